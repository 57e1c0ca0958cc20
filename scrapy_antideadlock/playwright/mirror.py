"""The one place that mirrors scrapy-playwright code: version 0.0.48, ``scrapy_playwright/handler.py``.

Each method below keeps the upstream method's name, signature, stats, log messages (on the
"scrapy-playwright" logger) and order of effects, and changes only what the pack guarantees:

* every browser call goes through ``self.calls.run`` (bounded; fails fast if the browser died);
* page and context slots are leases (``self.books``) instead of semaphores, released once;
* a context is found or created without a handler-wide lock (``self._context_for``);
* a browser that disconnected is forgotten only if it is still the current one.

When upgrading scrapy-playwright, diff these methods against the new release first;
``scrapy_antideadlock.compat.playwright.check`` refuses versions outside the tested range.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from functools import partial
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Response as PlaywrightResponse
from scrapy.http import Headers
from scrapy.responsetypes import responsetypes
from scrapy_playwright.handler import ScrapyPlaywrightDownloadHandler
from scrapy_playwright.page import PageMethod

from .. import stats as ad_stats
from ..compat import playwright as pw_compat
from .books import LeaseSemaphore
from .calls import CURRENT
from .errors import BrowserCrashed, PlaywrightCallTimeout

if TYPE_CHECKING:
    from .books import Books, ContextEntry
    from .calls import Calls

__all__ = ["UpstreamMirror"]

logger = logging.getLogger("scrapy-playwright")  # upstream's logger: users filter on it


class UpstreamMirror(ScrapyPlaywrightDownloadHandler):
    """scrapy-playwright 0.0.48's page/context/browser methods, bounded and leased."""

    books: Books
    calls: Calls
    browser_pid: int | None = None

    async def _context_for(self, request: Any, spider: Any) -> ContextEntry:
        raise NotImplementedError  # SafePlaywrightDownloadHandler

    async def _find_browser_pid(self, browser: Any) -> int | None:
        raise NotImplementedError  # SafePlaywrightDownloadHandler

    # ------------------------------------------------------------------ browser
    async def _maybe_launch_browser(self) -> None:
        gone = getattr(self, "_browser_gone", None)
        if hasattr(self, "browser") and gone is not None and gone.done() \
                and self.config.restart_disconnected_browser:
            del self.browser  # dead; its disconnect callback may not have run yet
        remaining = self.calls.deadline() - time.monotonic()
        try:
            await asyncio.wait_for(self.browser_launch_lock.acquire(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.calls.timed_out("launch")
            raise PlaywrightCallTimeout("launch", max(remaining, 0.0)) from None
        try:
            if not hasattr(self, "browser"):
                browser = await self.calls.run("launch", self.browser_provider.launch_browser(),
                                               cleanup=self.books.close_quietly)
                if getattr(self, "_browsers_launched", 0):
                    self.books.inc(ad_stats.PW_BROWSER_RESTARTS)
                self._browsers_launched = getattr(self, "_browsers_launched", 0) + 1
                gone = asyncio.get_running_loop().create_future()
                browser.on("disconnected", lambda *_: gone.done() or gone.set_result(True))
                self.browser, self._browser_gone = browser, gone
                self.stats.inc_value("playwright/browser_count")
                self.browser.on("disconnected", self._browser_disconnected_callback)
                self.browser_pid = await self._find_browser_pid(browser)
        finally:
            self.browser_launch_lock.release()

    async def _browser_disconnected_callback(self, browser: Any = None) -> None:
        current = getattr(self, "browser", None)
        browser = browser if browser is not None else current
        dead = [c for c in list(self.books.contexts.values())
                if not c.persistent and _browser_of(c.context) in (browser, None)]
        if browser is current and not self.books.closing:
            self.books.inc(ad_stats.PW_BROWSER_CRASHES)
            logging.getLogger(__package__).warning(
                "Browser disconnected; pending browser calls fail and retry")
        for ctx in dead:  # leases back and pending calls failed at once
            self.books.forget_context(ctx, None if self.books.closing else "crash")
        with suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*[c.context.close() for c in dead],
                                                  return_exceptions=True),
                                   self.books.opts.close_timeout)
        logger.debug("Browser disconnected")
        if self.config.restart_disconnected_browser and browser is not None \
                and getattr(self, "browser", None) is browser:
            del self.browser
            self.browser_pid = None

    # ------------------------------------------------------------------ contexts
    async def _create_browser_context(self, name: str, context_kwargs: dict | None,
                                      spider: Any = None) -> Any:
        lease = await self.books.context_slot(name, self.calls.deadline())
        try:
            context_kwargs = context_kwargs or {}
            persistent = remote = False
            if context_kwargs.get(pw_compat.persistent_context_key()):
                context = await self.calls.run(
                    "new_context", self.browser_provider.launch_persistent_context(context_kwargs),
                    cleanup=self.books.close_quietly)
                persistent = True
                gone = asyncio.get_running_loop().create_future()
            else:
                await self._maybe_launch_browser()
                gone = self._browser_gone
                context = await self.calls.run(
                    "new_context", self.browser.new_context(**context_kwargs), gone=(gone,),
                    cleanup=self.books.close_quietly)
                remote = bool(self.config.cdp_url or self.config.connect_url)
        except BaseException:
            lease.release("failed")
            raise
        wrapper = pw_compat.context_wrapper(context, None, persistent)
        ctx = self.books.add_context(name, context, wrapper, lease, gone, persistent)
        wrapper.semaphore = LeaseSemaphore(ctx.pages)
        context.on("close", self._make_close_browser_context_callback(
            name, persistent, remote, spider, entry=ctx))
        self.stats.inc_value("playwright/context_count")
        self.stats.inc_value(f"playwright/context_count/persistent/{persistent}")
        self.stats.inc_value(f"playwright/context_count/remote/{remote}")
        logger.debug("Browser context started: '%s' (persistent=%s, remote=%s)",
                     name, persistent, remote,
                     extra={"spider": spider, "context_name": name, "persistent": persistent,
                            "remote": remote})
        if self.config.navigation_timeout_ms is not None:
            context.set_default_navigation_timeout(self.config.navigation_timeout_ms)
        self._set_stats_max_concurrent_context_count()
        return wrapper

    def _make_close_browser_context_callback(self, name: str, persistent: bool, remote: bool,
                                             spider: Any = None, entry: Any = None) -> Any:
        def close_browser_context_callback(*_: Any) -> None:
            ctx = entry if entry is not None else self.books.contexts.get(name)
            if ctx is not None and not self.books.forget_context(ctx, None):
                return  # booked closed already (browser crash, shutdown)
            logger.debug("Browser context closed: '%s' (persistent=%s, remote=%s)",
                         name, persistent, remote,
                         extra={"spider": spider, "context_name": name,
                                "persistent": persistent, "remote": remote})

        return close_browser_context_callback

    # ------------------------------------------------------------------ pages
    async def _create_page(self, request: Any, spider: Any) -> Any:
        context_name = request.meta.setdefault("playwright_context",
                                               pw_compat.default_context_name())
        ctx = await self._context_for(request, spider)
        ctx.users += 1
        try:
            lease = await self.books.page_slot(ctx, request, self.calls.deadline())
            try:
                page = await self.calls.run("new_page", ctx.wrapper.context.new_page(),
                                            gone=(ctx.gone,), cleanup=self.books.close_quietly)
            except BaseException:
                lease.release("failed")
                raise
        finally:
            ctx.users -= 1
            ctx.last_used = time.monotonic()
        if ctx.closed:  # the context died while the page was being opened
            lease.release("failed")
            self.books.spawn(self.books.close_quietly(page))
            raise BrowserCrashed(f"context {context_name!r} closed during new_page", "new_page",
                                 request.url)
        entry = self.books.add_page(page, ctx, lease, request)
        current = CURRENT.get()
        if current is not None and current.request is request:
            current.entry = entry
        self.stats.inc_value("playwright/page_count")
        context_page_count = len(ctx.context.pages)
        total_page_count = self._get_total_page_count()
        logger.debug("[Context=%s] New page created, page count is %i (%i for all contexts)",
                     context_name, context_page_count, total_page_count,
                     extra={"spider": spider, "context_name": context_name,
                            "context_page_count": context_page_count,
                            "total_page_count": total_page_count,
                            "scrapy_request_url": request.url,
                            "scrapy_request_method": request.method})
        self._set_stats_max_concurrent_page_count(total_page_count)
        if self.config.navigation_timeout_ms is not None:
            page.set_default_navigation_timeout(self.config.navigation_timeout_ms)
        page.on("request", self._increment_request_stats)
        page.on("response", self._increment_response_stats)
        if logger.getEffectiveLevel() <= logging.DEBUG:
            page.on("request", pw_compat.request_logger(context_name, spider))
            page.on("response", pw_compat.response_logger(context_name, spider))
        return page

    def _make_close_page_callback(self, context_name: str) -> Any:
        def close_page_callback(page: Any = None) -> None:
            entry = self.books.pages.get(page)
            if entry is not None:
                self.books.page_closed(entry)  # once, however many events report it

        return close_page_callback

    # ------------------------------------------------------------------ downloading
    async def _download_request_with_page(self, request: Any, page: Any, spider: Any) -> Any:
        entry = self.books.pages.get(page)
        gone = (entry.ctx.gone, entry.gone) if entry is not None else ()
        call = partial(self.calls.run, gone=gone, url=request.url)
        if request.meta.get("playwright_include_page"):
            request.meta["playwright_page"] = page

        start_time = time.time()
        response, download = await self._get_response_and_download(request, page, spider)
        if isinstance(response, PlaywrightResponse):
            await call("redirect_meta", pw_compat.set_redirect_meta(request, response))
            headers = Headers(await call("all_headers", response.all_headers()))
            headers.pop("Content-Encoding", None)
        elif not download:
            logger.warning("Navigating to %s returned None, the response"
                           " will have empty headers and status 200", request,
                           extra={"spider": spider,
                                  "context_name": request.meta.get("playwright_context"),
                                  "scrapy_request_url": request.url,
                                  "scrapy_request_method": request.method})
            headers = Headers()

        await self._apply_page_methods(page, request, spider)
        body_str = await call("content", pw_compat.page_content(
            page, spider, request.meta.get("playwright_context"), request.url, request.method))
        request.meta["download_latency"] = time.time() - start_time

        server_ip_address = None
        if response is not None:
            with suppress(PlaywrightError, KeyError, TypeError, ValueError):
                request.meta["playwright_security_details"] = await call(
                    "security_details", response.security_details())
                server_addr = await call("server_addr", response.server_addr())
                server_ip_address = ip_address(server_addr["ipAddress"])

        if download and download.exception:
            raise download.exception

        if not request.meta.get("playwright_include_page"):
            if entry is not None:
                await self.books.close_page(entry, None)
            else:
                await call("close", page.close())
            self.stats.inc_value("playwright/page_count/closed")

        if download:
            request.meta["playwright_suggested_filename"] = download.suggested_filename
            respcls = responsetypes.from_args(url=download.url, body=download.body)
            download_headers = Headers(download.headers)
            download_headers.pop("Content-Encoding", None)
            return respcls(url=download.url, status=download.response_status,
                           headers=download_headers, body=download.body, request=request,
                           flags=["playwright"])

        body, encoding = pw_compat.encode_body(headers, body_str)
        respcls = responsetypes.from_args(headers=headers, url=page.url, body=body)
        return respcls(url=page.url, status=response.status if response is not None else 200,
                       headers=headers, body=body, request=request, flags=["playwright"],
                       encoding=encoding, ip_address=server_ip_address)

    async def _apply_page_methods(self, page: Any, request: Any, spider: Any) -> None:
        context_name = request.meta.get("playwright_context")
        entry = self.books.pages.get(page)
        gone = (entry.ctx.gone, entry.gone) if entry is not None else ()
        page_methods = request.meta.get("playwright_page_methods") or ()
        if isinstance(page_methods, dict):
            page_methods = page_methods.values()
        extra = {"spider": spider, "context_name": context_name,
                 "scrapy_request_url": request.url, "scrapy_request_method": request.method}
        for pm in page_methods:
            if not isinstance(pm, PageMethod):
                logger.warning("Ignoring %r: expected PageMethod, got %r", pm, type(pm),
                               extra=extra)
                continue
            try:
                method = partial(pm.method, page) if callable(pm.method) \
                    else getattr(page, pm.method)
            except AttributeError as ex:
                logger.warning("Ignoring %r: could not find method", pm,
                               extra={**extra, "exception": ex}, exc_info=True)
                continue
            name = pm.method if isinstance(pm.method, str) \
                else getattr(pm.method, "__name__", "page_method")
            pm.result = await self.calls.run(
                name, pw_compat.maybe_await(method(*pm.args, **pm.kwargs)), gone=gone)
            await self.calls.run("wait_for_load_state", page.wait_for_load_state(
                timeout=self.config.navigation_timeout_ms), gone=gone)


def _browser_of(context: Any) -> Any:
    try:
        return context.browser
    except Exception:  # noqa: BLE001 - a closed context may not say
        return None
