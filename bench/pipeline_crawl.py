"""The pipeline as users run it: items/min of a crawl storing into PostgreSQL vs a feed.

A fault-free crawl of ``--pages`` listings x 100 detail pages (5 000 items), 16
concurrent, from a local fault site; both sides run the full add-on at its defaults.
One side writes the items to a JSON Lines feed (FEEDS), the other stores them with
PostgresUpsertPipeline in commit mode (``process_item`` returns once the row is
committed), default pipeline settings. A pair runs both sides at the same time, each
pinned to its own core (swapped every pair), so both see the same machine: this VM's
speed drifts too much between back-to-back runs for sequential pairs to resolve a few
percent. The figure is the median of the paired ratios of items/min (items over the
crawl's wall time). Rows per commit is the pipeline's group commit at this concurrency.

    python -m bench.pipeline_crawl [--pairs 7] [--pages 50] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from .common import ADDON_PACK, SiteProcess, load_line, run_side_by_side

BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}


def _table(dsn: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, name text, price text, "
                             "url text)").format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--pages", type=int, default=50, help="listings of 100 items")
    parser.add_argument("--dsn", default=None, help="default: the test bed's postgres_dsn()")
    args = parser.parse_args()
    if os.environ.get("BENCH_REPORT"):
        args.pairs = min(args.pairs, 5)
    if args.dsn is None:
        from scrapy_antideadlock.testing.postgres import postgres_dsn

        args.dsn = postgres_dsn()
    expected = args.pages * 100
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-crawl-"))
    began = time.monotonic()
    print(load_line(), "(start)")
    reports: dict[str, list[dict]] = {"feed": [], "pipeline": []}
    with SiteProcess("--pages", str(args.pages), "--items-per-page", "100") as site:
        for rnd in range(args.pairs):
            table = f"bench_pipeline_crawl_{rnd}"
            _table(args.dsn, table)
            sides = {
                "feed": {"FEEDS": {str(tmp / f"items-{rnd}.jsonl"): {"format": "jsonlines"}}},
                "pipeline": {"ANTIDEADLOCK_PG_DSN": args.dsn,
                             "ANTIDEADLOCK_PG_TABLES": {"dict": {"table": table, "key": "key"}},
                             "ANTIDEADLOCK_PG_DEADLETTER_PATH": str(tmp / "deadletter.jsonl")}}
            done = run_side_by_side(site.start_url, *({**BASE, **ADDON_PACK, **extra}
                                                      for extra in sides.values()),
                                    window=600, rnd=rnd)
            for side, report in zip(sides, done, strict=True):
                if not report["finished"] or report["items"] != expected:
                    raise SystemExit(f"{side}: {report['items']}/{expected} items, "
                                     f"finished={report['finished']}")
                reports[side].append(report)
                st = report["stats"]
                batches = st.get("antideadlock/pg/batches", 0)
                per_commit = st.get("antideadlock/pg/rows_upserted", 0) / batches if batches else 0
                print(f"pair {rnd + 1} {side:8s} wall {report['elapsed']:6.2f}s "
                      f"{expected / report['elapsed'] * 60:8.0f} items/min cpu {report['cpu']:5.1f}s"
                      + (f"  rows/commit {per_commit:5.1f}" if side == "pipeline" else ""),
                      flush=True)
    pairs = list(zip(reports["pipeline"], reports["feed"], strict=True))
    ratio = statistics.median(f["elapsed"] / p["elapsed"] for p, f in pairs)
    per_commit = statistics.median(
        r["stats"].get("antideadlock/pg/rows_upserted", 0)
        / max(1, r["stats"].get("antideadlock/pg/batches", 0)) for r in reports["pipeline"])
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    print(f"RESULT pipeline_crawl.vs_feed {ratio:.3f} ratio # items/min, add-on + pipeline "
          f"(commit mode, defaults) / add-on + JSON Lines feed, {expected} pages, 16 "
          f"concurrent, median of {args.pairs} side-by-side pinned pairs; target >= 0.97")
    print(f"RESULT pipeline_crawl.rows_per_commit {per_commit:.1f} count # rows per committed "
          "batch at 16 concurrent requests (group commit)")


if __name__ == "__main__":
    main()
