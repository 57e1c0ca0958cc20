"""Playwright benchmark: stock scrapy-playwright 0.0.48 vs SafePlaywrightDownloadHandler.

Scenario "raise" (the issue's): 200 JS-rendered detail pages (+ 20 listings) with
``playwright_include_page=True``; half the item callbacks raise without closing their
page, the other half close it as the scrapy-playwright README says. Default limits
(CONCURRENT_REQUESTS=16, pages per context = 16).

Scenario "contexts": 200 item requests each in its own context, PLAYWRIGHT_MAX_CONTEXTS=4.

The handlers and spiders are the test bed's Playwright fault components
(``scrapy_antideadlock.testing.playwright_faults``: probe handlers, IncludePageSpider,
ContextPerItemSpider), the same ones tests/test_playwright.py runs.

For each handler, in the same invocation, one crawl in a fresh child process bounded by
``--window`` seconds: whether it completed, items, responses, pages/min over the pages
it completed (first request to last response), and the pages (contexts) still open in
the browser at the end — counted by the browser over CDP, not by either handler.

    python -m bench.playwright [--scenario raise|contexts|both] [--window 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = "scrapy_antideadlock.testing.playwright_faults"
HANDLERS = {"stock": f"{FAULTS}.StockProbe", "safe": f"{FAULTS}.SafeProbe"}


# --------------------------------------------------------------------------- child side


async def _child_run(spec: dict[str, Any]) -> dict[str, Any]:
    from scrapy_antideadlock.testing import chromium_launch_options, run_crawl
    from scrapy_antideadlock.testing.playwright_faults import (
        OPEN_CONTEXTS,
        OPEN_PAGES,
        ContextPerItemSpider,
        IncludePageSpider,
        kill_leftover,
    )

    spider = IncludePageSpider if spec["scenario"] == "raise" else ContextPerItemSpider
    handler = HANDLERS[spec["handler"]]
    settings: dict[str, Any] = {
        "LOG_LEVEL": "ERROR",
        "DOWNLOAD_HANDLERS": {"http": handler, "https": handler},
        "PLAYWRIGHT_LAUNCH_OPTIONS": chromium_launch_options(),
        "PLAYWRIGHT_BROWSER_TYPE": "chromium",
        "RETRY_ENABLED": False,
    }
    if spec["scenario"] == "contexts":
        settings["PLAYWRIGHT_MAX_CONTEXTS"] = 4
    start = time.monotonic()
    result = await run_crawl(spider, settings, timeout=spec["window"], expect_hang=True,
                             start_url=spec["start_url"], js=spec["scenario"] == "raise")
    stats = result.stats
    open_pages = stats.get(OPEN_PAGES)
    open_contexts = stats.get(OPEN_CONTEXTS)
    if not result.finished:  # hung: count what it holds now, then kill its browser
        counts = await kill_leftover(result.crawler)
        if counts is not None:
            open_pages, open_contexts = counts
    responses = result.crawler.spider.responses
    span = (responses[-1] - start) if responses else 0.0
    return {
        "handler": spec["handler"], "scenario": spec["scenario"],
        "timeline": [round(t - start, 3) for t in responses],
        "open_pages_after_cleanup": stats.get("antideadlock/playwright/open_pages_at_close"),
        "open_contexts_after_cleanup": stats.get(
            "antideadlock/playwright/open_contexts_at_close"),
        "finished": result.finished, "elapsed": round(result.elapsed, 1),
        "items": len(result.items), "item_responses": len(responses),
        "pages_per_min": round(len(responses) / span * 60, 1) if span else 0.0,
        "open_pages_at_end": open_pages, "open_contexts_at_end": open_contexts,
        "force_closed": {k.rsplit("/", 1)[1]: v for k, v in stats.items()
                         if k.startswith("antideadlock/playwright/pages/force_closed/")},
    }


def _child(spec: dict[str, Any]) -> None:
    from scrapy.utils.reactor import install_reactor

    install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    out: dict[str, Any] = {}

    def done(value: Any) -> None:
        if isinstance(value, dict):
            out.update(value)
        else:
            out["error"] = repr(value)
            print(value, file=sys.stderr)
        reactor.stop()

    # an asyncio task (not a Twisted-driven coroutine): it awaits asyncio futures directly
    Deferred.fromFuture(asyncio.ensure_future(_child_run(spec))).addBoth(done)
    reactor.run()
    print(json.dumps(out), flush=True)
    os._exit(0)  # a hung stock crawl must not keep the process alive


# --------------------------------------------------------------------------- parent side


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.playwright", "--child", json.dumps(spec)],
                          cwd=ROOT, capture_output=True, text=True, timeout=spec["window"] + 90)
    if proc.stderr.strip():
        print(proc.stderr.strip()[-1500:], file=sys.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child failed: {proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["raise", "contexts", "both"], default="raise")
    parser.add_argument("--window", type=float, default=120.0,
                        help="bound on each crawl, seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    from scrapy_antideadlock.testing import FaultSite

    scenarios = ["raise", "contexts"] if args.scenario == "both" else [args.scenario]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"# bench.playwright  load average at start {load}, window {args.window:.0f} s")
    rows = []
    with FaultSite(pages=20, items_per_page=10) as site:
        for scenario in scenarios:
            for handler in ("stock", "safe"):
                spec = {"scenario": scenario, "handler": handler, "window": args.window,
                        "start_url": site.start_url}
                row = _run_child(spec)
                rows.append(row)
                shown = {k: v for k, v in row.items() if k != "timeline"}
                print(json.dumps(shown), flush=True)
            _same_pages(rows[-2], rows[-1])
    print()
    print("| scenario | handler | completed | elapsed s | items | responses | pages/min "
          "| pages/min, first N | open pages at end | open contexts at end "
          "| open pages / contexts after our cleanup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['handler']} | {'yes' if r['finished'] else 'NO (hung)'} "
              f"| {r['elapsed']} | {r['items']} | {r['item_responses']} | {r['pages_per_min']} "
              f"| {r['first_n']} | {r['open_pages_at_end']} | {r['open_contexts_at_end']} "
              f"| {r['open_pages_after_cleanup']} / {r['open_contexts_after_cleanup']} |")
    print("\npages/min, first N: over the first N item responses, N = what both completed")
    for stock, safe in zip(rows[::2], rows[1::2], strict=True):
        if stock["scenario"] != "raise":
            continue
        print(f"RESULT playwright.leaked_pages_plain {stock['open_pages_at_end']} count "
              "# stock scrapy-playwright, pages open at the end (browser count)")
        print(f"RESULT playwright.leaked_pages_pack {safe['open_pages_at_end']} count "
              "# SafePlaywrightDownloadHandler, pages open at the end (browser count)")
        print(f"RESULT playwright.completed_plain {int(stock['finished'])} count "
              f"# stock finished within {args.window:.0f} s (1) or hung (0)")
        print(f"RESULT playwright.completed_pack {int(safe['finished'])} count "
              f"# ours finished within {args.window:.0f} s")
        n = min(len(stock["timeline"]), len(safe["timeline"]))
        if n:
            ratio = stock["timeline"][n - 1] / safe["timeline"][n - 1]
            print(f"RESULT playwright.throughput_ratio {ratio:.2f} ratio "
                  f"# pages/min ours / stock over the first {n} item pages both completed")


def _same_pages(stock: dict[str, Any], safe: dict[str, Any]) -> None:
    """Throughput of both handlers over the same number of completed item pages."""
    n = min(len(stock["timeline"]), len(safe["timeline"]))
    for row in (stock, safe):
        span = row["timeline"][n - 1] if n else 0.0
        row["first_n"] = f"{n / span * 60:.1f} (N={n})" if span else "-"


if __name__ == "__main__":
    main()
