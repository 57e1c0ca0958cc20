"""Every request the downloader guard is responsible for, and how to cancel one.

An :class:`InFlightDownload` lives from the deadline middleware's ``process_request``
to the end of the transfer. The watchdog and recovery read the tracker (contract:
``inflight_for(crawler)``) and cancel through it; a cancelled request reaches
``process_exception`` as an ordinary :class:`DownloadCancelled`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import signals as ad_signals
from .. import stats as ad_stats
from ..exceptions import DownloadCancelled
from ..identity import describe

if TYPE_CHECKING:
    from scrapy import Request

    from ..primitives import Lease
    from .core import DownloadGuard

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class InFlightDownload:
    """A request between the deadline middleware and the end of its transfer."""

    request: Request
    owner: str
    started: float
    deadline: float | None
    stage: str  # "queued" | "lease_wait" | "transfer"
    slot: str = ""
    timeout: float | None = None
    key: str = ""  # latency key: the slot, or "<slot> [playwright]" for browser downloads
    transfer_started: float | None = None
    lease: Lease | None = None
    cancel_exc: DownloadCancelled | None = None
    waker: asyncio.Future[None] | None = None
    task: asyncio.Task[Any] | None = None  # the task running the transfer inline (transfer.py)
    interrupted: bool = False  # ``task`` was interrupted by :meth:`wake`
    handler: Any = None  # the wrapped handler of an inline transfer (starts its hedge)
    copy: asyncio.Task[Any] | None = None  # an inline transfer's hedge
    lent: Any = None  # the downloader slot whose concurrency this transfer lent, or True
    hedge: str | None = None  # None | "asked" | "running" | "won": a second copy of the transfer
    hedge_started: float | None = None  # when the second copy started
    provisional: bool = False  # given while its slot was cold: tightened once it is warm

    @property
    def waiting(self) -> bool:
        """Whether a handler waits on this request: on its waker (a lease wait, a transfer in
        a task of ours) or inside an inline transfer."""
        return self.waker is not None and not self.waker.done() or self.task is not None

    def wake(self) -> bool:
        """Wake the handler waiting on this request (to raise ``cancel_exc``, or to take a
        hedge's answer): resolve its waker, or interrupt the task running its transfer
        inline. False when nothing waits (still queued, or in a middleware after ours)."""
        waker = self.waker
        if waker is not None:
            if not waker.done():
                waker.set_result(None)
            return True
        task = self.task
        if task is not None:
            if not self.interrupted:
                self.interrupted = True
                task.cancel()  # safe: the task is suspended inside transfer.inline's await
            return True
        return False


class InFlightTracker:
    """Every request the pack is responsible for, and the way to cancel one of them."""

    def __init__(self, guard: DownloadGuard) -> None:
        self._guard = guard
        self._entries: dict[Request, InFlightDownload] = {}

    def items(self) -> list[InFlightDownload]:
        return list(self._entries.values())

    def get(self, request: Request) -> InFlightDownload | None:
        return self._entries.get(request)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: InFlightDownload) -> None:
        self._entries[entry.request] = entry

    def finish(self, request: Request) -> None:
        self._entries.pop(request, None)

    def overdue(self, now: float | None = None) -> list[InFlightDownload]:
        now = time.monotonic() if now is None else now
        return [e for e in self._entries.values() if e.deadline is not None and e.deadline <= now]

    def cancel_threadsafe(self, request: Request, reason: str, *, retry: bool = False) -> None:
        """:meth:`cancel` from another thread (e.g. the watchdog's monitor thread)."""
        loop = self._guard.loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: self.cancel(request, reason, retry=retry))

    def cancel(self, request: Request, reason: str, *, retry: bool = False,
               exc: DownloadCancelled | None = None) -> bool:
        """Cancel ``request``; it reaches process_exception/errback as ``DownloadCancelled``.

        Returns False if the request is not in flight (or is already cancelled). Call it
        on the crawler's event loop; from another thread use :meth:`cancel_threadsafe`.
        """
        entry = self._entries.get(request)
        if entry is None or entry.cancel_exc is not None:
            return False
        entry.cancel_exc = exc or DownloadCancelled(reason, stage=entry.stage, retry=retry)
        guard = self._guard
        guard.inc(ad_stats.DEADLINE_CANCELS)
        logger.debug("cancelling %s (%s): %s", describe(request), entry.stage, entry.cancel_exc)
        guard.crawler.signals.send_catch_log(ad_signals.download_cancelled, request=request,
                                             reason=str(entry.cancel_exc))
        # wake the handler, which raises cancel_exc; or fail the request still queued
        if not entry.wake() and entry.stage == "queued" and guard.remove_from_slot_queue(entry):
            self.finish(request)
        # else: still in a middleware after ours; the handler raises cancel_exc on arrival
        return True
