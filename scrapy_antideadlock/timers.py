"""The pack's one timer mechanism on the event loop: run later, or run every so often.

Everything the components schedule on the loop goes through :func:`later`, :func:`every`
and :func:`soon`. The first two are built on Twisted's ``reactor.callLater``: it works
under every reactor Scrapy supports (on the asyncio reactor it is the asyncio loop's own
timer), so one code path serves them all. :func:`soon` is for work done once per loop
turn at a high rate: on a running asyncio loop it is ``loop.call_soon``, which skips
Twisted's timer bookkeeping (a ``DelayedCall`` sorted into a heap that, in a broad
crawl, holds a connection-pool timer per host). Work that must happen while the loop is
blocked (a hard-exit deadline, a liveness ping) cannot run here: it belongs on the loop
monitor's thread (``LoopMonitor.add_periodic`` / ``add_deadline``). The asyncio
primitives in ``primitives/`` stay on ``loop.call_later``: they are free of Scrapy and
Twisted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Repeating", "Timer", "every", "later", "loop_monitor_for", "soon"]

logger = logging.getLogger(__name__)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Timer:
    """One call of ``fn(*args)`` after a delay; :meth:`cancel` is safe at any time."""

    def __init__(self, delay: float, fn: Callable[..., object], *args: Any) -> None:
        self._call: Any = _reactor().callLater(max(0.0, delay), fn, *args)

    @property
    def active(self) -> bool:
        """Whether the call is still to come (neither run nor cancelled)."""
        return bool(self._call.active())

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class Repeating:
    """``fn()`` every ``interval`` seconds on a fixed schedule (beats missed while the loop
    was busy are skipped, not bunched). An exception is logged and stops the repetition,
    as Twisted's ``LoopingCall`` and Scrapy's ``create_looping_call`` do."""

    def __init__(self, interval: float, fn: Callable[[], object], *, now: bool = False,
                 name: str | None = None) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self._start = time.monotonic()
        self._timer: Timer | None = None
        self.running = True
        if now:
            self._run()
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self.running:
            elapsed = time.monotonic() - self._start
            self._timer = Timer(self.interval - elapsed % self.interval, self._run)

    def _run(self) -> None:
        self._timer = None
        if not self.running:
            return
        try:
            self.fn()
        except Exception:
            logger.exception("antideadlock: periodic %s failed; stopped", self.name)
            self.running = False
            return
        self._schedule()

    def stop(self) -> None:
        self.running = False
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


def later(delay: float, fn: Callable[..., object], *args: Any) -> Timer:
    """Run ``fn(*args)`` on the loop after ``delay`` seconds (0: on the next turn)."""
    return Timer(delay, fn, *args)


def soon(fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` on the loop's next turn (not cancellable; callers keep a flag)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running this thread: Twisted's timer
        later(0, fn, *args)
    else:
        loop.call_soon(fn, *args)


def every(interval: float, fn: Callable[[], object], *, now: bool = False,
          name: str | None = None) -> Repeating:
    """Run ``fn()`` on the loop every ``interval`` seconds (first call now, if ``now``)."""
    return Repeating(interval, fn, now=now, name=name)


def loop_monitor_for(crawler: Any, *, interval: float, threshold: float,
                     name: str = "antideadlock-loopmonitor") -> Any:
    """The crawler's loop monitor, the one off-loop thread (context role ``"loopmonitor"``):
    the watchdog's, or else one made and started now (call from the loop's thread) with
    these timings and stopped when the engine stops."""
    from scrapy import signals

    from .context import context_for
    from .loopmonitor import LoopMonitor

    created: list[LoopMonitor] = []

    def create() -> LoopMonitor:
        created.append(LoopMonitor(None, interval=min(interval, threshold / 4),
                                   threshold=threshold, name=name))
        return created[0]

    monitor = context_for(crawler).setdefault("loopmonitor", create)
    if created:
        monitor.start()
        crawler.signals.connect(monitor.stop, signal=signals.engine_stopped)
    return monitor
