"""Playwright fault components shared by the tests and ``bench/playwright.py``.

What the browser itself has open is counted over CDP (``Target.getTargets`` /
``Target.getBrowserContexts``), never from a handler's bookkeeping, so the stock
scrapy-playwright handler and ours are measured the same way:

* :func:`browser_counts`, :func:`browser_pid`, :func:`live_browser`, :func:`kill_leftover`;
* probe handlers (:class:`StockProbe`, :class:`SafeProbe`) that record, at handler close and
  before any cleanup, what the crawl left open (stats :data:`OPEN_PAGES`, :data:`OPEN_CONTEXTS`);
* fault spiders that stand for user code (:class:`IncludePageSpider`: callbacks that raise
  without closing their page; :class:`ContextPerItemSpider`: a context per request);
* :func:`handler_settings`, :func:`started` and :func:`req` for handler-level tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import scrapy
from scrapy.utils.test import get_crawler
from scrapy_playwright.handler import ScrapyPlaywrightDownloadHandler
from scrapy_playwright.page import PageMethod

from ..playwright import SafePlaywrightDownloadHandler
from .browser import chromium_launch_options
from .spiders import SiteSpider

__all__ = ["OPEN_CONTEXTS", "OPEN_PAGES", "READY", "SAFE_PROBE", "STOCK_PROBE",
           "ContextPerItemSpider", "IncludePageSpider", "SafeProbe", "StockProbe",
           "browser_counts", "browser_pid", "handler_settings", "kill_leftover",
           "live_browser", "record_open_pages", "req", "started"]

logger = logging.getLogger(__name__)

OPEN_PAGES = "testbed/browser_open_pages"  # max pages open at handler close (browser count)
OPEN_CONTEXTS = "testbed/browser_open_contexts"
SAFE_PROBE = f"{__name__}.SafeProbe"
STOCK_PROBE = f"{__name__}.StockProbe"

# The fault site's JS pages set body[data-ready]; its error pages have no #app to fill.
READY = PageMethod("wait_for_function",
                   "() => !document.getElementById('app') || document.body.dataset.ready")


# --------------------------------------------------------------------------- the browser


async def browser_counts(browser: Any) -> tuple[int, int]:
    """(open pages, open non-default contexts) as reported by the browser over CDP."""
    session = await asyncio.wait_for(browser.new_browser_cdp_session(), 5)
    try:
        targets = await asyncio.wait_for(session.send("Target.getTargets"), 5)
        contexts = await asyncio.wait_for(session.send("Target.getBrowserContexts"), 5)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.detach(), 2)
    pages = sum(1 for t in targets["targetInfos"] if t["type"] == "page")
    return pages, len(contexts["browserContextIds"])


async def browser_pid(browser: Any) -> int:
    """The browser process id, as the browser reports it over CDP."""
    session = await asyncio.wait_for(browser.new_browser_cdp_session(), 5)
    info = await asyncio.wait_for(session.send("SystemInfo.getProcessInfo"), 5)
    return next(p["id"] for p in info["processInfo"] if p["type"] == "browser")


def live_browser(handler: Any) -> Any:
    """The handler's browser (ours: the one shared by http and https), or None."""
    return getattr(getattr(handler, "primary", handler), "browser", None)


async def kill_leftover(crawler: Any) -> tuple[int, int] | None:
    """After a crawl that hung: count what its browser holds, then SIGKILL it so nothing
    outlives the run (its pending downloads must not relaunch one). Returns the counts."""
    counts = None
    handlers = []
    for handler in crawler.engine.downloader.handlers._handlers.values():
        inner = getattr(getattr(handler, "wrapped", None), "handlers", None)  # the guard's
        handlers += list(inner.values()) if isinstance(inner, dict) else [handler]
    for handler in handlers:
        config = getattr(handler, "config", None)
        if config is not None:
            config.restart_disconnected_browser = False
        browser = live_browser(handler)
        if browser is not None and browser.is_connected():
            try:
                counts = await browser_counts(browser)
                os.kill(await browser_pid(browser), signal.SIGKILL)
            except Exception as exc:  # noqa: BLE001 - report, do not fail the caller
                logger.warning("counting/killing the hung browser failed: %r", exc)
    return counts


# --------------------------------------------------------------------------- probe handlers


async def record_open_pages(handler: Any, settle: float = 1.0) -> None:
    """At handler close, before its cleanup: what the browser still has open from the crawl
    (after a few check intervals, the time our handler takes to notice a finished callback)."""
    await asyncio.sleep(settle)
    browser = live_browser(handler)
    if browser is not None and browser.is_connected():
        pages, contexts = await browser_counts(browser)
        handler.stats.max_value(OPEN_PAGES, pages)
        handler.stats.max_value(OPEN_CONTEXTS, contexts)


class SafeProbe(SafePlaywrightDownloadHandler):
    """Ours, recording :data:`OPEN_PAGES` / :data:`OPEN_CONTEXTS` at close."""

    async def close(self) -> None:
        await record_open_pages(self)
        await super().close()


class StockProbe(ScrapyPlaywrightDownloadHandler):
    """scrapy-playwright's, recording :data:`OPEN_PAGES` / :data:`OPEN_CONTEXTS` at close."""

    async def close(self) -> None:
        await record_open_pages(self)
        await super().close()


# --------------------------------------------------------------------------- fault spiders


class IncludePageSpider(SiteSpider):
    """Item pages with playwright_include_page=True; even keys raise without closing the page.

    Odd keys close their page as the scrapy-playwright README says. Requests have no errback,
    so a non-2xx or failed download leaves the page to nobody. ``responses``: the time of
    each item response.
    """

    name = "include_page"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[float] = []

    def request_meta(self, kind: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"playwright": True, "playwright_page_methods": [READY]}
        if kind == "item":
            meta["playwright_include_page"] = True
        return meta

    def make_request(self, url: str, callback: Any, kind: str = "list") -> scrapy.Request:
        return scrapy.Request(url, callback=callback, meta=self.request_meta(kind))

    async def parse_item(self, response: Any, **kwargs: Any) -> Any:
        self.responses.append(time.monotonic())
        page = response.meta["playwright_page"]
        key = response.css("div.item::attr(data-key)").get()
        if int(key[1:]) % 2 == 0:
            raise ValueError(f"callback failed on {key}")  # page left open
        await page.close()
        for item in super().parse_item(response):
            yield item


class ContextPerItemSpider(SiteSpider):
    """Plain (fast) pages through the browser; every item request in its own context.
    ``responses``: the time of each item response."""

    name = "context_per_item"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = itertools.count()
        self.responses: list[float] = []

    def request_meta(self, kind: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"playwright": True}
        if kind == "item":
            meta["playwright_context"] = f"item-{next(self.counter)}"
        return meta

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        self.responses.append(time.monotonic())
        yield from super().parse_item(response)


# --------------------------------------------------------------------------- handler level


def handler_settings(handler: str, **extra: Any) -> dict[str, Any]:
    """Settings for a crawl through ``handler`` (an import path) on the Chromium found."""
    return {
        "LOG_LEVEL": "WARNING",
        "DOWNLOAD_HANDLERS": {"http": handler, "https": handler},
        "PLAYWRIGHT_LAUNCH_OPTIONS": chromium_launch_options(),
        "PLAYWRIGHT_BROWSER_TYPE": "chromium",
        **extra,
    }


@contextlib.asynccontextmanager
async def started(cls: type, **settings: Any) -> AsyncIterator[Any]:
    """A launched handler outside a crawl (no engine: nothing counts as "callback done")."""
    crawler = get_crawler(scrapy.Spider, handler_settings("unused", **settings))
    handler = cls.from_crawler(crawler)
    await asyncio.wait_for(handler._launch(), 30)
    try:
        yield handler
    finally:
        await asyncio.wait_for(handler.close(), 30)


def req(url: str, **meta: Any) -> scrapy.Request:
    """A Playwright request (``meta["playwright"]``) that the dupefilter never drops."""
    return scrapy.Request(url, meta={"playwright": True, **meta}, dont_filter=True)
