"""Broad-crawl benchmark: one request per host, many hosts (one downloader slot each).

``--requests`` detail pages, each on its own loopback address 127.a.b.c (the fault site
listens on 0.0.0.0 for the run, so every address reaches it), 64 concurrent requests,
one per host, with the settings Scrapy's broad-crawl guide recommends. Plain Scrapy vs
the full add-on at its defaults, each crawl in a fresh child process; the figures are
medians of the paired ratios. Peak RSS is the child's ``ru_maxrss``.

A pair runs both sides at the same time, each pinned to its own core (swapped every
pair): the crawl is CPU-bound, and this VM's speed drifts too much between back-to-back
runs for sequential pairs to resolve a few percent (two sequential runs of the same
code gave 0.94 and 1.09). ``--full`` runs sequential pairs (A B, B A, ...) instead:
two crawls of 20 000 hosts at once would run out of loopback ports.

    python -m bench.broad            # 4 000 hosts, 5 pairs (quick)
    python -m bench.broad --full     # 20 000 hosts (the target: <= 1.05x wall, <= +10 MB)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from .common import ADDON_PACK, SiteProcess, load_line, run_child, run_side_by_side

#: Scrapy's broad-crawl guide (docs/topics/broad-crawls), at 64 concurrent, 1 per host.
BROAD = {
    "CONCURRENT_REQUESTS": 64,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 1,
    "SCHEDULER_PRIORITY_QUEUE": "scrapy.pqueues.DownloaderAwarePriorityQueue",
    "COOKIES_ENABLED": False,
    "REDIRECT_ENABLED": False,
    "REACTOR_THREADPOOL_MAXSIZE": 20,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--full", action="store_true", help="20 000 hosts")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    n = 20000 if args.full else args.requests
    if os.environ.get("BENCH_REPORT") and not args.full:
        n = min(n, 4000)
    began = time.monotonic()
    print(load_line(), "(start)")
    sides = {"plain": {}, "addon": ADDON_PACK}
    reports: dict[str, list[dict]] = {name: [] for name in sides}
    pages = (n + 99) // 100
    # 900 s was not enough for plain Scrapy's 20 000 hosts on a loaded 2-core host (896 s)
    window = max(900.0, 0.15 * n)
    with SiteProcess("--host", "0.0.0.0", "--pages", str(pages),
                     "--items-per-page", "100") as site:
        port = int(site.start_url.split(":")[2].split("/")[0])
        for rnd in range(args.pairs):
            opts = {"window": window, "broad": {"n": n, "port": port}}
            if args.full:
                order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
                done = {name: run_child(site.start_url, {**BROAD, **sides[name]}, **opts)
                        for name in order}
            else:
                done = dict(zip(sides, run_side_by_side(
                    site.start_url, *({**BROAD, **side} for side in sides.values()),
                    rnd=rnd, **opts), strict=True))
            for name, report in done.items():
                if not report["finished"] or report["items"] < 0.99 * n:
                    raise SystemExit(f"{name}: {report['items']}/{n} items, "
                                     f"finished={report['finished']}")
                reports[name].append(report)
                print(f"pair {rnd + 1} {name:6s} wall {report['elapsed']:7.2f}s cpu "
                      f"{report['cpu']:7.2f}s  peak RSS {report['max_rss_mb']:6.1f} MB  "
                      f"{report['items']}/{n} items", flush=True)
                if report["items"] != n:  # a finished crawl that gave up on a few hosts
                    print("  why:", {k: v for k, v in report["stats"].items()
                                     if k.startswith(("retry/", "downloader/exception"))},
                          flush=True)
    pairs = list(zip(reports["addon"], reports["plain"], strict=True))
    wall = statistics.median(a["elapsed"] / p["elapsed"] for a, p in pairs)
    cpu = statistics.median(a["cpu"] / p["cpu"] for a, p in pairs)
    rss = statistics.median(a["max_rss_mb"] - p["max_rss_mb"] for a, p in pairs)
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    print(f"RESULT broad.wall_ratio {wall:.3f} ratio # add-on / plain wall, {n} hosts x 1 "
          f"request, 64 concurrent, median of {args.pairs} "
          f"{'sequential' if args.full else 'side-by-side pinned'} pairs; target <= 1.05")
    print(f"RESULT broad.cpu_ratio {cpu:.3f} ratio # add-on / plain crawler CPU, same crawls")
    for name in sides:
        lost = statistics.median(n - r["items"] for r in reports[name])
        print(f"RESULT broad.{name}_lost {lost:.0f} count # items not stored ({name}), "
              "median over the same crawls")
    print(f"RESULT broad.rss_added_mb {rss:.1f} MB # add-on - plain peak RSS, same crawls; "
          "target <= 10")


if __name__ == "__main__":
    main()
