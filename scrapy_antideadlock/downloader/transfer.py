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

Scrapy's own handlers unwind at once when cancelled, so theirs run inline instead
(:func:`inline`): in the calling task, with no task or future of ours (about 8 us per
download less). What the task of ours was for, the calling task then does: a cancel, a
deadline or a winning hedge interrupts it with ``Task.cancel()`` while it is suspended
inside the handler, and :func:`inline` turns that back into an ordinary exception (or the
hedge's response) before Scrapy's code sees it; the hedge is started by the guard's check.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import stats as ad_stats
from ..identity import describe

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from scrapy import Request
    from scrapy.http import Response

    from .core import DownloadGuard
    from .inflight import InFlightDownload

logger = logging.getLogger(__name__)

HEDGE_METHODS = frozenset({"GET", "HEAD"})
_SCRAPY_HANDLERS = "scrapy.core.downloader.handlers."
#: A handler class attribute: True runs its transfers inline, False in a task of ours.
UNWINDS_ATTRIBUTE = "antideadlock_unwinds_on_cancel"
_unwinds: dict[type, bool] = {}


def may_hedge(entry: InFlightDownload) -> bool:
    """Whether a second copy of this transfer is harmless: idempotent, no leased proxy,
    not a browser download."""
    return (entry.request.method in HEDGE_METHODS and entry.lease is None
            and not entry.key.endswith("[playwright]"))


def runs_inline(handler: Any) -> bool:
    """Whether ``handler`` unwinds at once when cancelled: one of Scrapy's own, or a class
    that says so (``antideadlock_unwinds_on_cancel = True``). Any other keeps the task of
    ours, abandoned DEADLINE_CANCEL_GRACE after a cancel if it has not unwound by then."""
    cls = type(handler)
    found = _unwinds.get(cls)
    if found is None:
        said = getattr(cls, UNWINDS_ATTRIBUTE, None)
        found = _unwinds[cls] = (cls.__module__.startswith(_SCRAPY_HANDLERS) if said is None
                                 else bool(said))
    return found


def transfer(guard: DownloadGuard, entry: InFlightDownload, handler: Any,
             request: Request) -> Coroutine[Any, Any, Response]:
    """``handler.download_request(request)``; raises ``entry.cancel_exc`` when woken by a
    cancel or the deadline, starts a hedge when the guard asks for one. (A plain function
    returning the coroutine to await: no coroutine of its own per download.)"""
    if runs_inline(handler):
        task = asyncio.current_task()
        if task is not None:
            return inline(guard, entry, handler, request, task)
    return _in_tasks(guard, entry, handler, request)


async def _in_tasks(guard: DownloadGuard, entry: InFlightDownload, handler: Any,
                    request: Request) -> Response:
    """The transfer in a task of ours (a handler that may not unwind at once on cancel)."""
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


async def inline(guard: DownloadGuard, entry: InFlightDownload, handler: Any,
                 request: Request, task: asyncio.Task[Any]) -> Response:
    """The transfer in the calling ``task``; :meth:`InFlightDownload.wake` interrupts it.

    The interrupt is ``task.cancel()``, made only while ``entry.task`` is set, i.e. while
    ``task`` is suspended in the await below (the loop runs one thing at a time), so the
    CancelledError arrives there and never reaches Scrapy's code.
    """
    entry.task, entry.handler = task, handler
    try:
        try:
            response = await handler.download_request(request)
        except BaseException as exc:
            if entry.interrupted:
                return _answer_after_interrupt(guard, entry, task)
            if isinstance(exc, Exception) and entry.copy is not None:
                return await _await_copy(guard, entry, task, exc)
            raise
        if entry.interrupted:  # interrupted as it finished: its answer stands
            _uncancel(task)
        return response
    finally:
        entry.task = None
        if entry.copy is not None:
            _drop([entry.copy])


def start_copy(guard: DownloadGuard, entry: InFlightDownload) -> None:
    """Start the hedge of an inline transfer (the guard's check asked for one)."""
    entry.hedge = "running"
    entry.hedge_started = time.monotonic()
    copy = asyncio.get_running_loop().create_task(entry.handler.download_request(entry.request))
    copy.add_done_callback(functools.partial(_copy_done, entry))
    entry.copy = copy
    guard.inc(ad_stats.DEADLINE_HEDGES)


def _copy_done(entry: InFlightDownload, copy: asyncio.Task[Any]) -> None:
    if not copy.cancelled() and copy.exception() is None and entry.task is not None:
        entry.wake()  # the hedge answered first: the first copy gives way


async def _await_copy(guard: DownloadGuard, entry: InFlightDownload, task: asyncio.Task[Any],
                      first: Exception) -> Response:
    """The first copy failed while its hedge runs: the hedge's answer, else ``first``."""
    copy = entry.copy
    assert copy is not None
    try:
        response = await copy
    except BaseException:
        if entry.interrupted:
            return _answer_after_interrupt(guard, entry, task)
        raise first from None
    entry.hedge = "won"
    guard.inc(ad_stats.DEADLINE_HEDGE_WINS)
    return response


def _answer_after_interrupt(guard: DownloadGuard, entry: InFlightDownload,
                            task: asyncio.Task[Any]) -> Response:
    """Why :meth:`InFlightDownload.wake` interrupted ``task``: the hedge's response, else
    ``entry.cancel_exc``; a cancel of ``task`` by someone else (a shutdown) stands."""
    if _uncancel(task):
        raise asyncio.CancelledError
    copy = entry.copy
    if copy is not None and copy.done() and not copy.cancelled() and copy.exception() is None:
        entry.hedge = "won"
        guard.inc(ad_stats.DEADLINE_HEDGE_WINS)
        return copy.result()
    exc = entry.cancel_exc
    assert exc is not None
    raise exc from None  # not "during handling of CancelledError": ours, taken back


def _uncancel(task: asyncio.Task[Any]) -> int:
    """Take back our ``task.cancel()``; return how many cancels of others remain (3.11+)."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel() if uncancel is not None else 0


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
