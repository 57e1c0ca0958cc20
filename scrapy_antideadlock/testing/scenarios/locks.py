"""Stalls on in-process primitives, written the way a project writes them (plain asyncio,
plain Twisted): every one of them ends as a ``deadlock``.

Each spider crawls a :class:`~scrapy_antideadlock.testing.FaultSite` and carries its
components in ``custom_settings``, so the corpus runner only adds the ``ADDONS`` line.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred, DeferredLock

from ..spiders import SiteSpider

HERE = __name__

# ---------------------------------------------------------------------- semaphore hold-and-wait

#: The project's "DB pool": two connections, shared by a middleware and a pipeline.
DB_POOL = asyncio.Semaphore(2)


class TokenMiddleware:
    """Needs a DB connection to read the API token before every download."""

    async def process_request(self, request: scrapy.Request) -> None:
        async with DB_POOL:
            await asyncio.sleep(0)  # SELECT token FROM settings
            request.headers["X-Token"] = "t0k3n"


class EnrichPipeline:
    """Holds a DB connection while it downloads an enrichment page (hold and wait)."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> EnrichPipeline:
        return cls(crawler)

    async def process_item(self, item: Any) -> Any:
        async with DB_POOL:
            extra = scrapy.Request(item["url"] + "?specs=1", dont_filter=True)
            response = await self.crawler.engine.download_async(extra)
            item["specs"] = len(response.body)
        return item


class SemaphoreSpider(SiteSpider):
    name = "semaphore_hold_and_wait"
    custom_settings = {
        "DOWNLOADER_MIDDLEWARES": {f"{HERE}.TokenMiddleware": 500},
        "ITEM_PIPELINES": {f"{HERE}.EnrichPipeline": 300},
    }


# ---------------------------------------------------------------------- Deferred never fires


class RefreshingTokenMiddleware:
    """Every 10th request refreshes the token; the refresh's Deferred is never fired."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.refreshing: list[Deferred[str]] = []

    def refresh_token(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.refreshing.append(d)  # the callback that should fire it was never wired
        return d

    async def process_request(self, request: scrapy.Request) -> None:
        if next(self.counter) % 10 == 0:
            token = await maybe_deferred_to_future(self.refresh_token())
            request.headers["X-Token"] = token


class DeferredSpider(SiteSpider):
    name = "deferred_never_fires"
    custom_settings = {"DOWNLOADER_MIDDLEWARES": {f"{HERE}.RefreshingTokenMiddleware": 500}}


# ---------------------------------------------------------------------- asyncio.Event never set


class LoginSpider(SiteSpider):
    """Detail pages wait until logged in; the login page answers 404, so nobody sets it."""

    name = "event_never_set"

    async def start(self) -> Any:
        self.logged_in = asyncio.Event()
        yield scrapy.Request(self.start_url.replace("/list/0", "/login"), self.after_login)
        async for request in super().start():
            yield request

    def after_login(self, response: Any) -> None:
        self.logged_in.set()

    async def parse_item(self, response: Any, **kwargs: Any) -> Any:
        await self.logged_in.wait()
        for item in super().parse_item(response, **kwargs):
            yield item


# ---------------------------------------------------------------------- Queue.join, dead consumer


class BatchWriterPipeline:
    """Hands items to a writer task and waits for the batch to be written; the writer died."""

    async def open_spider(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.writer = asyncio.ensure_future(self.write_batches())

    async def write_batches(self) -> None:
        rows: list[Any] = []
        while True:
            item = await self.queue.get()
            rows.append((item["key"], item["price_eur"]))  # KeyError: the writer task dies
            self.queue.task_done()

    async def process_item(self, item: Any) -> Any:
        await self.queue.put(item)
        await self.queue.join()
        return item


class QueueSpider(SiteSpider):
    name = "queue_join_dead_consumer"
    custom_settings = {"ITEM_PIPELINES": {f"{HERE}.BatchWriterPipeline": 300}}


# ---------------------------------------------------------------------- Future set by a later callback


class ReviewsPipeline:
    """Waits for the product's reviews, which the spider's reviews callback sets."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> ReviewsPipeline:
        return cls(crawler)

    async def process_item(self, item: Any) -> Any:
        spider = self.crawler.spider
        waiting = spider.reviews.setdefault(item["key"], asyncio.get_running_loop().create_future())
        item["reviews"] = await waiting
        return item


class ReviewsSpider(SiteSpider):
    """The reviews request differs only by its #fragment: the duplicate filter drops it."""

    name = "future_from_later_callback"
    custom_settings = {"ITEM_PIPELINES": {f"{HERE}.ReviewsPipeline": 300}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reviews: dict[str, asyncio.Future[int]] = {}

    def parse_item(self, response: Any, **kwargs: Any) -> Iterator[Any]:
        yield from super().parse_item(response, **kwargs)
        yield scrapy.Request(response.url + "#reviews", callback=self.parse_reviews)

    def parse_reviews(self, response: Any) -> None:
        key = response.url.rsplit("/", 1)[-1].split("#")[0]
        future = self.reviews.setdefault(key, asyncio.get_running_loop().create_future())
        if not future.done():
            future.set_result(0)


# ---------------------------------------------------------------------- DeferredLock taken twice


class SessionMiddleware:
    """Serialises session refreshes with a DeferredLock, then takes it again inside."""

    def __init__(self) -> None:
        self.lock = DeferredLock()
        self.session: str | None = None

    async def refresh_session(self) -> str:
        await maybe_deferred_to_future(self.lock.acquire())  # already held by the caller
        try:
            return "s-1"
        finally:
            self.lock.release()

    async def process_request(self, request: scrapy.Request) -> None:
        await maybe_deferred_to_future(self.lock.acquire())
        try:
            if self.session is None:
                self.session = await self.refresh_session()
            request.cookies["session"] = self.session
        finally:
            self.lock.release()


class DeferredLockSpider(SiteSpider):
    name = "deferred_lock_twice"
    custom_settings = {"DOWNLOADER_MIDDLEWARES": {f"{HERE}.SessionMiddleware": 500}}
