"""Recovery: the watchdog's escalation ladder, each step bounded in time.

On ``stall_detected`` (docs/recovery.md, "Escalation"):

1. **cancel** in-flight downloads that are stuck — past their deadline, or
   transferring (or, in a deadlock, waiting for a lease) for longer than the
   watchdog's window — through the guarded handler, which releases their leases;
2. **requeue** each one with ``dont_filter=True`` and a per-request counter in
   ``meta["antideadlock_requeues"]`` (done by :class:`RecoveryMiddleware` in
   ``process_exception``, so the spider's errback never sees the cancel); past
   ``RECOVERY_MAX_REQUEUES`` the request is **quarantined** instead (a JSONL line
   with URL, reason, attempts and stall class) and fails normally — a poison URL
   cannot loop for ever. While the episode lasts, newly stuck downloads are
   cancelled the same way;
3. if progress has not resumed after ``RECOVERY_GRACE``, **close** the spider with
   reason ``antideadlock_<class>``, after cancelling what is in flight (kept
   pending in the journal) and fsyncing the journal;
4. if that close has not finished after ``RECOVERY_CLOSE_DEADLINE`` (Scrapy's close
   waits for everything in progress, with no timeout), **exit hard** with
   :data:`EXIT_CLOSE_TIMEOUT` so a supervisor restarts the job, which resumes from
   the journal.

A blocked event loop cannot run any of that: a thread watching the loop monitor's
heartbeat exits hard with :data:`EXIT_BLOCKED_LOOP` once the loop stayed blocked
for ``RECOVERY_BLOCKED_LOOP_EXIT_AFTER``. ``RECOVERY_LEVEL`` says how far to go:
``recover`` (1-2), ``close`` (1-3), ``exit`` (1-4 and the blocked-loop exit).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scrapy import Request, signals
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro

from . import metakeys
from . import settings as ad_settings
from . import signals as ad_signals
from . import stats as ad_stats
from .context import context_for
from .identity import request_id, strip_credentials
from .journal import QUARANTINED, journal_for, keep_pending
from .primitives.deadletter import DeadLetterStore
from .reactor import require_asyncio_reactor

logger = logging.getLogger(__name__)

__all__ = ["EXIT_BLOCKED_LOOP", "EXIT_CLOSE_TIMEOUT", "LEVELS", "Recovery",
           "RecoveryMiddleware", "recovery_for"]

#: Exit code when the spider close did not finish within RECOVERY_CLOSE_DEADLINE
#: (75 = EX_TEMPFAIL: "try again"; systemd ``Restart=on-failure`` restarts it).
EXIT_CLOSE_TIMEOUT = 75
#: Exit code when the event loop stayed blocked past RECOVERY_BLOCKED_LOOP_EXIT_AFTER.
EXIT_BLOCKED_LOOP = 76
LEVELS = ("off", "recover", "close", "exit")
REQUEUES_KEY = metakeys.REQUEUES
CANCELLED_KEY = metakeys.RECOVERY_CANCEL
_DEADLINE_KEY = metakeys.DEADLINE



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
        self.level = LEVELS.index(conf.level)
        self.stats = crawler.stats
        self.middleware_active = False
        self.closing = False
        self.closed = threading.Event()
        self.quarantined: list[dict[str, Any]] = []
        self._episode: dict[str, Any] | None = None
        self._episode_timer: Any = None  # twisted DelayedCall
        self._close_timer: threading.Timer | None = None
        self._blocked_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._quarantine: DeadLetterStore | None = None
        context_for(crawler).put("recovery", self)
        sig = crawler.signals
        sig.connect(self.spider_opened, signal=signals.spider_opened)
        sig.connect(self.spider_closed, signal=signals.spider_closed)
        sig.connect(self.engine_stopped, signal=signals.engine_stopped)
        sig.connect(self.stall_detected, signal=ad_signals.stall_detected)
        sig.connect(self.stall_cleared, signal=ad_signals.stall_cleared)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Recovery:
        return cls(crawler)

    # ------------------------------------------------------------------ life cycle

    def spider_opened(self, spider: Any = None) -> None:
        middlewares = self.crawler.engine.downloader.middleware.middlewares
        self.middleware_active = any(isinstance(mw, RecoveryMiddleware) for mw in middlewares)
        if not self.middleware_active:
            logger.warning("antideadlock recovery: RecoveryMiddleware is not enabled; cancelled "
                           "requests are requeued by the extension and still reach errbacks")
        if self._inflight() is None:
            logger.warning("antideadlock recovery: the guarded download handler is not active, "
                           "so stuck downloads cannot be cancelled (only close/exit steps)")
        if self.level >= LEVELS.index("exit"):
            if journal_for(self.crawler) is None:
                logger.warning("antideadlock recovery: level 'exit' without the journal "
                               "(ANTIDEADLOCK_JOURNAL_ENABLED): a hard exit loses the queue")
            self._blocked_thread = threading.Thread(target=self._watch_blocked,
                                                    name="antideadlock-recovery", daemon=True)
            self._blocked_thread.start()

    def spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self.closed.set()
        self._stop_threads()

    def engine_stopped(self) -> None:
        self.closed.set()
        self._stop_threads()
        context_for(self.crawler).remove("recovery", self)

    def _stop_threads(self) -> None:
        self._stop.set()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._cancel_step()
        thread, self._blocked_thread = self._blocked_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2)

    # ------------------------------------------------------------------ the ladder

    def stall_detected(self, diagnosis: dict[str, Any] | None = None, **kwargs: Any) -> None:
        diagnosis = diagnosis or {}
        stall_class = str(diagnosis.get("class") or "unknown")
        if self.closing or self.closed.is_set():
            return
        if stall_class == "blocked_loop":
            return  # the loop runs again (this signal is delivered on it); the thread handles it
        now = time.monotonic()
        window = float(diagnosis.get("window") or 10.0)
        if self._episode is None:
            self._episode = {"class": stall_class, "started": now, "window": window,
                             "progress": self._progress(), "diagnosis": diagnosis}
        else:
            self._episode.update({"class": stall_class, "window": window,
                                  "diagnosis": diagnosis})
        logger.warning("antideadlock recovery: %s stall, cancelling stuck downloads "
                       "(grace %.0fs before closing)", stall_class, self.conf.grace)
        self._cancel_step()
        self._step()

    def stall_cleared(self, **kwargs: Any) -> None:
        if self._episode is not None:
            logger.info("antideadlock recovery: progress resumed, episode over")
        self._episode = None
        self._cancel_step()

    def _cancel_step(self) -> None:
        timer, self._episode_timer = self._episode_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _step(self) -> None:
        """Run while an episode lasts: cancel newly stuck downloads; close after the grace."""
        self._episode_timer = None
        episode = self._episode
        if episode is None or self.closing or self.closed.is_set():
            return
        if self._progress() != episode["progress"]:
            # progress resumed (the watchdog will clear the episode soon)
            episode["progress"] = self._progress()
            episode["started"] = time.monotonic()
        self._cancel_stuck(episode)
        elapsed = time.monotonic() - episode["started"]
        if elapsed >= self.conf.grace and self.level >= LEVELS.index("close"):
            deferred_from_coro(self.close(episode["class"], episode["diagnosis"]))
            return
        from twisted.internet import reactor

        delay = max(0.2, min(episode["window"] / 4, 1.0))
        self._episode_timer = reactor.callLater(delay, self._step)

    def _progress(self) -> tuple[Any, ...]:
        """The watchdog's progress counters (items by default): responses alone are not
        progress — a livelock of retried errors has plenty."""
        names = ("item_scraped_count", "item_dropped_count")
        try:
            from .watchdog import watchdog_for

            watchdog = watchdog_for(self.crawler)
            names = tuple(getattr(getattr(watchdog, "cfg", None), "progress_stats", names))
        except ImportError:
            pass
        get = self.stats.get_value
        return tuple(get(name, 0) for name in names)

    def _inflight(self) -> Any:
        try:
            from .downloader import inflight_for
        except ImportError:
            return None
        middlewares = self.crawler.engine.downloader.middleware.middlewares
        if not any(type(mw).__name__ == "DeadlineMiddleware" for mw in middlewares):
            return None
        try:
            return inflight_for(self.crawler)
        except Exception:  # noqa: BLE001 - another part's failure must not stop recovery
            return None

    def _cancel_stuck(self, episode: dict[str, Any]) -> int:
        tracker = self._inflight()
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
                stall_class == "deadlock" and entry.stage == "lease_wait"
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
        tracker = tracker or self._inflight()
        if tracker is None:
            return False
        request.meta[CANCELLED_KEY] = stall_class
        if not tracker.cancel(request, f"antideadlock recovery ({stall_class})"):
            request.meta.pop(CANCELLED_KEY, None)
            return False
        self.stats.inc_value(ad_stats.WATCHDOG_CANCELLED)
        self._note_intervention()
        if not self.middleware_active and not self.closing:
            new = self.requeue_or_quarantine(request, stall_class)
            if new is not None:
                self.crawler.engine.crawl(new)
        return True

    def _note_intervention(self) -> None:
        try:
            from .watchdog import watchdog_for
        except ImportError:
            return
        watchdog = watchdog_for(self.crawler)
        if watchdog is not None and hasattr(watchdog, "note_intervention"):
            watchdog.note_intervention("recovery cancel")

    def requeue_or_quarantine(self, request: Request, stall_class: str) -> Request | None:
        """The copy to requeue, or None after quarantining ``request`` (past the bound)."""
        meta = request.meta
        meta.pop(CANCELLED_KEY, None)
        if self.closing:
            keep_pending(request)  # the close is on its way; the journal holds it
            return None
        attempts = int(meta.get(REQUEUES_KEY, 0))
        if attempts >= self.conf.max_requeues:
            self.quarantine(request, stall_class, attempts + 1)
            return None
        new = request.replace(dont_filter=True)
        new.meta[REQUEUES_KEY] = attempts + 1
        new.meta.pop(_DEADLINE_KEY, None)
        self.stats.inc_value(ad_stats.WATCHDOG_REQUEUED)
        logger.info("antideadlock recovery: requeued %s (%d/%d)",
                    strip_credentials(request.url), attempts + 1, self.conf.max_requeues)
        return new

    def quarantine(self, request: Request, stall_class: str, attempts: int) -> None:
        request.meta[QUARANTINED] = True
        episode = self._episode or {}
        evidence = (episode.get("diagnosis") or {}).get("evidence") or []
        record = {"url": strip_credentials(request.url), "method": request.method,
                  "request_id": request_id(request),
                  "reason": f"cancelled by recovery {attempts} times without an answer",
                  "attempts": attempts, "class": stall_class,
                  "diagnosis": evidence[:3], "spider": getattr(self.crawler.spider, "name", None)}
        self.quarantined.append(record)
        self.stats.inc_value(ad_stats.WATCHDOG_QUARANTINED)
        logger.error("antideadlock recovery: quarantined %s after %d attempts (%s)",
                     record["url"], attempts, stall_class)
        try:
            store = self._quarantine_store()
            if store is not None:
                store.append([record])
        except Exception as exc:  # a full disk must not stop the crawl; the log has it
            logger.error("antideadlock recovery: cannot write quarantine file: %s", exc)
        journal = journal_for(self.crawler)
        if journal is not None:
            journal.mark_done(request)

    def _quarantine_store(self) -> DeadLetterStore | None:
        """The quarantine file: the setting, else in the journal dir, else in JOBDIR."""
        if self._quarantine is None:
            path = self.conf.quarantine_file
            if not path:
                journal = journal_for(self.crawler)
                jobdir = self.crawler.settings.get("JOBDIR")
                if journal is not None:
                    path = str(journal.directory / "quarantine.jsonl")
                elif jobdir:
                    path = str(Path(jobdir) / "antideadlock-quarantine.jsonl")
                else:
                    logger.warning("antideadlock recovery: quarantined requests are only "
                                   "logged; set ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE to keep them")
                    return None
            self._quarantine = DeadLetterStore(path)
        return self._quarantine

    # ------------------------------------------------------------------ close / exit

    async def close(self, stall_class: str, diagnosis: dict[str, Any] | None = None) -> None:
        """Step 3 (and the arming of step 4): close with reason ``antideadlock_<class>``."""
        if self.closing or self.closed.is_set():
            return
        self.closing = True
        reason = f"antideadlock_{stall_class}"
        self.stats.inc_value(ad_stats.family(ad_stats.WATCHDOG_CLOSES, stall_class=stall_class))
        tracker = self._inflight()
        cancelled = 0
        if tracker is not None:  # in-flight downloads would make the close wait for ever
            for entry in tracker.items():
                keep_pending(entry.request)
                if self.cancel(entry.request, stall_class, tracker=tracker):
                    cancelled += 1
        journal = journal_for(self.crawler)
        pending = journal.save() if journal is not None else None
        logger.error("antideadlock recovery: no progress %.0fs after recovery started; closing "
                     "the spider (%s), %d downloads cancelled, %s requests pending in the "
                     "journal", self.conf.grace, reason, cancelled,
                     "no journal:" if pending is None else pending)
        if self.level >= LEVELS.index("exit"):
            self._close_timer = threading.Timer(self.conf.close_deadline, self._close_timeout,
                                                args=(reason,))
            self._close_timer.daemon = True
            self._close_timer.start()
        await self.crawler.engine.close_spider_async(reason=reason)

    def _close_timeout(self, reason: str) -> None:
        """Timer thread: the close hangs (a process_item that never returns, ...)."""
        if self.closed.is_set():
            return
        self.stats.inc_value(ad_stats.WATCHDOG_CLOSE_TIMEOUTS)
        self.hard_exit(EXIT_CLOSE_TIMEOUT, "close_timeout",
                       f"spider close ({reason}) not finished after "
                       f"{self.conf.close_deadline:.0f}s")

    def _monitor(self) -> Any:
        try:
            from .watchdog import watchdog_for
        except ImportError:
            watchdog_for = None  # type: ignore[assignment]
        watchdog = watchdog_for(self.crawler) if watchdog_for is not None else None
        if getattr(watchdog, "monitor", None) is not None:
            return watchdog.monitor
        try:
            from .health import health_for
        except ImportError:
            return None
        health = health_for(self.crawler)
        return getattr(health, "_monitor", None)

    def _watch_blocked(self) -> None:
        """Thread: exit hard when the loop monitor's heartbeat is older than the limit."""
        limit = self.conf.blocked_loop_exit_after
        monitor = None
        while not self._stop.wait(min(0.5, limit / 4)):
            monitor = monitor or self._monitor()  # started by the watchdog or health
            if monitor is None or not getattr(monitor, "running", True):
                continue
            age = monitor.heartbeat_age()
            if age >= limit and not self.closed.is_set():
                episode = getattr(monitor, "last_episode", None) or {}
                self.hard_exit(EXIT_BLOCKED_LOOP, "blocked_loop",
                               f"event loop blocked for {age:.1f}s in "
                               f"{episode.get('where') or '?'}", stack=episode.get("stack"),
                               diagnosis={"class": "blocked_loop", "blocked_for": age,
                                          **{k: episode.get(k) for k in
                                             ("where", "frames", "stack")}})

    def hard_exit(self, code: int, what: str, why: str, stack: str | None = None,
                  diagnosis: dict[str, Any] | None = None) -> None:
        """Persist what can be persisted from this thread, say why, and ``os._exit``."""
        self.stats.inc_value(ad_stats.family(ad_stats.WATCHDOG_HARD_EXITS, reason=what))
        journal = journal_for(self.crawler)
        pending = None
        if journal is not None:
            journal.save_from_thread()  # records are written as they happen; fsync them
            pending = len(journal.journal.pending_keys())
        fleet = context_for(self.crawler).get("fleet_queue")
        if fleet is not None:  # fleet mode: leased requests go back to the shared queue now
            fleet.give_back_all()
        if diagnosis is None:
            episode = self._episode or {}
            diagnosis = episode.get("diagnosis")
        report = {"exit_code": code, "reason": what, "detail": why, "pid": os.getpid(),
                  "journal_pending": pending, "diagnosis": diagnosis,
                  "stats": {k: v for k, v in dict(self.stats.get_stats()).items()
                            if isinstance(v, (int, float, str))}}
        logger.critical("antideadlock recovery: %s; exiting with code %d so the supervisor "
                        "restarts the job%s\n%s", why, code,
                        "" if pending is None else f" ({pending} requests pending in the journal)",
                        stack or "")
        self._write_exit_report(report)
        try:
            from .health import health_for
            health = health_for(self.crawler)
            if health is not None:
                health.notifier.notify(f"STOPPING=1\nSTATUS=hard exit {code}: {why}")
        except Exception:  # noqa: BLE001
            pass
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stderr.flush()
        os._exit(code)

    def _write_exit_report(self, report: dict[str, Any]) -> None:
        journal = journal_for(self.crawler)
        if journal is None:
            return
        try:
            path = journal.directory / "last-exit.json"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(report, default=str, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass


class RecoveryMiddleware:
    """Downloader middleware: turn a recovery cancel into a requeue (or a quarantine).

    Its priority (330) is below the deadline middleware's (340), so that one sees the
    exception first (``process_exception`` runs from the downloader outwards) and
    finishes its bookkeeping; a plain cancel is not retried there.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RecoveryMiddleware:
        if ad_settings.get(crawler.settings, "ANTIDEADLOCK_RECOVERY_LEVEL") == "off":
            raise NotConfigured("ANTIDEADLOCK_RECOVERY_LEVEL is off")
        require_asyncio_reactor("RecoveryMiddleware", crawler.settings)
        return cls(crawler)

    def process_exception(self, request: Request, exception: Exception) -> Request | None:
        stall_class = request.meta.get(CANCELLED_KEY)
        if stall_class is None:
            return None
        recovery = recovery_for(self.crawler)
        if recovery is None:
            request.meta.pop(CANCELLED_KEY, None)
            return None
        return recovery.requeue_or_quarantine(request, stall_class)
