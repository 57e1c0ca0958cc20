"""Playwright benchmark: stock scrapy-playwright 0.0.48 vs the full add-on with its handler.

Scenario "raise" (the issue's): 200 JS-rendered detail pages (+ 20 listings) with
``playwright_include_page=True``; half the item callbacks raise without closing their
page, the other half close it as the scrapy-playwright README says. Default limits
(CONCURRENT_REQUESTS=16, pages per context = 16).

Scenario "contexts": 200 item requests each in its own context, PLAYWRIGHT_MAX_CONTEXTS=4.

The handlers and spiders are the test bed's Playwright fault components
(``scrapy_antideadlock.testing.playwright_faults``: probe handlers, IncludePageSpider,
ContextPerItemSpider), the same ones tests/test_playwright.py runs.

The sides: "stock", plain Scrapy with scrapy-playwright's handler as its README
configures it; "safe", the full add-on (ADDONS line) with SafePlaywrightDownloadHandler,
which is what the add-on swaps in (both as the test bed's probe subclasses, so the pages
left open are counted the same way on both sides, before any cleanup).

Per round, in alternating order (stock safe, safe stock, ...), one crawl per side in a
fresh child process bounded by the same ``--window`` seconds: whether it completed,
items, responses, pages/min over the pages it completed (first request to last
response), and the pages (contexts) still open in the browser at the end — counted by
the browser over CDP, not by either handler. Figures are medians over ``--rounds``.

    python -m bench.playwright [--scenario raise|contexts|both] [--window 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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
        **({"ADDONS": {"scrapy_antideadlock.Addon": 0}} if spec["handler"] == "safe" else {}),
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
    from .common import compile_pack

    compile_pack()  # both handlers run from this checkout; compiled as pip would
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
    parser.add_argument("--window", type=float, default=150.0,
                        help="bound on each crawl, seconds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired rounds (2; 1 under bench.report: the stock side always "
                             "runs to the window)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    if args.rounds is None:
        args.rounds = 1 if os.environ.get("BENCH_REPORT") else 2
    from scrapy_antideadlock.testing import FaultSite

    from .common import load_line

    scenarios = ["raise", "contexts"] if args.scenario == "both" else [args.scenario]
    print(f"# bench.playwright  {load_line()} (start), window {args.window:.0f} s for every "
          f"side, {args.rounds} alternating round(s)")
    pairs: dict[str, list[dict[str, dict[str, Any]]]] = {s: [] for s in scenarios}
    with FaultSite(pages=20, items_per_page=10) as site:
        for scenario in scenarios:
            for rnd in range(args.rounds):
                pair: dict[str, dict[str, Any]] = {}
                for handler in ("stock", "safe") if rnd % 2 == 0 else ("safe", "stock"):
                    spec = {"scenario": scenario, "handler": handler, "window": args.window,
                            "start_url": site.start_url}
                    pair[handler] = row = _run_child(spec)
                    row["round"] = rnd + 1
                    print(json.dumps({k: v for k, v in row.items() if k != "timeline"}),
                          flush=True)
                _same_pages(pair["stock"], pair["safe"])
                pairs[scenario].append(pair)
    print(f"# {load_line()} (end)")
    print()
    print("| scenario | round | side | completed | elapsed s | items | responses | pages/min "
          "| pages/min, first N | open pages at end | open contexts at end "
          "| open pages / contexts after our cleanup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scenario, rounds in pairs.items():
        for pair in rounds:
            for r in (pair["stock"], pair["safe"]):
                print(f"| {scenario} | {r['round']} | {r['handler']} "
                      f"| {'yes' if r['finished'] else 'NO (hung)'} | {r['elapsed']} "
                      f"| {r['items']} | {r['item_responses']} | {r['pages_per_min']} "
                      f"| {r['first_n']} | {r['open_pages_at_end']} "
                      f"| {r['open_contexts_at_end']} | {r['open_pages_after_cleanup']} / "
                      f"{r['open_contexts_after_cleanup']} |")
    print("\npages/min, first N: over the first N item responses, N = what both completed")
    rounds = pairs.get("raise")
    if not rounds:
        return
    med = statistics.median
    what = f"window {args.window:.0f} s for each side, median of {len(rounds)} rounds"
    for side, label, who in (("stock", "plain", "stock scrapy-playwright, no add-on"),
                             ("safe", "pack", "full add-on + SafePlaywrightDownloadHandler")):
        leaked = [p[side]["open_pages_at_end"] for p in rounds
                  if p[side]["open_pages_at_end"] is not None]
        if leaked:
            print(f"RESULT playwright.leaked_pages_{label} {med(leaked):g} count "
                  f"# {who}, pages open at the end (browser count; a crawl cut by the "
                  f"window counts its pages in flight too); {what}")
        done = sum(bool(p[side]["finished"]) for p in rounds) / len(rounds)
        print(f"RESULT playwright.completed_{label} {done:g} count "
              f"# {who}: share of rounds finished within the window (1 = all, 0 = all hung)")
    ratios = []
    for p in rounds:
        n = min(len(p["stock"]["timeline"]), len(p["safe"]["timeline"]))
        if n:
            ratios.append(p["stock"]["timeline"][n - 1] / p["safe"]["timeline"][n - 1])
    if ratios:
        print(f"RESULT playwright.throughput_ratio {med(ratios):.2f} ratio "
              f"# pages/min, add-on / stock, over the first item pages both completed in a "
              f"round; median of {len(ratios)} paired rounds")


def _same_pages(stock: dict[str, Any], safe: dict[str, Any]) -> None:
    """Throughput of both handlers over the same number of completed item pages."""
    n = min(len(stock["timeline"]), len(safe["timeline"]))
    for row in (stock, safe):
        span = row["timeline"][n - 1] if n else 0.0
        row["first_n"] = f"{n / span * 60:.1f} (N={n})" if span else "-"


if __name__ == "__main__":
    main()
