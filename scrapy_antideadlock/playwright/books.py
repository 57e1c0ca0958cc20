"""The handler's books: which pages and contexts are open, who holds them, and their leases.

Page and context limits are :class:`LeasePool` s in the crawler's registry (the watchdog and
the health line read them there). scrapy-playwright's ``context_semaphore`` and each
``BrowserContextWrapper.semaphore`` are :class:`LeaseSemaphore` views of the same pools, so
code that reads ``semaphore._value`` sees the truth.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from .. import stats as ad_stats
from ..compat import scrapy as scrapy_compat
from ..identity import request_id
from ..primitives.lease import Lease, LeasePool, LeaseTimeout, PoolClosed
from .calls import consume
from .errors import BrowserCrashed, PlaywrightSlotTimeout

__all__ = ["Books", "ContextEntry", "LeaseSemaphore", "PageEntry"]

logger = logging.getLogger(__name__)
upstream_logger = logging.getLogger("scrapy-playwright")  # where users look for context events

UNLIMITED = 2**31 - 1  # capacity of the context pool when PLAYWRIGHT_MAX_CONTEXTS is unset


class LeaseSemaphore:
    """An ``asyncio.Semaphore``-shaped view of a lease pool (``_value``, ``locked``,
    ``acquire``/``release``) for code written against scrapy-playwright's semaphores."""

    def __init__(self, pool: LeasePool) -> None:
        self.pool = pool
        self._held: list[Lease] = []

    @property
    def _value(self) -> int:
        return self.pool.capacity - self.pool.in_use

    def locked(self) -> bool:
        return self._value <= 0

    async def acquire(self) -> bool:
        self._held.append(await self.pool.acquire("semaphore", timeout=UNLIMITED))
        return True

    def release(self) -> None:
        if self._held:
            self._held.pop().release()


@dataclass(eq=False)
class ContextEntry:
    name: str
    context: Any
    wrapper: Any  # scrapy-playwright's BrowserContextWrapper, as in context_wrappers
    pages: LeasePool
    lease: Lease
    gone: asyncio.Future  # done when its browser (or, persistent, itself) closed
    persistent: bool = False
    startup: bool = False
    entries: set[PageEntry] = field(default_factory=set)
    users: int = 0  # requests between "got this context" and "have a page in it"
    last_used: float = field(default_factory=time.monotonic)
    closing: bool = False
    closed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class PageEntry:
    page: Any
    ctx: ContextEntry
    lease: Lease
    request: Any  # current owner; an included page passes to a follow-up request
    gone: asyncio.Future  # done when the page closed or crashed
    busy: bool = True  # a download runs on it
    scheduled: Any = None  # a follow-up request carrying it waits in the scheduler
    closing: bool = False
    closed: bool = False


class Books:
    """Open pages and contexts of one handler, their leases, and the sweeps that close them."""

    def __init__(self, name: str, crawler: Any, opts: Any, max_contexts: int | None,
                 max_pages: int, registry: Any, wrappers: dict[str, Any]) -> None:
        self.name = name
        self.crawler = crawler
        self.opts = opts
        self.stats = crawler.stats
        self.max_pages = max_pages
        self.registry = registry
        self.wrappers = wrappers  # the handler's context_wrappers, kept in step
        self.contexts: dict[str, ContextEntry] = {}
        self.pages: dict[Any, PageEntry] = {}
        self.context_pool = LeasePool(f"{name}/contexts", max_contexts or UNLIMITED,
                                      kind="context")
        registry.register(self.context_pool)
        self.tasks: set[asyncio.Future] = set()
        self.closing = False
        self._serial = 0
        self._evictions = 0

    # ------------------------------------------------------------------ helpers
    def inc(self, name: str, count: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc_value(name, count)

    def spawn(self, coro: Awaitable) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(consume)
        return task

    async def acquire(self, pool: LeasePool, call: str, owner: str, deadline: float,
                      **kwargs: Any) -> Lease:
        """A slot within min(slot timeout, time left), else PlaywrightSlotTimeout."""
        timeout = max(min(self.opts.slot_timeout, deadline - time.monotonic()), 0.0)
        try:
            return await pool.acquire(owner, timeout=timeout, **kwargs)
        except LeaseTimeout as exc:
            self.inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call=call))
            raise PlaywrightSlotTimeout(exc.pool, exc.owner, exc.waited) from None

    # ------------------------------------------------------------------ contexts
    async def context_slot(self, name: str, deadline: float) -> Lease:
        lease = self.context_pool.try_acquire(f"context:{name}")
        if lease is None:
            self.make_room(extra=1)
            lease = await self.acquire(self.context_pool, "context_slot", f"context:{name}",
                                       deadline)
        return lease

    def add_context(self, name: str, context: Any, wrapper: Any, lease: Lease,
                    gone: asyncio.Future, persistent: bool) -> ContextEntry:
        self._serial += 1
        pages = LeasePool(f"{self.name}/pages/{name}#{self._serial}", self.max_pages,
                          kind="page")
        self.registry.register(pages)
        ctx = ContextEntry(name, context, wrapper, pages, lease, gone, persistent=persistent)
        old = self.contexts.get(name)
        if old is not None:
            self.forget_context(old, "replaced")
        self.contexts[name] = ctx
        self.wrappers[name] = wrapper
        self.inc(ad_stats.PW_CONTEXTS_OPENED)
        return ctx

    def forget_context(self, ctx: ContextEntry, reason: str | None) -> bool:
        """Book a context as closed (once): its pages are gone, its leases returned."""
        if ctx.closed:
            return False
        ctx.closed = ctx.closing = True
        if reason == "crash":
            self.inc(ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason="crash"))
        if self.contexts.get(ctx.name) is ctx:
            del self.contexts[ctx.name]
        if self.wrappers.get(ctx.name) is ctx.wrapper:
            del self.wrappers[ctx.name]
        if ctx.persistent and not ctx.gone.done():
            ctx.gone.set_result(True)  # pending calls on its pages fail at once
        for entry in list(ctx.entries):
            if not entry.closed and reason == "crash":
                self.inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason="crash"))
            self.page_closed(entry)
        ctx.lease.release(reason or "closed")
        ctx.pages.close()
        self.registry.unregister(ctx.pages)
        self.inc(ad_stats.PW_CONTEXTS_CLOSED)
        ctx.done.set()
        return True

    def start_closing_context(self, ctx: ContextEntry, reason: str) -> asyncio.Future | None:
        """Claim a context for closing (nobody takes a page in it any more) and close it in
        a task within the close bound."""
        if ctx.closing:
            return None
        ctx.closing = True
        self.inc(ad_stats.family(ad_stats.PW_CONTEXTS_FORCE_CLOSED, reason=reason))
        return self.spawn(self._close_context(ctx))

    async def _close_context(self, ctx: ContextEntry) -> None:
        try:
            await asyncio.wait_for(ctx.context.close(), self.opts.close_timeout)
        except asyncio.TimeoutError:
            self.inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="context_close"))
            logger.warning("Closing context %r timed out", ctx.name)
        except Exception as exc:  # noqa: BLE001 - the browser may be gone already
            logger.debug("Closing context %r failed: %r", ctx.name, exc)
        finally:
            self.forget_context(ctx, None)

    def idle_contexts(self) -> list[ContextEntry]:
        return sorted((c for c in self.contexts.values()
                       if not c.startup and not c.entries and c.users == 0 and not c.closing),
                      key=lambda c: c.last_used)

    def make_room(self, extra: int = 0) -> None:
        """A request waits for a context slot (PLAYWRIGHT_MAX_CONTEXTS): close the least
        recently used idle contexts, one per waiter not already served by a closing one.

        The only way a context the user named is closed mid-crawl by default: it breaks a
        wait that would otherwise end in PlaywrightSlotTimeout (upstream: a deadlock)."""
        closing = sum(1 for c in self.contexts.values() if c.closing)
        needed = len(self.context_pool.waiters()) + extra - closing
        if needed <= 0 or self.closing:
            return
        for ctx in self.idle_contexts()[:needed]:
            self._evictions += 1
            first = self._evictions == 1  # logged once; the stat counts every one
            upstream_logger.log(
                logging.INFO if first else logging.DEBUG,
                "[Context=%s] Closing idle context to make room for a request waiting for a "
                "context slot (PLAYWRIGHT_MAX_CONTEXTS=%i); its cookies and storage are gone%s",
                ctx.name, self.context_pool.capacity,
                " (later ones at DEBUG; each one counted in stat "
                "antideadlock/playwright/contexts/force_closed/evicted)" if first else "",
                extra={"spider": getattr(self.crawler, "spider", None),
                       "context_name": ctx.name})
            self.start_closing_context(ctx, "evicted")

    # ------------------------------------------------------------------ pages
    async def page_slot(self, ctx: ContextEntry, request: Any, deadline: float) -> Lease:
        try:  # the age limit (on_expire) starts once the page is handed over
            return await self.acquire(ctx.pages, "page_slot", request_id(request), deadline,
                                      on_expire=self._on_page_expired)
        except PoolClosed:
            raise BrowserCrashed(f"context {ctx.name!r} closed while waiting") from None

    def add_page(self, page: Any, ctx: ContextEntry, lease: Lease, request: Any) -> PageEntry:
        entry = PageEntry(page, ctx, lease, request, asyncio.get_running_loop().create_future())
        ctx.entries.add(entry)
        self.pages[page] = entry
        page.on("close", lambda *_: self.page_closed(entry))
        page.on("crash", lambda *_: self._on_page_crash(entry))
        self.inc(ad_stats.PW_PAGES_OPENED)
        return entry

    def page_closed(self, entry: PageEntry) -> None:
        """Book a page as closed exactly once and return its slot."""
        if entry.closed:
            return
        entry.closed = entry.closing = True
        if not entry.gone.done():
            entry.gone.set_result(True)
        if not entry.lease.released:  # an expired (age-limited) lease is back already
            entry.lease.release("closed")
        ctx = entry.ctx
        ctx.entries.discard(entry)
        ctx.last_used = time.monotonic()
        if self.pages.get(entry.page) is entry:
            del self.pages[entry.page]
        self.inc(ad_stats.PW_PAGES_CLOSED)
        if not self.closing and self.context_pool.waiters():
            self.make_room()

    def _on_page_crash(self, entry: PageEntry) -> None:
        if entry.closed:
            return
        self.inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason="crash"))
        entry.closing = True
        self.spawn(self.close_quietly(entry.page))
        self.page_closed(entry)

    def _on_page_expired(self, lease: Lease) -> None:
        for entry in list(self.pages.values()):
            if entry.lease is lease:
                self.spawn(self.close_page(entry, "age"))

    async def close_quietly(self, obj: Any) -> None:
        try:
            await asyncio.wait_for(obj.close(), self.opts.close_timeout)
        except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - closing what may be dead
            pass

    async def close_page(self, entry: PageEntry, reason: str | None) -> None:
        """Close a page within the close bound; ``reason`` set: counted as force-closed."""
        if entry.closing or entry.closed:
            return
        entry.closing = True
        if reason is not None:
            self.inc(ad_stats.family(ad_stats.PW_PAGES_FORCE_CLOSED, reason=reason))
        try:
            await asyncio.wait_for(entry.page.close(), self.opts.close_timeout)
        except asyncio.TimeoutError:
            self.inc(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call="close"))
            logger.warning("Closing page %s timed out", entry.page.url)
        except Exception as exc:  # noqa: BLE001 - a dead page is a closed page
            logger.debug("Closing page failed: %r", exc)
        finally:
            self.page_closed(entry)

    async def close_page_now(self, entry: PageEntry, reason: str) -> None:
        """From a failure path (maybe cancelled): close in a task, wait for it bounded."""
        task = self.spawn(self.close_page(entry, reason))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.opts.close_timeout + 0.5)
        except BaseException:  # noqa: BLE001 - the task goes on; the caller's error wins
            pass

    def hand_over(self, entry: PageEntry) -> None:
        """The page now belongs to user code: the last-resort age limit starts."""
        entry.busy = False
        entry.ctx.pages.extend(entry.lease, self.opts.page_max_age)

    def carried(self, request: Any) -> PageEntry | None:
        entry = self.pages.get(request.meta.get("playwright_page"))
        return entry if entry is not None and not entry.closing else None

    def adopt(self, request: Any) -> PageEntry | None:
        """The open page this request carries (a follow-up or retry of an include_page
        request): it now belongs to this request."""
        entry = self.carried(request)
        if entry is None or entry.busy or entry.page.is_closed():
            return None
        entry.busy = True
        entry.request = request
        if entry.scheduled is request:
            entry.scheduled = None
        entry.lease.owner = request_id(request)
        entry.ctx.pages.extend(entry.lease, None)
        return entry

    def on_scheduled(self, request: Any, **_: Any) -> None:
        """A new request carries an open page: keep the page for it."""
        entry = self.carried(request)
        if entry is not None:
            entry.scheduled = request

    def on_dropped(self, request: Any, **_: Any) -> None:
        entry = self.carried(request)
        if entry is not None and entry.scheduled is request:
            entry.scheduled = None

    # ------------------------------------------------------------------ sweeping
    def _in_progress(self) -> set[Any] | None:
        """Requests the engine still works on (download, middlewares, callback/errback)."""
        engine = scrapy_compat.engine_or_none(self.crawler)
        if engine is None:
            return None  # not crawling (yet): nothing is known done
        found = scrapy_compat.in_progress(engine)
        if found is not None:
            return found
        return (set(getattr(engine.downloader, "active", ()))
                | scrapy_compat.scraper_active(engine) | scrapy_compat.scraper_queued(engine))

    def sweep(self) -> None:
        """Close included pages of finished requests, expired pages and idle contexts."""
        inprogress = self._in_progress()
        if inprogress is not None:
            for entry in list(self.pages.values()):
                if not entry.busy and not entry.closing and entry.scheduled is None \
                        and entry.request not in inprogress:
                    self.spawn(self.close_page(entry, "after_callback"))
        for ctx in list(self.contexts.values()):
            ctx.pages.sweep()
        self.make_room()
        idle = self.idle_contexts()  # opt-in cleanup below: both settings are None by default
        excess = 0
        if self.opts.max_idle_contexts is not None:
            excess = max(len(idle) - self.opts.max_idle_contexts, 0)
            for ctx in idle[:excess]:
                self.start_closing_context(ctx, "idle")
        if self.opts.context_idle_timeout is not None:
            now = time.monotonic()
            for ctx in idle[excess:]:
                if now - ctx.last_used >= self.opts.context_idle_timeout:
                    self.start_closing_context(ctx, "idle")

    async def sweep_loop(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.opts.check_interval)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must survive
                logger.exception("Playwright sweeper failed")

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for background closes to finish."""
        pending = [task for task in self.tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def close_pools(self) -> None:
        self.context_pool.close()
        self.registry.unregister(self.context_pool)
        for ctx in list(self.contexts.values()):
            ctx.pages.close()
            self.registry.unregister(ctx.pages)
