"""Watchdog extension: sees the flatline, classifies it and names the cause.

A deadlocked crawl raises nothing: items/min drops to zero and the CPU goes idle.
The watchdog measures progress over a sliding window, and when nothing moved for
a window while work is pending, it classifies the episode from evidence:

- ``blocked_loop``: the off-loop :class:`LoopMonitor` saw no heartbeat (stack attached);
- ``deadlock``: a knot in the wait-for graph of the registry's pools (or an exhausted
  pool whose holders all wait) while the loop is alive and quiet;
- ``livelock``: no progress but churn (requests, retries, lease grants) or a busy loop;
- ``stalled_io``: in-flight downloads past their deadline or older than the window;
- ``unknown``: pending work waits on something the registry cannot see.

Each episode gives one diagnosis block (log, JSON file, stats, ``stall_detected``).
Escalation (cancel, requeue, close, exit) is the recovery part's job; it listens
to the signals and to :func:`watchdog_for`.
"""

from __future__ import annotations

import asyncio
import json
import linecache
import logging
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from scrapy import signals as scrapy_signals
from scrapy.exceptions import NotConfigured

from . import metakeys
from . import settings as ad_settings
from . import signals as ad_signals
from . import stats as ad_stats
from .compat import scrapy as compat
from .context import context_for
from .identity import META_KEY, describe, strip_credentials
from .loopmonitor import LoopMonitor
from .primitives.deadline import LatencyTracker
from .primitives.progress import ProgressMeter
from .primitives.registry import PoolSnapshot
from .primitives.waitgraph import WaitGraph, analyse

logger = logging.getLogger(__name__)

MAX_KEPT_DIAGNOSES = 100
CLASSES = ("blocked_loop", "deadlock", "livelock", "stalled_io", "unknown")
_ITEM_KINDS = ("pg", "buffer")  # units of these pools are held by items, not downloads
# exception names that mean "the peer did not answer in time" (Twisted, Scrapy, this pack)
_TIMEOUT_WORDS = ("TimeoutError", "DeadlineExceeded", "DownloadCancelled", "ResponseNeverReceived")


def watchdog_for(crawler: Any) -> Watchdog | None:
    """The crawler's running :class:`Watchdog`, or None when it is off."""
    return context_for(crawler).get("watchdog")


class Watchdog:
    """Progress meter, stall detection and diagnosis for one crawler."""

    def __init__(self, crawler: Any, cfg: Any) -> None:
        self.crawler = crawler
        self.cfg = cfg
        self.stats = crawler.stats
        self.registry = context_for(crawler).registry
        self.meter = ProgressMeter(
            [f"progress:{name}" for name in cfg.progress_stats],
            [f"churn:{name}" for name in cfg.churn_stats] + ["churn:lease_grants"],
            ["timeouts"], horizon=max(cfg.window or 0, cfg.window_max) * 2 + 10)
        self.latency = LatencyTracker(window=2000)
        # Created now so other parts can add callbacks in from_crawler; started with the engine.
        self.monitor = LoopMonitor(None, interval=cfg.heartbeat, threshold=cfg.blocked_threshold,
                                   cpu_horizon=self.meter.horizon)
        self.monitor.add_blocked_callback(self._on_blocked)
        self.monitor.add_unblocked_callback(self._on_unblocked)
        self._monitor_started = False
        self.state = "idle"
        self.last_diagnosis: dict[str, Any] | None = None
        # The latest episodes (bounded: a crawl that stalls all day must not grow the file).
        self.diagnoses: deque[dict[str, Any]] = deque(maxlen=MAX_KEPT_DIAGNOSES)
        self.episodes = 0
        self.interventions = 0
        self.cpu_spent = 0.0  # loop-thread CPU seconds spent in the periodic evaluation
        self.concurrency = int(crawler.settings.getint("CONCURRENT_REQUESTS") or 0)
        self._lock = threading.RLock()
        self._episode: dict[str, Any] | None = None  # the stall in progress
        self._inflight_seen: dict[int, tuple[Any, float]] = {}  # id(request) -> (req, first seen)
        self._transfer_started: dict[int, float] = {}
        self._tasks: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen_blocks = 0
        self._last_tick = 0.0
        self._stopped = False
        self._older_tasks: weakref.WeakSet = weakref.WeakSet()

    @classmethod
    def from_crawler(cls, crawler: Any) -> Watchdog:
        cfg = ad_settings.load(crawler.settings, "watchdog")
        if not cfg.enabled:
            raise NotConfigured("ANTIDEADLOCK_WATCHDOG_ENABLED is False")
        _check(cfg)
        watchdog = cls(crawler, cfg)
        sig = crawler.signals
        sig.connect(watchdog.engine_started, signal=scrapy_signals.engine_started)
        sig.connect(watchdog.spider_opened, signal=scrapy_signals.spider_opened)
        sig.connect(watchdog.spider_closed, signal=scrapy_signals.spider_closed)
        sig.connect(watchdog.engine_stopped, signal=scrapy_signals.engine_stopped)
        sig.connect(watchdog._response_received, signal=scrapy_signals.response_received)
        sig.connect(watchdog._reached_downloader,
                    signal=scrapy_signals.request_reached_downloader)
        sig.connect(watchdog._left_downloader, signal=scrapy_signals.request_left_downloader)
        sig.connect(watchdog._download_cancelled, signal=ad_signals.download_cancelled)
        context_for(crawler).put("watchdog", watchdog)
        return watchdog

    # ------------------------------------------------------------------ life cycle
    async def engine_started(self) -> None:
        self._remember_older_tasks()
        self._start_monitor()

    def _remember_older_tasks(self) -> None:
        """Tasks alive before this crawl started (e.g. left by an earlier crawl in the same
        process) cannot be this crawl's pending work: keep them out of the diagnosis."""
        try:
            self._older_tasks = weakref.WeakSet(
                asyncio.all_tasks(asyncio.get_running_loop()))
        except RuntimeError:
            self._older_tasks = weakref.WeakSet()

    async def spider_opened(self, spider: Any = None) -> None:
        self._start_monitor()
        now = time.monotonic()
        self.meter.mark_progress(now)
        self._last_tick = now
        self._start_loop(self._tick, self.cfg.interval)
        if self.cfg.health_interval > 0:
            self._start_loop(self.log_health, self.cfg.health_interval)

    async def spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self._stop_all()

    async def engine_stopped(self) -> None:
        self._stop_all()

    def _start_monitor(self) -> None:
        if self._monitor_started or self._stopped:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.warning("antideadlock watchdog: no asyncio loop; blocked-loop detection off")
            return
        self._monitor_started = True
        self._loop = loop
        self.monitor.loop = loop
        self.monitor.start()

    def _start_loop(self, fn: Callable[[], object], interval: float) -> None:
        from twisted.internet import task

        call = task.LoopingCall(fn)
        call.start(interval, now=False).addErrback(
            lambda failure: logger.error("antideadlock watchdog loop failed: %s", failure))
        self._tasks.append(call)

    def _stop_all(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        now = time.monotonic()
        self.meter.sample(self._counter_values(), now)
        with self._lock:
            episode = self._episode
        if episode is not None and (episode["class"] == "blocked_loop"
                                    or self.meter.last_progress > episode["detected"]):
            self._clear(episode, now)  # progress resumed just before the close
        for call in self._tasks:
            if call.running:
                call.stop()
        self._tasks.clear()
        if self._monitor_started:
            lag = self.monitor.lag_stats()
            self.stats.set_value(ad_stats.WATCHDOG_LOOP_LAG_P99, round(lag["p99"], 4))
            self.stats.max_value(ad_stats.WATCHDOG_LOOP_LAG_MAX, round(lag["max"], 4))
        self.monitor.stop()
        self.stats.set_value(ad_stats.WATCHDOG_WINDOW, round(self.window(), 3))

    # ------------------------------------------------------------------ signals
    def _response_received(self, response: Any, request: Any, **kwargs: Any) -> None:
        latency = request.meta.get("download_latency")
        if isinstance(latency, (int, float)):
            self.latency.record("all", float(latency))

    def _reached_downloader(self, request: Any, **kwargs: Any) -> None:
        self._transfer_started[id(request)] = time.monotonic()

    def _left_downloader(self, request: Any, **kwargs: Any) -> None:
        self._transfer_started.pop(id(request), None)

    def _download_cancelled(self, request: Any = None, reason: str = "", **kwargs: Any) -> None:
        self.interventions += 1

    def note_intervention(self, what: str = "") -> None:
        """Count an intervention (recovery calls this), shown in the health line."""
        self.interventions += 1

    # ------------------------------------------------------------------ window
    def window(self) -> float:
        """The stall window: fixed by setting, else adaptive from request durations."""
        cfg = self.cfg
        if cfg.window is not None:
            return cfg.window
        p99, samples = self._p99()
        if p99 is None or samples < cfg.window_min_samples:
            base = cfg.window_initial
        else:
            base = p99 * cfg.window_multiplier + cfg.window_buffer
        window = min(max(base, cfg.window_min), cfg.window_max)
        # A polite crawl (DOWNLOAD_DELAY, AutoThrottle) is slow by design, not stalled.
        return max(window, 2 * self._slot_delay() + cfg.window_buffer)

    def _slot_delay(self) -> float:
        engine = _engine(self.crawler)
        slots = getattr(getattr(engine, "downloader", None), "slots", None) or {}
        try:
            return max((float(slot.delay) for slot in list(slots.values())), default=0.0)
        except (TypeError, ValueError, AttributeError):
            return 0.0

    def _p99(self) -> tuple[float | None, int]:
        tracked = _latency_for(self.crawler)
        tracker = self.latency
        if tracked and any(tracked[0].samples(k) for k in tracked[0].keys()):
            tracker = tracked[0]  # the downloader's: it also times slot-queue waits
        best: float | None = None
        samples = 0
        for key in tracker.keys():
            samples += tracker.samples(key)
            value = tracker.quantile(key, 0.99)
            if value is not None and (best is None or value > best):
                best = value
        return best, samples

    # ------------------------------------------------------------------ the tick
    def _counter_values(self) -> dict[str, float]:
        values = dict(self.stats.get_stats())
        out: dict[str, float] = {}
        for kind, names in (("progress", self.cfg.progress_stats),
                            ("churn", self.cfg.churn_stats)):
            for name in names:
                out[f"{kind}:{name}"] = _stat_total(values, name)
        grants = 0
        for pool in self.registry.pools():
            counters = getattr(pool, "counters", None)
            grants += int(getattr(counters, "acquired", 0) or 0)
        out["churn:lease_grants"] = grants
        out["timeouts"] = float(sum(
            v for k, v in values.items()
            if k.startswith("downloader/exception_type_count/") and _is_number(v)
            and any(word in k for word in _TIMEOUT_WORDS)))
        return out

    def _tick(self) -> None:
        started = time.thread_time()
        try:
            self._evaluate()
        except Exception:  # the watchdog must outlive a surprise in what it reads
            logger.exception("antideadlock watchdog: evaluation failed")
        self.cpu_spent += time.thread_time() - started

    def _evaluate(self) -> None:
        now = time.monotonic()
        late = now - self._last_tick
        self._last_tick = now
        self.meter.sample(self._counter_values(), now)
        self._track_inflight(now)
        monitor = self.monitor
        if monitor.episodes != self._seen_blocks:
            # The loop was blocked (already reported): that time is not a flatline.
            self._seen_blocks = monitor.episodes
            self.meter.mark_progress(now)
        elif late > self.window():
            self.meter.mark_progress(now)  # the tick itself was held up: no measurement
        pending = self.pending()
        window = self.window()
        since = self.meter.since_progress(now)
        with self._lock:
            episode = self._episode
        if episode is not None:
            # Code on the loop runs, so a blocked-loop episode is over.
            if episode["class"] == "blocked_loop" or since < episode["since_progress"] \
                    or not pending["any"]:
                self._clear(episode, now)
            return
        if not pending["any"]:
            self.meter.mark_progress(now)  # idle time is not stall time
            self.state = "idle"
            return
        if since >= window:
            self._detect_flatline(now, since, window, pending)
        elif since >= window / 2:
            self.state = "slow"
        else:
            self.state = "flowing"

    def pending(self) -> dict[str, Any]:
        """Work not yet done: in progress (download or scraping) and scheduled."""
        engine = _engine(self.crawler)
        out: dict[str, Any] = {"in_progress": 0, "scheduled": 0, "downloading": 0,
                               "scraping": 0, "any": False}
        if engine is None:
            return out
        try:
            out["in_progress"] = len(compat.in_progress(engine) or ())
            out["downloading"] = len(engine.downloader.active)
            out["scraping"] = len(compat.scraper_active(engine))
            scheduler = compat.scheduler_of(engine)
            out["scheduled"] = len(scheduler) if scheduler is not None \
                and hasattr(scheduler, "__len__") else 0
            idle = engine.spider_is_idle() if scheduler is not None else True
        except (RuntimeError, AttributeError, TypeError):
            idle = True
        out["any"] = (not idle) or out["in_progress"] > 0
        return out

    def _track_inflight(self, now: float) -> None:
        engine = _engine(self.crawler)
        if engine is None:
            return
        try:
            active = list(engine.downloader.active)
        except (AttributeError, RuntimeError):
            return
        seen = self._inflight_seen
        current = {id(r): r for r in active}
        for key in list(seen):
            if key not in current:
                del seen[key]
        for key in list(self._transfer_started):
            if key not in current:  # left without request_left_downloader (cancelled)
                del self._transfer_started[key]
        for key, request in current.items():
            if key not in seen:
                seen[key] = (request, now)

    def inflight(self, now: float | None = None) -> list[dict[str, Any]]:
        """In-flight downloads, oldest first: request, age, stage, seconds to deadline."""
        now = time.monotonic() if now is None else now
        out = []
        tracker = _inflight_for(self.crawler)
        if tracker is not None:
            try:
                for entry in tracker.items():
                    deadline = getattr(entry, "deadline", None)
                    out.append({"request": describe(entry.request), "owner": entry.owner,
                                "age": now - entry.started, "stage": entry.stage,
                                "deadline_in": None if deadline is None else deadline - now})
            except Exception:  # noqa: BLE001 - another component's tracker must not break us
                logger.debug("inflight tracker failed", exc_info=True)
                out = []
        if not out:
            for key, (request, first_seen) in list(self._inflight_seen.items()):
                started = self._transfer_started.get(key)
                deadline = request.meta.get(metakeys.DEADLINE)
                if deadline is None and started is not None:
                    timeout = request.meta.get("download_timeout")
                    if isinstance(timeout, (int, float)) and timeout > 0:
                        deadline = started + timeout
                out.append({"request": describe(request), "owner": request.meta.get(META_KEY),
                            "age": now - first_seen,
                            "stage": "transfer" if started is not None else "queued",
                            "deadline_in": None if deadline is None else deadline - now})
        out.sort(key=lambda e: -e["age"])
        return out

    # ------------------------------------------------------------------ detection
    def _detect_flatline(self, now: float, since: float, window: float,
                         pending: dict[str, Any]) -> None:
        snapshots = self.registry.snapshot()
        graph = analyse(snapshots, self._labeller())
        churn = self.meter.churn_in(window, now)
        cpu = self.monitor.cpu_fraction(window) if self._monitor_started else None
        inflight = self.inflight(now)
        stuck = [e for e in inflight
                 if e["age"] >= window or (e["deadline_in"] is not None and e["deadline_in"] < 0)]
        evidence: list[str] = []
        cpu_text = "unknown" if cpu is None else f"{cpu:.0%} of a core"
        timeouts = self.meter.delta("timeouts", window, now)
        requests = self.meter.delta("churn:downloader/request_count", window, now)
        if graph.has_deadlock:
            stall_class = "deadlock"
            evidence.append(f"{len(graph.deadlocked)} owners wait in a knot: each waits for a "
                            "pool whose every unit is held inside the knot")
            evidence.append(f"loop alive, loop CPU {cpu_text}, churn {churn:.0f} in window")
        elif churn >= self.cfg.churn_min and timeouts * 2 >= requests > 0:
            # Busy, but what churns is requests timing out and being retried: a peer that
            # never answers, bounded by timeouts — the fix is the peer, not the retry loop.
            stall_class = "stalled_io"
            evidence.append(f"{timeouts:.0f} downloads timed out in {window:.1f}s and were "
                            f"retried ({requests:.0f} requests sent), none answered")
            evidence.append(f"loop alive, loop CPU {cpu_text}, churn {churn:.0f}")
        elif churn >= self.cfg.churn_min or (cpu is not None and cpu >= self.cfg.cpu_busy):
            stall_class = "livelock"
            evidence.append(f"loop alive and working: churn {churn:.0f} events in {window:.1f}s "
                            f"(threshold {self.cfg.churn_min}), loop CPU {cpu_text}, "
                            "but no progress")
            evidence.extend(f"{name.split(':', 1)[1]} +{value:.0f}" for name, value
                            in self.meter.window_report(window, now).items()
                            if name.startswith("churn:") and value > 0)
        elif graph.starved:
            stall_class = "deadlock"
            for starved in graph.starved:
                evidence.append(f"pool {starved.pool!r} ({starved.kind}) exhausted "
                                f"({starved.capacity}), {len(starved.waiters)} waiting, and "
                                "every holder is itself waiting")
            evidence.append(f"no cycle inside the registry: a wait outside it may close it; "
                            f"loop CPU {cpu_text}")
        elif stuck:
            stall_class = "stalled_io"
            overdue = [e for e in stuck if e["deadline_in"] is not None and e["deadline_in"] < 0]
            evidence.append(f"{len(stuck)} of {len(inflight)} in-flight downloads got no answer "
                            f"within the window ({len(overdue)} past their deadline); "
                            "no wait-for cycle")
            evidence.append(f"loop alive, loop CPU {cpu_text}, churn {churn:.0f}")
        else:
            stall_class = "unknown"
            evidence.append("work is pending but nothing in the registry or the downloader "
                            "explains the wait (an un-instrumented await?)")
            evidence.append(f"loop alive, loop CPU {cpu_text}, churn {churn:.0f}")
        try:
            awaiting = suspended_tasks(exclude=self._older_tasks)
        except Exception:  # noqa: BLE001 - introspection must not break the diagnosis
            awaiting = []
        if stall_class == "unknown" and awaiting:
            top = awaiting[0]
            evidence.append(f"{top['count']} task(s) suspended in {top['at']}"
                            + (f": {top['code']}" if top["code"] else ""))
        diagnosis = self._diagnosis(stall_class, evidence, now=now, since=since, window=window,
                                    snapshots=snapshots, graph=graph, inflight=inflight,
                                    pending=pending, cpu=cpu, churn=churn, awaiting=awaiting)
        self._emit(diagnosis, time_to_detect=since, on_loop=True)

    def _on_blocked(self, info: dict[str, Any]) -> None:
        """Monitor thread: the loop missed its heartbeat past the threshold."""
        now = time.monotonic()
        evidence = [f"no heartbeat for {info['blocked_for']:.2f}s "
                    f"(threshold {self.cfg.blocked_threshold}s): the loop thread is running "
                    f"Python code that does not yield, in {info.get('where') or '?'}"]
        try:
            snapshots = self.registry.snapshot()
        except Exception:  # noqa: BLE001
            snapshots = []
        diagnosis = self._diagnosis(
            "blocked_loop", evidence, now=now, since=self.meter.since_progress(now),
            window=self.window(), snapshots=snapshots, graph=None, inflight=self.inflight(now),
            pending=self.pending(), cpu=None, churn=None, block=info)
        self._emit(diagnosis, time_to_detect=info["blocked_for"], on_loop=False)

    def _on_unblocked(self, info: dict[str, Any]) -> None:
        self.stats.max_value(ad_stats.WATCHDOG_BLOCKED_MAX, round(info["blocked_for"], 3))
        with self._lock:
            episode = self._episode
        if episode is not None and episode["class"] == "blocked_loop" and self._loop:
            try:
                self._loop.call_soon_threadsafe(self._clear, episode, time.monotonic())
            except RuntimeError:  # loop closed
                pass

    def _emit(self, diagnosis: dict[str, Any], *, time_to_detect: float, on_loop: bool) -> None:
        stall_class = diagnosis["class"]
        with self._lock:
            self.diagnoses.append(diagnosis)
            self.episodes = diagnosis["episode"]
            self.last_diagnosis = diagnosis
            self._episode = {"class": stall_class, "detected": time.monotonic(),
                             "started": time.monotonic() - time_to_detect,
                             "since_progress": diagnosis["since_progress"]}
            self.state = f"stalled:{stall_class}"
        stats = self.stats
        stats.inc_value(ad_stats.WATCHDOG_STALLS)
        stats.inc_value(ad_stats.family(ad_stats.WATCHDOG_STALLS_BY_CLASS,
                                        stall_class=stall_class))
        stats.set_value(ad_stats.WATCHDOG_LAST_CLASS, stall_class)
        stats.set_value(ad_stats.WATCHDOG_DETECT_SECONDS, round(time_to_detect, 3))
        stats.max_value(ad_stats.WATCHDOG_DETECT_SECONDS_MAX, round(time_to_detect, 3))
        if diagnosis.get("loop"):
            stats.max_value(ad_stats.WATCHDOG_LOOP_LAG_MAX, round(diagnosis["loop"]["lag_max"], 4))
        level = logging.ERROR if stall_class in ("deadlock", "blocked_loop") else logging.WARNING
        logger.log(level, "%s", render(diagnosis))
        self._write_file()
        if on_loop:
            self._send_detected(diagnosis)
        elif self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._send_detected, diagnosis)
            except RuntimeError:
                pass

    def _send_detected(self, diagnosis: dict[str, Any]) -> None:
        self.crawler.signals.send_catch_log(ad_signals.stall_detected, diagnosis=diagnosis)

    def _clear(self, episode: dict[str, Any], now: float) -> None:
        with self._lock:
            if self._episode is not episode:
                return
            self._episode = None
        duration = now - episode["started"]
        if episode["class"] == "blocked_loop" and self._monitor_started:
            blocked = self.monitor.lag_stats()["max"]
            duration = max(duration, blocked)
            self.stats.max_value(ad_stats.WATCHDOG_BLOCKED_MAX, round(blocked, 3))
        self.meter.mark_progress(now)
        self.state = "flowing"
        self.stats.inc_value(ad_stats.WATCHDOG_CLEARED)
        logger.info("antideadlock watchdog: %s stall cleared after %.1fs", episode["class"],
                    duration)
        self.crawler.signals.send_catch_log(ad_signals.stall_cleared,
                                            stall_class=episode["class"], duration=duration)

    # ------------------------------------------------------------------ the diagnosis
    def _labeller(self) -> Callable[[str, PoolSnapshot | None], str]:
        requests: dict[str, Any] = {}
        scraping: set[str] = set()
        engine = _engine(self.crawler)
        try:
            for request in compat.scraper_active(engine):
                if META_KEY in request.meta:
                    requests.setdefault(request.meta[META_KEY], request)
                    scraping.add(request.meta[META_KEY])
            for request in list(engine.downloader.active):
                if META_KEY in request.meta:
                    requests.setdefault(request.meta[META_KEY], request)
        except (AttributeError, RuntimeError):
            pass

        def label(owner: str, pool: PoolSnapshot | None) -> str:
            request = requests.get(owner)
            text = f"request {owner}"
            if request is not None:
                text = f"request {owner} ({request.method} {strip_credentials(request.url)})"
            kind = pool.kind if pool is not None else ""
            if kind in _ITEM_KINDS or (owner in scraping and kind not in ("proxy",)):
                return f"item of {text}"
            return text

        return label

    def _diagnosis(self, stall_class: str, evidence: list[str], *, now: float, since: float,
                   window: float, snapshots: list[PoolSnapshot], graph: WaitGraph | None,
                   inflight: list[dict[str, Any]], pending: dict[str, Any],
                   cpu: float | None, churn: float | None,
                   block: dict[str, Any] | None = None,
                   awaiting: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        monitor = self.monitor
        lag = monitor.lag_stats() if self._monitor_started else None
        holders = sorted(
            ({"pool": s.name, "kind": s.kind, "owner": h.owner, "member": h.member,
              "age": round(h.age, 3),
              "expires_in": None if h.expires_in is None else round(h.expires_in, 3)}
             for s in snapshots for h in s.holders), key=lambda h: -h["age"])[:10]
        pools = [{"name": s.name, "kind": s.kind, "capacity": s.capacity, "in_use": s.in_use,
                  "waiters": len(s.waiters),
                  "oldest_wait": round(max((w.waited for w in s.waiters), default=0.0), 3),
                  **({"error": s.extra["error"]} if "error" in s.extra else {})}
                 for s in snapshots]
        cycle = graph.cycles[0].text if graph is not None and graph.cycles else None
        try:
            spider = getattr(self.crawler, "spider", None)
        except RuntimeError:
            spider = None
        return {
            "class": stall_class,
            "episode": self.episodes + 1,
            "spider": getattr(spider, "name", None),
            "detected_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "monotonic": round(now, 3),  # time.monotonic() at detection (same-process timing)
            "window": round(window, 3),
            "since_progress": round(since, 3),
            "evidence": evidence,
            "cycle": cycle,
            "graph": graph.to_dict() if graph is not None else None,
            "stack": block.get("stack") if block else None,
            "where": block.get("where") if block else None,
            "frames": block.get("frames") if block else None,
            "oldest_holders": holders,
            "pools": pools,
            "in_flight": {"count": len(inflight), "oldest": [
                {**e, "age": round(e["age"], 3),
                 "deadline_in": None if e["deadline_in"] is None else round(e["deadline_in"], 3)}
                for e in inflight[:10]]},
            "pending": pending,
            "in_callbacks": self._in_callbacks(),
            "awaiting": awaiting or [],
            "progress": {k.split(":", 1)[1]: v
                         for k, v in self.meter.window_report(window, now).items()
                         if k.startswith("progress:")},
            "churn": churn,
            "loop": None if lag is None else {
                "heartbeat_age": round(monitor.heartbeat_age(), 3),
                "lag_p99": round(lag["p99"], 4), "lag_max": round(lag["max"], 4),
                "cpu": None if cpu is None else round(cpu, 3),
                "threshold": monitor.threshold},
            "concurrency": self.concurrency,
        }

    def _in_callbacks(self, limit: int = 10) -> list[str]:
        """Requests whose callback or items are still being processed."""
        active = list(compat.scraper_active(_engine(self.crawler)))
        return [describe(request) for request in active[:limit]]

    def _write_file(self) -> None:
        path = self.cfg.diagnosis_file
        if not path:
            return
        try:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            with self._lock:
                data = json.dumps(list(self.diagnoses), indent=1, default=str)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diagnosis-")
            with os.fdopen(fd, "w") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            logger.error("antideadlock watchdog: cannot write %s: %s", path, exc)

    # ------------------------------------------------------------------ health line
    def health(self) -> dict[str, Any]:
        """The numbers behind the health line (also for /healthz)."""
        now = time.monotonic()
        pending = self.pending()
        monitor = self.monitor if self._monitor_started else None
        lag = monitor.lag_stats() if monitor is not None else None
        return {
            "state": self.state,
            "items": self.stats.get_value("item_scraped_count", 0),
            "progress_in_window": self.meter.progress_in(self.window(), now),
            "in_flight": pending["downloading"], "concurrency": self.concurrency,
            "scheduled": pending["scheduled"],
            "heartbeat_age": None if monitor is None else monitor.heartbeat_age(),
            "lag_p99": None if lag is None else lag["p99"],
            "pools": [(s.name, s.in_use, s.capacity, len(s.waiters))
                      for s in self.registry.snapshot()],
            "window": self.window(), "armed": monitor is not None and monitor.running,
            "interventions": self.interventions,
        }

    def log_health(self) -> None:
        try:
            logger.info("%s", render_health(self.health()))
        except Exception:
            logger.exception("antideadlock watchdog: health line failed")


# ---------------------------------------------------------------------- rendering


def render_health(h: dict[str, Any]) -> str:
    pools = ", ".join(f"{name} {used}/{cap}" + (f" w{waiting}" if waiting else "")
                      for name, used, cap, waiting in h["pools"]) or "none"
    beat = "n/a" if h["heartbeat_age"] is None else f"{h['heartbeat_age']:.2f}s"
    lag = "n/a" if h["lag_p99"] is None else f"{h['lag_p99'] * 1000:.0f}ms"
    return (f"antideadlock health: {h['state']} | items {h['items']} "
            f"(+{h['progress_in_window']:.0f} progress in {h['window']:.1f}s) | "
            f"in flight {h['in_flight']}/{h['concurrency']}, scheduled {h['scheduled']} | "
            f"heartbeat {beat}, lag p99 {lag} | pools: {pools} | "
            f"watchdog {'armed' if h['armed'] else 'off'} | interventions {h['interventions']}")


def render(d: dict[str, Any]) -> str:
    """The diagnosis as one multi-line log block."""
    if d["class"] == "blocked_loop":
        head = f"event loop blocked (threshold {d['loop']['threshold']:.1f}s)" \
            if d.get("loop") and "threshold" in d["loop"] else "event loop blocked"
    else:
        head = f"no progress for {d['since_progress']:.1f}s (window {d['window']:.1f}s)"
    lines = [f"antideadlock watchdog: STALL #{d['episode']} class={d['class']} — {head}"]
    lines += [f"  evidence: {e}" for e in d["evidence"]]
    if d.get("cycle"):
        lines.append(f"  cycle: {d['cycle']}")
    graph = d.get("graph") or {}
    others = [c for c in (graph.get("cycles") or [])[1:] if len(c["owners"]) > 1]
    for extra in others[:2]:
        lines.append(f"  also:  {extra['text']}")
    if d.get("stack"):
        lines.append(f"  blocking call: {d.get('where')}")
        lines.append("  loop thread stack (innermost last):")
        lines += ["    " + line for line in d["stack"].rstrip().splitlines()[-24:]]
    if d["oldest_holders"]:
        lines.append("  oldest holders:")
        for h in d["oldest_holders"][:5]:
            member = f" [{h['member']}]" if h["member"] else ""
            expiry = "no expiry" if h["expires_in"] is None else f"expires in {h['expires_in']}s"
            lines.append(f"    {h['owner']} holds {h['kind']} {h['pool']!r}{member} for "
                         f"{h['age']:.1f}s ({expiry})")
    if d["pools"]:
        lines.append("  pools:  name                kind      cap  used  waiting  oldest_wait")
        for p in d["pools"]:
            lines.append(f"          {p['name'][:18]:<18}  {p['kind'][:8]:<8}  {p['capacity']:>3}"
                         f"  {p['in_use']:>4}  {p['waiters']:>7}  {p['oldest_wait']:>10.1f}s")
    flight = d["in_flight"]
    if flight["count"]:
        oldest = flight["oldest"][0]
        lines.append(f"  in flight: {flight['count']} (oldest {oldest['age']:.1f}s "
                     f"[{oldest['stage']}]: {oldest['request']})")
    if d.get("awaiting"):
        lines.append("  suspended tasks (where pending work awaits, innermost last):")
        for group in d["awaiting"][:4]:
            code = f"  | {group['code']}" if group["code"] else ""
            lines.append(f"    {group['count']}x {' → '.join(group['chain'])}{code}")
    if d.get("in_callbacks"):
        lines.append(f"  in callbacks/pipelines: {', '.join(d['in_callbacks'][:3])}"
                     + (" ..." if len(d["in_callbacks"]) > 3 else ""))
    pending = d["pending"]
    lines.append(f"  pending: {pending.get('in_progress', 0)} in progress, "
                 f"{pending.get('scheduled', 0)} scheduled, {pending.get('scraping', 0)} "
                 "in callbacks/pipelines")
    loop = d.get("loop")
    if loop:
        cpu = "n/a" if loop["cpu"] is None else f"{loop['cpu']:.0%}"
        lines.append(f"  loop: heartbeat {loop['heartbeat_age']:.2f}s ago, lag p99 "
                     f"{loop['lag_p99'] * 1000:.0f}ms, max {loop['lag_max'] * 1000:.0f}ms, "
                     f"loop CPU {cpu}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- helpers


def _check(cfg: Any) -> None:
    if cfg.window_min > cfg.window_max:
        raise ad_settings.SettingError(
            "ANTIDEADLOCK_WATCHDOG_WINDOW_MIN", "seconds <= ANTIDEADLOCK_WATCHDOG_WINDOW_MAX",
            cfg.window_min)
    if cfg.blocked_threshold <= cfg.heartbeat:
        raise ad_settings.SettingError(
            "ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD",
            "seconds > ANTIDEADLOCK_WATCHDOG_HEARTBEAT", cfg.blocked_threshold)


_FRAMEWORK_PARTS = (f"{os.sep}scrapy{os.sep}", f"{os.sep}twisted{os.sep}",
                    f"{os.sep}asyncio{os.sep}")


def suspended_tasks(limit: int = 6, exclude: Any = ()) -> list[dict[str, Any]]:
    """Where the loop's pending tasks are suspended, grouped, framework-only chains left out.

    This names the await nobody registered (the ``unknown`` class) and shows, for the other
    classes, which code waits. Call on the loop thread only.
    """
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        return []
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for task in tasks:
        if task.done() or task in exclude:
            continue
        chain = _await_chain(task.get_coro())
        if not any(not any(part in f[1] for part in _FRAMEWORK_PARTS) for f in chain):
            continue  # only Scrapy/Twisted/asyncio machinery
        while len(chain) > 1 and any(part in chain[0][1] for part in _FRAMEWORK_PARTS):
            chain = chain[1:]  # drop the framework frames the user did not write
        shown = tuple(f"{name} ({os.path.basename(path)}:{line})"
                      for name, path, line in chain[-4:])
        group = groups.setdefault(shown, {"count": 0, "chain": list(shown), "code": "",
                                          "at": shown[-1]})
        group["count"] += 1
        user = [f for f in chain if not any(part in f[1] for part in _FRAMEWORK_PARTS)]
        if user and not group["code"]:
            name, path, line = user[-1]
            group["at"] = f"{name} ({os.path.basename(path)}:{line})"
            group["code"] = linecache.getline(path, line).strip()
    return sorted(groups.values(), key=lambda g: -g["count"])[:limit]


def _await_chain(coro: Any) -> list[tuple[str, str, int]]:
    chain: list[tuple[str, str, int]] = []
    seen = 0
    while coro is not None and seen < 50:
        seen += 1
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is not None:
            chain.append((frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno))
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))
    return chain


def _engine(crawler: Any) -> Any:
    """The crawler's engine or None (Scrapy 2.19 raises RuntimeError before the crawl)."""
    try:
        return getattr(crawler, "engine", None)
    except RuntimeError:
        return None


def _stat_total(values: dict[str, Any], name: str) -> float:
    """``name`` itself if set, else the sum of its family ``name/...`` (no double count)."""
    value = values.get(name)
    if _is_number(value):
        return float(value)
    prefix = name + "/"
    return float(sum(v for k, v in values.items() if k.startswith(prefix) and _is_number(v)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _downloader_part(crawler: Any) -> Any:
    """The downloader part's module if its middleware runs in this crawl, else None.

    Asked only then, so the watchdog never creates the downloader's state as a side effect.
    """
    engine = _engine(crawler)
    middlewares = getattr(getattr(getattr(engine, "downloader", None), "middleware", None),
                          "middlewares", ())
    if not any(type(mw).__name__ == "DeadlineMiddleware" for mw in middlewares):
        return None
    try:
        from . import downloader
    except ImportError:
        return None
    return downloader


def _inflight_for(crawler: Any) -> Any:
    part = _downloader_part(crawler)
    if part is None or not hasattr(part, "inflight_for"):
        return None
    try:
        return part.inflight_for(crawler)
    except Exception:  # noqa: BLE001 - another component must not break the watchdog
        return None


def _latency_for(crawler: Any) -> Any:
    part = _downloader_part(crawler)
    if part is None or not hasattr(part, "latency_for"):
        return None
    try:
        return part.latency_for(crawler)
    except Exception:  # noqa: BLE001
        return None


__all__ = ["CLASSES", "Watchdog", "render", "render_health", "watchdog_for"]
