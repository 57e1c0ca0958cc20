"""Preemption anywhere in a request's life, on real crawls of naive user code.

Each component below is what a user would write (a plain ``asyncio.Semaphore``, a
Deferred that is never fired, an ``await`` on something that never comes); the crawl
runs with the add-on's defaults, only the durations shortened. Each test asserts that
the crawl ends, and that every item is stored or dead-lettered and every request not
completed is quarantined or pending in the journal: nothing is lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest_twisted
import scrapy
from twisted.internet.defer import Deferred

from scrapy_antideadlock.primitives.deadletter import read_dead_letters
from scrapy_antideadlock.primitives.journal import iter_urls, read_pending
from scrapy_antideadlock.testing import FaultSite, Latency, SiteSpider, run_crawl

HERE = "test_lifecycle"


def short(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """The add-on with its defaults; only the durations are shortened."""
    return {"ADDONS": {"scrapy_antideadlock.Addon": 0},
            "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path / "state"),
            "ANTIDEADLOCK_WATCHDOG_WINDOW": 1.5,
            "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0,
            "ANTIDEADLOCK_RECOVERY_GRACE": 4.0,
            "ANTIDEADLOCK_RECOVERY_CLOSE_DEADLINE": 6.0,
            **extra}


def state(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / "state" / name
    return read_dead_letters(path) if path.exists() else []


def pending_urls(tmp_path: Path) -> list[str]:
    return sorted(iter_urls(read_pending(tmp_path / "state")))


def nth(n: int) -> Any:
    """Every n-th call is True (a fault that strikes some requests, not their retries)."""
    calls = iter(range(1, 10**9))
    return lambda: next(calls) % n == 0


# ---------------------------------------------------------------- user code (naive)

class NeverFiresMiddleware:
    """A token refresh whose Deferred never fires, for every 7th URL (the first time)."""

    def __init__(self) -> None:
        self.strike = nth(7)
        self.seen: set[str] = set()

    def process_request(self, request: scrapy.Request) -> Deferred | None:
        first = request.url not in self.seen
        self.seen.add(request.url)
        if first and self.strike():
            return Deferred()  # nobody will ever fire it
        return None


class StuckResponseMiddleware:
    """``process_response`` awaits an event that is never set, for item k00013."""

    async def process_response(self, request: scrapy.Request, response: Any) -> Any:
        if request.url.endswith("/item/k00013"):
            await asyncio.Event().wait()
        return response


class NeverReturnsPipeline:
    """``process_item`` never returns for two keys."""

    async def process_item(self, item: Any) -> Any:
        if item["key"] in ("k00005", "k00031"):
            await asyncio.get_running_loop().create_future()
        return item


class AwaitForeverSpider(SiteSpider):
    """A coroutine callback that awaits for ever for item k00021 (every attempt)."""

    async def parse_item(self, response: Any, **kwargs: Any) -> Any:
        if response.url.endswith("/item/k00021"):
            await asyncio.Event().wait()
        return list(super().parse_item(response))


class AsyncGenForeverSpider(SiteSpider):
    """An async generator callback that awaits for ever for item k00017, first time only."""

    seen: set[str] = set()

    async def parse_item(self, response: Any, **kwargs: Any) -> Any:
        if response.url.endswith("/item/k00017") and response.url not in self.seen:
            self.seen.add(response.url)
            await asyncio.Event().wait()
        for item in super().parse_item(response):
            yield item


class HoldAndWaitPipeline:
    """The project's own "DB pool", a plain Semaphore(2): the pipeline takes a slot, then
    awaits an enrichment download while holding it; the token middleware below needs the
    same pool before every download. Hold-and-wait: a deadlock once both slots are held."""

    pool: asyncio.Semaphore | None = None

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> HoldAndWaitPipeline:
        return cls(crawler)

    async def process_item(self, item: Any) -> Any:
        async with pool():
            response = await self.crawler.engine.download_async(
                scrapy.Request(item["url"] + "?enrich=1", dont_filter=True))
            item["enriched"] = response.status
        return item


class TokenMiddleware:
    async def process_request(self, request: scrapy.Request) -> None:
        async with pool():
            await asyncio.sleep(0)


def pool() -> asyncio.Semaphore:
    if HoldAndWaitPipeline.pool is None:
        HoldAndWaitPipeline.pool = asyncio.Semaphore(2)
    return HoldAndWaitPipeline.pool


# ---------------------------------------------------------------- tests

async def crawl(site: FaultSite, spider: type, settings: dict[str, Any]) -> Any:
    return await run_crawl(spider, settings, timeout=90, start_url=site.start_url)


def accounted(site: FaultSite, result: Any, tmp_path: Path) -> None:
    """Every item of the site is stored, dead-lettered, or its request quarantined, pending
    in the journal, or failed visibly in the spider's errback (e.g. a deadline the pack's
    downloader gave up on under load): nothing silently lost."""
    stored = {item["key"] for item in result.items}
    dead = {record["item"]["key"] for record in state(tmp_path, "deadletter.jsonl")}
    quarantined = {record["url"] for record in state(tmp_path, "quarantine.jsonl")}
    pending = set(pending_urls(tmp_path))
    failed = {url for url, _ in result.crawler.spider.failures}
    lost = [key for key in site.item_keys() if key not in stored | dead
            and site.url(f"/item/{key}") not in quarantined | pending | failed]
    assert not lost, (lost, result.reason, result.stats)


@pytest_twisted.ensureDeferred
async def test_middleware_deferred_never_fires_is_preempted_and_requeued(tmp_path):
    with FaultSite(pages=5, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, SiteSpider, short(tmp_path, DOWNLOADER_MIDDLEWARES={
            f"{HERE}.NeverFiresMiddleware": 543}))
    assert result.reason == "finished", result.stats
    assert sorted(result.keys()) == sorted(site.item_keys())
    stats = result.stats
    assert stats["antideadlock/lifecycle/preempted/middleware:process_request"] >= 1
    assert stats["antideadlock/watchdog/requeued"] >= 1
    assert not result.spider_errors  # the errback never saw the preemption
    assert not result.crawler.spider.failures


@pytest_twisted.ensureDeferred
async def test_process_response_awaiting_for_ever_is_preempted(tmp_path):
    with FaultSite(pages=3, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, SiteSpider, short(tmp_path, DOWNLOADER_MIDDLEWARES={
            f"{HERE}.StuckResponseMiddleware": 543}))
    assert result.reason == "finished", result.stats
    stats = result.stats
    assert stats["antideadlock/lifecycle/preempted/middleware:process_response"] == 3
    [record] = state(tmp_path, "quarantine.jsonl")  # it hangs on every attempt
    assert record["url"].endswith("/item/k00013") and record["attempts"] == 3
    accounted(site, result, tmp_path)


@pytest_twisted.ensureDeferred
async def test_pipeline_that_never_returns_dead_letters_the_item(tmp_path):
    with FaultSite(pages=5, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, SiteSpider, short(tmp_path, ITEM_PIPELINES={
            f"{HERE}.NeverReturnsPipeline": 300}))
    assert result.reason == "finished", result.stats
    dead = state(tmp_path, "deadletter.jsonl")
    assert sorted(record["item"]["key"] for record in dead) == ["k00005", "k00031"]
    assert all(record["component"] == f"{HERE}.NeverReturnsPipeline.process_item"
               and record["reason"] for record in dead)
    assert sorted(result.keys()) == sorted(k for k in site.item_keys()
                                           if k not in ("k00005", "k00031"))
    assert result.stats["antideadlock/lifecycle/dead_lettered"] == 2
    assert not pending_urls(tmp_path)  # the item is kept in the dead letters, not re-crawled


@pytest_twisted.ensureDeferred
async def test_coroutine_callback_awaiting_for_ever_is_quarantined(tmp_path):
    with FaultSite(pages=3, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, AwaitForeverSpider, short(tmp_path))
    assert result.reason == "finished", result.stats
    assert result.stats["antideadlock/lifecycle/preempted/callback"] == 3
    [record] = state(tmp_path, "quarantine.jsonl")
    assert record["url"].endswith("/item/k00021")
    assert sorted(result.keys()) == sorted(k for k in site.item_keys() if k != "k00021")
    accounted(site, result, tmp_path)


@pytest_twisted.ensureDeferred
async def test_async_generator_callback_is_preempted_and_requeued(tmp_path):
    AsyncGenForeverSpider.seen = set()
    with FaultSite(pages=3, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, AsyncGenForeverSpider, short(tmp_path))
    assert result.reason == "finished", result.stats
    assert result.stats["antideadlock/lifecycle/preempted/callback"] == 1
    assert sorted(result.keys()) == sorted(site.item_keys())  # the requeued copy made it


@pytest_twisted.ensureDeferred
async def test_semaphore_hold_and_wait_deadlock_loses_nothing(tmp_path):
    HoldAndWaitPipeline.pool = None
    with FaultSite(pages=4, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, SiteSpider, short(
            tmp_path, ITEM_PIPELINES={f"{HERE}.HoldAndWaitPipeline": 300},
            DOWNLOADER_MIDDLEWARES={f"{HERE}.TokenMiddleware": 543}))
    assert result.finished, result.diagnostics
    assert result.elapsed < 1.5 + 4 + 6 + 20  # window + grace + close deadline + slack
    assert result.reason in ("finished", "antideadlock_deadlock", "antideadlock_unknown",
                             "antideadlock_stalled_io"), result.reason
    accounted(site, result, tmp_path)


class SlowToStopPipeline:
    """``process_item`` never returns for the first two items."""

    async def process_item(self, item: Any) -> Any:
        if item["key"] in ("k00000", "k00001"):
            await asyncio.get_running_loop().create_future()
        return item


@pytest_twisted.ensureDeferred
async def test_a_close_recovery_did_not_start_is_bounded_too(tmp_path):
    # CLOSESPIDER_ITEMCOUNT starts Scrapy's own close, which waits for the stuck items
    with FaultSite(pages=3, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        result = await crawl(site, SiteSpider, short(
            tmp_path, ANTIDEADLOCK_WATCHDOG_WINDOW=60.0, ANTIDEADLOCK_RECOVERY_CLOSE_DEADLINE=4.0,
            CLOSESPIDER_ITEMCOUNT=5, ITEM_PIPELINES={f"{HERE}.SlowToStopPipeline": 300}))
    assert result.reason == "closespider_itemcount", result.reason
    assert result.elapsed < 30
    dead = state(tmp_path, "deadletter.jsonl")
    assert {record["item"]["key"] for record in dead} >= {"k00000", "k00001"}
    assert result.stats.get("antideadlock/watchdog/stalls", 0) == 0  # no stall: a close


class StuckOnErrorMiddleware:
    """``process_exception`` awaits a reconnect that never comes."""

    async def process_exception(self, request: scrapy.Request, exception: Exception) -> None:
        await asyncio.Event().wait()


@pytest_twisted.ensureDeferred
async def test_process_exception_awaiting_for_ever_is_preempted(tmp_path):
    from scrapy_antideadlock.testing import Fault

    with FaultSite(pages=2, items_per_page=10, latency=Latency.fixed(0.005)) as site:
        site.add_fault("/item/k00004", Fault.reset())
        result = await crawl(site, SiteSpider, short(
            tmp_path, RETRY_ENABLED=False,
            DOWNLOADER_MIDDLEWARES={f"{HERE}.StuckOnErrorMiddleware": 543}))
    assert result.reason == "finished", result.stats
    assert result.stats["antideadlock/lifecycle/preempted/middleware:process_exception"] == 3
    [record] = state(tmp_path, "quarantine.jsonl")  # the reset comes back on every attempt
    assert record["url"].endswith("/item/k00004")
    assert sorted(result.keys()) == sorted(k for k in site.item_keys() if k != "k00004")
