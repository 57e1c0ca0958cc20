"""Overhead benchmark: plain Scrapy vs the full add-on at its defaults (ADDONS line only).

A fault-free local crawl of ``--pages`` listings x 100 detail pages (5 000 items by
default), 16 concurrent requests, from a fault site in its own process. The sides run
in pairs, alternating which goes first (A B, B A, ...), each crawl in a fresh child
process; the figures are the medians of the paired ratios (never best-of).

CPU is also measured in concurrent pairs: both sides crawl at the same time, each
pinned to its own core (swapped every pair), so both see the same machine. On a
shared VM the same crawl's CPU time drifts by a fifth between back-to-back runs, which
sequential pairs cannot tell from a few percent of overhead; the concurrent plain vs
plain pairs (``cpu_ratio_aa``) show how far the method itself can be trusted.

    python -m bench.overhead [--pairs 5] [--concurrent 9] [--pages 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from .common import ADDON_PACK, SiteProcess, load_line, run_child, run_side_by_side

BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}


def added_cpu_per_request(n: int = 20000, inline: bool = True) -> float:
    """CPU seconds the middleware + guard add to one download (no network; load-robust).

    ``inline``: the transfer runs in the calling task, as Scrapy's own handlers' do (the
    stand-in handler says it unwinds on cancel); else in a task of the guard's, as a
    user's handler does."""
    import asyncio

    from scrapy import Request
    from scrapy.http import HtmlResponse
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock.downloader import DeadlineMiddleware, guard_for

    class Inner:
        antideadlock_unwinds_on_cancel = inline

        async def download_request(self, request: Request) -> HtmlResponse:
            return HtmlResponse(request.url, body=b"<html></html>", request=request)

    async def run() -> float:
        crawler = get_crawler(settings_dict={})
        mw, guard, inner = DeadlineMiddleware.from_crawler(crawler), guard_for(crawler), Inner()
        reqs = [Request(f"http://127.0.0.1/item/{i}") for i in range(2 * n)]
        t = time.process_time()
        for r in reqs[:n]:
            await inner.download_request(r)
        plain = time.process_time() - t
        t = time.process_time()
        for r in reqs[n:]:
            mw.process_request(r)
            await guard.download(r, inner)
        return (time.process_time() - t - plain) / n

    return statistics.median(asyncio.run(run()) for _ in range(3))


def paired(site_url: str, sides: dict[str, dict], pairs: int, expected: int,
           window: float) -> dict[str, list[dict]]:
    """Run ``pairs`` rounds of every side, alternating the order; return the reports."""
    reports: dict[str, list[dict]] = {name: [] for name in sides}
    names = list(sides)
    for rnd in range(pairs):
        for name in names if rnd % 2 == 0 else reversed(names):
            report = run_child(site_url, {**BASE, **sides[name]}, window=window)
            if not report["finished"] or report["items"] != expected:
                raise SystemExit(f"{name}: {report['items']}/{expected} items, "
                                 f"finished={report['finished']}")
            reports[name].append(report)
            print(f"pair {rnd + 1} {name:6s} wall {report['elapsed']:6.2f}s "
                  f"cpu {report['cpu']:6.2f}s  ({report['items']} items)", flush=True)
    return reports


def concurrent(site_url: str, a: dict, b: dict, pairs: int, expected: int,
               window: float, label: str) -> tuple[list[float], list[float]]:
    """CPU and wall ratios b / a of crawls run at the same time, each pinned to its own
    core."""
    out, walls = [], []
    for rnd in range(pairs):
        ra, rb = run_side_by_side(site_url, {**BASE, **a}, {**BASE, **b}, window, rnd)
        for report in (ra, rb):
            if not report["finished"] or report["items"] != expected:
                raise SystemExit(f"{label}: {report['items']}/{expected} items")
        out.append(rb["cpu"] / ra["cpu"])
        walls.append(rb["elapsed"] / ra["elapsed"])
        print(f"concurrent {label} {rnd + 1}: cpu {ra['cpu']:6.2f}s / {rb['cpu']:6.2f}s "
              f"ratio {out[-1]:.3f}, wall ratio {walls[-1]:.3f}", flush=True)
    return out, walls


def ratios(reports: dict[str, list[dict]], key: str, a: str = "addon",
           b: str = "plain") -> list[float]:
    return [x[key] / y[key] for x, y in zip(reports[a], reports[b], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=9,
                        help="concurrent pinned pairs for the CPU ratio (0: none)")
    parser.add_argument("--pages", type=int, default=50, help="listings of 100 items")
    args = parser.parse_args()
    if os.environ.get("BENCH_REPORT"):
        args.pairs = min(args.pairs, 3)
    began = time.monotonic()
    print(load_line(), "(start)")
    sides = {"plain": {}, "addon": ADDON_PACK}
    with SiteProcess("--pages", str(args.pages), "--items-per-page", "100") as site:
        reports = paired(site.start_url, sides, args.pairs, args.pages * 100, 300)
        together: list[float] = []
        together_wall: list[float] = []
        aa: list[float] = []
        if args.concurrent:
            together, together_wall = concurrent(site.start_url, {}, ADDON_PACK,
                                                 args.concurrent, args.pages * 100, 300,
                                                 "plain/addon")
            aa, _ = concurrent(site.start_url, {}, {}, max(3, args.concurrent // 2),
                               args.pages * 100, 300, "plain/plain")
    wall, cpu = ratios(reports, "elapsed"), ratios(reports, "cpu")
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    print("paired wall ratios:", " ".join(f"{r:.3f}" for r in wall))
    print("paired cpu ratios: ", " ".join(f"{r:.3f}" for r in cpu))
    print("concurrent cpu ratios, add-on:", " ".join(f"{r:.3f}" for r in together))
    print("concurrent cpu ratios, plain/plain:", " ".join(f"{r:.3f}" for r in aa))
    added, added_task = added_cpu_per_request(), added_cpu_per_request(inline=False)
    per_page = statistics.median(r["cpu"] for r in reports["plain"]) / (args.pages * 101)
    n = args.pages * 100
    print(f"RESULT overhead.wall_ratio {statistics.median(wall):.3f} ratio "
          f"# add-on / plain wall, {n} local pages, median of {args.pairs} pairs; target <= 1.03")
    if together:
        print(f"RESULT overhead.cpu_ratio {statistics.median(together):.3f} ratio "
              f"# add-on / plain crawler CPU, {n} local pages, median of {len(together)} "
              "concurrent pairs pinned to their own cores; target <= 1.03")
        print(f"RESULT overhead.wall_ratio_side_by_side {statistics.median(together_wall):.3f} "
              "ratio # add-on / plain wall, the same concurrent pinned pairs")
        print(f"RESULT overhead.cpu_ratio_aa {statistics.median(aa):.3f} ratio "
              f"# plain / plain, same method: the method's own bias (spread "
              f"{min(aa):.3f}-{max(aa):.3f})")
    print(f"RESULT overhead.cpu_ratio_sequential {statistics.median(cpu):.3f} ratio "
          f"# add-on / plain crawler CPU, sequential pairs (median of {args.pairs})")
    print(f"RESULT overhead.guard_us_per_request {added * 1e6:.1f} us "
          f"# CPU the deadline middleware + guard add per download, no network "
          f"({added / per_page:.1%} of plain Scrapy's CPU per page), Scrapy's own handler")
    print(f"RESULT overhead.guard_us_per_request_task {added_task * 1e6:.1f} us "
          f"# the same for a user's handler (a task of the guard's per transfer)")


if __name__ == "__main__":
    main()
