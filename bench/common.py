"""Shared bench plumbing: a fault site in its own process, one crawl per child process.

Each crawl runs in a fresh interpreter (``python -m bench.common '<json>'``) so runs do
not share a reactor, caches or leftover hung connections, and its CPU time is its own.
The child prints one JSON line and exits hard at the end of its window, so a crawl
that would hang on close (plain Scrapy with hung requests) cannot stall the bench.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The pack's downloader components in classic form (no add-on, no other components).
DOWNLOADER_PACK: dict[str, Any] = {
    "DOWNLOADER_MIDDLEWARES": {"scrapy_antideadlock.downloader.DeadlineMiddleware": 340},
    "DOWNLOAD_HANDLERS": {"http": "scrapy_antideadlock.downloader.GuardedDownloadHandler",
                          "https": "scrapy_antideadlock.downloader.GuardedDownloadHandler"},
}
#: The whole pack through the add-on (whatever else it enables on this install).
ADDON_PACK: dict[str, Any] = {"ADDONS": {"scrapy_antideadlock.Addon": 0}}


class SiteProcess:
    """``antideadlock-fault-site`` in a child process (so it does not share our GIL)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scrapy_antideadlock.testing.cli", "--port", "0",
             "--stats-every", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("fault site:"):
            self.proc.kill()
            raise RuntimeError(f"fault site did not start: {line!r}")
        self.start_url = line.split()[2]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> SiteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@functools.cache
def compile_pack() -> None:
    """Write the pack's bytecode cache once, as ``pip install`` does for every package.

    Scrapy's modules come from site-packages with their ``.pyc`` files; the pack runs
    from this checkout, where PYTHONDONTWRITEBYTECODE (set on the CI machines) would
    make every child compile ~60 modules from source (about 0.05 s of CPU per crawl)
    that no installed copy of the pack pays.
    """
    import compileall

    compileall.compile_dir(ROOT / "scrapy_antideadlock", quiet=1)


def start_child(start_url: str, settings: dict[str, Any], window: float,
                cpu: int | None = None, **extra: Any) -> subprocess.Popen:
    """Start a child crawling ``start_url`` for at most ``window`` s (pinned to CPU
    ``cpu`` if given)."""
    compile_pack()
    spec = {"start_url": start_url, "settings": settings, "window": window, **extra}
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return subprocess.Popen([*pin, sys.executable, "-m", "bench.common", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def child_report(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Wait for a child and return its JSON report."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench child failed:\n{stderr[-3000:]}")
    return json.loads(lines[-1])


def run_child(start_url: str, settings: dict[str, Any], window: float,
              timeout: float | None = None, **extra: Any) -> dict[str, Any]:
    """Crawl ``start_url`` for at most ``window`` s in a child; return its JSON report."""
    return child_report(start_child(start_url, settings, window, **extra),
                        timeout or window + 60)


def run_side_by_side(start_url: str, a: dict[str, Any], b: dict[str, Any], window: float,
                     rnd: int, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Crawl with settings ``a`` and ``b`` at the same time, each pinned to its own core
    (swapped every other ``rnd``), and return both reports.

    This VM's speed drifts by tens of percent between back-to-back runs; two crawls
    running together see the same machine, so their ratio is steadier than a sequential
    pair's.
    """
    cpus = (0, 1) if rnd % 2 == 0 else (1, 0)
    procs = [start_child(start_url, side, window, cpu=cpu, **extra)
             for side, cpu in zip((a, b), cpus, strict=True)]
    ra, rb = (child_report(proc, window + 60) for proc in procs)
    return ra, rb


def load_line() -> str:
    """Machine load while benchmarking (the machine is shared)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load: n/a"
    return f"load avg {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def rate(times: list[float], start: float, end: float) -> float:
    """Items per minute between ``start`` and ``end`` (seconds from crawl start)."""
    n = sum(1 for t in times if start <= t < end)
    return n * 60.0 / (end - start) if end > start else 0.0


# --------------------------------------------------------------------------- the child


def _child(spec: dict[str, Any]) -> None:
    from scrapy.utils.reactor import install_reactor

    install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from scrapy_antideadlock.testing import SiteSpider, run_crawl

    times: list[float] = []
    t0 = [0.0]

    class TimedSpider(SiteSpider):
        name = "bench"

        def parse_item(self, response: Any, **kwargs: Any) -> Any:
            for item in super().parse_item(response, **kwargs):
                times.append(time.monotonic() - t0[0])
                yield item

    spider_cls: type = TimedSpider
    broad = spec.get("broad")
    if broad:  # one detail page per host: 127.a.b.c, each its own downloader slot
        class BroadSpider(TimedSpider):
            name = "broad"

            async def start(self) -> Any:
                for i in range(broad["n"]):
                    host = f"127.{1 + i // 64516}.{1 + (i // 254) % 254}.{1 + i % 254}"
                    url = f"http://{host}:{broad['port']}/item/k{i:05d}"
                    yield self.make_request(url, self.parse_item, "item")

        spider_cls = BroadSpider
    settings = {"LOG_LEVEL": "ERROR", **spec["settings"]}

    profiler = None
    if os.environ.get("BENCH_CPROFILE"):  # bench._profile: a cProfile dump of the crawl
        import cProfile

        profiler = cProfile.Profile()

    async def main() -> None:
        t0[0] = time.monotonic()
        cpu0 = time.process_time()
        if profiler is not None:
            profiler.enable()
        result = await run_crawl(spider_cls, settings, timeout=spec["window"],
                                 expect_hang=True, start_url=spec["start_url"])
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.environ["BENCH_CPROFILE"])
        report = {"items": len(times), "times": [round(t, 3) for t in times],
                  "finished": result.finished, "elapsed": time.monotonic() - t0[0],
                  "cpu": time.process_time() - cpu0,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "stats": {k: v for k, v in result.stats.items()
                            if isinstance(v, (int, float)) and (
                                k.startswith(("antideadlock/", "retry/", "downloader/"))
                                or k in ("item_scraped_count",))}}
        print(json.dumps(report), flush=True)
        os._exit(0)

    reactor.callWhenRunning(lambda: ensureDeferred(main()))
    reactor.run()


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
