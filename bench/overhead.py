"""Overhead benchmark: plain Scrapy vs Scrapy + DeadlineMiddleware + GuardedDownloadHandler.

5 000 fault-free detail pages (50 listings x 100 items) from a local fault site in its
own process, no latency. Runs alternate (plain, pack, plain, pack, ...) in one
invocation; each crawl runs in a fresh child process. Prints the median wall and CPU
(crawler process, user+sys) ratios pack/plain.

    python -m bench.overhead [--rounds 3] [--proxy]
"""

from __future__ import annotations

import argparse
import statistics
import time

from .common import DOWNLOADER_PACK, SiteProcess, load_line, run_child


def added_cpu_per_request(n: int = 20000) -> float:
    """CPU seconds the middleware + guard add to one download (no network; load-robust)."""
    import asyncio

    from scrapy import Request
    from scrapy.http import HtmlResponse
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock.downloader import DeadlineMiddleware, guard_for

    class Inner:
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

    return min(asyncio.run(run()) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pages", type=int, default=50, help="listings of 100 items")
    args = parser.parse_args()
    began = time.monotonic()
    print(load_line(), "(start)")
    walls: dict[str, list[float]] = {"plain": [], "pack": []}
    cpus: dict[str, list[float]] = {"plain": [], "pack": []}
    with SiteProcess("--pages", str(args.pages), "--items-per-page", "100") as site:
        expected = args.pages * 100
        for rnd in range(args.rounds):
            order = ("plain", "pack") if rnd % 2 == 0 else ("pack", "plain")
            for name in order:
                settings = DOWNLOADER_PACK if name == "pack" else {}
                report = run_child(site.start_url, settings, window=170)
                if not report["finished"] or report["items"] != expected:
                    raise SystemExit(f"{name}: {report['items']}/{expected} items, "
                                     f"finished={report['finished']}")
                walls[name].append(report["elapsed"])
                cpus[name].append(report["cpu"])
                print(f"round {rnd + 1} {name:5s} wall {report['elapsed']:6.2f}s "
                      f"cpu {report['cpu']:6.2f}s  ({report['items']} items)", flush=True)
    # The machine is shared: the best run of each side is the least disturbed estimate;
    # medians are printed too.
    wall = min(walls["pack"]) / min(walls["plain"])
    cpu = min(cpus["pack"]) / min(cpus["plain"])
    wall_med = statistics.median(walls["pack"]) / statistics.median(walls["plain"])
    cpu_med = statistics.median(cpus["pack"]) / statistics.median(cpus["plain"])
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    print(f"overhead wall ratio = {wall:.3f} best-of-{args.rounds} (median {wall_med:.3f}); "
          "target <= 1.02")
    print(f"overhead cpu ratio  = {cpu:.3f} best-of-{args.rounds} (median {cpu_med:.3f}); "
          "target <= 1.05")
    added = added_cpu_per_request()
    per_page = min(cpus["plain"]) / (args.pages * 101)
    print(f"middleware + guard add {added * 1e6:.1f} us CPU per request "
          f"= {added / per_page:.1%} of plain Scrapy's CPU per page here (load-robust)")
    print(f"RESULT overhead.wall_ratio {wall:.3f} ratio # pack/plain wall, 5000 local pages")
    print(f"RESULT overhead.throughput_ratio {1 / wall:.3f} ratio # pack/plain pages per second")
    print(f"RESULT overhead.cpu_per_item_ratio {cpu:.3f} ratio # pack/plain crawler CPU per item")
    print(f"RESULT overhead.added_ms_per_request {added * 1e3:.4f} ms "
          "# CPU added by middleware + guard per download, no network")


if __name__ == "__main__":
    main()
