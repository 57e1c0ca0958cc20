"""Contexts stay open as upstream keeps them (cookies and storage survive an idle crawl);
one is closed only to make room for a request waiting at PLAYWRIGHT_MAX_CONTEXTS.

Real Chromium; open contexts are counted by the browser over CDP.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy_playwright.page import PageMethod

from scrapy_antideadlock import stats as ad_stats
from scrapy_antideadlock.playwright import SAFE_PATH, SafePlaywrightDownloadHandler
from scrapy_antideadlock.testing import SiteSpider, run_crawl
from scrapy_antideadlock.testing.playwright_faults import (
    browser_counts,
    handler_settings,
    live_browser,
    req,
    started,
)

pytestmark = pytest.mark.browser

EVICTED = ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason="evicted")


@deferred_f_from_coro_f
async def test_named_context_keeps_its_cookie_while_idle(chromium: str,
                                                         make_fault_site: Any) -> None:
    """True defaults: a logged-in context idle for an hour, beside nine other idle contexts,
    is still open with its cookie (the clock is moved, not waited for)."""
    site = make_fault_site(pages=1)
    login = PageMethod("evaluate", "() => { document.cookie = 'session=s3cret; max-age=86400' }")
    check = PageMethod("evaluate", "() => document.cookie")
    async with started(SafePlaywrightDownloadHandler) as handler:
        await asyncio.wait_for(handler.download_request(req(
            site.url("/item/k00000"), playwright_context="login",
            playwright_page_methods=[login])), 30)
        await asyncio.wait_for(asyncio.gather(*[handler.download_request(req(
            site.url(f"/item/k0000{i}"), playwright_context=f"other-{i}"))
            for i in range(1, 10)]), 60)
        for ctx in handler.books.contexts.values():
            ctx.last_used -= 3600  # idle for an hour
        handler.books.sweep()
        await handler.books.drain(10)
        assert (await browser_counts(live_browser(handler))) == (0, 10)
        await asyncio.wait_for(handler.download_request(req(
            site.url("/item/k00001"), playwright_context="login",
            playwright_page_methods=[check])), 30)
        assert check.result == "session=s3cret"
        stats = handler.stats.get_stats()
        assert not [k for k in stats if k.startswith("antideadlock/playwright/contexts/force")]


class TwoContextsSpider(SiteSpider):
    """Item requests alternate between two named contexts, "a" and "b"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = itertools.cycle("ab")

    def request_meta(self, kind: str) -> dict[str, Any]:
        if kind != "item":
            return {}  # listings over plain HTTP
        return {"playwright": True, "playwright_context": next(self.names)}


@deferred_f_from_coro_f
async def test_one_context_slot_two_named_contexts_alternately(
        chromium: str, make_fault_site: Any, caplog: Any) -> None:
    """PLAYWRIGHT_MAX_CONTEXTS=1: the least recently used idle context is closed for the
    request that waits, so the crawl ends with every item (upstream: it waits forever)."""
    site = make_fault_site(pages=2, items_per_page=6)
    caplog.set_level(logging.DEBUG, logger="scrapy-playwright")
    result = await run_crawl(TwoContextsSpider, handler_settings(
        SAFE_PATH, PLAYWRIGHT_MAX_CONTEXTS=1, RETRY_ENABLED=False),
        timeout=120, start_url=site.start_url)
    assert result.finished and result.reason == "finished"
    assert sorted(result.keys()) == site.expected_keys()
    assert result.crawler.spider.failures == []
    evictions = [r for r in caplog.records
                 if r.name == "scrapy-playwright" and "to make room" in r.getMessage()]
    assert [r.levelno for r in evictions][:1] == [logging.INFO]
    assert all(r.levelno == logging.DEBUG for r in evictions[1:])
    assert result.stats[EVICTED] == len(evictions) >= 1
    assert result.stats[ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE] == 0
