"""Benchmark figures in README.md and docs/*.md, generated from ``bench/results/results.json``.

Like the settings tables: a block between ``<!-- bench-figures:begin NAME -->`` and
``<!-- bench-figures:end NAME -->`` is written from the results file of one
``python -m bench.report`` invocation (one commit), never typed by hand, and
``tests/test_bench_figures.py`` checks that every block agrees with the file.

    python -m bench.figures --write     # rewrite every block from results.json
    python -m bench.figures --check     # exit 1 and name the blocks that disagree
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "bench" / "results" / "results.json"
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: bench.recovery's storm sides: (figure suffix, what the row says).
STORM_SIDES = [("pack", "add-on + journal"), ("plain_t3s", "plain DOWNLOAD_TIMEOUT=3"),
               ("plain_t10s", "plain DOWNLOAD_TIMEOUT=10"),
               ("plain_no_item_10s", "plain CLOSESPIDER_TIMEOUT_NO_ITEM=10")]

#: block name -> rows (label, figure name, target). A missing figure shows as "not measured".
BLOCKS: dict[str, list[tuple[str, str, str]]] = {
    "headline": [
        ("CPU, full add-on / plain Scrapy, fault-free 5 000 pages (concurrent pinned pairs)",
         "overhead.cpu_ratio", "<= 1.03"),
        ("same method, plain / plain (the method's own bias)", "overhead.cpu_ratio_aa", "1"),
        ("CPU, same crawls in sequential pairs", "overhead.cpu_ratio_sequential", "—"),
        ("wall time, sequential pairs", "overhead.wall_ratio", "<= 1.03"),
        ("wall time, concurrent pinned pairs", "overhead.wall_ratio_side_by_side", "<= 1.03"),
        ("instructions per request, full add-on / plain (valgrind; an upper bound)",
         "instructions.ratio", "<= 1.03"),
        ("broad crawl (one request per host): wall, add-on / plain", "broad.wall_ratio",
         "<= 1.05"),
        ("broad crawl: peak RSS added by the add-on", "broad.rss_added_mb", "<= 10 MB"),
        ("1 % of requests hang: time to finish / fault-free (add-on)",
         "tail.hang_addon_finish_ratio", "<= 1.25"),
        ("same: time to finish / fault-free, plain DOWNLOAD_TIMEOUT=3",
         "tail.hang_plain_t3s_finish_ratio", "—"),
        ("same: time to finish / fault-free, plain DOWNLOAD_TIMEOUT=10",
         "tail.hang_plain_t10s_finish_ratio", "—"),
        ("1 % hang: items/s until 95 % / fault-free (add-on)", "tail.hang_addon_rate_ratio",
         ">= 0.95"),
        ("10 % hang storm: items/s until 95 % / fault-free (add-on)",
         "tail.storm_addon_rate_ratio", ">= 0.7"),
        ("10 % hang storm: items lost (add-on)", "tail.storm_addon_lost", "0"),
        ("pipeline crawl: items/min, PostgreSQL commit mode / JSON Lines feed",
         "pipeline_crawl.vs_feed", ">= 0.97"),
        ("pipeline crawl: rows per commit at 16 concurrent requests",
         "pipeline_crawl.rows_per_commit", "—"),
        ("browser pages leaked when callbacks raise, safe handler",
         "playwright.leaked_pages_pack", "0"),
        ("items lost after SIGKILL + resume, pack + journal", "recovery.sigkill_lost_pack",
         "0"),
        ("items lost after SIGKILL + resume, plain JOBDIR", "recovery.sigkill_lost_plain", "—"),
    ],
    "downloader": [
        ("1 % hang: time to finish / fault-free (add-on)", "tail.hang_addon_finish_ratio",
         "<= 1.25"),
        ("1 % hang: items/s until 95 % / fault-free (add-on)", "tail.hang_addon_rate_ratio",
         ">= 0.95"),
        ("1 % hang: time to finish / fault-free, plain DOWNLOAD_TIMEOUT=3",
         "tail.hang_plain_t3s_finish_ratio", "—"),
        ("1 % hang: time to finish / fault-free, plain DOWNLOAD_TIMEOUT=10",
         "tail.hang_plain_t10s_finish_ratio", "—"),
        ("1 % hang: time to finish / fault-free, plain + CLOSESPIDER_TIMEOUT_NO_ITEM",
         "tail.hang_plain_no_item_10s_finish_ratio", "—"),
        ("1 % hang: items lost, plain + CLOSESPIDER_TIMEOUT_NO_ITEM",
         "tail.hang_plain_no_item_10s_lost", "—"),
        ("guard CPU per download (no network), Scrapy's handler", "overhead.guard_us_per_request",
         "small"),
        ("guard CPU per download (no network), a user's handler",
         "overhead.guard_us_per_request_task", "small"),
    ],
    "pipeline": [
        ("pack engine / naive per-item autocommit (4 writers, same item count)",
         "pipeline.vs_naive", "> 1x"),
        ("pack engine / naive unsorted batches", "pipeline.vs_naive_batches", "> 1x"),
        ("deadlocks, naive unsorted batches", "pipeline.naive_batches_deadlocks", "—"),
        ("deadlocks, pack engine", "pipeline.deadlocks", "0"),
        ("pack engine / plain COPY (ceiling)", "pipeline.vs_copy", "—"),
        ("crawl items/min, pipeline / JSON Lines feed", "pipeline_crawl.vs_feed", ">= 0.97"),
        ("rows per commit at 16 concurrent requests", "pipeline_crawl.rows_per_commit", "—"),
    ],
    "recovery": [
        ("items lost after SIGKILL + resume, pack + journal", "recovery.sigkill_lost_pack",
         "0"),
        ("items lost after SIGKILL + resume, plain JOBDIR", "recovery.sigkill_lost_plain", "—"),
        *[(f"10 % hang storm, {what}: reachable items lost", f"recovery.storm_lost_{side}",
           "0" if side == "pack" else "—") for side, what in STORM_SIDES],
        *[(f"10 % hang storm, {what}: wall time (finished, or the limit)",
           f"recovery.storm_wall_{side}", "—") for side, what in STORM_SIDES],
        ("journal overhead (crawl time with / without)", "recovery.journal_overhead",
         "close to 1"),
    ],
    "watchdog": [
        *[(f"{cls.replace('_', ' ')}: detected after, watchdog (W = 3 s)",
           f"detect.latency_{cls}", "about W")
          for cls in ("deadlock", "livelock", "stalled_io", "blocked_loop")],
        *[(f"{cls.replace('_', ' ')}: CLOSESPIDER_TIMEOUT_NO_ITEM = 3 fired after",
           f"detect.builtin_{cls}", "—")
          for cls in ("deadlock", "livelock", "stalled_io", "blocked_loop")],
        ("watchdog CPU, share of the crawl's", "detect.own_cpu_share", "small"),
        ("wall time with / without the watchdog", "detect.overhead_wall_ratio", "close to 1"),
    ],
    "diagnose": [
        *[(f"{name}: diagnosis to process exit", f"diagnose.{name}_end", "<= grace + close")
          for name in ("semaphore_hold_and_wait", "deferred_never_fires", "event_never_set",
                       "queue_join_dead_consumer", "future_from_later_callback",
                       "deferred_lock_twice", "sticky_proxy_pg", "thread_pool_starved",
                       "psycopg_row_lock", "consent_wall", "playwright_promise")],
        ("stall scenarios classified right", "diagnose.classified_right", "11"),
        ("items lost, all scenarios", "diagnose.lost_total", "0"),
    ],
    "fleet": [
        ("requests lost (one worker SIGKILLed), fleet mode", "fleet.lost_fleet", "0"),
        ("requests lost, without fleet mode", "fleet.lost_local", "—"),
        ("most transfers at one proxy (capacity 2), fleet mode", "fleet.max_per_proxy_fleet",
         "<= 2"),
        ("most transfers at one proxy, without fleet mode", "fleet.max_per_proxy_local", "—"),
        ("items/min, fleet mode", "fleet.items_per_min_fleet", "—"),
        ("items/min, without fleet mode", "fleet.items_per_min_local", "—"),
        ("fleet leases still live after their TTL", "fleet.leases_leaked", "0"),
        ("Redis round trips per response, fleet mode", "fleet.round_trips_per_request", "—"),
        ("added latency of one lease (acquire + release), Redis vs local",
         "fleet.lease_added_latency", "—"),
    ],
    "playwright": [
        ("pages left open (callbacks raise), plain Scrapy + stock handler",
         "playwright.leaked_pages_plain", "—"),
        ("pages left open (callbacks raise), full add-on + safe handler",
         "playwright.leaked_pages_pack", "0"),
        ("crawls finished within the window, stock (share of rounds)",
         "playwright.completed_plain", "—"),
        ("crawls finished within the window, add-on (share of rounds)",
         "playwright.completed_pack", "1"),
        ("pages/min, add-on / stock, over the pages both completed",
         "playwright.throughput_ratio", "close to 1"),
    ],
}

_BEGIN = re.compile(r"<!-- bench-figures:begin (?P<name>[a-z_]+) -->\n(?P<body>.*?)"
                    r"<!-- bench-figures:end (?P=name) -->", re.S)


def load(path: Path = RESULTS_FILE) -> dict[str, Any]:
    if not path.exists():
        return {"commit": "none", "machine": {}, "figures": {}}
    return json.loads(path.read_text())


def _value(fig: dict[str, Any]) -> str:
    value, unit = fig["value"], fig["unit"]
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    text = f"{value:,.0f}" if unit == "count" or abs(value) >= 100 else f"{value:.3g}"
    return {"x": f"{text}×", "ratio": text, "count": text}.get(unit, f"{text} {unit}")


def render(name: str, results: dict[str, Any]) -> str:
    """The body of block ``name`` from ``results``."""
    figures = results.get("figures", {})
    machine = results.get("machine", {})
    lines = ["| figure | measured | target | what was compared |", "|---|---|---|---|"]
    for label, key, target in BLOCKS[name]:
        fig = figures.get(key)
        if fig is None:
            lines.append(f"| {label} | not measured | {target} | `{key}` is not in the "
                         "results file |")
        else:
            lines.append(f"| {label} | {_value(fig)} | {target} | {fig['note']} |")
    when = machine.get("date (UTC)", "—")
    load_avg = machine.get("load average (1/5/15 min) at start / end", "—")
    lines += ["", f"Generated from `bench/results/results.json` (commit {results['commit']}, "
              f"{when} UTC, load average {load_avg} on a shared 2-core machine) by "
              "`python -m bench.figures --write`; rerun with `python -m bench.report`."]
    return "\n".join(lines) + "\n"


def _rewrite(text: str, results: dict[str, Any]) -> str:
    def block(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown bench-figures block {name!r}")
        return (f"<!-- bench-figures:begin {name} -->\n{render(name, results)}"
                f"<!-- bench-figures:end {name} -->")

    return _BEGIN.sub(block, text)


def stale(results: dict[str, Any] | None = None) -> list[str]:
    """Files whose blocks disagree with the results file."""
    results = load() if results is None else results
    return [str(p.relative_to(ROOT)) for p in FILES
            if p.exists() and _rewrite(p.read_text(), results) != p.read_text()]


def write(results: dict[str, Any] | None = None) -> list[str]:
    results = load() if results is None else results
    changed = []
    for path in FILES:
        if not path.exists():
            continue
        text = path.read_text()
        new = _rewrite(text, results)
        if new != text:
            path.write_text(new)
            changed.append(str(path.relative_to(ROOT)))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.write:
        print("rewrote:", ", ".join(write()) or "nothing")
    bad = stale()
    if bad:
        print("figures disagree with bench/results/results.json:", ", ".join(bad))
        sys.exit(1 if args.check else 0)


if __name__ == "__main__":
    main()
