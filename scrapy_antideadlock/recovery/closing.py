"""Closing the spider so that it really closes, and in bounded time.

Scrapy's close waits for every request in progress with no timeout. Recovery's own close
first preempts everything in progress (kept pending in the journal, items dead-lettered),
then sweeps every second for work stuck since, and exits with code 75 if the close has not
finished by ``RECOVERY_CLOSE_DEADLINE``. A close recovery did not start (SIGTERM,
``CLOSESPIDER_*``) is bounded the same way: what is still in progress at half the close
deadline is preempted, and the process exits at the deadline. After any close of
recovery's, a process that cannot exit (threads that never return) exits at the deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import stats as ad_stats
from ..compat.lifecycle import engine_closing
from ..journal import keep_pending
from ..timers import Repeating, Timer, every, later
from .exit import EXIT_CLOSE_TIMEOUT, hard_exit

if TYPE_CHECKING:
    from .extension import Recovery

logger = logging.getLogger(__name__)

__all__ = ["PREEMPTIBLE", "Closer"]

#: Stages recovery preempts through the lifecycle tracker (a transfer: the guarded handler).
PREEMPTIBLE = ("middleware:process_request", "middleware:process_response",
               "middleware:process_exception", "callback", "pipeline", "queue")
_EXIT = 3  # LEVELS.index("exit")


class Closer:
    """The close steps of one crawler's recovery (timers on the loop, one watch)."""

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery
        self.crawler = recovery.crawler
        self.conf = recovery.conf
        self.stats = recovery.stats
        self.tracker = recovery.tracker
        self.closing = False
        self._close_timer: Timer | None = None
        self._sweep_timer: Timer | None = None
        self._close_watch: Repeating | None = None  # a close recovery did not start
        self._foreign_close: float | None = None

    @property
    def closed(self) -> bool:
        return self.recovery.closed.is_set()

    def stop(self) -> None:
        watch, self._close_watch = self._close_watch, None
        if watch is not None:
            watch.stop()
        for name in ("_close_timer", "_sweep_timer"):
            timer = getattr(self, name)
            setattr(self, name, None)
            if timer is not None:
                timer.cancel()

    def start_watch(self) -> None:
        self._close_watch = every(1.0, self._watch_close)

    def _watch_close(self) -> None:
        """A close recovery did not start (SIGTERM, CLOSESPIDER_*) waits, like any close, for
        everything in progress: bound it the same way (preempt at half the close deadline,
        kept pending; exit at the deadline)."""
        if self.closing or self.closed:
            return
        if not engine_closing(self.crawler.engine):
            return
        now = time.monotonic()
        if self._foreign_close is None:
            self._foreign_close = now
            return
        elapsed = now - self._foreign_close
        deadline = self.conf.close_deadline
        if elapsed >= deadline / 2 and self.tracker.units():
            self.recovery.requeuer.closing = True
            preempted = self.preempt_all("shutdown")
            if preempted:
                logger.warning("antideadlock recovery: the spider close waited %.0fs for work "
                               "in progress; preempted %d units (requests kept pending in the "
                               "journal, items dead-lettered)",
                               elapsed, preempted)
        if elapsed >= deadline and self.recovery.level >= _EXIT:
            self.stats.inc_value(ad_stats.WATCHDOG_CLOSE_TIMEOUTS)
            hard_exit(self.crawler, EXIT_CLOSE_TIMEOUT, "close_timeout",
                      f"spider close not finished after {deadline:.0f}s")

    def after_engine_stopped(self, reason: str | None) -> None:
        """The close completed (stats, feeds, journal), but threads that never return (a
        starved thread pool) would keep the interpreter from exiting: bound that too. A
        daemon timer: a process that exits normally never waits for it."""
        if self.recovery.level >= _EXIT:
            timer = threading.Timer(self.conf.close_deadline, self._exit_timeout, (reason,))
            timer.daemon = True
            timer.start()

    def _exit_timeout(self, reason: str | None) -> None:
        # a finished crawl has nothing pending: 0, so a supervisor does not start it again
        code = 0 if reason == "finished" else EXIT_CLOSE_TIMEOUT
        hard_exit(self.crawler, code, "exit_timeout",
                  f"the spider closed ({reason}) but the process did not exit within "
                  f"{self.conf.close_deadline:.0f}s (threads that never return)")

    async def close(self, stall_class: str, diagnosis: Any = None) -> None:
        """Preempt everything, close with ``antideadlock_<class>``, arm the deadline."""
        if self.closing or self.closed:
            return
        self.closing = self.recovery.requeuer.closing = True
        reason = f"antideadlock_{stall_class}"
        self.stats.inc_value(ad_stats.family(ad_stats.WATCHDOG_CLOSES, stall_class=stall_class))
        if self.recovery.level >= _EXIT:
            self._close_timer = later(self.conf.close_deadline,
                                      self._close_timeout, reason, diagnosis)
        cancelled = self.preempt_all(reason)
        journal = self.recovery.ctx.get("journal")
        pending = journal.save() if journal is not None else None
        logger.error("antideadlock recovery: no progress %.0fs after recovery started; closing "
                     "the spider (%s), %d units preempted, %s requests pending in the journal",
                     self.conf.grace, reason, cancelled, "no journal:" if pending is None
                     else pending)
        self._sweep_timer = later(1.0, self._sweep, reason)
        await self.crawler.engine.close_spider_async(reason=reason)

    def preempt_all(self, reason: str) -> int:
        """Preempt every unit in progress so the close can complete (kept pending)."""
        cancelled = 0
        inflight = self.recovery.inflight()
        if inflight is not None:  # transfers would make the close wait for ever
            for entry in inflight.items():
                keep_pending(entry.request)
                if self.recovery.cancel(entry.request, reason, tracker=inflight):
                    cancelled += 1
        for unit in self.tracker.units():
            if unit.request is not None:
                keep_pending(unit.request)
            if unit.stage in PREEMPTIBLE and self.tracker.cancel(
                    unit, f"{reason}: closing, {unit.age:.0f}s in {unit.stage}"):
                cancelled += 1
        return cancelled

    def _sweep(self, reason: str) -> None:
        """While closing: preempt what got stuck since (e.g. a queued request's callback)."""
        self._sweep_timer = None
        if self.closed:
            return
        for unit in self.tracker.units():
            if unit.age >= 1.0 and unit.stage in PREEMPTIBLE:
                if unit.request is not None:
                    keep_pending(unit.request)
                self.tracker.cancel(unit, f"{reason}: closing, {unit.age:.0f}s in {unit.stage}")
        self._sweep_timer = later(1.0, self._sweep, reason)

    def _close_timeout(self, reason: str, diagnosis: Any) -> None:
        """The close hangs although its work was preempted (code that ignores cancels)."""
        self._close_timer = None
        if self.closed:
            return
        self.stats.inc_value(ad_stats.WATCHDOG_CLOSE_TIMEOUTS)
        hard_exit(self.crawler, EXIT_CLOSE_TIMEOUT, "close_timeout",
                  f"spider close ({reason}) not finished after {self.conf.close_deadline:.0f}s",
                  diagnosis=diagnosis if diagnosis is not None else
                  self.recovery.episode_diagnosis())
