"""SafePlaywrightDownloadHandler: scrapy-playwright's handler, with the pack's guarantees
added at its seams.

The stock structure stays: ``browser_provider``, ``browser``, ``context_wrappers``,
``context_semaphore`` and the private methods keep their meaning. What changes is below:

* ``_download_request`` binds the request's deadline (every browser call inside ends by
  min(call cap, deadline)) and bounds the whole download by it;
* ``_download_request_with_retry`` (one attempt) closes the attempt's page on every failure,
  ``CancelledError`` included, or leaves an included page to the errback;
* ``_get_response_and_download`` (navigation) is bounded;
* page/context creation and the browser's lifecycle are in :mod:`.mirror`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from scrapy import signals
from scrapy.exceptions import NotSupported

from .. import settings as ad_settings
from .. import stats as ad_stats
from ..compat import playwright as pw_compat
from ..context import context_for
from .books import Books, ContextEntry, LeaseSemaphore
from .calls import CURRENT, Calls, Download, request_deadline
from .errors import BrowserCrashed, PlaywrightCallTimeout, attach_info
from .mirror import UpstreamMirror
from .shutdown import browser_pid, shutdown

__all__ = ["SafePlaywrightDownloadHandler"]

logger = logging.getLogger(__package__)
ROLE = "playwright"  # the crawler context's name for the handler that owns the browser
LAUNCH_MIN_BOUND = 30.0  # seconds; Playwright's own default launch timeout


def _failure_reason(exc: BaseException, download: Download | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "timeout" if download is not None and download.expired else "cancelled"
    if isinstance(exc, PlaywrightCallTimeout):
        return "timeout"
    if isinstance(exc, pw_compat.target_closed_error()):
        return "crash"
    return "failure"


class SafePlaywrightDownloadHandler(UpstreamMirror):
    """scrapy-playwright's handler with every page/context closed and every call bounded."""

    def __init__(self, crawler: Any) -> None:
        pw_compat.check()
        self.opts = ad_settings.load(crawler.settings, "playwright")  # bad value: named here
        super().__init__(crawler)
        if self.config.use_threaded_loop:
            raise NotSupported("SafePlaywrightDownloadHandler needs the asyncio reactor's loop "
                               "(no threaded loop / Windows support)")
        self.crawler = crawler
        context = context_for(crawler)
        primary = context.get(ROLE) if self.opts.share_browser else None
        self.primary: SafePlaywrightDownloadHandler = primary or self
        if primary is not None:  # one driver, browser and set of limits per crawler
            self.books, self.calls = primary.books, primary.calls
            self.context_wrappers = primary.context_wrappers
            if hasattr(primary, "context_semaphore"):
                self.context_semaphore = primary.context_semaphore
            return
        name = "playwright" if self.opts.share_browser else f"playwright-{id(self):x}"
        self.books = Books(name, crawler, self.opts, self.config.max_contexts,
                           self.config.max_pages_per_context, context.registry,
                           self.context_wrappers)
        self.calls = Calls(self.opts.call_timeout, crawler.stats, self.books.spawn)
        if self.config.max_contexts:
            self.context_semaphore = LeaseSemaphore(self.books.context_pool)
        self._creating: dict[str, asyncio.Future] = {}
        self._launching: asyncio.Future | None = None
        self._sweeper: asyncio.Future | None = None
        self._default_timeout = crawler.settings.getfloat("DOWNLOAD_TIMEOUT")
        if self.opts.share_browser:
            context.put(ROLE, self)
        crawler.signals.connect(self.books.on_scheduled, signal=signals.request_scheduled)
        crawler.signals.connect(self.books.on_dropped, signal=signals.request_dropped)
        crawler.signals.connect(self._on_spider_closed, signal=signals.spider_closed)

    def __getattr__(self, name: str) -> Any:
        """The other scheme's handler shows the shared browser as its own (read only)."""
        primary = self.__dict__.get("primary")
        if name in ("browser", "browser_provider", "browser_pid") and primary is not None \
                and primary is not self:
            return getattr(primary, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ lifecycle
    async def _launch(self) -> None:
        if self.primary is not self:
            return
        if self._launching is None:
            self._launching = asyncio.ensure_future(self._launch_once())
        await asyncio.shield(self._launching)

    async def _launch_once(self) -> None:
        # A launch takes what the machine gives it (seconds on a loaded host), not what a
        # page call should take: a short call cap must not fail the crawl at its start.
        bound = max(2 * self.opts.call_timeout, LAUNCH_MIN_BOUND)
        await self.calls.run("start", super()._launch(),
                             deadline=time.monotonic() + bound, cap=bound)
        for ctx in self.books.contexts.values():
            ctx.startup = True
        self._sweeper = asyncio.ensure_future(self.books.sweep_loop())

    async def _find_browser_pid(self, browser: Any) -> int | None:
        if self.config.cdp_url or self.config.connect_url:
            return None  # never kill a browser we did not launch
        return await browser_pid(browser)

    async def _on_spider_closed(self, **_: Any) -> None:
        """Close the pages of finished requests now, bounded, so the stats dump counts them
        (the handler itself is closed only after the dump)."""
        if not self.books.closing:
            self.books.sweep()
            await self.books.drain(self.opts.close_timeout + 0.5)

    async def _close(self) -> None:
        if self.primary is not self or self.books.closing:
            return
        context_for(self.crawler).remove(ROLE, self)
        if self._sweeper is not None:
            self._sweeper.cancel()
        await shutdown(self, self.books, self.opts.shutdown_timeout, self.calls.pending)

    # ------------------------------------------------------------------ contexts
    async def _context_for(self, request: Any, spider: Any) -> ContextEntry:
        """The request's context, created if needed without blocking other contexts."""
        name = request.meta.setdefault("playwright_context", pw_compat.default_context_name())
        while True:
            ctx = self.books.contexts.get(name)
            if ctx is not None and not ctx.closing and not ctx.gone.done():
                return ctx
            pending = self._creating.get(name)
            if ctx is not None and ctx.closing:
                pending = asyncio.ensure_future(ctx.done.wait())
            if pending is not None:
                remaining = self.calls.deadline() - time.monotonic()
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
                await self._create_browser_context(
                    name=name, context_kwargs=request.meta.get("playwright_context_kwargs"),
                    spider=spider)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    creating.set_exception(exc)
                    creating.exception()
                else:
                    creating.cancel()
                raise
            else:
                creating.set_result(None)
            finally:
                self._creating.pop(name, None)

    # ------------------------------------------------------------------ downloading
    async def _download_request(self, request: Any, spider: Any = None) -> Any:
        if self.primary is not self:
            return await self.primary._download_request(request, spider)
        if getattr(self, "browser_provider", None) is None:
            await self._launch()  # a download before engine_started (direct use)
        download = Download(request, request_deadline(request, self._default_timeout))
        token = CURRENT.set(download)
        try:
            return await self._within_deadline(super()._download_request(request, spider),
                                               download)
        except BrowserCrashed as exc:
            attach_info(exc, call=download.call, attempts=download.attempts)
            raise
        except pw_compat.target_closed_error() as exc:
            # still a TargetClosedError for errbacks, and a DownloadFailedError for retries
            crashed = BrowserCrashed(str(exc), download.call, request.url)
            raise attach_info(crashed, call=download.call, attempts=download.attempts) from exc
        except BaseException as exc:
            attach_info(exc, call=download.call, attempts=download.attempts)
            raise
        finally:
            CURRENT.reset(token)

    async def _within_deadline(self, coro: Any, download: Download) -> Any:
        """Bound the whole download (retries included) by the request's deadline; a call
        left unbounded upstream (routing, init callback) cannot outlive it."""
        task = asyncio.ensure_future(coro)
        grace = self.opts.close_timeout
        started = time.monotonic()
        try:
            done, _ = await asyncio.wait({task}, timeout=download.deadline - time.monotonic()
                                         + grace)
        except BaseException:
            task.cancel()
            await asyncio.wait({task}, timeout=grace + 1.0)
            raise
        if done:
            return task.result()
        download.expired = True
        task.cancel()
        await asyncio.wait({task}, timeout=grace + 1.0)
        self.calls.timed_out("download")
        exc = PlaywrightCallTimeout("download", time.monotonic() - started, download.request.url)
        raise attach_info(exc, last_call=download.call)

    async def _download_request_with_retry(self, request: Any, spider: Any) -> Any:
        download = CURRENT.get()
        if download is not None and download.request is not request:
            download = None
        entry = self.books.adopt(request)
        if download is not None:
            download.entry = entry
            download.attempts += 1
        include = bool(request.meta.get("playwright_include_page"))
        try:
            response = await super()._download_request_with_retry(request, spider)
        except BaseException as exc:
            await self._after_failure(exc, download, include)
            raise
        entry = download.entry if download is not None else None
        if entry is not None and not entry.closed and include:
            self.books.hand_over(entry)
        return response

    async def _after_failure(self, exc: BaseException, download: Download | None,
                             include: bool) -> None:
        reason = _failure_reason(exc, download)
        if reason == "crash" and download is not None \
                and download.attempts <= self.config.target_closed_max_retries:
            self.books.inc(ad_stats.PW_CRASH_RETRIES)
        entry = download.entry if download is not None else None
        if entry is None:
            return
        entry.busy = False
        if entry.closed:  # upstream closed it (failed request without include_page)
            if reason == "timeout":
                self.books.inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason=reason))
        elif include and reason == "failure":
            self.books.hand_over(entry)  # for the errback; closed once it finished (sweep)
        else:
            await self.books.close_page_now(entry, reason)

    async def _get_response_and_download(self, request: Any, page: Any, spider: Any) -> Any:
        entry = self.books.pages.get(page)
        gone = (entry.ctx.gone, entry.gone) if entry is not None else ()
        cap = self.opts.call_timeout + 2 * self.config.download_timeout_secs
        return await self.calls.run(
            "goto", super()._get_response_and_download(request, page, spider), gone=gone,
            url=request.url, cap=cap)
