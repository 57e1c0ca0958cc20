"""SafePlaywrightDownloadHandler against real Chromium: each scrapy-playwright 0.0.48 failure
path from FIELD-NOTES is reproduced with the stock handler (bounded) and shown fixed here.

Open pages and contexts are counted by the browser itself over CDP
(``scrapy_antideadlock.testing.playwright_faults``), never from the handler's bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from typing import Any

import pytest
import scrapy
from scrapy.exceptions import IgnoreRequest
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler
from scrapy_playwright.handler import ScrapyPlaywrightDownloadHandler
from scrapy_playwright.page import PageMethod

from scrapy_antideadlock import stats as ad_stats
from scrapy_antideadlock.context import context_for
from scrapy_antideadlock.playwright import (
    PlaywrightCallTimeout,
    PlaywrightSlotTimeout,
    SafePlaywrightDownloadHandler,
)
from scrapy_antideadlock.primitives import LeaseTimeout
from scrapy_antideadlock.settings import SettingError
from scrapy_antideadlock.testing import Fault, SiteSpider, run_crawl
from scrapy_antideadlock.testing.playwright_faults import (
    OPEN_PAGES,
    SAFE_PROBE,
    STOCK_PROBE,
    ContextPerItemSpider,
    IncludePageSpider,
    SafeProbe,
    StockProbe,
    browser_counts,
    browser_pid,
    handler_settings,
    kill_leftover,
    live_browser,
    req,
    started,
)

pytestmark = pytest.mark.browser

FORCE = ad_stats.PW_PAGES_FORCE_CLOSED


# --------------------------------------------------------------------------- processes


def proc_state(pid: int) -> str:
    """The process state letter from /proc ("" if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


# --------------------------------------------------------------------------- paths 1 + 2


class DropOneResponse:
    """A downloader middleware that drops the response of k00007 (IgnoreRequest)."""

    def process_response(self, request: Any, response: Any) -> Any:
        if response.url.endswith("/k00007"):
            raise IgnoreRequest("dropped by a middleware")
        return response


DROP = {"DOWNLOADER_MIDDLEWARES": {"tests.test_playwright.DropOneResponse": 950}}


def include_page_site(make_fault_site: Any) -> Any:
    site = make_fault_site(pages=2, items_per_page=10, js_delay_ms=10)
    site.add_fault("/js/item/k00003", Fault.status(500))   # non-2xx, no errback
    site.add_fault("/js/item/k00005", Fault.reset())        # failed download, no errback
    return site  # raising: k00000 k00002 ... k00018 (10); k00007 dropped; 7 odd keys close


@deferred_f_from_coro_f
async def test_stock_leaks_included_pages_when_callbacks_raise(chromium: str,
                                                               make_fault_site: Any) -> None:
    """Paths 1 + 2, stock: raised callbacks, a 500, a reset and a dropped response each leave
    a page open."""
    site = include_page_site(make_fault_site)
    result = await run_crawl(IncludePageSpider, handler_settings(
        STOCK_PROBE, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=100, RETRY_ENABLED=False, **DROP),
        timeout=60, start_url=site.js_start_url, js=True)
    assert result.finished
    # 10 raising callbacks + the 500 + the reset + the dropped one: 13 pages open at close
    assert result.stats[OPEN_PAGES] == 13


@deferred_f_from_coro_f
async def test_stock_freezes_when_leaked_pages_fill_the_limit(chromium: str,
                                                              make_fault_site: Any) -> None:
    """FIELD-NOTES: once leaked pages fill the page limit the crawl never finishes."""
    site = include_page_site(make_fault_site)
    result = await run_crawl(IncludePageSpider, handler_settings(
        STOCK_PROBE, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=4, RETRY_ENABLED=False),
        timeout=15, expect_hang=True, start_url=site.js_start_url, js=True)
    try:
        assert not result.finished
        assert len(result.items) < 8
        (handler,) = {h for h in result.crawler.engine.downloader.handlers._handlers.values()
                      if live_browser(h) is not None}
        assert (await browser_counts(live_browser(handler)))[0] == 4  # the limit, all leaked
    finally:
        await kill_leftover(result.crawler)


@deferred_f_from_coro_f
async def test_included_pages_always_closed(chromium: str, make_fault_site: Any) -> None:
    """Paths 1 + 2, ours, with a page limit of 4: the crawl completes, nothing stays open."""
    site = include_page_site(make_fault_site)
    result = await run_crawl(IncludePageSpider, handler_settings(
        SAFE_PROBE, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=4, RETRY_ENABLED=False, **DROP),
        timeout=60, start_url=site.js_start_url, js=True)
    assert result.finished and result.reason == "finished"
    odd = [k for k in site.item_keys()
           if int(k[1:]) % 2 and k not in ("k00003", "k00005", "k00007")]
    assert sorted(result.keys()) == odd
    stats = result.stats
    assert stats[OPEN_PAGES] == 0  # counted by the browser at handler close
    assert stats[ad_stats.PW_OPEN_PAGES_AT_CLOSE] == 0
    assert stats[ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE] == 0
    assert stats[ad_stats.family(FORCE, reason="after_callback")] == 13
    assert stats[ad_stats.PW_PAGES_OPENED] == stats[ad_stats.PW_PAGES_CLOSED]


# --------------------------------------------------------------------------- handler level


def page_pools(handler: SafePlaywrightDownloadHandler) -> list[Any]:
    return [p.snapshot() for p in context_for(handler.crawler).registry.pools() if p.kind == "page"]


async def wait_for_hanging(site: Any, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while site.hanging < count:
        assert time.monotonic() < deadline, f"only {site.hanging}/{count} requests reached the site"
        await asyncio.sleep(0.05)


async def cancel_five(handler: Any, site: Any) -> tuple[int, int]:
    site.add_fault("/hang*", Fault.hang())
    tasks = [asyncio.ensure_future(handler.download_request(req(site.url(f"/hang{i}"))))
             for i in range(5)]
    await wait_for_hanging(site, 5)
    for task in tasks:
        task.cancel()
    done, _ = await asyncio.wait(tasks, timeout=10)
    assert len(done) == 5 and all(t.cancelled() for t in tasks)
    await asyncio.sleep(0.2)
    return await browser_counts(live_browser(handler))


@deferred_f_from_coro_f
async def test_stock_cancelled_download_leaks_page_and_slot(chromium: str,
                                                            make_fault_site: Any) -> None:
    """Path 3, stock: CancelledError is not an Exception, so no page close, no slot release."""
    site = make_fault_site(pages=1)
    async with started(StockProbe, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=8) as handler:
        pages, _ = await cancel_five(handler, site)
        assert pages == 5
        assert handler.context_wrappers["default"].semaphore._value == 8 - 5


@deferred_f_from_coro_f
async def test_cancelled_download_closes_page_and_releases_slot_once(
        chromium: str, make_fault_site: Any) -> None:
    """Path 3 / issue item 6, ours: the page closes, the slot comes back, exactly once."""
    site = make_fault_site(pages=1)
    async with started(SafePlaywrightDownloadHandler,
                       PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=8) as handler:
        pages, _ = await cancel_five(handler, site)
        assert pages == 0
        (pool,) = page_pools(handler)
        assert pool.in_use == 0 and pool.capacity == 8
        stats = handler.stats.get_stats()
        assert stats[ad_stats.family(FORCE, reason="cancelled")] == 5
        assert stats[ad_stats.PW_PAGES_CLOSED] == stats[ad_stats.PW_PAGES_OPENED] == 5
        # the slots really are free: 8 pages at once still fit
        site.clear_faults()
        responses = await asyncio.wait_for(asyncio.gather(*[
            handler.download_request(req(site.url(f"/item/k0000{i}"))) for i in range(8)]), 30)
        assert [r.status for r in responses] == [200] * 8


HANG_JS = PageMethod("evaluate", "() => new Promise(() => {})")


@deferred_f_from_coro_f
async def test_stock_hanging_evaluate_never_returns(chromium: str, make_fault_site: Any) -> None:
    """Path 4, stock: no bound on evaluate; DOWNLOAD_TIMEOUT does not apply."""
    site = make_fault_site(pages=1)
    async with started(StockProbe, DOWNLOAD_TIMEOUT=1) as handler:
        task = asyncio.ensure_future(handler.download_request(
            req(site.url("/item/k00000"), playwright_page_methods=[HANG_JS])))
        done, _ = await asyncio.wait({task}, timeout=5)
        assert not done  # still hanging 5 s later, 5 x its DOWNLOAD_TIMEOUT
        assert (await browser_counts(live_browser(handler)))[0] == 1
        task.cancel()
        await asyncio.wait({task}, timeout=5)


async def warm_up(handler: Any, site: Any) -> float:
    """One plain download (context and first page made): how long a page takes right now.

    A deadline under test must leave room for opening the page before the call that hangs;
    on a loaded machine that alone can take seconds, so such deadlines scale with this.
    """
    start = time.monotonic()
    response = await asyncio.wait_for(handler.download_request(
        req(site.url("/item/k00001"))), 60)
    assert response.status == 200
    return time.monotonic() - start


async def open_pages_settle(handler: Any, within: float = 10.0) -> int:
    """Open pages once the browser has done the closes it was asked for (a close the
    handler gave up on after its bound still lands), or what is left after ``within``."""
    end = time.monotonic() + within
    pages = (await browser_counts(live_browser(handler)))[0]
    while pages and time.monotonic() < end:
        await asyncio.sleep(0.1)
        pages = (await browser_counts(live_browser(handler)))[0]
    return pages


@deferred_f_from_coro_f
async def test_hanging_evaluate_and_navigation_fail_at_their_bound(
        chromium: str, make_fault_site: Any) -> None:
    """Path 4, ours: the call fails with PlaywrightCallTimeout at its bound, page closed."""
    site = make_fault_site(pages=1)
    site.add_fault("/hang*", Fault.hang())
    async with started(SafePlaywrightDownloadHandler,
                       ANTIDEADLOCK_PLAYWRIGHT_CALL_TIMEOUT=3) as handler:
        warm = await warm_up(handler, site)
        start = time.monotonic()
        with pytest.raises(PlaywrightCallTimeout) as info:
            await asyncio.wait_for(handler.download_request(
                req(site.url("/item/k00000"), playwright_page_methods=[HANG_JS])), 20 + warm)
        assert info.value.call == "evaluate"
        assert 2.9 < time.monotonic() - start < 12 + 2 * warm
        # a hanging navigation is cut by the request's download_timeout (shorter than the cap)
        timeout = max(2.0, 2 * warm)
        start = time.monotonic()
        with pytest.raises(PlaywrightCallTimeout) as info:
            await asyncio.wait_for(handler.download_request(
                req(site.url("/hang"), download_timeout=timeout)), 20 + timeout)
        assert info.value.call == "goto"
        assert timeout - 0.1 < time.monotonic() - start < timeout + 8, warm
        assert await open_pages_settle(handler) == 0
        stats = handler.stats.get_stats()
        assert stats[ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="evaluate")] == 1
        assert stats[ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="goto")] == 1
        assert stats[ad_stats.family(FORCE, reason="timeout")] == 2


async def hang_forever(page: Any, request: Any) -> None:
    """A page-init callback that never returns (scrapy-playwright awaits it unbounded)."""
    await asyncio.Event().wait()


@deferred_f_from_coro_f
async def test_whole_download_ends_by_the_deadline(chromium: str, make_fault_site: Any) -> None:
    """What scrapy-playwright awaits without a call of ours around it (here the page-init
    callback) still ends by the request's deadline + the close bound; the page is closed."""
    site = make_fault_site(pages=1)
    async with started(SafePlaywrightDownloadHandler,
                       ANTIDEADLOCK_PLAYWRIGHT_CLOSE_TIMEOUT=1) as handler:
        timeout = max(2.0, 2 * await warm_up(handler, site))
        start = time.monotonic()
        with pytest.raises(PlaywrightCallTimeout) as info:
            await asyncio.wait_for(handler.download_request(req(
                site.url("/item/k00000"), download_timeout=timeout,
                playwright_page_init_callback=hang_forever)), 20 + timeout)
        assert info.value.call == "download"
        assert time.monotonic() - start > timeout - 0.1  # not before the deadline
        assert await open_pages_settle(handler) == 0
        stats = handler.stats.get_stats()
        assert stats[ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="download")] == 1
        assert stats[ad_stats.family(FORCE, reason="timeout")] == 1


async def context_lock_scenario(handler: Any, site: Any) -> tuple[Any, Any, Any]:
    """Context "a" holds a page; "b" waits for the only context slot; then "a" is asked again."""
    first = await asyncio.wait_for(handler.download_request(req(
        site.url("/item/k00000"), playwright_context="a", playwright_include_page=True)), 30)
    waiting = asyncio.ensure_future(handler.download_request(
        req(site.url("/item/k00001"), playwright_context="b")))
    await asyncio.sleep(0.5)
    existing = asyncio.ensure_future(handler.download_request(
        req(site.url("/item/k00002"), playwright_context="a")))
    await asyncio.wait({existing}, timeout=3)
    return first, waiting, existing


@deferred_f_from_coro_f
async def test_stock_new_context_wait_blocks_existing_contexts(chromium: str,
                                                              make_fault_site: Any) -> None:
    """Path 6, stock: the context lock is held while waiting for a slot -> deadlock."""
    site = make_fault_site(pages=1)
    async with started(StockProbe, PLAYWRIGHT_MAX_CONTEXTS=1) as handler:
        first, waiting, existing = await context_lock_scenario(handler, site)
        try:
            assert not existing.done()  # context "a" exists, yet its request is stuck
            assert not waiting.done()
        finally:
            for task in (waiting, existing):
                task.cancel()
            await asyncio.wait({waiting, existing}, timeout=5)
            await first.meta["playwright_page"].close()


@deferred_f_from_coro_f
async def test_new_context_wait_does_not_block_existing_contexts(chromium: str,
                                                                 make_fault_site: Any) -> None:
    """Path 6, ours: "a" is served at once; "b" gets the slot when "a" goes idle (evicted)."""
    site = make_fault_site(pages=1)
    async with started(SafePlaywrightDownloadHandler, PLAYWRIGHT_MAX_CONTEXTS=1,
                       ANTIDEADLOCK_PLAYWRIGHT_SLOT_TIMEOUT=20) as handler:
        first, waiting, existing = await context_lock_scenario(handler, site)
        assert existing.done() and existing.result().status == 200
        assert not waiting.done()
        (contexts,) = [p.snapshot() for p in context_for(handler.crawler).registry.pools()
                       if p.kind == "context"]
        assert contexts.in_use == 1 and [w.owner for w in contexts.waiters] == ["context:b"]
        await first.meta["playwright_page"].close()  # user code done with "a": now idle
        done, _ = await asyncio.wait({waiting}, timeout=10)
        assert done and waiting.result().status == 200
        stats = handler.stats.get_stats()
        assert stats[ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason="evicted")] == 1
        assert (await browser_counts(live_browser(handler))) == (0, 1)  # only "b" left


async def crash_then_open_three(handler: Any, site: Any) -> list[Any]:
    """Crash an included page (crash + close events), then open three pages at once."""
    response = await asyncio.wait_for(handler.download_request(
        req(site.url("/item/k00000"), playwright_include_page=True)), 30)
    page = response.meta["playwright_page"]
    crashed = asyncio.Event()
    page.on("crash", lambda *_: crashed.set())
    with contextlib.suppress(Exception):
        await asyncio.wait_for(page.goto("chrome://crash"), 5)
    await asyncio.wait_for(crashed.wait(), 5)
    await asyncio.wait_for(page.close(), 5)
    results = await asyncio.wait_for(asyncio.gather(*[
        handler.download_request(req(site.url(f"/item/k0000{i}"), playwright_include_page=True))
        for i in (1, 2, 3)], return_exceptions=True), 30)
    return results


@deferred_f_from_coro_f
async def test_stock_crashed_page_releases_its_slot_twice(chromium: str,
                                                          make_fault_site: Any) -> None:
    """Path 7, stock: crash + close both release: a limit of 2 then lets 3 pages open."""
    site = make_fault_site(pages=1)
    async with started(StockProbe, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=2) as handler:
        results = await crash_then_open_three(handler, site)
        assert all(getattr(r, "status", None) == 200 for r in results)
        assert (await browser_counts(live_browser(handler)))[0] == 3  # above the limit of 2


@deferred_f_from_coro_f
async def test_crashed_page_releases_its_slot_once(chromium: str, make_fault_site: Any) -> None:
    """Path 7, ours: the slot comes back once; the limit of 2 still holds afterwards."""
    site = make_fault_site(pages=1)
    async with started(SafePlaywrightDownloadHandler, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=2,
                       ANTIDEADLOCK_PLAYWRIGHT_SLOT_TIMEOUT=1.5) as handler:
        results = await crash_then_open_three(handler, site)
        assert [getattr(r, "status", None) for r in results].count(200) == 2
        # the third waits for a slot, then fails with a retryable LeaseTimeout
        assert sum(isinstance(r, PlaywrightSlotTimeout) for r in results) == 1
        assert all(isinstance(r, LeaseTimeout) for r in results if not hasattr(r, "status"))
        assert (await browser_counts(live_browser(handler)))[0] == 2
        stats = handler.stats.get_stats()
        assert stats[ad_stats.family(FORCE, reason="crash")] == 1
        assert stats[ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="page_slot")] == 1


@deferred_f_from_coro_f
async def test_browser_hung_in_close_is_killed(chromium: str, make_fault_site: Any) -> None:
    """Item 4: a browser that does not close in time (here: SIGSTOPped) is killed."""
    site = make_fault_site(pages=1)
    crawler = get_crawler(scrapy.Spider, handler_settings(
        "unused", ANTIDEADLOCK_PLAYWRIGHT_SHUTDOWN_TIMEOUT=2,
        ANTIDEADLOCK_PLAYWRIGHT_CLOSE_TIMEOUT=0.5))
    handler = SafePlaywrightDownloadHandler.from_crawler(crawler)
    await asyncio.wait_for(handler._launch(), 30)
    await asyncio.wait_for(handler.download_request(
        req(site.url("/item/k00000"), playwright_include_page=True)), 30)
    pid = handler.browser_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        await asyncio.wait_for(handler.close(), 20)
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - start < 2 + 6
    assert handler.stats.get_value(ad_stats.PW_BROWSER_KILLED) == 1
    await asyncio.sleep(0.3)
    assert proc_state(pid) in ("", "Z")  # gone (or a zombie awaiting its reaper)


# --------------------------------------------------------------------------- crawls


KILL_AT = (4, 10, 16)  # new_page calls right after which the browser is SIGKILLed


class KillMidNewPageMixin:
    """Kills the browser right after some new_page calls were sent (KILL_AT), hooked into
    each new context's new_page: the same hook works for the stock class and ours."""

    calls = itertools.count(1)

    async def _maybe_launch_browser(self) -> None:
        await super()._maybe_launch_browser()
        if getattr(self, "_pid_of", None) is not self.browser:
            self._pid_of, self._pid = self.browser, await browser_pid(self.browser)

    async def _create_browser_context(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = await super()._create_browser_context(*args, **kwargs)
        original = wrapper.context.new_page
        calls = type(self).calls

        async def new_page(*a: Any, **kw: Any) -> Any:
            call = asyncio.ensure_future(original(*a, **kw))
            if next(calls) in KILL_AT:
                self.stats.inc_value("test/kills")
                os.kill(self._pid, signal.SIGKILL)
            return await call

        wrapper.context.new_page = new_page
        return wrapper


class StockKillMidNewPage(KillMidNewPageMixin, StockProbe):
    calls = itertools.count(1)


class KillMidNewPage(KillMidNewPageMixin, SafeProbe):
    calls = itertools.count(1)


@deferred_f_from_coro_f
async def test_stock_browser_killed_mid_new_page_hangs(chromium: str,
                                                       make_fault_site: Any) -> None:
    """Path 5, stock: a new_page in flight when the browser dies never returns (it hung in
    every run here with 3 kills; FIELD-NOTES: 5/10 runs with one kill)."""
    site = make_fault_site(pages=2, items_per_page=10)
    result = await run_crawl(ContextPerItemSpider, handler_settings(
        "tests.test_playwright.StockKillMidNewPage", CONCURRENT_REQUESTS=4),
        timeout=15, expect_hang=True, start_url=site.start_url)
    try:
        assert not result.finished
        assert "item/" in result.diagnostics  # stuck in the downloader, not elsewhere
    finally:
        await kill_leftover(result.crawler)


@deferred_f_from_coro_f
async def test_browser_killed_mid_new_page_crawl_completes(chromium: str,
                                                           make_fault_site: Any) -> None:
    """Path 5 / item 5, ours: the browser dies 3 times mid-new_page; the crawl gets everything."""
    site = make_fault_site(pages=2, items_per_page=10)
    result = await run_crawl(ContextPerItemSpider, handler_settings(
        "tests.test_playwright.KillMidNewPage", CONCURRENT_REQUESTS=4),
        timeout=90, start_url=site.start_url)
    assert result.finished and result.reason == "finished"
    assert sorted(result.keys()) == site.expected_keys()
    stats = result.stats
    assert stats["test/kills"] == len(KILL_AT)
    assert stats[ad_stats.PW_BROWSER_RESTARTS] == len(KILL_AT)
    assert stats[ad_stats.PW_CRASH_RETRIES] >= len(KILL_AT)
    assert stats[OPEN_PAGES] == 0
    assert stats[ad_stats.PW_OPEN_PAGES_AT_CLOSE] == 0
    assert stats[ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE] == 0


async def sample_contexts(handler: Any, seen: list[int]) -> None:
    """Poll the live browser for its open contexts (browser-side count) until cancelled."""
    while True:
        browser = live_browser(handler)
        if browser is not None and browser.is_connected():
            with contextlib.suppress(Exception):
                seen.append((await browser_counts(browser))[1])
        await asyncio.sleep(0.1)


@deferred_f_from_coro_f
async def test_context_per_request_stays_within_limit_and_closes(chromium: str,
                                                                 make_fault_site: Any) -> None:
    """N requests each in its own context: never more than the limit open, all closed.

    N = 200 in the issue; a new context costs a renderer process (~0.4 s of CPU on this
    2-core box under load), so the test runs 30 unless ANTIDEADLOCK_TEST_PW_CONTEXTS says
    otherwise; bench/playwright.py --contexts 200 runs the full count.
    """
    count = int(os.environ.get("ANTIDEADLOCK_TEST_PW_CONTEXTS", "30"))
    site = make_fault_site(pages=(count + 9) // 10, items_per_page=10)
    keys = site.item_keys()[:count]
    async with started(SafePlaywrightDownloadHandler, PLAYWRIGHT_MAX_CONTEXTS=4,
                       ANTIDEADLOCK_PLAYWRIGHT_SLOT_TIMEOUT=60) as handler:
        seen: list[int] = []
        sampler = asyncio.ensure_future(sample_contexts(handler, seen))
        concurrency = asyncio.Semaphore(8)  # like CONCURRENT_REQUESTS

        async def fetch(key: str) -> int:
            async with concurrency:
                response = await handler.download_request(
                    req(site.url(f"/item/{key}"), playwright_context=f"ctx-{key}"))
                return response.status

        try:
            statuses = await asyncio.wait_for(
                asyncio.gather(*[fetch(k) for k in keys]), 10 + count)
        finally:
            sampler.cancel()
        assert statuses == [200] * count
        assert len(seen) > 10 and 1 <= max(seen) <= 4
        await asyncio.sleep(0.6)  # the last contexts go idle (kept: no idle cleanup by default)
        stats = handler.stats.get_stats()
        assert stats[ad_stats.PW_CONTEXTS_OPENED] == count
        pages, contexts = await browser_counts(live_browser(handler))
        assert pages == 0 and contexts <= 4  # idle ones kept, never more than the limit
    assert stats[ad_stats.PW_CONTEXTS_CLOSED] == count
    assert stats[ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE] == 0
    assert stats[ad_stats.PW_OPEN_PAGES_AT_CLOSE] == 0


# --------------------------------------------------------------------------- wiring


def test_bad_setting_fails_at_start_naming_it() -> None:
    crawler = get_crawler(scrapy.Spider, handler_settings(
        "unused", ANTIDEADLOCK_PLAYWRIGHT_CALL_TIMEOUT="-1"))
    with pytest.raises(SettingError, match="ANTIDEADLOCK_PLAYWRIGHT_CALL_TIMEOUT"):
        SafePlaywrightDownloadHandler.from_crawler(crawler)


@pytest.mark.parametrize("share", [True, False])
def test_http_and_https_share_one_browser(share: bool) -> None:
    """Item 7: one driver/browser and one set of limits per crawler (unless switched off)."""
    crawler = get_crawler(scrapy.Spider, handler_settings(
        "unused", ANTIDEADLOCK_PLAYWRIGHT_SHARE_BROWSER=share))
    http = SafePlaywrightDownloadHandler.from_crawler(crawler)
    https = SafePlaywrightDownloadHandler.from_crawler(crawler)
    assert (https.primary is http) is share
    assert (https.context_wrappers is http.context_wrappers) is share
    contexts = [p for p in context_for(crawler).registry.pools() if p.kind == "context"]
    assert len(contexts) == (1 if share else 2)


def test_addon_swaps_the_stock_handler_for_ours() -> None:
    from scrapy_antideadlock.playwright import configure_download_handlers

    stock = "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"
    settings = get_crawler(scrapy.Spider, {"DOWNLOAD_HANDLERS": {
        "http": stock, "https": ScrapyPlaywrightDownloadHandler, "ftp": None}}).settings.copy()
    configure_download_handlers(settings)
    handlers = settings["DOWNLOAD_HANDLERS"]
    assert handlers["http"] == handlers["https"] == (
        "scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler")
    assert handlers["ftp"] is None
    off = get_crawler(scrapy.Spider, {"DOWNLOAD_HANDLERS": {"http": stock},
                                      "ANTIDEADLOCK_PLAYWRIGHT_ENABLED": False}).settings.copy()
    configure_download_handlers(off)
    assert off["DOWNLOAD_HANDLERS"]["http"] == stock


class CancelThroughGuardSpider(scrapy.Spider):
    """Five hanging browser downloads, cancelled by the guarded handler's cancel()."""

    name = "cancel_guard"

    def __init__(self, site: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.site = site
        self.requests: list[scrapy.Request] = []
        self.failures: list[str] = []
        self.cancelled: list[bool] = []

    async def start(self) -> Any:
        for i in range(5):
            request = req(self.site.url(f"/hang{i}"))
            request.errback = self.on_error
            self.requests.append(request)
            yield request
        asyncio.ensure_future(self.cancel_when_hanging())

    async def cancel_when_hanging(self) -> None:
        from scrapy_antideadlock.downloader import inflight_for

        await wait_for_hanging(self.site, 5)
        tracker = inflight_for(self.crawler)
        self.cancelled = [tracker.cancel(r, "test cancel") for r in self.requests]

    def parse(self, response: Any) -> None:
        raise AssertionError("a hanging page cannot produce a response")

    def on_error(self, failure: Any) -> None:
        self.failures.append(type(failure.value).__name__)


@deferred_f_from_coro_f
async def test_cancel_through_the_guarded_handler(chromium: str, make_fault_site: Any) -> None:
    """Item 6: inflight_for(crawler).cancel() -> page closed, slot released once, errback."""
    site = make_fault_site(pages=1)
    site.add_fault("/hang*", Fault.hang())
    stock = "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"
    settings = handler_settings(stock, ADDONS={"scrapy_antideadlock.Addon": 0},
                           RETRY_ENABLED=False, ANTIDEADLOCK_WATCHDOG_ENABLED=False,
                           ANTIDEADLOCK_JOURNAL_ENABLED=False)
    result = await run_crawl(CancelThroughGuardSpider, settings, timeout=60, site=site)
    assert result.finished
    spider = result.crawler.spider
    assert spider.cancelled == [True] * 5
    assert spider.failures == ["DownloadCancelled"] * 5
    stats = result.stats
    assert stats[ad_stats.family(FORCE, reason="cancelled")] == 5
    assert stats[ad_stats.PW_PAGES_CLOSED] == stats[ad_stats.PW_PAGES_OPENED] == 5
    assert stats[ad_stats.PW_OPEN_PAGES_AT_CLOSE] == 0
    handlers = result.crawler.engine.downloader.handlers._handlers
    assert "Guarded" in type(handlers["http"]).__name__


@deferred_f_from_coro_f
async def test_page_age_limit_and_idle_contexts(chromium: str, make_fault_site: Any) -> None:
    """Last resorts: an included page nobody closes is closed at its age limit; a context
    without pages is closed after the idle timeout."""
    site = make_fault_site(pages=1)
    async with started(SafePlaywrightDownloadHandler, ANTIDEADLOCK_PLAYWRIGHT_PAGE_MAX_AGE=1.0,
                       ANTIDEADLOCK_PLAYWRIGHT_CONTEXT_IDLE_TIMEOUT=1.0) as handler:
        await asyncio.wait_for(handler.download_request(req(
            site.url("/item/k00000"), playwright_include_page=True, playwright_context="kept")),
            30)
        await asyncio.wait_for(handler.download_request(req(
            site.url("/item/k00001"), playwright_context="idle")), 30)
        browser = live_browser(handler)
        assert await browser_counts(browser) == (1, 2)
        await asyncio.sleep(2.5)
        assert await browser_counts(browser) == (0, 0)
        stats = handler.stats.get_stats()
        assert stats[ad_stats.family(FORCE, reason="age")] == 1
        assert stats[ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason="idle")] == 2


class FollowUpSpider(SiteSpider):
    """The scrapy-playwright pattern of passing an included page on to the next request."""

    def request_meta(self, kind: str) -> dict[str, Any]:
        return {"playwright": True, "playwright_include_page": kind == "item"}

    def parse(self, response: Any, **kwargs: Any) -> Any:
        for href in response.css("a.item-link::attr(href)").getall()[:3]:
            yield self.make_request(response.urljoin(href), self.parse_item, "item")

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        page = response.meta["playwright_page"]
        yield scrapy.Request(response.url + "?again", callback=self.parse_again,
                             dont_filter=True, cb_kwargs={"first": page},
                             meta={"playwright": True, "playwright_page": page,
                                   "playwright_include_page": True})

    async def parse_again(self, response: Any, first: Any) -> Any:
        page = response.meta["playwright_page"]
        yield {"key": response.url, "same_page": page is first}
        await page.close()


@deferred_f_from_coro_f
async def test_page_passed_to_a_follow_up_request_is_kept_for_it(
        chromium: str, make_fault_site: Any) -> None:
    """A page handed on in meta stays open for the follow-up request (not closed between)."""
    site = make_fault_site(pages=1)
    # the delay keeps each follow-up queued for longer than the check interval
    result = await run_crawl(FollowUpSpider, handler_settings(SAFE_PROBE, DOWNLOAD_DELAY=0.5),
                             timeout=60, start_url=site.start_url)
    assert result.finished and len(result.items) == 3
    assert all(item["same_page"] for item in result.items)
    stats = result.stats
    assert ad_stats.family(FORCE, reason="after_callback") not in stats
    assert stats[OPEN_PAGES] == 0


@deferred_f_from_coro_f
async def test_new_context_overrunning_its_bound_is_closed_when_it_arrives(
        chromium: str, make_fault_site: Any) -> None:
    """Item 2: a stalled browser (SIGSTOP) makes new_context overrun; the request fails with
    PlaywrightCallTimeout and the context that arrives late is closed, not leaked."""
    site = make_fault_site(pages=1)
    async with started(SafePlaywrightDownloadHandler,
                       ANTIDEADLOCK_PLAYWRIGHT_CALL_TIMEOUT=2) as handler:
        await asyncio.wait_for(handler.download_request(req(site.url("/item/k00000"))), 30)
        browser, pid = live_browser(handler), handler.browser_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(PlaywrightCallTimeout) as info:
                await asyncio.wait_for(handler.download_request(
                    req(site.url("/item/k00001"), playwright_context="late")), 20)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert info.value.call == "new_context"
        await asyncio.sleep(1.5)  # the late context arrives and is closed
        assert await browser_counts(browser) == (0, 1)  # only "default" (idle) is left
        assert "late" not in handler.context_wrappers
