"""Bounded browser calls: every await on the browser ends by min(call cap, request deadline).

The download in progress is kept in a context variable (:data:`CURRENT`), so the handler's
overridden methods, called by scrapy-playwright's own code in between, find the request's
deadline and the page they work on without extra parameters. Called outside a download (a
test calling ``_create_page`` directly), a call is bounded by the cap alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import metakeys
from .. import stats as ad_stats
from .errors import BrowserCrashed, PlaywrightCallTimeout

__all__ = ["CURRENT", "Calls", "Download", "consume", "request_deadline"]

_YEAR = 365 * 86400.0


@dataclass(eq=False)
class Download:
    """One Playwright download in progress (one per request, across retries)."""

    request: Any
    deadline: float
    entry: Any = None  # the page entry of the current attempt (pages.PageEntry)
    call: str = "download"  # the browser call in progress (names a whole-download timeout)
    attempts: int = 0  # scrapy-playwright retries an attempt whose target closed
    expired: bool = False  # the whole download overran the request's deadline


CURRENT: contextvars.ContextVar[Download | None] = contextvars.ContextVar(
    "antideadlock_playwright_download", default=None)


def consume(task: asyncio.Future) -> None:
    """Mark a background result as retrieved (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


def call_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "call"


def request_deadline(request: Any, default_timeout: float) -> float:
    """Monotonic deadline of ``request``: its ``antideadlock_deadline`` or its
    ``download_timeout`` (else DOWNLOAD_TIMEOUT), whichever is sooner."""
    now = time.monotonic()
    bounds = [now + _YEAR]
    absolute = request.meta.get(metakeys.DEADLINE)
    if isinstance(absolute, (int, float)) and not isinstance(absolute, bool):
        bounds.append(float(absolute))
    timeout = request.meta.get("download_timeout", default_timeout)
    if timeout:
        bounds.append(now + float(timeout))
    return min(bounds)


class Calls:
    """Runs browser calls within their bound and counts the ones that overran."""

    def __init__(self, cap: float, stats: Any, spawn: Callable[[Awaitable], Any]) -> None:
        self.cap = cap
        self.stats = stats
        self.spawn = spawn
        self.pending: set[asyncio.Future] = set()  # abandoned calls still running

    def deadline(self) -> float:
        current = CURRENT.get()
        return current.deadline if current is not None else time.monotonic() + self.cap

    def timed_out(self, call: str) -> None:
        if self.stats is not None:
            self.stats.inc_value(ad_stats.family(ad_stats.PW_CALL_TIMEOUTS, call=call_name(call)))

    async def run(self, call: str, awaitable: Awaitable, *,
                  gone: Iterable[asyncio.Future | None] = (), url: str = "",
                  cleanup: Callable[[Any], Awaitable] | None = None,
                  deadline: float | None = None, cap: float | None = None) -> Any:
        """Await ``awaitable`` for at most min(cap, time to the deadline).

        Fails at once with :class:`BrowserCrashed` when one of ``gone`` completes (the
        browser, context or page died). A call given up on is cancelled or, with
        ``cleanup``, left to finish so whatever it opens late is closed.
        """
        current = CURRENT.get()
        if current is not None:
            current.call = call
            url = url or current.request.url
        end = self.deadline() if deadline is None else deadline
        timeout = min(self.cap if cap is None else cap, end - time.monotonic())
        task = asyncio.ensure_future(awaitable)
        watch = {f for f in gone if f is not None}
        if timeout <= 0:
            self._abandon(task, cleanup)
            self.timed_out(call)
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
            raise BrowserCrashed(f"browser or page died during {call} ({url})", call, url)
        self.timed_out(call)
        raise PlaywrightCallTimeout(call, timeout, url)

    def _abandon(self, task: asyncio.Future, cleanup: Callable[[Any], Awaitable] | None) -> None:
        if cleanup is None:
            task.cancel()
            task.add_done_callback(consume)
            return

        def late(done: asyncio.Future) -> None:
            self.pending.discard(done)
            if not done.cancelled() and done.exception() is None:
                self.spawn(cleanup(done.result()))

        task.add_done_callback(late)
        task.add_done_callback(consume)
        self.pending.add(task)  # cancelled at shutdown if the browser never answers
