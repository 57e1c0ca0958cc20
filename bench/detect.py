"""Detection latency of the watchdog vs CLOSESPIDER_TIMEOUT_NO_ITEM, and its overhead.

For each stall class one real crawl (fault site + fault proxy + PostgreSQL on 127.0.0.1)
flows normally, then the fault starts at the 5th item. The watchdog (fixed window W)
and Scrapy's CLOSESPIDER_TIMEOUT_NO_ITEM = W run in the same crawl; both latencies are
measured from the last item scraped (for the blocked loop: from the start of the block).
Each scenario runs in a child process, so a hang cannot stall the bench; it runs
``--reps`` times and the latencies are medians (never best-of).

Overhead: the same fault-free crawl with and without the watchdog (alternating, median).
The watchdog runs alone here (as the built-in does), with the same window as the
built-in's timeout: the full add-on's cost is bench.overhead's.

    python -m bench.detect [--window 3] [--reps 3] [--overhead-rounds 3] [--only deadlock,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("deadlock", "livelock", "stalled_io", "blocked_loop")
FAULT_AT_ITEM = 5


# The user's naive code (sticky proxy sessions + a pipeline holding its connection across a
# download) is the corpus scenario scrapy_antideadlock.testing.scenarios.pools; it turns
# naive after FAULT_AT_ITEM items.


# ---------------------------------------------------------------------- one scenario (child)


async def run_scenario(name: str, window: float) -> dict[str, Any]:
    from scrapy import signals

    from scrapy_antideadlock import signals as ad_signals
    from scrapy_antideadlock.testing import (
        Fault,
        FaultProxy,
        FaultSite,
        Latency,
        SiteSpider,
        postgres_dsn,
        run_crawl,
    )
    from scrapy_antideadlock.testing.scenarios.pools import StickySpider
    from scrapy_antideadlock.watchdog import watchdog_for

    site = FaultSite(pages=1, items_per_page=40, latency=Latency.fixed(0.05)).start()
    proxy = FaultProxy().start()
    marks: dict[str, float] = {}
    hold = 3 * window + 4  # how long the fault may last before the bench ends it
    settings: dict[str, Any] = {
        "EXTENSIONS": {"scrapy_antideadlock.watchdog.Watchdog": 100},
        "ANTIDEADLOCK_WATCHDOG_WINDOW": window, "ANTIDEADLOCK_WATCHDOG_INTERVAL": 0.1,
        "ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD": window,
        "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0,
        "CLOSESPIDER_TIMEOUT_NO_ITEM": int(window), "CONCURRENT_REQUESTS": 2,
        "LOG_LEVEL": "ERROR", "SCENARIO_PROXY_URL": proxy.url,
    }
    if name == "deadlock":
        settings.update(SCENARIO_PG_DSN=postgres_dsn(), SCENARIO_NAIVE_AFTER=FAULT_AT_ITEM)
    elif name == "livelock":
        settings.update(RETRY_TIMES=10**9, RETRY_HTTP_CODES=[502], RETRY_PRIORITY_ADJUST=0)
    elif name == "stalled_io":
        settings.update(DOWNLOAD_TIMEOUT=hold, RETRY_ENABLED=False)

    def start_fault(crawler: Any) -> None:
        marks["fault"] = time.monotonic()
        if name == "livelock":
            proxy.mode = "error"
        elif name == "stalled_io":
            site.add_fault("/item/*", Fault.hang())

    def end_fault(crawler: Any) -> None:
        if "ended" in marks:
            return
        marks["ended"] = time.monotonic()
        if name == "deadlock":
            crawler.scenario_pipeline.break_pools()
        elif name == "livelock":
            proxy.mode = "healthy"

    base = StickySpider if name == "deadlock" else SiteSpider

    class Spider(base):  # type: ignore[valid-type,misc]
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            spider = super().from_crawler(crawler, *args, **kwargs)
            spider.items_seen = 0
            crawler.signals.connect(spider.on_item, signals.item_scraped)
            crawler.signals.connect(spider.on_opened, signals.spider_opened)
            crawler.signals.connect(spider.on_stall, ad_signals.stall_detected)
            return spider

        def request_meta(self, kind: str) -> dict[str, Any]:
            if name == "deadlock":
                return super().request_meta(kind)
            return {"proxy": proxy.url} if name == "livelock" else {}

        def on_opened(self) -> None:
            engine = self.crawler.engine
            original = engine.close_spider_async

            async def close_spider_async(*, reason: str = "cancelled") -> None:
                if reason == "closespider_timeout_no_item":
                    marks.setdefault("ref", marks.get("last_item", 0.0))
                    marks.setdefault("builtin", time.monotonic())
                    if name == "blocked_loop":
                        return  # keep the crawl going to the end of the block
                    end_fault(self.crawler)
                await original(reason=reason)

            engine.close_spider_async = close_spider_async
            watchdog = watchdog_for(self.crawler)
            if watchdog is not None and watchdog.monitor is not None:
                watchdog.monitor.add_blocked_callback(
                    lambda info: marks.setdefault("watchdog", time.monotonic()))

        def on_item(self, item: Any) -> None:
            self.items_seen += 1
            marks["last_item"] = time.monotonic()
            if self.items_seen == FAULT_AT_ITEM and name != "blocked_loop":
                start_fault(self.crawler)

        def on_stall(self, diagnosis: dict[str, Any]) -> None:
            marks.setdefault("ref", marks.get("last_item", 0.0))
            marks.setdefault("watchdog", time.monotonic())
            marks.setdefault("class", diagnosis["class"])  # type: ignore[arg-type]
            if "builtin" in marks:
                end_fault(self.crawler)

        def parse_item(self, response: Any, **kwargs: Any) -> Any:
            if name == "blocked_loop" and self.items_seen >= FAULT_AT_ITEM \
                    and "fault" not in marks:
                marks["fault"] = time.monotonic()
                time.sleep(hold)  # the blocking callback
            yield from super().parse_item(response, **kwargs)

    async def ender() -> None:
        while "fault" not in marks:
            await asyncio.sleep(0.1)
        while time.monotonic() - marks["fault"] < hold and not (
                "watchdog" in marks and "builtin" in marks):
            await asyncio.sleep(0.1)

    started = time.monotonic()
    try:
        crawl = asyncio.ensure_future(run_crawl(Spider, settings, timeout=hold * 3 + 30,
                                                expect_hang=True, start_url=site.start_url))
        watcher = asyncio.ensure_future(ender())
        done, _ = await asyncio.wait({crawl, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            # the fault ran its course: end it so the crawl can finish
            for _ in range(50):
                if crawl.done():
                    break
                crawler = _current_crawler()
                if crawler is not None:
                    end_fault(crawler)
                    break
                await asyncio.sleep(0.1)
        result = await crawl
    finally:
        site.stop()
        proxy.stop()
    ref = marks["fault"] if name == "blocked_loop" else marks.get("ref", marks["fault"])
    out = {"scenario": name, "window": window, "class": marks.get("class"),
           "watchdog_s": None if "watchdog" not in marks else round(marks["watchdog"] - ref, 2),
           "builtin_s": None if "builtin" not in marks else round(marks["builtin"] - ref, 2),
           "finished": result.finished, "reason": result.reason,
           "elapsed": round(time.monotonic() - started, 1)}
    if name == "blocked_loop":
        out["builtin_during_block"] = "builtin" in marks and marks["builtin"] < marks["fault"] \
            + hold
    return out


_CRAWLERS: list[Any] = []


def _current_crawler() -> Any:
    return _CRAWLERS[-1] if _CRAWLERS else None


# ---------------------------------------------------------------------- overhead (child)


async def run_overhead(with_watchdog: bool) -> dict[str, Any]:
    from scrapy_antideadlock.testing import FaultSite, Latency, SiteSpider, run_crawl

    site = FaultSite(pages=40, items_per_page=25, latency=Latency.fixed(0.02)).start()
    settings: dict[str, Any] = {"CONCURRENT_REQUESTS": 16, "LOG_LEVEL": "ERROR",
                                "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0}
    if with_watchdog:
        settings["EXTENSIONS"] = {"scrapy_antideadlock.watchdog.Watchdog": 100}
        settings.update(json.loads(os.environ.get("BENCH_DETECT_SETTINGS", "{}")))
    cpu0 = time.process_time()  # the site runs in this process too: same share both ways
    try:
        result = await run_crawl(SiteSpider, settings, timeout=300, start_url=site.start_url)
    finally:
        site.stop()
    out = {"watchdog": with_watchdog, "elapsed": result.elapsed, "items": len(result.items),
           "cpu": time.process_time() - cpu0}
    if with_watchdog:
        from scrapy_antideadlock.watchdog import watchdog_for

        watchdog = watchdog_for(result.crawler)
        if watchdog is not None:  # its own CPU, measured directly (robust to machine load)
            out["own_cpu"] = watchdog.cpu_spent + watchdog.monitor.thread_cpu
    return out


# ---------------------------------------------------------------------- drivers


def _child(kind: str, arg: str, window: float) -> None:
    from scrapy.utils.defer import deferred_from_coro
    from scrapy.utils.reactor import install_reactor

    install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    from twisted.internet import reactor

    _patch_crawler_tracking()
    box: dict[str, Any] = {}

    async def main() -> None:
        if kind == "scenario":
            box["out"] = await run_scenario(arg, window)
        else:
            box["out"] = await run_overhead(arg == "on")

    def done(result: Any) -> None:
        if hasattr(result, "getTraceback"):
            box["error"] = result.getTraceback()
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: deferred_from_coro(main()).addBoth(done))
    reactor.run()  # type: ignore[attr-defined]
    if "error" in box:
        print(box["error"], file=sys.stderr)
        sys.exit(1)
    print(json.dumps(box["out"]))


def _patch_crawler_tracking() -> None:
    """Remember crawlers the harness creates, so the bench can end a fault on its crawler."""
    from scrapy_antideadlock.testing import harness

    original = harness.get_crawler

    def get_crawler(*args: Any, **kwargs: Any) -> Any:
        crawler = original(*args, **kwargs)
        _CRAWLERS.append(crawler)
        return crawler

    harness.get_crawler = get_crawler


def _spawn(kind: str, arg: str, window: float, timeout: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.detect", "--child", kind, arg,
                          "--window", str(window)], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"scenario": arg, "error": out.stderr[-1500:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=2 if os.environ.get("BENCH_REPORT") else 3)
    parser.add_argument("--overhead-rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.window)
        return
    from .common import load_line

    print(load_line(), "(start)")
    print(f"window W = {args.window}s; CLOSESPIDER_TIMEOUT_NO_ITEM = {int(args.window)}; "
          f"latency from the last item before the fault (blocked loop: from the block)")
    print(f"{'class':<13} {'classified':<13} {'watchdog':>9} {'built-in':>9}  note")
    results: list[str] = []
    for name in [n for n in args.only.split(",") if n]:
        rows = [_spawn("scenario", name, args.window, timeout=args.window * 12 + 90)
                for _ in range(args.reps)]
        for row in rows:
            if "error" in row:
                print(f"{name:<13} ERROR {row['error']}")
        rows = [row for row in rows if "error" not in row]
        if not rows:
            continue
        for row in rows:
            note = ""
            if name == "blocked_loop" and not row.get("builtin_during_block"):
                note = "built-in cannot run while the loop is blocked"
            wd = "-" if row["watchdog_s"] is None else f"{row['watchdog_s']:.2f}s"
            bi = "never" if row["builtin_s"] is None else f"{row['builtin_s']:.2f}s"
            print(f"{name:<13} {row['class'] or '-':<13} {wd:>9} {bi:>9}  {note}", flush=True)
        classes = sorted({str(row["class"]) for row in rows})
        what = f"median of {len(rows)} runs"
        fired = [row["watchdog_s"] for row in rows if row["watchdog_s"] is not None]
        if fired:
            results.append(f"RESULT detect.latency_{name} {statistics.median(fired):.2f} s "
                           f"# W={args.window}s, classified {'/'.join(classes)}; {what} "
                           f"(fired in {len(fired)})")
        # a built-in that never fired is later than any that did (-1 = the median never)
        builtin = [math.inf if row["builtin_s"] is None else row["builtin_s"] for row in rows]
        never = builtin.count(math.inf)
        value = statistics.median(builtin)
        value = -1 if math.isinf(value) else round(value, 2)
        results.append(f"RESULT detect.builtin_{name} {value} s "
                       f"# CLOSESPIDER_TIMEOUT_NO_ITEM={int(args.window)}, -1 = never fired; "
                       f"{what} (never fired in {never})")
    if args.overhead_rounds:
        times: dict[bool, list[float]] = {False: [], True: []}
        cpus: dict[bool, list[float]] = {False: [], True: []}
        own: list[float] = []
        for round_ in range(args.overhead_rounds):
            for on in ((False, True) if round_ % 2 == 0 else (True, False)):
                row = _spawn("overhead", "on" if on else "off", args.window, timeout=400)
                if "error" in row:
                    print("overhead run failed:", row["error"])
                    continue
                times[on].append(row["elapsed"])
                cpus[on].append(row["cpu"])
                if "own_cpu" in row:
                    own.append(row["own_cpu"] / row["cpu"])
        if times[False] and times[True]:
            off, on = statistics.median(times[False]), statistics.median(times[True])
            c_off, c_on = statistics.median(cpus[False]), statistics.median(cpus[True])
            print(f"overhead (fault-free, 1040 requests, median of {args.overhead_rounds}): "
                  f"wall without {off:.2f}s, with watchdog {on:.2f}s, ratio {on / off:.3f}; "
                  f"CPU {c_off:.2f}s vs {c_on:.2f}s, ratio {c_on / c_off:.3f}")
            results.append(f"RESULT detect.overhead_wall_ratio {on / off:.3f} ratio "
                           f"# fault-free crawl wall time, watchdog on / off, median of "
                           f"{args.overhead_rounds} alternating rounds")
            results.append(f"RESULT detect.overhead_cpu_ratio {c_on / c_off:.3f} ratio "
                           f"# fault-free crawl process CPU, watchdog on / off, median of "
                           f"{args.overhead_rounds} alternating rounds")
        if own:
            share = statistics.median(own) * 100
            print(f"watchdog's own CPU (evaluation ticks + monitor thread, measured with "
                  f"thread_time): {share:.2f} % of the crawl's CPU (median)")
            results.append(f"RESULT detect.own_cpu_share {share:.2f} % "
                           "# watchdog evaluation + monitor thread CPU / crawl CPU")
    print(load_line(), "(end)")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
