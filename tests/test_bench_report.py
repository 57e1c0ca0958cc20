"""bench.report measures one commit: it refuses a dirty tree and never mixes in a log of
another commit (not in REPORT.md, not in results.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import report

LOG = """# commit {commit}
# started 2026-11-30 12:00 UTC, load 1.00 / 2.00 / 3.00
RESULT overhead.cpu_ratio {value} ratio # add-on / plain
# ended 2026-11-30 12:02 UTC, load 4.00 / 5.00 / 6.00, ok in 120 s
"""


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "RESULTS_FILE", tmp_path / "results.json")
    return tmp_path


def test_a_log_says_what_commit_and_load_it_measured(results: Path) -> None:
    log = results / "overhead.log"
    log.write_text(LOG.format(commit="abc1234", value=1.02))
    run = report.read_log("overhead", log, "ok", 120.0)
    assert run.commit == "abc1234"
    assert run.load == "1.00 / 2.00 / 3.00 — 4.00 / 5.00 / 6.00"
    assert [(f.name, f.value) for f in run.figures] == [("overhead.cpu_ratio", 1.02)]


def test_a_log_of_another_commit_is_left_out_of_report_and_results(results: Path) -> None:
    (results / "overhead.log").write_text(LOG.format(commit="old0000", value=1.5))
    (results / "broad.log").write_text(LOG.format(commit="new1111", value=9.9).replace(
        "overhead.cpu_ratio", "broad.wall_ratio"))
    runs = {b: report.read_log(b, results / f"{b}.log", "ok", 1.0)
            for b in ("overhead", "broad")}
    text = report.write_report(runs, [("date (UTC)", "now")], 0.0, "new1111").read_text()
    assert "Commit measured: new1111" in text
    assert "1.5" not in text  # the old commit's figure is nowhere
    assert "**left out** (log of commit old0000, not new1111)" in text
    data = json.loads(report.write_results(runs, [], "new1111").read_text())
    assert set(data["figures"]) == {"broad.wall_ratio"}
    assert data["benches"]["overhead"]["status"] == "left out: log of commit old0000"
    assert data["benches"]["broad"]["load"] == "1.00 / 2.00 / 3.00 — 4.00 / 5.00 / 6.00"


def test_a_dirty_tree_is_refused_unless_allowed(results: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "git_commit", lambda: "abc1234 + uncommitted changes")
    ran: list[str] = []
    monkeypatch.setattr(report, "run_bench", lambda bench, bound, commit: ran.append(bench))
    monkeypatch.setattr(sys, "argv", ["bench.report", "--only", "overhead"])
    with pytest.raises(SystemExit) as exc:
        report.main()
    assert exc.value.code == 2 and ran == []
