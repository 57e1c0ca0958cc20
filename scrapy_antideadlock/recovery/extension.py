"""Recovery: the watchdog's escalation ladder, each step bounded in time.

On ``stall_detected`` (docs/recovery.md):

1. **preempt** what is stuck, wherever it waits: transfers through the guarded download
   handler; middlewares, callbacks and pipelines through the lifecycle tracker — every
   unit older than the lifecycle deadline (the stall window by default), or, when the
   diagnosis is a deadlock, one **victim** per step (youngest holder / least work lost),
   as a database aborts one transaction of a cycle;
2. **requeue** each preempted request (bounded; past the bound it is **quarantined**);
   an item preempted in a pipeline is **dead-lettered** with its reason;
3. if progress has not resumed after ``RECOVERY_GRACE``, **close** the spider with
   ``antideadlock_<class>``, preempting everything still in progress first (kept pending
   in the journal), so the close completes: stats dumped, feeds written;
4. if that close has not finished after ``RECOVERY_CLOSE_DEADLINE``, **exit** with
   :data:`~.exit.EXIT_CLOSE_TIMEOUT`; the journal holds everything pending.

A blocked event loop runs none of that: recovery subscribes to the loop monitor and
exits with :data:`~.exit.EXIT_BLOCKED_LOOP` once the loop stayed blocked for
``RECOVERY_BLOCKED_LOOP_EXIT_AFTER``. ``RECOVERY_LEVEL`` says how far to go: ``recover``
(1-2), ``close`` (1-3), ``exit`` (1-4 and the blocked-loop exit, the default).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from scrapy import Request, signals
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro

from .. import metakeys
from .. import settings as ad_settings
from .. import signals as ad_signals
from .. import stats as ad_stats
from ..context import context_for
from ..lifecycle.components import tracker_for
from ..lifecycle.victims import choose_victim
from ..reactor import require_asyncio_reactor
from ..timers import Timer, later, loop_monitor_for
from ..watchdog.classes import BLOCKED_LOOP, DEADLOCK
from .closing import PREEMPTIBLE as _PREEMPTIBLE
from .closing import Closer
from .exit import EXIT_BLOCKED_LOOP, hard_exit
from .requeue import Requeuer

logger = logging.getLogger(__name__)

__all__ = ["LEVELS", "Recovery", "recovery_for"]

LEVELS = ("off", "recover", "close", "exit")


def recovery_for(crawler: Crawler) -> Recovery | None:
    return context_for(crawler).get("recovery")


class Recovery:
    """Extension: reacts to ``stall_detected`` with the escalation ladder."""

    def __init__(self, crawler: Crawler) -> None:
        conf = ad_settings.load(crawler.settings, "recovery")
        if conf.level == "off" or not ad_settings.get(crawler.settings, "ANTIDEADLOCK_ENABLED"):
            raise NotConfigured("ANTIDEADLOCK_RECOVERY_LEVEL is off")
        require_asyncio_reactor("Recovery", crawler.settings)
        self.crawler = crawler
        self.conf = conf
        self.lifecycle_deadline = ad_settings.get(crawler.settings,
                                                  "ANTIDEADLOCK_LIFECYCLE_DEADLINE")
        self.level = LEVELS.index(conf.level)
        self.stats = crawler.stats
        self.ctx = context_for(crawler)
        self.requeuer = Requeuer(crawler, conf)
        self.tracker = tracker_for(crawler)
        self.tracker.resolver = self.requeuer.resolve
        self.tracker.on_preempted.append(self._preempted)
        self.middleware_active = False
        self.closed = threading.Event()
        self._episode: dict[str, Any] | None = None
        self._episode_timer: Timer | None = None
        self.closer = Closer(self)
        self.close_reason: str | None = None
        self.ctx.put("recovery", self)
        sig = crawler.signals
        sig.connect(self.spider_opened, signal=signals.spider_opened)
        sig.connect(self.spider_closed, signal=signals.spider_closed)
        sig.connect(self.engine_stopped, signal=signals.engine_stopped)
        sig.connect(self.stall_detected, signal=ad_signals.stall_detected)
        sig.connect(self.stall_cleared, signal=ad_signals.stall_cleared)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Recovery:
        return cls(crawler)

    @property
    def quarantined(self) -> list[dict[str, Any]]:
        return self.requeuer.quarantined

    @property
    def closing(self) -> bool:
        """Recovery has started closing the spider."""
        return self.closer.closing

    # ------------------------------------------------------------------ life cycle

    def spider_opened(self, spider: Any = None) -> None:
        self.tracker.spider_name = getattr(spider, "name", None)
        self.tracker.dead_letters = self.requeuer.dead_letter_store()
        self.closer.start_watch()
        self.middleware_active = self.ctx.get("recovery_middleware") is not None
        if not self.middleware_active:
            logger.warning("antideadlock recovery: RecoveryMiddleware is not enabled; cancelled "
                           "downloads are requeued by the extension and still reach errbacks")
        if self.level >= LEVELS.index("exit"):
            if self.ctx.get("journal") is None:
                logger.warning("antideadlock recovery: level 'exit' without the journal "
                               "(ANTIDEADLOCK_JOURNAL_ENABLED): a hard exit loses the queue")
            self._monitor().add_blocked_callback(self._loop_blocked,
                                                 after=self.conf.blocked_loop_exit_after)

    def _monitor(self) -> Any:
        """The crawler's loop monitor: the watchdog's, or one made for recovery."""
        watchdog = ad_settings.load(self.crawler.settings, "watchdog")
        return loop_monitor_for(self.crawler, interval=watchdog.heartbeat,
                                threshold=watchdog.blocked_threshold)

    def spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self.close_reason = reason
        self.closed.set()
        self._stop_timers()

    def engine_stopped(self) -> None:
        self.closed.set()
        self._stop_timers()
        self.ctx.remove("recovery", self)
        self.closer.after_engine_stopped(self.close_reason)

    def _stop_timers(self) -> None:
        self.closer.stop()
        self._cancel_timer("_episode_timer")

    # ------------------------------------------------------------------ the ladder

    def stall_detected(self, diagnosis: Any = None, **kwargs: Any) -> None:
        diagnosis = diagnosis or {}
        stall_class = str(diagnosis.get("class") or "unknown")
        if self.closing or self.closed.is_set():
            return
        if stall_class == BLOCKED_LOOP.name:
            return  # the loop runs again (this signal is delivered on it); see _loop_blocked
        now = time.monotonic()
        window = float(diagnosis.get("window") or 10.0)
        if self._episode is None:
            self._episode = {"class": stall_class, "started": now, "window": window,
                             "progress": self._progress(), "diagnosis": diagnosis}
        else:
            self._episode.update({"class": stall_class, "window": window,
                                  "diagnosis": diagnosis})
        self.requeuer.evidence = list(diagnosis.get("evidence") or [])
        logger.warning("antideadlock recovery: %s stall, preempting stuck work (grace %.0fs "
                       "before closing)", stall_class, self.conf.grace)
        self._cancel_timer("_episode_timer")
        self._step()

    def stall_cleared(self, **kwargs: Any) -> None:
        if self._episode is not None:
            logger.info("antideadlock recovery: progress resumed, episode over")
        self._episode = None
        self._cancel_timer("_episode_timer")

    def _cancel_timer(self, name: str) -> None:
        timer = getattr(self, name)
        setattr(self, name, None)
        if timer is not None:
            timer.cancel()

    def _step(self) -> None:
        """Run while an episode lasts: preempt stuck work; close after the grace."""
        self._episode_timer = None
        episode = self._episode
        if episode is None or self.closing or self.closed.is_set():
            return
        if self._progress() != episode["progress"]:
            # progress resumed (the watchdog will clear the episode soon)
            episode["progress"] = self._progress()
            episode["started"] = time.monotonic()
        self._preempt(episode)
        elapsed = time.monotonic() - episode["started"]
        if elapsed >= self.conf.grace and self.level >= LEVELS.index("close"):
            deferred_from_coro(self.close(episode["class"], episode["diagnosis"]))
            return
        delay = max(0.2, min(episode["window"] / 4, 1.0))
        self._episode_timer = later(delay, self._step)

    def _progress(self) -> tuple[Any, ...]:
        """The watchdog's progress counters (items by default): responses alone are not
        progress — a livelock of retried errors has plenty."""
        watchdog = self.ctx.get("watchdog")
        names = tuple(getattr(getattr(watchdog, "cfg", None), "progress_stats", None)
                      or ("item_scraped_count", "item_dropped_count"))
        get = self.stats.get_value
        return tuple(get(name, 0) for name in names)

    def _preempt(self, episode: dict[str, Any]) -> int:
        stall_class = episode["class"]
        done = self._cancel_stuck_downloads(episode)
        diagnosis = episode["diagnosis"]
        deadline = self.lifecycle_deadline or episode["window"]
        declared = stall_class == DEADLOCK.name or bool(diagnosis.get("cycle"))
        if declared or self._all_in_process():
            # a total wait: if someone holds what the others wait for, abort one victim per
            # step so the rest proceed (independent waits are preempted below instead)
            what = "deadlock" if declared else "total wait (nothing on the network)"
            units = [u for u in self.tracker.units() if u.age >= deadline / 2]
            victim = choose_victim(units, getattr(diagnosis, "units", None) or ())
            if victim is not None and victim.kind != "least_loss":
                if self.tracker.cancel(victim.unit,
                                       f"{stall_class}: victim of a {what}: {victim.why}"):
                    self.stats.inc_value(ad_stats.LIFECYCLE_VICTIMS)
                    logger.error("antideadlock recovery: %s victim: %s at %s (%s): %s", what,
                                 getattr(victim.unit.request, "url", "an item"),
                                 victim.unit.stage, victim.unit.component, victim.why)
                    return done + 1
                return done
        for unit in self.tracker.units():
            if unit.stage in _PREEMPTIBLE and unit.age >= deadline and self.tracker.cancel(
                    unit, f"{stall_class}: {unit.age:.0f}s in {unit.stage}, past the "
                          f"lifecycle deadline ({deadline:.0f}s)"):
                done += 1
        return done

    def episode_diagnosis(self) -> Any:
        return (self._episode or {}).get("diagnosis")

    def _all_in_process(self) -> bool:
        """Every stuck unit waits inside the process (none on the network): whatever the
        class says, that is a total wait, and one victim at a time is the way out."""
        units = self.tracker.units()
        return bool(units) and not any(u.stage in ("queue", "download") for u in units) \
            and self._inflight_count() == 0

    def _inflight_count(self) -> int:
        inflight = self.inflight()
        if inflight is None:
            return 0
        return sum(1 for entry in inflight.items() if entry.stage == "transfer")

    def _preempted(self, unit: Any) -> None:
        self.stats.inc_value(ad_stats.family(ad_stats.LIFECYCLE_PREEMPTED, stage=unit.stage))
        if unit.item is not None:
            self.stats.inc_value(ad_stats.LIFECYCLE_DEAD_LETTERED)
        self._note_intervention()

    # ------------------------------------------------------------------ downloads

    def inflight(self) -> Any:
        """The guarded handler's in-flight downloads (None without the guard)."""
        guard = self.ctx.get("guard")
        return getattr(guard, "inflight", None)

    def _cancel_stuck_downloads(self, episode: dict[str, Any]) -> int:
        tracker = self.inflight()
        if tracker is None:
            return 0
        now = time.monotonic()
        window = episode["window"]
        stall_class = episode["class"]
        cancelled = 0
        for entry in tracker.items():
            overdue = entry.deadline is not None and entry.deadline <= now
            transfer_age = now - entry.transfer_started if entry.transfer_started else 0.0
            stuck = (entry.stage == "transfer" and transfer_age >= window) or (
                stall_class == DEADLOCK.name and entry.stage == "lease_wait"
                and now - entry.started >= window)
            if not (overdue or stuck) or entry.cancel_exc is not None:
                continue
            if self.cancel(entry.request, stall_class, tracker=tracker):
                cancelled += 1
        if cancelled:
            logger.warning("antideadlock recovery: cancelled %d stuck downloads (%s)",
                           cancelled, stall_class)
        return cancelled

    def cancel(self, request: Request, stall_class: str, *, tracker: Any = None) -> bool:
        """Cancel one download; the middleware then requeues or quarantines it."""
        tracker = tracker or self.inflight()
        if tracker is None:
            return False
        request.meta[metakeys.RECOVERY_CANCEL] = stall_class
        if not tracker.cancel(request, f"antideadlock recovery ({stall_class})"):
            request.meta.pop(metakeys.RECOVERY_CANCEL, None)
            return False
        self.stats.inc_value(ad_stats.WATCHDOG_CANCELLED)
        self._note_intervention()
        if not self.middleware_active and not self.closing:
            new = self.requeue_or_quarantine(request, stall_class)
            if new is not None:
                self.crawler.engine.crawl(new)
        return True

    def requeue_or_quarantine(self, request: Request, stall_class: str) -> Request | None:
        return self.requeuer.requeue_or_quarantine(request, stall_class)

    def _note_intervention(self) -> None:
        watchdog = self.ctx.get("watchdog")
        if watchdog is not None and hasattr(watchdog, "note_intervention"):
            watchdog.note_intervention("recovery preempt")

    # ------------------------------------------------------------------ close / exit

    async def close(self, stall_class: str, diagnosis: Any = None) -> None:
        """Step 3 (and the arming of step 4): close with reason ``antideadlock_<class>``."""
        await self.closer.close(stall_class, diagnosis)

    def _loop_blocked(self, info: dict[str, Any]) -> None:
        """Loop monitor thread: the loop stayed blocked past the limit."""
        if self.closed.is_set():
            return
        age = float(info.get("blocked_for") or 0.0)
        hard_exit(self.crawler, EXIT_BLOCKED_LOOP, "blocked_loop",
                  f"event loop blocked for {age:.1f}s in {info.get('where') or '?'}",
                  stack=info.get("stack"),
                  diagnosis={"class": BLOCKED_LOOP.name, "blocked_for": age,
                             **{k: info.get(k) for k in ("where", "frames", "stack")}})
