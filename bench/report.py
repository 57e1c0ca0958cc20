"""One command for every benchmark, from one commit: ``python -m bench.report``.

Runs each ``bench/<name>.py`` (overhead, broad, tail, hang_rate, pipeline, ..., and any
other bench module) as ``python -m bench.<name>`` in its own process group, one after
the other, each under a time bound; keeps its output in ``bench/results/<name>.log``
(headed by the commit and the load average); collects its ``RESULT <name> <value> <unit>
[# note]`` lines (see bench/README.md); and writes ``bench/results/REPORT.md`` (the
headline ratios, every figure, the status of each benchmark — a missing or failed one is
reported as such, never filled in — the commit and the machine) and
``bench/results/results.json``, then rewrites the README/docs figure blocks from it.
A tree with uncommitted changes is refused (``--allow-dirty`` flags it instead), and a
log of another commit never contributes a figure. ``bench.timeline`` draws
``bench/results/hang_rate.png``.

    python -m bench.report [--only a,b] [--skip a,b] [--bound SECONDS] [--reuse-logs]
    python -m bench.report --report-only     # rewrite REPORT.md from the logs, run nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._machine import dirty, git_commit, load, machine, now, same_code

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

#: Benchmarks in run order (the issues' headline figures); others found in bench/ follow.
KNOWN = ["overhead", "instructions", "broad", "tail", "hang_rate", "pipeline", "pipeline_crawl", "detect",
         "playwright", "recovery", "timeline", "diagnose", "fleet"]
#: Benchmarks that need more than ``--bound`` (a multiple of it): instructions runs 34
#: crawls under valgrind, 40 s to 2.5 min each depending on how busy this VM is.
LONGER = {"instructions": 3.0}
#: Modules in bench/ that are not benchmarks.
NOT_BENCHES = {"__init__", "__main__", "common", "report", "pngplot", "figures"}
#: Every figure of one invocation, from one commit: what README/docs figures are made from.
RESULTS_FILE = RESULTS / "results.json"

RESULT_RE = re.compile(
    r"^RESULT\s+(?P<name>[a-z0-9_.]+)\s+(?P<value>\S+)\s+(?P<unit>\S+)\s*(?:#\s*(?P<note>.*))?$")

#: Summary lines of benchmarks written before the RESULT convention: (bench, regex, name,
#: unit, note). A RESULT line of the same name wins.
LEGACY_PATTERNS: list[tuple[str, str, str, str, str]] = [
    ("pipeline", r"^\(c\)/\(a\)\s*=\s*([0-9.]+)x", "pipeline.vs_naive", "x",
     "pack pipeline / naive per-item autocommit upserts"),
    ("pipeline", r"^\(c\)/\(b\)\s*=\s*([0-9.]+)x", "pipeline.vs_naive_batches", "x",
     "pack pipeline / naive unsorted batches"),
    ("pipeline", r"^\(c\)/\(d\)\s*=\s*([0-9.]+)", "pipeline.vs_copy", "ratio",
     "pack pipeline / plain COPY into an empty table"),
    ("pipeline", r"^deadlocks in \(c\):\s*([0-9]+)", "pipeline.deadlocks", "count",
     "deadlocks seen by the pack pipeline"),
    ("pipeline", r"^\(e\)/\(d\)\s*=\s*([0-9.]+)", "pipeline.buffered_vs_copy", "ratio",
     "pack pipeline in buffered mode / plain COPY"),
    ("pipeline", r"^\(f\)/\(d\)\s*=\s*([0-9.]+)", "pipeline.write_path_vs_copy", "ratio",
     "pack pipeline's database side alone (5 000-row batches) / plain COPY"),
]

#: Headline rows: (label, figure name or prefix ending in "*", what "good" looks like).
HEADLINES: list[tuple[str, str, str]] = [
    ("Overhead: CPU, full add-on / plain (5 000 pages)", "overhead.cpu_ratio", "<= 1.03"),
    ("Overhead: CPU, plain / plain by the same method (bias)", "overhead.cpu_ratio_aa", "1"),
    ("Overhead: wall, full add-on / plain (5 000 pages)", "overhead.wall_ratio", "<= 1.03"),
    ("Overhead: instructions per request, add-on / plain (valgrind, upper bound)",
     "instructions.ratio", "<= 1.03"),
    ("Overhead: instructions per request the deadline adds, % of plain",
     "instructions.deadline_share", "—"),
    ("Overhead: instructions per request the journal adds, % of plain",
     "instructions.journal_share", "—"),
    ("Overhead: instructions per request the lifecycle adds, % of plain",
     "instructions.lifecycle_share", "—"),
    ("Overhead: instructions per request the watchdog adds, % of plain",
     "instructions.watchdog_share", "—"),
    ("Overhead: instructions per request the recovery adds, % of plain",
     "instructions.recovery_share", "—"),
    ("Broad crawl: wall, add-on / plain", "broad.wall_ratio", "<= 1.05"),
    ("Broad crawl: peak RSS added", "broad.rss_added_mb", "<= 10 MB"),
    ("1 % hangs: time to finish / fault-free, add-on", "tail.hang_addon_finish_ratio",
     "<= 1.25"),
    ("1 % hangs: items/s until 95 % / fault-free, add-on", "tail.hang_addon_rate_ratio",
     ">= 0.95"),
    ("10 % hang storm: items/s / fault-free, add-on", "tail.storm_addon_rate_ratio", ">= 0.7"),
    ("10 % hang storm: items lost, add-on", "tail.storm_addon_lost", "0"),
    ("Pipeline crawl: items/min vs a JSON Lines feed", "pipeline_crawl.vs_feed", ">= 0.97"),
    ("Pipeline crawl: rows per commit at 16 concurrent", "pipeline_crawl.rows_per_commit",
     "—"),
    ("1 % hang rate: throughput retained, plain DOWNLOAD_TIMEOUT=3",
     "hang_rate.retained_plain_t3s", "—"),
    ("1 % hang rate: throughput retained, plain DOWNLOAD_TIMEOUT=10",
     "hang_rate.retained_plain_t10s", "—"),
    ("1 % hang rate: throughput retained, with the pack", "hang_rate.retained_pack", ">= 0.95"),
    ("Pipeline vs naive per-item upserts (same item count)", "pipeline.vs_naive", "> 1x"),
    ("Pipeline vs naive unsorted batches", "pipeline.vs_naive_batches", "> 1x"),
    ("Pipeline vs plain COPY (ceiling)", "pipeline.vs_copy", ">= 0.4"),
    ("Pipeline deadlocks under contention", "pipeline.deadlocks", "0"),
    ("Stall detection latency, watchdog", "detect.latency_*", "about the window W"),
    ("Stall detection latency, CLOSESPIDER_TIMEOUT_NO_ITEM (-1 = never)", "detect.builtin_*",
     "—"),
    ("Watchdog CPU, share of the crawl's", "detect.own_cpu_share", "small"),
    ("Playwright pages leaked (callbacks raise), stock handler",
     "playwright.leaked_pages_plain", "—"),
    ("Playwright pages leaked (callbacks raise), safe handler",
     "playwright.leaked_pages_pack", "0"),
    ("Playwright crawls finished (share of rounds), stock handler",
     "playwright.completed_plain", "—"),
    ("Playwright crawls finished (share of rounds), full add-on",
     "playwright.completed_pack", "1"),
    ("Playwright pages/min, safe / stock handler", "playwright.throughput_ratio", "close to 1"),
    ("Items lost after SIGKILL + resume, pack + journal", "recovery.sigkill_lost_pack", "0"),
    ("Items lost after SIGKILL + resume, plain JOBDIR", "recovery.sigkill_lost_plain", "—"),
    ("Reachable items lost in a 10 % hang storm (equal limits)", "recovery.storm_lost_*",
     "0 for the pack"),
    ("10 % hang storm: wall time to finish or the limit", "recovery.storm_wall_*", "—"),
    ("10 % hang storm: reachable items/min / fault-free", "recovery.storm_retained_*", "—"),
    ("Journal overhead (crawl time with / without)", "recovery.journal_overhead",
     "close to 1"),
    ("Timeline (60 s, 1 % of URLs hang): items", "timeline.items_*", "most for the pack"),
    ("Timeline: items/min in the 2nd half", "timeline.rate_late_*", "> 0"),
    ("Fleet (4 workers, one SIGKILLed): items lost", "fleet.lost_*", "0 for fleet"),
    ("Fleet: items/min", "fleet.items_per_min_*", "—"),
]


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    note: str
    bench: str


@dataclass
class Run:
    bench: str
    status: str  # ok | failed (exit N) | timed out | missing | skipped
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    log: Path | None = None
    commit: str = "unknown"  # the commit its log says it measured
    load: str = "n/a"  # load average (1/5/15 min) at its start and end

    def of(self, commit: str) -> bool:
        """Whether this run measured ``commit``'s code (a log of other code never counts)."""
        return same_code(self.commit, commit)


def discover() -> list[str]:
    present = sorted(p.stem for p in BENCH.glob("*.py")
                     if p.stem not in NOT_BENCHES and not p.stem.startswith("_"))
    return [b for b in KNOWN if b in present] + [b for b in present if b not in KNOWN]


def parse(bench: str, output: str) -> list[Figure]:
    """The RESULT lines of ``output``, plus legacy summary lines not given as RESULT."""
    figures: dict[str, Figure] = {}
    for line in output.splitlines():
        match = RESULT_RE.match(line.strip())
        if not match:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        figures[match["name"]] = Figure(match["name"], value, match["unit"],
                                        (match["note"] or "").strip(), bench)
    if bench == "playwright" and not figures:  # only for a version without RESULT lines
        for fig in _playwright_rows(output):
            figures.setdefault(fig.name, fig)
    for owner, pattern, name, unit, note in LEGACY_PATTERNS:
        if owner != bench or name in figures:
            continue
        for line in output.splitlines():
            match = re.match(pattern, line.strip())
            if match:
                figures[name] = Figure(name, float(match[1]), unit, note + " (summary line)",
                                       bench)
    return list(figures.values())


def _playwright_rows(output: str) -> list[Figure]:
    """Figures from bench.playwright's JSON rows (it prints no RESULT lines yet)."""
    out: list[Figure] = []
    side = {"stock": "plain", "safe": "pack"}
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
            scenario, handler = row["scenario"], side[row["handler"]]
        except (ValueError, KeyError, TypeError):
            continue
        what = f"{row['handler']} handler, scenario {scenario!r} (JSON row)"
        out.append(Figure(f"playwright.completed_{scenario}_{handler}",
                          1.0 if row.get("finished") else 0.0, "count",
                          f"1 = crawl finished, 0 = hung until its bound; {what}", "playwright"))
        if scenario == "raise" and row.get("open_pages_at_end") is not None:
            out.append(Figure(f"playwright.leaked_pages_{handler}",
                              float(row["open_pages_at_end"]), "count",
                              f"pages open in the browser at the end; {what}", "playwright"))
        if scenario == "contexts" and row.get("open_contexts_at_end") is not None:
            out.append(Figure(f"playwright.leaked_contexts_{handler}",
                              float(row["open_contexts_at_end"]), "count",
                              f"contexts open in the browser at the end; {what}", "playwright"))
    return out


def run_bench(bench: str, bound: float, commit: str) -> Run:
    """``python -m bench.<bench>`` under ``bound`` seconds (its whole process group).

    Its log starts with ``# commit <commit>`` and the load average, and ends with the load
    average, so a log read back later says what it measured and how busy the machine was."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"{bench}.log"
    env = dict(os.environ, BENCH_REPORT="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    began = time.monotonic()
    load_start = load()
    print(f"== bench.{bench} (bound {bound:.0f} s, load {load_start}) ...", flush=True)
    with log.open("w") as out:
        out.write(f"# commit {commit}\n# started {now()} UTC, load {load_start}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", f"bench.{bench}"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(bound)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {bound:.0f} s"
    seconds = time.monotonic() - began
    with log.open("a") as out:
        out.write(f"# ended {now()} UTC, load {load()}, {status} in {seconds:.0f} s\n")
    run = read_log(bench, log, status, seconds)
    print(f"   {status} in {seconds:.0f} s, {len(run.figures)} figures", flush=True)
    for fig in run.figures:
        print(f"   {fig.name} = {fig.value:g} {fig.unit}", flush=True)
    return run


def read_log(bench: str, log: Path, status: str, seconds: float) -> Run:
    """A run as its log tells it: figures, the commit measured and the load around it."""
    text = log.read_text(errors="replace")
    head = dict(re.findall(r"^# (commit|started|ended) (.*)$", text, re.M))
    loads = [re.search(r"load ([0-9.]+ / [0-9.]+ / [0-9.]+)", head.get(k, ""))
             for k in ("started", "ended")]
    load = " — ".join(m[1] for m in loads if m) or "n/a"
    return Run(bench, status, seconds, parse(bench, text), log,
               head.get("commit", "unknown").strip(), load)

# --------------------------------------------------------------------------- report


def _fmt(fig: Figure) -> str:
    if math.isnan(fig.value):
        return "n/a"
    if fig.unit == "s" and fig.value == -1:  # convention of bench.detect: never fired
        return "never"
    if fig.unit == "count" or fig.value == int(fig.value) and abs(fig.value) >= 100:
        text = f"{fig.value:,.0f}"
    elif abs(fig.value) >= 100:
        text = f"{fig.value:,.0f}"
    else:
        text = f"{fig.value:.3g}"
    return {"x": f"{text}×", "ratio": text, "count": text}.get(fig.unit, f"{text} {fig.unit}")


def _status_of(bench: str, runs: dict[str, Run], commit: str = "") -> str:
    run = runs.get(bench)
    if run is None:
        return f"**missing** (no bench/{bench}.py)" if bench not in discover() else "not run"
    if commit and not run.of(commit):
        return f"left out: its log measured commit {run.commit}"
    if run.status.startswith("ok"):
        return "not reported (bench ran, printed no such figure)"
    return f"**{run.status}** (see `{bench}.log`)"


def write_report(runs: dict[str, Run], machine_rows: list[tuple[str, str]],
                 total: float, commit: str) -> Path:
    """REPORT.md from the runs of ``commit`` only; a log of another commit is listed as left
    out, and none of its figures is shown."""
    figures = {fig.name: fig for run in runs.values() if run.of(commit) for fig in run.figures}
    when = (f"in {total / 60:.1f} min" if total > 0
            else "from the logs of earlier runs (`--report-only`)")
    others = sorted(b for b, run in runs.items() if not run.of(commit))
    lines = ["# Benchmark report", "",
             f"**Commit measured: {commit}**"
             + (" (**not a clean tree**: figures of code no commit holds)" if dirty(commit)
                else "") + ".", "",
             f"Written by `python -m bench.report` {when} on the machine below. "
             "Every figure is read from the benchmark's own output (`RESULT` lines, see "
             "bench/README.md); a benchmark that is missing, failed or timed out is shown as "
             "such, never estimated. Only logs of this commit count"
             + (f"; left out, logs of another commit: {', '.join(others)}" if others else "")
             + ".", "",
             "## Headline figures", "",
             "| figure | value | target | what was compared | bench |",
             "|---|---|---|---|---|"]
    for label, name, target in HEADLINES:
        bench = name.split(".", 1)[0]
        if name.endswith("*"):
            matches = sorted(n for n in figures if n.startswith(name[:-1]))
            for n in matches:
                fig = figures[n]
                cls = n[len(name) - 1:]
                lines.append(f"| {label}: {cls} | {_fmt(fig)} | {target} | {fig.note} | {bench} |")
            if not matches:
                lines.append(f"| {label} | — | {target} | {_status_of(bench, runs, commit)} "
                             f"| {bench} |")
            continue
        fig = figures.get(name)
        if fig is None:
            lines.append(f"| {label} | — | {target} | {_status_of(bench, runs, commit)} "
                         f"| {bench} |")
        else:
            lines.append(f"| {label} | {_fmt(fig)} | {target} | {fig.note} | {bench} |")
    lines += ["", "## Items/min over time under a 1 % hang rate", ""]
    if (RESULTS / "hang_rate.png").exists() and "timeline" in runs \
            and runs["timeline"].status.startswith("ok") and runs["timeline"].of(commit):
        lines += ["![items/min over time, plain Scrapy vs the pack, 1 % of item URLs hang]"
                  "(hang_rate.png)", "",
                  "Fault site with log-normal latency (median 100 ms), 1 % of item URLs never "
                  "answer; CONCURRENT_REQUESTS = 16; each crawl 60 s in its own process: "
                  "plain Scrapy with DOWNLOAD_TIMEOUT 3 s and 10 s, and the full add-on. "
                  "Data: `timeline.csv`."]
    else:
        lines.append(f"Not drawn this run: {_status_of('timeline', runs, commit)}.")
    lines += ["", "## All figures", "", "| name | value | unit | note |", "|---|---|---|---|"]
    for name in sorted(figures):
        fig = figures[name]
        lines.append(f"| `{name}` | {fig.value:g} | {fig.unit} | {fig.note} |")
    lines += ["", "## Benchmarks run", "",
              "| bench | status | duration | commit | load average at start — end | log |",
              "|---|---|---|---|---|---|"]
    for bench in KNOWN + [b for b in runs if b not in KNOWN]:
        run = runs.get(bench)
        if run is None:
            state = "missing (no module)" if bench not in discover() else "not run (--only/--skip)"
            lines.append(f"| {bench} | {state} | — | — | — | — |")
        else:
            log = f"[{run.log.name}]({run.log.name})" if run.log else "—"
            took = "—" if math.isnan(run.seconds) else f"{run.seconds:.0f} s"
            state = run.status if run.of(commit) else \
                f"**left out** (log of commit {run.commit}, not {commit})"
            lines.append(f"| {bench} | {state} | {took} | {run.commit} | {run.load} | {log} |")
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine_rows]
    lines += ["", "The machine is shared: other processes were running; the load average "
              "above says how busy it was. Ratios measured in one invocation (plain and pack "
              "alternating) are more trustworthy than absolute rates.", ""]
    out = RESULTS / "REPORT.md"
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated benches to run")
    parser.add_argument("--skip", default="", help="comma-separated benches not to run")
    parser.add_argument("--bound", type=float, default=900.0, help="seconds per benchmark")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite REPORT.md from the logs in bench/results")
    parser.add_argument("--reuse-logs", action="store_true",
                        help="for benches not run now, read their figures from the log of "
                             "their last run in bench/results, if it measured this same "
                             "commit (a log of another commit is listed as left out)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="measure a tree with uncommitted changes (flagged in the report; "
                             "its figures match no commit)")
    parser.add_argument("--no-figures", action="store_true",
                        help="do not rewrite the README/docs figure blocks (bench.figures)")
    args = parser.parse_args()
    only = {b for b in args.only.split(",") if b}
    skip = {b for b in args.skip.split(",") if b}
    benches = [b for b in discover() if (not only or b in only) and b not in skip]
    if args.report_only:
        benches, args.reuse_logs = [], True
    unknown = only - set(discover())
    if unknown:
        parser.error(f"no such benchmark: {', '.join(sorted(unknown))} (have {discover()})")
    commit = git_commit()  # the commit measured: later commits must not relabel it
    if benches and dirty(commit) and not args.allow_dirty:
        parser.error(f"the tree has uncommitted changes ({commit}): commit them first, so "
                     "every figure names the code it measured (or pass --allow-dirty)")
    began = time.monotonic()
    load_start = load()
    runs = {bench: run_bench(bench, args.bound * LONGER.get(bench, 1.0), commit)
            for bench in benches}
    if args.reuse_logs:
        for bench in discover():
            log = RESULTS / f"{bench}.log"
            if bench not in runs and log.exists():
                when = dt.datetime.fromtimestamp(log.stat().st_mtime, dt.timezone.utc)
                runs[bench] = read_log(bench, log, f"ok (log of an earlier run, "
                                                   f"{when:%Y-%m-%d %H:%M} UTC)", float("nan"))
    if not benches and runs:  # --report-only: the commit of the newest log
        commit = max((r for r in runs.values() if r.log),
                     key=lambda r: r.log.stat().st_mtime).commit
    for run in runs.values():
        if not run.of(commit):
            print(f"left out: bench.{run.bench}'s log measured commit {run.commit}, "
                  f"not {commit}", flush=True)
    total = time.monotonic() - began if benches else 0.0
    loads = (load_start, load()) if benches else ("n/a", "n/a (nothing run)")
    rows = machine(*loads, commit)
    print(f"wrote {write_report(runs, rows, total, commit)}")
    if runs:
        print(f"wrote {write_results(runs, rows, commit)}")
        if not args.no_figures:
            from . import figures

            print("README/docs figure blocks rewritten:", ", ".join(figures.write()) or "none")


def write_results(runs: dict[str, Run], machine_rows: list[tuple[str, str]],
                  commit: str | None = None) -> Path:
    """``results.json``: the figures of one commit only (the one measured now, or with
    ``--report-only`` the newest log's); a log of another commit is left out and listed as
    such, so no figure mixes commits."""
    commit = commit or git_commit()
    figures: dict[str, dict] = {}
    benches: dict[str, dict] = {}
    for bench, run in runs.items():
        if not run.of(commit):
            benches[bench] = {"status": f"left out: log of commit {run.commit}"}
            continue
        seconds = None if math.isnan(run.seconds) else round(run.seconds, 1)
        benches[bench] = {"status": run.status, "seconds": seconds, "load": run.load}
        for fig in run.figures:
            figures[fig.name] = {"value": fig.value, "unit": fig.unit, "note": fig.note,
                                 "bench": bench}
    data = {"commit": commit, "dirty": dirty(commit), "machine": dict(machine_rows),
            "benches": benches, "figures": figures}
    RESULTS_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return RESULTS_FILE


if __name__ == "__main__":
    main()
