"""The README's demo: ``cd example_project && scrapy crawl demo`` really works, and the
disabled variant really freezes and is stopped by its outer bound.

Each crawl runs as the user would run it (``scrapy crawl`` in a child process, from the
project folder, with no database configured so the embedded server path is exercised),
under a time bound that kills it, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "example_project"
HARD_BOUND_EXIT = 3  # antideadlock_demo.testbed.HARD_BOUND_EXIT

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ANTIDEADLOCK_PG_DSN", None)  # the fresh-machine path: embedded PostgreSQL
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class _Crawl:
    """A ``scrapy crawl`` child; a thread collects its output and the moment it exited."""

    def __init__(self, project: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "scrapy", "crawl", *args]
        self.started = time.monotonic()
        self.popen = subprocess.Popen(cmd, cwd=project, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        self.output = ""
        self.ended: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        self.output = self.popen.stdout.read()
        self.popen.wait()
        self.ended = time.monotonic()

    def finish(self, bound: float) -> tuple[int, str, float]:
        """(exit status, log, seconds it ran); kill it and fail past ``bound`` seconds."""
        self._reader.join(max(1.0, bound - (time.monotonic() - self.started)))
        if self.ended is None:
            self.kill()
            self._reader.join(10)
            pytest.fail(f"crawl {self.popen.args[3:]} still running after {bound} s (killed); "
                        f"log tail:\n{self.output[-4000:]}")
        return self.popen.returncode, self.output, self.ended - self.started


@pytest.fixture
def crawl(tmp_path: Path) -> Iterator[Callable[..., _Crawl]]:
    """Start ``scrapy crawl <args>``; whatever still runs at teardown is killed.

    The crawls run in a copy of the project: its ``.state/`` files (quarantine, dead
    letters, heartbeats) are then this test's own, not shared with a test running the
    demo at the same time on another xdist worker, nor left over from an earlier run.
    """
    project = tmp_path / "example_project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns(
        ".state", ".pg", ".scrapy", "__pycache__"))
    started: list[_Crawl] = []

    def start(*args: str) -> _Crawl:
        started.append(_Crawl(project, *args))
        return started[-1]

    yield start
    for child in started:
        child.kill()


def _dumped_stats(log: str) -> dict[str, str]:
    """``name -> value text`` of the "Dumping Scrapy stats" block."""
    _, _, dump = log.partition("Dumping Scrapy stats:")
    return dict(re.findall(r"^[{ ]'([^']+)': (.+?),?$", dump, flags=re.M))


def test_demo_finishes_and_plain_variant_freezes_until_its_bound(
        crawl: Callable[..., _Crawl]) -> None:
    # Both crawls at once: same spider, same site recipe, pack on vs off.
    protected = crawl("demo")
    bounds = ("-s", "ANTIDEADLOCK_ENABLED=0", "-s", "DEMO_PLAIN_CLOSESPIDER_TIMEOUT=10",
              "-s", "DEMO_PLAIN_HARD_TIMEOUT=20")
    plain = crawl("demo", *bounds)
    plain_proxies = crawl("proxies", *bounds)  # a black-hole proxy in a round-robin pool

    code, log, elapsed = protected.finish(110)
    tail = log[-3000:]
    assert code == 0, tail
    assert "Spider closed (finished)" in log, tail
    stats = _dumped_stats(log)
    assert stats, f"no stats dump:\n{tail}"
    assert stats.get("finish_reason") == "'finished'", tail
    # The 3 % of item pages that hang were cut by their deadline (or by the watchdog's
    # recovery), not by DOWNLOAD_TIMEOUT, and finally given up or quarantined.
    cut = (int(stats.get("antideadlock/deadline/exceeded", 0))
           + int(stats.get("antideadlock/watchdog/cancelled", 0)))
    assert cut >= 3, tail
    given_up = (int(stats.get("antideadlock/deadline/gave_up", 0))
                + int(stats.get("antideadlock/watchdog/quarantined", 0)))
    assert given_up >= 3, tail
    items = int(stats["item_scraped_count"])
    assert items >= 70, tail
    # Every item reached the (embedded) PostgreSQL before the close.
    assert int(stats.get("antideadlock/pg/rows_upserted", 0)) == items, tail
    assert "antideadlock health:" in log, "no periodic health line from the watchdog"
    assert elapsed < 90, f"demo took {elapsed:.0f} s"

    for crawl in (plain, plain_proxies):
        code, log, elapsed = crawl.finish(60)
        tail = log[-3000:]
        assert code == HARD_BOUND_EXIT, tail
        assert "Closing spider (closespider_timeout)" in log, tail  # Scrapy's bound: a close
        assert "Dumping Scrapy stats" not in log, tail  # ... that never finished
        assert "demo outer bound" in log, tail
        assert "'antideadlock/" not in log, tail  # the pack really was off: none of its stats
        assert "(at 0 pages/min)" in log, tail  # the user saw the freeze
        assert elapsed < 50, f"plain crawl stopped only after {elapsed:.0f} s"


def test_contention_spiders_finish_with_the_pack(crawl: Callable[..., _Crawl]) -> None:
    """Proxy slots, a blocked loop, a small DB pool, shared dead-letter files, browser pages."""
    runs = {name: crawl(name) for name in ("proxies", "blocking", "db_pool", "filelocks",
                                            "browser")}
    results = {name: run.finish(110) for name, run in runs.items()}
    for name, (code, log, _) in results.items():
        assert code == 0, f"{name}:\n{log[-3000:]}"
        assert "Spider closed (finished)" in log, f"{name}:\n{log[-3000:]}"

    log = results["proxies"][1]
    stats = _dumped_stats(log)
    assert int(stats["item_scraped_count"]) == 50, log[-3000:]  # the black hole cost nothing
    assert int(stats.get("antideadlock/proxy/failures", 0)) >= 1, log[-3000:]
    assert stats["antideadlock/proxy/leases_acquired"] == stats[
        "antideadlock/proxy/leases_released"], log[-3000:]

    log = results["blocking"][1]
    stats = _dumped_stats(log)
    assert int(stats.get("antideadlock/watchdog/stalls/blocked_loop", 0)) == 1, log[-3000:]
    assert "class=blocked_loop" in log and "in parse_item" in log, log[-3000:]  # stack shown
    assert int(stats["item_scraped_count"]) == 40, log[-3000:]

    log = results["db_pool"][1]
    stats = _dumped_stats(log)
    assert int(stats["item_scraped_count"]) == 1200, log[-3000:]
    assert int(stats.get("antideadlock/pg/deadlocks", 0)) == 0, log[-3000:]
    assert int(stats.get("antideadlock/pg/dead_lettered", 0)) == 0, log[-3000:]

    log = results["filelocks"][1]
    stats = _dumped_stats(log)
    assert stats.get("demo/filelocks/peer_exit_code") == "0", log[-3000:]
    # 10 keyless items from each of the two crawls, every line whole.
    assert stats.get("demo/filelocks/deadletter_records_added") == "20", log[-3000:]
    assert stats.get("demo/filelocks/deadletter_torn_lines") == "0", log[-3000:]

    log = results["browser"][1]
    stats = _dumped_stats(log)
    assert int(stats["item_scraped_count"]) == 16, log[-3000:]  # 8 of 24 callbacks raise
    # The 8 pages those callbacks left open were closed by the handler (stock
    # scrapy-playwright keeps them, and with 4 pages per context the crawl freezes).
    closed = stats.get("antideadlock/playwright/pages/force_closed/after_callback")
    assert closed == "8", log[-3000:]
    opened = stats["antideadlock/playwright/pages/opened"]
    assert stats.get("antideadlock/playwright/pages/closed") == opened, log[-3000:]


def test_version_metadata_and_changelog_agree() -> None:
    import importlib.metadata

    import scrapy_antideadlock

    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert found is not None
    declared = found[1]
    assert scrapy_antideadlock.__version__ == declared
    top = re.search(r"^## \[(\d[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert top is not None and top[1] == declared, "CHANGELOG's newest entry is not the version"
    try:
        installed = importlib.metadata.version("scrapy-antideadlock")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout, not installed
        return
    assert installed == declared, "reinstall: pip install -e ."


def test_stats_named_by_these_tests_and_the_project_are_declared() -> None:
    """A misspelt stat here would make ``stats.get(name, 0) == 0`` pass vacuously."""
    from scrapy_antideadlock.stats import is_declared

    texts = [Path(__file__).read_text()]
    texts += [p.read_text() for p in (PROJECT / "antideadlock_demo").rglob("*.py")]
    names = {m for text in texts for m in re.findall(r"antideadlock/[a-z_]+/[a-z0-9_/]+", text)}
    assert len(names) >= 10
    undeclared = sorted(name for name in names if not is_declared(name.rstrip("/")))
    assert not undeclared, undeclared
