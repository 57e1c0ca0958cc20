"""The transfer itself: cancellable, and hedged when it runs past its slot's p99.

Cancelling Scrapy's own download task hangs the engine, so the wrapped handler runs in a
task of ours; a cancel (or the guard's deadline check) wakes us and we raise an ordinary
exception instead. With DEADLINE_HEDGE (on by default), a GET or HEAD transfer still
running past its slot's overdue threshold (transfer p99 x DEADLINE_LEND_AFTER) gets a
second copy ("hedge", as in Dean and Barroso's "The Tail at Scale"): the first copy to
answer wins and the other is cancelled. A request hung at the site then costs about its
slot's p99, not its whole deadline and a retry; hedges count in the lending bound, and
never go through a leased proxy, a browser or a slot with a download delay.
A winning hedge's latency is timed from its own start (see DownloadGuard.download).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import stats as ad_stats
from ..identity import describe

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.http import Response

    from .core import DownloadGuard
    from .inflight import InFlightDownload

logger = logging.getLogger(__name__)

HEDGE_METHODS = frozenset({"GET", "HEAD"})


def may_hedge(entry: InFlightDownload) -> bool:
    """Whether a second copy of this transfer is harmless: idempotent, no leased proxy,
    not a browser download."""
    return (entry.request.method in HEDGE_METHODS and entry.lease is None
            and not entry.key.endswith("[playwright]"))


async def transfer(guard: DownloadGuard, entry: InFlightDownload, handler: Any,
                   request: Request) -> Response:
    """``handler.download_request(request)``; raises ``entry.cancel_exc`` when woken by a
    cancel or the deadline, starts a hedge when the guard asks for one."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(handler.download_request(request))]

    def wake(_: Any = None) -> None:
        waker = entry.waker
        if waker is not None and not waker.done():
            waker.set_result(None)

    tasks[0].add_done_callback(wake)
    winner = None
    try:
        while True:
            entry.waker = loop.create_future()
            if entry.cancel_exc is not None:  # no copy can have finished: none ran yet
                break
            await entry.waker  # a copy finished, a cancel/deadline, or a hedge was asked
            winner = _winner(tasks)
            if winner is not None or entry.cancel_exc is not None:
                break
            if entry.hedge == "asked":
                entry.hedge = "running"
                entry.hedge_started = time.monotonic()
                hedge = loop.create_task(handler.download_request(request))
                hedge.add_done_callback(wake)
                tasks.append(hedge)
                guard.inc(ad_stats.DEADLINE_HEDGES)
    except asyncio.CancelledError:
        _drop(tasks)
        raise
    finally:
        entry.waker = None
    if winner is not None:
        _drop([t for t in tasks if t is not winner])
        if winner is not tasks[0] and not winner.cancelled() and winner.exception() is None:
            entry.hedge = "won"
            guard.inc(ad_stats.DEADLINE_HEDGE_WINS)
        return winner.result()
    exc = entry.cancel_exc
    assert exc is not None
    for task in tasks:
        task.cancel()  # our own tasks: Scrapy's download task just sees exc below
    await asyncio.wait(set(tasks), timeout=guard.cancel_grace)
    _drop(tasks)
    if not all(task.done() for task in tasks):
        logger.warning("download of %s did not unwind %.1fs after cancel; abandoned",
                       describe(request), guard.cancel_grace)
    raise exc


def _winner(tasks: list[asyncio.Task[Any]]) -> asyncio.Task[Any] | None:
    """The first copy that answered; or, once every copy failed, the first failure."""
    if len(tasks) == 1:  # no hedge: the only copy, once done, is the answer either way
        return tasks[0] if tasks[0].done() else None
    done = [task for task in tasks if task.done()]
    for task in done:
        if not task.cancelled() and task.exception() is None:
            return task
    return done[0] if done and len(done) == len(tasks) else None


def _drop(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        if not task.done():
            task.cancel()
        task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
