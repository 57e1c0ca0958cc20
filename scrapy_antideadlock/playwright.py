"""A drop-in subclass of scrapy-playwright's download handler that cannot leak or hang.

``DOWNLOAD_HANDLERS = {"http": "scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler",
"https": ...}``: same settings, same ``meta`` keys, same responses as
``ScrapyPlaywrightDownloadHandler`` 0.0.48, plus:

* every page is closed on every path: included pages (``playwright_include_page``) once
  the request's callback or errback finished, whatever it did; other pages on every
  failure, ``CancelledError`` included; an age limit as a last resort;
* every browser call is bounded (the request's deadline or a cap) and fails with
  :class:`PlaywrightCallTimeout`, closing what it opened;
* page and context limits are :class:`LeasePool` s in the crawler's registry: released
  exactly once, acquired with a timeout, and waiting for a *new* context never blocks
  requests for contexts that already exist;
* idle contexts are closed; at close everything is closed with a deadline and a browser
  that does not close in time is killed;
* a dead browser fails its pending calls at once; their downloads are retried on a
  relaunched browser (bounded);
* http and https share one driver and browser (``ANTIDEADLOCK_PLAYWRIGHT_SHARE_BROWSER``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import ip_address
from typing import Any

from playwright._impl._errors import TargetClosedError
from playwright.async_api import Browser, BrowserContext, Page
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Response as PlaywrightResponse
from scrapy import signals
from scrapy.core.downloader.handlers.http11 import HTTP11DownloadHandler
from scrapy.crawler import Crawler
from scrapy.exceptions import DownloadFailedError, DownloadTimeoutError, NotSupported
from scrapy.http import Request, Response
from scrapy.http.headers import Headers
from scrapy.responsetypes import responsetypes
from scrapy.utils.misc import load_object
from scrapy_playwright._utils import (
    _attach_page_event_handlers,
    _encode_body,
    _get_page_content,
    _maybe_await,
    _maybe_execute_page_init_callback,
    _set_redirect_meta,
)
from scrapy_playwright.handler import (
    DEFAULT_CONTEXT_NAME,
    PERSISTENT_CONTEXT_PATH_KEY,
    Config,
    ScrapyPlaywrightDownloadHandler,
)
from scrapy_playwright.page import PageMethod

from . import metakeys
from . import settings as ad_settings
from . import stats as ad_stats
from .context import context_for
from .identity import request_id
from .primitives.lease import Lease, LeasePool, LeaseTimeout, PoolClosed

__all__ = ["BrowserCrashed", "PlaywrightCallTimeout", "PlaywrightSlotTimeout",
           "SafePlaywrightDownloadHandler",
           "configure_download_handlers"]

SAFE_PATH = "scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler"
STOCK_PATH = "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"

logger = logging.getLogger(__name__)

_UNLIMITED = 2**31 - 1  # capacity of the context pool when PLAYWRIGHT_MAX_CONTEXTS is unset


class PlaywrightCallTimeout(DownloadTimeoutError):
    """A browser call overran its bound. Retried by RetryMiddleware (a DownloadTimeoutError)."""

    def __init__(self, call: str, timeout: float, url: str = "") -> None:
        self.call, self.timeout, self.url = call, timeout, url
        where = f" for {url}" if url else ""
        super().__init__(f"Playwright {call} did not finish within {timeout:.2f}s{where}")


class PlaywrightSlotTimeout(LeaseTimeout, DownloadTimeoutError):
    """No page or context slot came free in time (a LeaseTimeout that RetryMiddleware retries,
    being a DownloadTimeoutError too)."""


class BrowserCrashed(DownloadFailedError):
    """The browser, context or page died under the download. Retried by RetryMiddleware."""


# --------------------------------------------------------------------------- bookkeeping


@dataclass(eq=False)
class _Context:
    name: str
    context: BrowserContext
    pages: LeasePool
    lease: Lease
    gone: asyncio.Future  # done when the browser (or persistent context) died or closed
    startup: bool = False
    persistent: bool = False  # its own browser process: ``gone`` is its own
    entries: set[_Page] = field(default_factory=set)
    users: int = 0  # requests between "got this context" and "have a page in it"
    last_used: float = field(default_factory=time.monotonic)
    closing: bool = False
    closed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Page:
    page: Page
    ctx: _Context
    lease: Lease
    request: Request  # current owner; an included page passes to a retried/redirected copy
    gone: asyncio.Future  # done when the page closed or crashed
    busy: bool = True  # a download runs on it
    scheduled: Request | None = None  # a follow-up request carrying it waits in the scheduler
    closing: bool = False
    closed: bool = False


def _consume(task: asyncio.Future) -> None:
    """Mark a background result as retrieved (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


def _call_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "call"


# --------------------------------------------------------------------------- session


class _Session:
    """Driver, browser, contexts, pages and their leases; shared by a crawler's handlers."""

    _shared: weakref.WeakKeyDictionary[Crawler, _Session] = weakref.WeakKeyDictionary()
    _serial = 0

    def __init__(self, crawler: Crawler, config: Config, name: str) -> None:
        self.crawler = crawler
        self.config = config
        self.name = name
        self.opts = ad_settings.load(crawler.settings, "playwright")
        self.stats = crawler.stats
        self.registry = context_for(crawler).registry
        self.handlers: set[int] = set()
        self.provider: Any = None
        self.browser: Browser | None = None
        self.browser_pid: int | None = None
        self.gone: asyncio.Future | None = None
        self.generation = 0
        self.contexts: dict[str, _Context] = {}
        self.entries: dict[Page, _Page] = {}
        self.context_pool = LeasePool(f"{name}/contexts", config.max_contexts or _UNLIMITED,
                                      kind="context")
        self.registry.register(self.context_pool)
        self._creating: dict[str, asyncio.Future] = {}
        self._browser_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._closing = False
        self._closed = False
        self._tasks: set[asyncio.Future] = set()
        self._sweeper: asyncio.Task | None = None
        self._page_pool_serial = 0
        crawler.signals.connect(self._on_scheduled, signal=signals.request_scheduled)
        crawler.signals.connect(self._on_dropped, signal=signals.request_dropped)
        crawler.signals.connect(self._on_spider_closed, signal=signals.spider_closed)

    @classmethod
    def attach(cls, crawler: Crawler, handler: SafePlaywrightDownloadHandler) -> _Session:
        share = ad_settings.get(crawler.settings, "ANTIDEADLOCK_PLAYWRIGHT_SHARE_BROWSER")
        session = cls._shared.get(crawler) if share else None
        if session is None or session._closing:
            cls._serial += 1
            name = "playwright" if share else f"playwright-{cls._serial}"
            session = cls(crawler, handler.config, name)
            if share:
                cls._shared[crawler] = session
        session.handlers.add(id(handler))
        return session

    async def _on_spider_closed(self, **_: Any) -> None:
        """Close the pages of finished requests now, bounded, so the stats dump counts them
        (the handler itself is closed only after the dump)."""
        if self._closing:
            return
        self.sweep()
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.opts.close_timeout + 0.5)

    # ------------------------------------------------------------------ helpers
    def _inc(self, name: str, count: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc_value(name, count)

    def _spawn(self, coro: Awaitable) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_consume)
        return task

    async def _call(self, call: str, awaitable: Awaitable, deadline: float, *,
                    gone: Iterable[asyncio.Future | None] = (), url: str = "",
                    cleanup: Callable[[Any], Awaitable] | None = None) -> Any:
        """Await one browser call for at most min(call cap, time to ``deadline``).

        Fails at once with :class:`BrowserCrashed` if one of ``gone`` completes (the
        browser, context or page died). A call given up on is cancelled, or, with
        ``cleanup``, left to finish so whatever it opens late is closed.
        """
        timeout = min(self.opts.call_timeout, deadline - time.monotonic())
        task = asyncio.ensure_future(awaitable)
        watch = {f for f in gone if f is not None}
        if timeout <= 0:
            self._abandon(task, cleanup)
            self._inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call=_call_name(call)))
            raise PlaywrightCallTimeout(call, 0.0, url)
        try:
            done, _ = await asyncio.wait({task, *watch}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(task, cleanup)
            raise
        if task in done:
            return task.result()
        self._abandon(task, cleanup)
        if done:
            raise BrowserCrashed(f"browser or page died during {call} ({url})")
        self._inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call=_call_name(call)))
        raise PlaywrightCallTimeout(call, timeout, url)

    def _abandon(self, task: asyncio.Future, cleanup: Callable[[Any], Awaitable] | None) -> None:
        if cleanup is None:
            task.cancel()
            task.add_done_callback(_consume)
            return

        def late(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                self._spawn(cleanup(done.result()))

        task.add_done_callback(late)
        self._tasks.add(task)  # cancelled at shutdown if the browser never answers
        task.add_done_callback(self._tasks.discard)

    async def _close_quietly(self, obj: Any) -> None:
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(obj.close(), self.opts.close_timeout)

    def _deadline(self, request: Request) -> float:
        now = time.monotonic()
        bounds = [now + 365 * 86400.0]
        absolute = request.meta.get(metakeys.DEADLINE)
        if isinstance(absolute, (int, float)) and not isinstance(absolute, bool):
            bounds.append(float(absolute))
        timeout = request.meta.get("download_timeout")
        if timeout is None:
            timeout = self.crawler.settings.getfloat("DOWNLOAD_TIMEOUT")
        if timeout:
            bounds.append(now + float(timeout))
        return min(bounds)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        async with self._start_lock:
            if self.provider is not None:
                return
            provider_cls = load_object(self.crawler.settings.get("PLAYWRIGHT_BROWSER_PROVIDER")
                                       or "scrapy_playwright.provider.PlaywrightBrowserProvider")
            provider = provider_cls(self.config)
            await self._call("start_driver", provider.start(),
                             time.monotonic() + self.opts.call_timeout)
            self.provider = provider
            self._sweeper = asyncio.ensure_future(self._sweep_loop())
            if self.config.startup_context_kwargs:
                deadline = time.monotonic() + self.opts.call_timeout
                await asyncio.gather(*[
                    self._open_context(name, kwargs, deadline, startup=True)
                    for name, kwargs in self.config.startup_context_kwargs.items()])

    async def _ensure_browser(self, deadline: float) -> Browser:
        if self.browser is not None:
            return self.browser
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._browser_lock.acquire(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise PlaywrightCallTimeout("launch", remaining) from None
        try:
            if self.browser is not None:
                return self.browser
            if self._closing:
                raise BrowserCrashed("handler is closing")
            if self.provider is None:
                await self.start()
            browser = await self._call("launch", self.provider.launch_browser(), deadline,
                                       cleanup=self._close_quietly)
            self.generation += 1
            if self.generation > 1:
                self._inc(ad_stats.PW_BROWSER_RESTARTS)
            gone = asyncio.get_running_loop().create_future()
            browser.on("disconnected", partial(self._on_disconnected, browser, gone))
            self.browser, self.gone = browser, gone
            self.browser_pid = await self._browser_pid(browser)
            return browser
        finally:
            self._browser_lock.release()

    async def _browser_pid(self, browser: Browser) -> int | None:
        """The browser's process id (to kill it if it hangs in close); None if unknown."""
        if self.config.cdp_url or self.config.connect_url:
            return None  # never kill a browser we did not launch
        try:
            session = await asyncio.wait_for(browser.new_browser_cdp_session(), 5.0)
            info = await asyncio.wait_for(session.send("SystemInfo.getProcessInfo"), 5.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.detach(), 2.0)
        except (Exception, asyncio.TimeoutError):
            return None
        for proc in info.get("processInfo", []):
            if proc.get("type") == "browser":
                return int(proc["id"])
        return None

    def _on_disconnected(self, browser: Browser, gone: asyncio.Future, *_: Any) -> None:
        if not gone.done():
            gone.set_result(True)
        if self.browser is browser:
            if not self._closing:
                self._inc(ad_stats.PW_BROWSER_CRASHES)
                logger.warning("Browser disconnected; pending browser calls fail and retry")
            if self.config.restart_disconnected_browser or self._closing:
                self.browser, self.browser_pid = None, None
        for ctx in list(self.contexts.values()):
            if ctx.gone is gone:
                self._forget_context(ctx, "crash")

    async def release(self, handler_id: int) -> None:
        self.handlers.discard(handler_id)
        if not self.handlers:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Close every page and context, then the browser, all within the shutdown bound."""
        if self._closed:
            return
        self._closed = self._closing = True
        if _Session._shared.get(self.crawler) is self:
            del _Session._shared[self.crawler]
        deadline = time.monotonic() + self.opts.shutdown_timeout
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._wait([self._spawn(self._close_page(e, "shutdown"))
                          for e in list(self.entries.values())], deadline)
        contexts = list(self.contexts.values())
        for ctx in contexts:
            self._start_closing_context(ctx, "shutdown")
        await self._wait([self._spawn(c.done.wait()) for c in contexts], deadline)
        browser, pid = self.browser, self.browser_pid
        if browser is not None and browser.is_connected():
            pages, contexts = await self.browser_counts(browser, deadline)
            self.stats.set_value(ad_stats.PW_OPEN_PAGES_AT_CLOSE, pages)
            self.stats.set_value(ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE, contexts)
            try:
                await asyncio.wait_for(browser.close(), max(deadline - time.monotonic(), 0.5))
            except (Exception, asyncio.TimeoutError) as exc:
                logger.warning("Browser did not close in time (%r); killing it", exc)
                self._kill(pid)
        else:  # no browser to ask (none launched, or persistent contexts only)
            self.stats.set_value(ad_stats.PW_OPEN_PAGES_AT_CLOSE, len(self.entries))
            self.stats.set_value(ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE, len(self.contexts))
        self.browser = None
        for task in list(self._tasks):
            task.cancel()
        self.context_pool.close()
        self.registry.unregister(self.context_pool)
        if self.provider is not None:
            try:
                await asyncio.wait_for(self.provider.close(),
                                       max(deadline - time.monotonic(), 1.0))
            except (Exception, asyncio.TimeoutError) as exc:
                logger.warning("Playwright driver did not stop in time: %r", exc)

    def _kill(self, pid: int | None) -> None:
        if pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            self._inc(ad_stats.PW_BROWSER_KILLED)

    @staticmethod
    async def _wait(tasks: list[asyncio.Future], deadline: float) -> None:
        if tasks:
            await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.1))

    @staticmethod
    async def browser_counts(browser: Browser, deadline: float) -> tuple[int, int]:
        """(open pages, open non-default contexts) as the browser itself reports them."""
        timeout = max(min(deadline - time.monotonic(), 5.0), 0.5)
        try:
            session = await asyncio.wait_for(browser.new_browser_cdp_session(), timeout)
            targets = await asyncio.wait_for(session.send("Target.getTargets"), timeout)
            contexts = await asyncio.wait_for(session.send("Target.getBrowserContexts"), timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.detach(), 2.0)
        except (Exception, asyncio.TimeoutError):
            return -1, -1
        pages = sum(1 for t in targets["targetInfos"] if t.get("type") == "page")
        return pages, len(contexts.get("browserContextIds", []))

    # ------------------------------------------------------------------ contexts
    async def _context_for(self, request: Request, deadline: float) -> _Context:
        """The request's context, creating it if needed without blocking other contexts."""
        name = request.meta.setdefault("playwright_context", DEFAULT_CONTEXT_NAME)
        while True:
            ctx = self.contexts.get(name)
            if ctx is not None and not ctx.closing and not ctx.gone.done():
                return ctx
            pending: asyncio.Future | None = self._creating.get(name)
            if ctx is not None and ctx.closing:
                pending = asyncio.ensure_future(ctx.done.wait())
            if pending is not None:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    await asyncio.wait({pending}, timeout=min(remaining, self.opts.slot_timeout))
                if not pending.done():
                    raise PlaywrightCallTimeout("new_context", max(remaining, 0.0), request.url)
                if not pending.cancelled() and pending.exception() is not None:
                    raise pending.exception()
                continue
            creating = asyncio.get_running_loop().create_future()
            self._creating[name] = creating
            try:
                ctx = await self._open_context(name, request.meta.get("playwright_context_kwargs"),
                                               deadline)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    creating.set_exception(exc)
                    creating.exception()
                else:
                    creating.cancel()
                raise
            else:
                creating.set_result(ctx)
            finally:
                self._creating.pop(name, None)
            return ctx

    async def _open_context(self, name: str, kwargs: dict | None, deadline: float, *,
                            startup: bool = False) -> _Context:
        owner = f"context:{name}"
        lease = self.context_pool.try_acquire(owner)
        if lease is None:
            self._evict_idle_contexts(1)
            remaining = deadline - time.monotonic()
            lease = await self._acquire(self.context_pool, "context_slot", owner, remaining)
        try:
            kwargs = dict(kwargs or {})
            persistent = bool(kwargs.get(PERSISTENT_CONTEXT_PATH_KEY))
            if persistent:
                if self.provider is None:
                    await self.start()
                context = await self._call(
                    "new_context", self.provider.launch_persistent_context(kwargs), deadline,
                    cleanup=self._close_quietly)
                gone = asyncio.get_running_loop().create_future()
            else:
                browser = await self._ensure_browser(deadline)
                gone = self.gone
                context = await self._call("new_context", browser.new_context(**kwargs), deadline,
                                           gone=(gone,), cleanup=self._close_quietly)
        except BaseException:
            lease.release("failed")
            raise
        self._page_pool_serial += 1
        pages = LeasePool(f"{self.name}/pages/{name}#{self._page_pool_serial}",
                          self.config.max_pages_per_context, kind="page")
        self.registry.register(pages)
        ctx = _Context(name, context, pages, lease, gone, startup=startup, persistent=persistent)
        old = self.contexts.get(name)
        if old is not None:
            self._forget_context(old, "replaced")
        self.contexts[name] = ctx
        context.on("close", lambda *_: self._forget_context(ctx, None))
        if self.config.navigation_timeout_ms is not None:
            context.set_default_navigation_timeout(self.config.navigation_timeout_ms)
        self._inc(ad_stats.PW_CONTEXTS_OPENED)
        self._inc("playwright/context_count")  # the stock handler's stat, kept for dashboards
        logger.debug("Browser context started: %r", name)
        return ctx

    def _forget_context(self, ctx: _Context, reason: str | None) -> None:
        """Book a context as closed (once): its pages are gone, its leases returned."""
        if ctx.closed:
            return
        ctx.closed = ctx.closing = True
        if reason == "crash":
            self._inc(ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason="crash"))
        if self.contexts.get(ctx.name) is ctx:
            del self.contexts[ctx.name]
        if ctx.persistent and not ctx.gone.done():
            ctx.gone.set_result(True)  # pending calls on its pages fail at once
        for entry in list(ctx.entries):
            if not entry.closed and reason == "crash":
                self._inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason="crash"))
            self._page_closed(entry)
        ctx.lease.release(reason or "closed")
        ctx.pages.close()
        self.registry.unregister(ctx.pages)
        self._inc(ad_stats.PW_CONTEXTS_CLOSED)
        ctx.done.set()

    def _start_closing_context(self, ctx: _Context, reason: str) -> asyncio.Future | None:
        """Claim a context for closing now (nobody takes a page in it any more), close it
        in a task within the close bound."""
        if ctx.closing:
            return None
        ctx.closing = True
        self._inc(ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason=reason))
        return self._spawn(self._close_context(ctx))

    async def _close_context(self, ctx: _Context) -> None:
        try:
            await asyncio.wait_for(ctx.context.close(), self.opts.close_timeout)
        except asyncio.TimeoutError:
            self._inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="context_close"))
            logger.warning("Closing context %r timed out", ctx.name)
        except Exception as exc:  # noqa: BLE001 - the browser may be gone already
            logger.debug("Closing context %r failed: %r", ctx.name, exc)
        finally:
            self._forget_context(ctx, None)

    async def _acquire(self, pool: LeasePool, call: str, owner: str, remaining: float,
                       **kwargs: Any) -> Lease:
        """A slot within min(slot timeout, time left), else PlaywrightSlotTimeout."""
        try:
            return await pool.acquire(
                owner, timeout=max(min(self.opts.slot_timeout, remaining), 0.0), **kwargs)
        except LeaseTimeout as exc:
            self._inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call=call))
            raise PlaywrightSlotTimeout(exc.pool, exc.owner, exc.waited) from None

    def _idle_contexts(self) -> list[_Context]:
        return sorted((c for c in self.contexts.values()
                       if not c.startup and not c.entries and c.users == 0 and not c.closing),
                      key=lambda c: c.last_used)

    def _evict_idle_contexts(self, count: int) -> None:
        for ctx in self._idle_contexts()[:count]:
            self._start_closing_context(ctx, "evicted")

    # ------------------------------------------------------------------ pages
    async def _open_page(self, request: Request, deadline: float,
                         handler: SafePlaywrightDownloadHandler) -> _Page:
        ctx = await self._context_for(request, deadline)
        ctx.users += 1
        try:
            owner = request_id(request)
            remaining = deadline - time.monotonic()
            try:  # the age limit (on_expire) starts once the page is handed over
                lease = await self._acquire(ctx.pages, "page_slot", owner, remaining,
                                            on_expire=self._on_page_expired)
            except PoolClosed:
                raise BrowserCrashed(f"context {ctx.name!r} closed while waiting") from None
            try:
                page = await self._call("new_page", self._new_page_call(ctx), deadline,
                                        gone=(ctx.gone,), url=request.url,
                                        cleanup=self._close_quietly)
            except BaseException:
                lease.release("failed")
                raise
        finally:
            ctx.users -= 1
            ctx.last_used = time.monotonic()
        gone = asyncio.get_running_loop().create_future()
        entry = _Page(page, ctx, lease, request, gone)
        if ctx.closed:  # the context died while the page was being opened
            self._page_closed(entry)
            raise BrowserCrashed(f"context {ctx.name!r} closed during new_page")
        ctx.entries.add(entry)
        self.entries[page] = entry
        page.on("close", lambda *_: self._page_closed(entry))
        page.on("crash", lambda *_: self._on_page_crash(entry))
        page.on("request", handler._increment_request_stats)
        page.on("response", handler._increment_response_stats)
        if self.config.navigation_timeout_ms is not None:
            page.set_default_navigation_timeout(self.config.navigation_timeout_ms)
        self._inc(ad_stats.PW_PAGES_OPENED)
        self._inc("playwright/page_count")  # the stock handler's stat, kept for dashboards
        return entry

    def _new_page_call(self, ctx: _Context) -> Awaitable[Page]:
        """The one place a page is created (tests hook it to kill the browser mid-call)."""
        return ctx.context.new_page()

    def _page_closed(self, entry: _Page) -> None:
        """Book a page as closed exactly once and return its slot."""
        if entry.closed:
            return
        entry.closed = entry.closing = True
        if not entry.gone.done():
            entry.gone.set_result(True)
        if not entry.lease.released:
            entry.lease.release("closed")
        ctx = entry.ctx
        ctx.entries.discard(entry)
        ctx.last_used = time.monotonic()
        if self.entries.get(entry.page) is entry:
            del self.entries[entry.page]
        self._inc(ad_stats.PW_PAGES_CLOSED)
        if not ctx.entries and not ctx.users and not ctx.startup and not self._closing \
                and self.context_pool.waiters():
            self._start_closing_context(ctx, "evicted")  # someone waits for a context slot

    def _on_page_crash(self, entry: _Page) -> None:
        if entry.closed:
            return
        self._inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason="crash"))
        entry.closing = True
        self._spawn(self._close_quietly(entry.page))
        self._page_closed(entry)

    def _on_page_expired(self, lease: Lease) -> None:
        for entry in list(self.entries.values()):
            if entry.lease is lease:
                self._spawn(self._close_page(entry, "age"))

    async def _close_page(self, entry: _Page, reason: str | None) -> None:
        """Close a page within the close bound; ``reason`` set: counted as force-closed."""
        if entry.closing or entry.closed:
            return
        entry.closing = True
        if reason is not None:
            self._inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason=reason))
        try:
            await asyncio.wait_for(entry.page.close(), self.opts.close_timeout)
        except asyncio.TimeoutError:
            self._inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="close"))
            logger.warning("Closing page %s timed out", entry.page.url)
        except Exception as exc:  # noqa: BLE001 - a dead page is a closed page
            logger.debug("Closing page failed: %r", exc)
        finally:
            self._page_closed(entry)

    async def _close_page_now(self, entry: _Page, reason: str) -> None:
        """From a failure path (maybe cancelled): close in a task, wait for it bounded."""
        task = self._spawn(self._close_page(entry, reason))
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(task), self.opts.close_timeout + 0.5)

    def _carried(self, request: Request) -> _Page | None:
        page = request.meta.get("playwright_page")
        entry = self.entries.get(page) if isinstance(page, Page) else None
        return entry if entry is not None and not entry.closing else None

    def _on_scheduled(self, request: Request, **_: Any) -> None:
        """A new request carries an open page (a follow-up or a retry): keep the page for it."""
        entry = self._carried(request)
        if entry is not None:
            entry.scheduled = request

    def _on_dropped(self, request: Request, **_: Any) -> None:
        entry = self._carried(request)
        if entry is not None and entry.scheduled is request:
            entry.scheduled = None

    def _adopt(self, request: Request) -> _Page | None:
        """The open page this request carries (a retry/redirect of an include_page request)."""
        page = request.meta.get("playwright_page")
        if not isinstance(page, Page) or page.is_closed():
            return None
        entry = self.entries.get(page)
        if entry is None or entry.closing or entry.closed or entry.busy:
            return None
        entry.busy = True
        entry.request = request
        if entry.scheduled is request:
            entry.scheduled = None
        entry.lease.owner = request_id(request)
        entry.ctx.pages.extend(entry.lease, None)
        return entry

    # ------------------------------------------------------------------ sweeping
    async def _sweep_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.opts.check_interval)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must survive
                logger.exception("Playwright sweeper failed")

    def _in_progress(self) -> set[Request] | None:
        """Requests the engine still works on (download, middlewares, callback/errback)."""
        try:
            engine = self.crawler.engine
        except (AttributeError, RuntimeError):  # not crawling (yet): nothing is known done
            return None
        slot = getattr(engine, "_slot", None)
        inprogress = getattr(slot, "inprogress", None)
        if isinstance(inprogress, set):
            return inprogress
        if engine is None:
            return None
        found: set[Request] = set(getattr(engine.downloader, "active", ()))
        scraper_slot = getattr(engine.scraper, "slot", None)
        if scraper_slot is not None:
            found |= set(scraper_slot.active)
            found |= {queued[1] for queued in scraper_slot.queue}
        return found

    def sweep(self) -> None:
        """Close included pages of finished requests, expired pages and idle contexts."""
        inprogress = self._in_progress()
        if inprogress is not None:
            for entry in list(self.entries.values()):
                if not entry.busy and not entry.closing and entry.scheduled is None \
                        and entry.request not in inprogress:
                    self._spawn(self._close_page(entry, "after_callback"))
        for ctx in list(self.contexts.values()):
            ctx.pages.sweep()
        waiting = len(self.context_pool.waiters())
        if waiting:
            self._evict_idle_contexts(waiting)
        idle = self._idle_contexts()
        excess = len(idle) - self.opts.max_idle_contexts
        for ctx in idle[:max(excess, 0)]:
            self._start_closing_context(ctx, "idle")
        if self.opts.context_idle_timeout is not None:
            now = time.monotonic()
            for ctx in idle[max(excess, 0):]:
                if now - ctx.last_used >= self.opts.context_idle_timeout:
                    self._start_closing_context(ctx, "idle")

    # ------------------------------------------------------------------ downloading
    async def download(self, handler: SafePlaywrightDownloadHandler, request: Request) -> Response:
        spider = self.crawler.spider
        deadline = self._deadline(request)
        attempt = 0
        while True:
            try:
                return await self._download_once(handler, request, spider, deadline)
            except (BrowserCrashed, TargetClosedError) as exc:
                attempt += 1
                if attempt > self.config.target_closed_max_retries or self._closing \
                        or time.monotonic() >= deadline:
                    if isinstance(exc, BrowserCrashed):
                        raise
                    raise BrowserCrashed(str(exc)) from exc
                self._inc(ad_stats.PW_CRASH_RETRIES)
                logger.debug("Browser/page died under %s, retrying (%d)", request, attempt)

    async def _download_once(self, handler: SafePlaywrightDownloadHandler, request: Request,
                             spider: Any, deadline: float) -> Response:
        include = bool(request.meta.get("playwright_include_page"))
        entry = self._adopt(request)
        created = entry is None
        try:
            if entry is None:
                entry = await self._open_page(request, deadline, handler)
            response = await self._download_with(handler, entry, request, spider, deadline,
                                                 created)
        except BaseException as exc:
            if entry is not None:
                entry.busy = False
                reason = _failure_reason(exc)
                # an included page stays for the errback after an ordinary failure; it is
                # closed once the errback finished (sweep)
                if include and reason == "failure" and not entry.closed:
                    self._hand_over(entry)
                elif not entry.closed:
                    await self._close_page_now(entry, reason)
            raise
        entry.busy = False
        if include:
            self._hand_over(entry)
        return response

    def _hand_over(self, entry: _Page) -> None:
        """The page now belongs to user code: the last-resort age limit starts."""
        entry.ctx.pages.extend(entry.lease, self.opts.page_max_age)

    async def _download_with(self, handler: SafePlaywrightDownloadHandler, entry: _Page,
                             request: Request, spider: Any, deadline: float,
                             created: bool) -> Response:
        page = entry.page
        url = request.url
        call = partial(self._call, deadline=deadline, gone=(entry.ctx.gone, entry.gone), url=url)
        context_name = request.meta.setdefault("playwright_context", DEFAULT_CONTEXT_NAME)
        _attach_page_event_handlers(page=page, request=request, spider=spider,
                                    context_name=context_name)
        initial_request_done = asyncio.Event()
        if not created:
            await call("unroute", page.unroute("**"))
        await call("route", page.route("**", handler._make_request_handler(
            context_name=context_name, method=request.method, url=url,
            headers=request.headers, body=request.body, encoding=request.encoding,
            spider=spider, initial_request_done=initial_request_done)))
        await call("page_init_callback", _maybe_execute_page_init_callback(
            page=page, request=request, context_name=context_name, spider=spider))
        if request.meta.get("playwright_include_page"):
            request.meta["playwright_page"] = page

        start_time = time.time()
        response, download = await call(
            "goto", handler._get_response_and_download(request, page, spider))
        headers = Headers()
        if isinstance(response, PlaywrightResponse):
            await call("redirect_meta", _set_redirect_meta(request=request, response=response))
            headers = Headers(await call("all_headers", response.all_headers()))
            headers.pop("Content-Encoding", None)
        elif not download:
            logger.warning("Navigating to %s returned None, the response will have empty "
                           "headers and status 200", request)
        await self._apply_page_methods(entry, request, spider, call)
        body_str = await call("content", _get_page_content(
            page=page, spider=spider, context_name=context_name,
            scrapy_request_url=url, scrapy_request_method=request.method))
        request.meta["download_latency"] = time.time() - start_time

        server_ip_address = None
        if response is not None:
            with contextlib.suppress(PlaywrightError, KeyError, TypeError, ValueError,
                                     PlaywrightCallTimeout):
                request.meta["playwright_security_details"] = await call(
                    "security_details", response.security_details())
                server_addr = await call("server_addr", response.server_addr())
                server_ip_address = ip_address(server_addr["ipAddress"])

        if download and download.exception:
            raise download.exception
        if not request.meta.get("playwright_include_page"):
            await self._close_page(entry, None)
            handler.stats.inc_value("playwright/page_count/closed")

        if download:
            request.meta["playwright_suggested_filename"] = download.suggested_filename
            respcls = responsetypes.from_args(url=download.url, body=download.body)
            download_headers = Headers(download.headers)
            download_headers.pop("Content-Encoding", None)
            return respcls(url=download.url, status=download.response_status,
                           headers=download_headers, body=download.body, request=request,
                           flags=["playwright"])
        body, encoding = _encode_body(headers=headers, text=body_str)
        respcls = responsetypes.from_args(headers=headers, url=page.url, body=body)
        return respcls(url=page.url, status=response.status if response is not None else 200,
                       headers=headers, body=body, request=request, flags=["playwright"],
                       encoding=encoding, ip_address=server_ip_address)

    async def _apply_page_methods(self, entry: _Page, request: Request, spider: Any,
                                  call: Callable[..., Awaitable]) -> None:
        page = entry.page
        page_methods = request.meta.get("playwright_page_methods") or ()
        if isinstance(page_methods, dict):
            page_methods = page_methods.values()
        for pm in page_methods:
            if not isinstance(pm, PageMethod):
                logger.warning("Ignoring %r: expected PageMethod, got %r", pm, type(pm))
                continue
            try:
                method = partial(pm.method, page) if callable(pm.method) \
                    else getattr(page, pm.method)
            except AttributeError:
                logger.warning("Ignoring %r: could not find method", pm, exc_info=True)
                continue
            name = pm.method if isinstance(pm.method, str) \
                else getattr(pm.method, "__name__", "page_method")
            pm.result = await call(name, _maybe_await(method(*pm.args, **pm.kwargs)))
            await call("wait_for_load_state",
                       page.wait_for_load_state(timeout=self.config.navigation_timeout_ms))


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, PlaywrightCallTimeout):
        return "timeout"
    if isinstance(exc, (BrowserCrashed, TargetClosedError)):
        return "crash"
    return "failure"


# --------------------------------------------------------------------------- the handler


class SafePlaywrightDownloadHandler(ScrapyPlaywrightDownloadHandler):
    """scrapy-playwright's handler with every page/context closed and every call bounded."""

    def __init__(self, crawler: Crawler) -> None:
        ad_settings.load(crawler.settings, "playwright")  # a bad value fails here, named
        super().__init__(crawler)
        if self.config.use_threaded_loop:
            raise NotSupported("SafePlaywrightDownloadHandler needs the asyncio reactor's loop "
                               "(no threaded loop / Windows support)")
        self.session = _Session.attach(crawler, self)

    async def _launch(self) -> None:
        await self.session.start()

    async def download_request(self, request: Request) -> Response:  # type: ignore[override]
        if request.meta.get("playwright"):
            return await self.session.download(self, request)
        return await HTTP11DownloadHandler.download_request(self, request)

    async def close(self) -> None:  # type: ignore[override]
        logger.info("Closing download handler")
        try:
            await HTTP11DownloadHandler.close(self)
        finally:
            await self.session.release(id(self))


def configure_download_handlers(settings: Any) -> None:
    """Add-on configurer: where DOWNLOAD_HANDLERS names the stock handler, use ours.

    Only the exact stock class is replaced; a user's own subclass is left alone.
    """
    if not ad_settings.get(settings, "ANTIDEADLOCK_PLAYWRIGHT_ENABLED"):
        return
    handlers = settings["DOWNLOAD_HANDLERS"]
    for scheme, path in list(handlers.items()):
        if path is None:
            continue
        try:
            cls = load_object(path) if isinstance(path, str) else path
        except (ImportError, NameError, ValueError):
            continue
        if cls is ScrapyPlaywrightDownloadHandler:
            handlers.set(scheme, SAFE_PATH, handlers.getpriority(scheme) or 0)
