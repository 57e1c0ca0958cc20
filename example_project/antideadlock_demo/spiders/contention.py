"""One spider per contention point of a crawler (run each with ``scrapy crawl <name>``).

===========  =======================================================================
``db_pool``  many writers, one small connection pool: every detail page yields 20
             price observations over a shared key space, in random order, with
             CONCURRENT_ITEMS = 200 and 2 pooled connections.
``browser``  headless browser pages: JS pages through Playwright with
             ``playwright_include_page=True``, 4 pages per context, and a callback
             that raises on every third page without closing it.
``blocking`` event-loop blocking: one callback makes a synchronous 8 s call.
``proxies``  proxy slots: a pool of three proxies, one of which is a black hole.
``filelocks`` the pack's dead-letter file shared by two concurrent crawls (this one
             starts its peer process): items without a key are dead-lettered by both.
===========  =======================================================================

Each runs on plain Scrapy with ``-s ANTIDEADLOCK_ENABLED=0`` (bounded like the demo).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scrapy import signals
from scrapy.crawler import Crawler
from scrapy.http import Response

from scrapy_antideadlock import settings as ad_settings
from scrapy_antideadlock.primitives.deadletter import read_dead_letters

from ..testbed import SiteSpec, protected, testbed
from .demo import BedSpider


class DbPoolSpider(BedSpider):
    """Concurrent writers over overlapping keys through a 2-connection pool."""

    name = "db_pool"
    site_spec = SiteSpec(pages=6, items_per_page=10, latency_median=0.05)
    custom_settings = {
        "CONCURRENT_ITEMS": 200,
        "ANTIDEADLOCK_PG_POOL_SIZE": 2,
        "ANTIDEADLOCK_PG_BATCH_SIZE": 50,
        "ANTIDEADLOCK_PG_MAX_DELAY": 0.02,
        "ANTIDEADLOCK_PG_TABLES": {
            "dict": {"table": "price_observations", "key": "key",
                     "types": {"price": "numeric", "seen_on": "text"}}},
    }
    observations_per_page = 20
    key_space = 100

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> DbPoolSpider:
        if not protected(crawler):
            # Without the pack: the same database, through a typical hand-written pipeline.
            if not crawler.settings.get("ANTIDEADLOCK_PG_DSN"):
                crawler.settings.set("ANTIDEADLOCK_PG_DSN", testbed().start_postgres(),
                                     priority="spider")
            crawler.settings.set("ITEM_PIPELINES",
                                 {"antideadlock_demo.pipelines.NaivePostgresPipeline": 300},
                                 priority="spider")
        return super().from_crawler(crawler, *args, **kwargs)

    def parse_item(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        rng = random.Random(response.url)
        keys = rng.sample(range(self.key_space), self.observations_per_page)  # random order
        for k in keys:
            yield {"key": f"p{k:04d}", "price": f"{rng.uniform(1, 100):.2f}",
                   "seen_on": response.url}


class BrowserSpider(BedSpider):
    """Playwright pages kept open by the callback (and leaked when it raises)."""

    name = "browser"
    site_spec = SiteSpec(pages=3, items_per_page=8, latency_median=0.05, js_delay_ms=30)
    uses_postgres = False
    custom_settings = {
        "PLAYWRIGHT_MAX_PAGES_PER_CONTEXT": 4,
        "PLAYWRIGHT_DEFAULT_NAVIGATION_TIMEOUT": 15_000,
        "CONCURRENT_REQUESTS": 8,
        "ANTIDEADLOCK_PLAYWRIGHT_CALL_TIMEOUT": 15.0,
        "ANTIDEADLOCK_DEADLINE_INITIAL": 20.0,  # the first pages wait for the browser launch
    }

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> BrowserSpider:
        from scrapy_antideadlock.testing import chromium_launch_options

        handler = ("scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler"
                   if protected(crawler)
                   else "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler")
        crawler.settings.set("DOWNLOAD_HANDLERS", {"http": handler, "https": handler},
                             priority="spider")
        crawler.settings.set("PLAYWRIGHT_LAUNCH_OPTIONS", chromium_launch_options(),
                             priority="spider")
        kwargs.setdefault("js", True)
        return super().from_crawler(crawler, *args, **kwargs)

    def request_meta(self, kind: str) -> dict[str, Any]:
        meta = super().request_meta(kind)
        if kind == "item":
            meta["playwright_include_page"] = True
        return meta

    async def parse_item(self, response: Response, **kwargs: Any) -> Any:
        page = response.meta["playwright_page"]
        key = response.css("div.item::attr(data-key)").get() or ""
        if key and int(key[1:]) % 3 == 0:
            # A bug in a callback: the page is never closed. Stock scrapy-playwright keeps
            # it open (and its slot taken) until the end of the crawl.
            raise ValueError(f"cannot parse {key}")
        for item in super().parse_item(response, **kwargs):
            yield item
        await page.close()


class BlockingSpider(BedSpider):
    """A callback with a heavy synchronous step that freezes the event loop."""

    name = "blocking"
    site_spec = SiteSpec(pages=4, items_per_page=10, latency_median=0.05)
    uses_postgres = False
    custom_settings = {"ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD": 3.0}

    def parse_item(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        if response.url.endswith("/item/k00013"):
            # Like requests.get() or a synchronous DB driver in a callback: nothing else
            # in the crawl runs meanwhile. The watchdog sees it from its own thread and
            # logs this stack.
            time.sleep(self.settings.getfloat("DEMO_BLOCK_SECONDS", 8.0))
        yield from super().parse_item(response, **kwargs)


class ProxySpider(BedSpider):
    """A pool of three proxies; one accepts connections and never answers."""

    name = "proxies"
    site_spec = SiteSpec(pages=5, items_per_page=10, latency_median=0.05)
    uses_postgres = False

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> ProxySpider:
        proxies = [p.url for p in testbed().start_proxies(healthy=2, blackhole=1)]
        if protected(crawler):
            # The pack leases proxy slots: 4 concurrent requests per proxy, each lease
            # bounded by the request's deadline; a failing proxy cools down.
            crawler.settings.set("ANTIDEADLOCK_PROXY_LIST", {url: 4 for url in proxies},
                                 priority="spider")
        else:
            # What projects commonly do: rotate proxies in a small middleware.
            crawler.settings.set("DEMO_PROXIES", proxies, priority="spider")
            crawler.settings.set(
                "DOWNLOADER_MIDDLEWARES",
                {"antideadlock_demo.middlewares.RoundRobinProxyMiddleware": 350},
                priority="spider")
        return super().from_crawler(crawler, *args, **kwargs)


class FileLockSpider(BedSpider):
    """Two crawls at once appending to one dead-letter file (under the pack's flock).

    ``scrapy crawl filelocks`` starts a peer (``-a peer=1``) on the same site and
    database; every fifth detail page gives an item without a key, which the pipeline
    refuses and dead-letters. At close the file is read back: every line whole.
    """

    name = "filelocks"
    site_spec = SiteSpec(pages=5, items_per_page=10, latency_median=0.05)

    def __init__(self, *args: Any, peer: str = "0", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.is_peer = peer == "1"
        self._peer: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> FileLockSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        if not spider.is_peer:
            crawler.signals.connect(spider._start_peer, signals.spider_opened)
            crawler.signals.connect(spider._check_file, signals.spider_closed)
        return spider

    @property
    def deadletter_path(self) -> Path:
        return Path(ad_settings.get(self.settings, "ANTIDEADLOCK_PG_DEADLETTER_PATH"))

    def _start_peer(self) -> None:
        self.lines_before = len(read_dead_letters(self.deadletter_path))
        cmd = [sys.executable, "-m", "scrapy", "crawl", "filelocks", "-a", "peer=1",
               "-a", f"start_url={self.start_url}"]
        for name in ("ANTIDEADLOCK_ENABLED", "ANTIDEADLOCK_PG_DSN"):
            if self.settings.get(name) is not None:
                cmd += ["-s", f"{name}={self.settings.get(name)}"]
        self.deadletter_path.parent.mkdir(parents=True, exist_ok=True)
        log = (self.deadletter_path.parent / "filelocks-peer.log").open("wb")
        self._peer = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=os.getcwd())
        self.logger.info("filelocks: peer crawl started (pid %d, log %s)", self._peer.pid,
                         log.name)

    async def _check_file(self) -> None:
        stats = self.crawler.stats
        if self._peer is not None:
            try:
                code = await asyncio.to_thread(self._peer.wait, 60)
            except subprocess.TimeoutExpired:
                self._peer.kill()
                code = -9
            stats.set_value("demo/filelocks/peer_exit_code", code)
        records = read_dead_letters(self.deadletter_path)
        raw_lines = [ln for ln in self.deadletter_path.read_bytes().splitlines() if ln.strip()] \
            if self.deadletter_path.exists() else []
        stats.set_value("demo/filelocks/deadletter_records_added",
                        len(records) - self.lines_before)
        stats.set_value("demo/filelocks/deadletter_torn_lines", len(raw_lines) - len(records))
        self.logger.info("filelocks: %s has %d records (+%d this run, both crawls), %d torn",
                         self.deadletter_path, len(records), len(records) - self.lines_before,
                         len(raw_lines) - len(records))

    def parse_item(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        for item in super().parse_item(response, **kwargs):
            if int(item["key"][1:]) % 5 == 0:
                item = {**item, "key": None, "note": "no key: dead-lettered by the pipeline"}
            yield item
