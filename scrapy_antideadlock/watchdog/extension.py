"""The watchdog extension: measures progress, sees the flatline, emits one diagnosis.

It owns the episode state and the timers; what the engine says is read by
:class:`.probe.Probe`, the class is decided by :func:`.classify.classify`, and the
block, file and stats are written by :mod:`.report`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from scrapy import signals as scrapy_signals
from scrapy.exceptions import NotConfigured

from .. import settings as ad_settings
from .. import signals as ad_signals
from .. import stats as ad_stats
from ..context import connect_shared, context_for, disconnect_shared
from ..loopmonitor import LoopMonitor
from ..primitives.deadline import LatencyTracker
from ..primitives.progress import ProgressMeter
from ..primitives.waitgraph import analyse
from ..reactor import require_asyncio_reactor
from ..timers import every
from . import classes, report
from .classify import Evidence, Thresholds, classify
from .diagnosis import Diagnosis
from .meter import RequestFlow, check_settings, counter_values, p99_of, stall_window
from .probe import Probe, UnitsReader, latency_tracker
from .tasks import suspended_tasks
from .threadpools import thread_pools
from .waits import user_frames_of_stack

logger = logging.getLogger("scrapy_antideadlock.watchdog")

MAX_KEPT_DIAGNOSES = 100


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
        self.probe = Probe(crawler)
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
        self.last_diagnosis: Diagnosis | None = None
        # The latest episodes (bounded: a crawl that stalls all day must not grow the file).
        self.diagnoses: deque[Diagnosis] = deque(maxlen=MAX_KEPT_DIAGNOSES)
        self.episodes = 0
        self.interventions = 0
        self.cpu_spent = 0.0  # loop-thread CPU seconds spent in the periodic evaluation
        self.concurrency = int(crawler.settings.getint("CONCURRENT_REQUESTS") or 0)
        self._lock = threading.RLock()
        self._episode: dict[str, Any] | None = None  # the stall in progress
        self._tasks: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen_blocks = 0
        self._last_tick = 0.0
        self._stopped = False
        self._older_tasks: weakref.WeakSet = weakref.WeakSet()
        self.flow = RequestFlow()  # who keeps scheduling requests (livelock evidence)
        self._new_requests = 0  # added to the stats when the tick reads them
        # Request durations of our own, until the downloader part's tracker (which p99_of
        # asks first) has samples: from then on ours would never be read.
        self._own_latency = True

    @classmethod
    def from_crawler(cls, crawler: Any) -> Watchdog:
        cfg = ad_settings.load(crawler.settings, "watchdog")
        if not cfg.enabled:
            raise NotConfigured("ANTIDEADLOCK_WATCHDOG_ENABLED is False")
        require_asyncio_reactor("Watchdog", crawler.settings)
        check_settings(cfg)
        watchdog = cls(crawler, cfg)
        sig = crawler.signals
        sig.connect(watchdog.engine_started, signal=scrapy_signals.engine_started)
        sig.connect(watchdog.spider_opened, signal=scrapy_signals.spider_opened)
        sig.connect(watchdog.spider_closed, signal=scrapy_signals.spider_closed)
        sig.connect(watchdog.engine_stopped, signal=scrapy_signals.engine_stopped)
        connect_shared(crawler, watchdog._response_received, scrapy_signals.response_received)
        connect_shared(crawler, watchdog.probe.reached_downloader,
                       scrapy_signals.request_reached_downloader)
        connect_shared(crawler, watchdog.probe.left_downloader,
                       scrapy_signals.request_left_downloader)
        sig.connect(watchdog._download_cancelled, signal=ad_signals.download_cancelled)
        connect_shared(crawler, watchdog._request_scheduled, scrapy_signals.request_scheduled)
        context_for(crawler).put("watchdog", watchdog)
        context_for(crawler).put("loopmonitor", watchdog.monitor)  # health and recovery share it
        return watchdog

    # ------------------------------------------------------------------ life cycle
    async def engine_started(self) -> None:
        self._remember_older_tasks()
        self._start_monitor()

    def _remember_older_tasks(self) -> None:
        """Tasks alive before this crawl started (e.g. left by an earlier crawl in the same
        process) cannot be this crawl's pending work: keep them out of the diagnosis."""
        try:
            self._older_tasks = weakref.WeakSet(asyncio.all_tasks(asyncio.get_running_loop()))
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
        self._tasks.append(every(interval, fn, name=f"watchdog {fn.__name__}"))

    def _stop_all(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        now = time.monotonic()
        self.meter.sample(self._counter_values(), now)
        with self._lock:
            episode = self._episode
        if episode is not None and (episode["class"] == classes.BLOCKED_LOOP.name
                                    or self.meter.last_progress > episode["detected"]):
            self._clear(episode, now)  # progress resumed just before the close
        for call in self._tasks:
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

    def _request_scheduled(self, request: Any, **kwargs: Any) -> None:
        if not request.dont_filter:  # it passed the duplicate filter: a new fingerprint
            self._new_requests += 1
        self.flow.scheduled(request)

    def _publish_new_requests(self) -> None:
        if self._new_requests:
            self.stats.inc_value(ad_stats.WATCHDOG_NEW_REQUESTS, self._new_requests)
            self._new_requests = 0

    def _download_cancelled(self, request: Any = None, reason: str = "", **kwargs: Any) -> None:
        self.interventions += 1

    def note_intervention(self, what: str = "") -> None:
        """Count an intervention (recovery calls this), shown in the health line."""
        self.interventions += 1

    # ------------------------------------------------------------------ window
    def window(self, now: float | None = None) -> float:
        """The stall window: fixed by setting, else adaptive from request durations."""
        if self.cfg.window is not None:
            return self.cfg.window
        p99, samples = p99_of([latency_tracker(self.crawler), self.latency])
        return stall_window(self.cfg, p99, samples, self.probe.slot_delay(now),
                            self.probe.longest_deadline())

    def _drop_own_latency(self) -> None:
        """On the loop: stop timing responses once the downloader part's tracker has
        samples (p99_of asks it first, so ours would never be read again)."""
        guard = latency_tracker(self.crawler)
        summary = getattr(guard, "summary", None)
        if summary is not None and summary(0.99)[1]:
            self._own_latency = False
            disconnect_shared(self.crawler, self._response_received,
                              scrapy_signals.response_received)

    # ------------------------------------------------------------------ the tick
    def _counter_values(self) -> dict[str, float]:
        self._publish_new_requests()
        return counter_values(dict(self.stats.get_stats()), self.cfg, self.registry.pools())

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
        self.probe.track(now)
        if self._own_latency:
            self._drop_own_latency()
        monitor = self.monitor
        if monitor.episodes != self._seen_blocks:
            # The loop was blocked (already reported): that time is not a flatline.
            self._seen_blocks = monitor.episodes
            self.meter.mark_progress(now)
        window = self.window(now)  # read once per tick: it walks the in-flight downloads
        if late > window:
            self.meter.mark_progress(now)  # the tick itself was held up: no measurement
        busy = self.probe.busy()
        since = self.meter.since_progress(now)
        with self._lock:
            episode = self._episode
        if episode is not None:
            # Code on the loop runs, so a blocked-loop episode is over.
            if episode["class"] == classes.BLOCKED_LOOP.name \
                    or since < episode["since_progress"] or not busy:
                self._clear(episode, now)
            return
        if not busy:
            self.meter.mark_progress(now)  # idle time is not stall time
            self.state = classes.IDLE.name
            return
        if since >= window:
            self._detect_flatline(now, since, window, self.pending())
        elif since >= window / 2:
            self.state = "slow"
        else:
            self.state = "flowing"

    def pending(self) -> dict[str, Any]:
        """Work not yet done: in progress (download or scraping) and scheduled."""
        return self.probe.pending()

    def inflight(self, now: float | None = None) -> list[dict[str, Any]]:
        """In-flight downloads, oldest first: request, age, stage, seconds to deadline."""
        return self.probe.inflight(now)

    # ------------------------------------------------------------------ detection
    def _detect_flatline(self, now: float, since: float, window: float,
                         pending: dict[str, Any]) -> None:
        snapshots = self.registry.snapshot()
        graph = analyse(snapshots, self.probe.labeller())
        cpu = self.monitor.cpu_fraction(window) if self._monitor_started else None
        probe_started = time.perf_counter()
        try:
            awaiting = suspended_tasks(exclude=self._older_tasks)
            units, _ = UnitsReader(self.probe, context_for(self.crawler).get("lifecycle")).read(
                now, since, exclude=self._older_tasks)
            pools = thread_pools(self._loop)
        except Exception:  # noqa: BLE001 - introspection must not break the diagnosis
            logger.debug("antideadlock watchdog: task introspection failed", exc_info=True)
            awaiting, units, pools = [], [], []
        evidence = Evidence(
            window=window, churn=self.meter.churn_in(window, now),
            churn_by_name={name.split(":", 1)[1]: value for name, value
                           in self.meter.window_report(window, now).items()
                           if name.startswith("churn:")},
            cpu=cpu, timeouts=self.meter.delta("timeouts", window, now),
            requests_sent=self.meter.delta("churn:downloader/request_count", window, now),
            graph=graph, inflight=self.inflight(now), awaiting=awaiting, units=units,
            transferring=self.probe.transferring(), pools=pools,
            requesters=self.flow.requesters(window, now))
        verdict = classify(evidence, Thresholds(self.cfg.churn_min, self.cfg.cpu_busy))
        diagnosis = self._diagnosis(
            verdict.stall_class, verdict.evidence, culprit=verdict.culprit, now=now, since=since,
            window=window, snapshots=snapshots, graph=graph, inflight=evidence.inflight,
            pending=pending, cpu=cpu, churn=evidence.churn, awaiting=awaiting, units=units,
            extra={"thread_pools": [p.to_dict() for p in pools],
                   "transferring": evidence.transferring, "time_to_detect": round(since, 3),
                   "probe_seconds": round(time.perf_counter() - probe_started, 4)})
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
        culprit = user_frames_of_stack(info.get("frames") or [])
        if culprit is not None:
            evidence.append(f"the project's innermost frame: {culprit}")
        diagnosis = self._diagnosis(
            classes.BLOCKED_LOOP.name, evidence, now=now, since=self.meter.since_progress(now),
            window=self.window(), snapshots=snapshots, graph=None, inflight=self.inflight(now),
            pending=self.pending(), cpu=None, churn=None, block=info, culprit=culprit,
            extra={"time_to_detect": round(info["blocked_for"], 3)})
        self._emit(diagnosis, time_to_detect=info["blocked_for"], on_loop=False)

    def _on_unblocked(self, info: dict[str, Any]) -> None:
        self.stats.max_value(ad_stats.WATCHDOG_BLOCKED_MAX, round(info["blocked_for"], 3))
        with self._lock:
            episode = self._episode
        if episode is not None and episode["class"] == classes.BLOCKED_LOOP.name and self._loop:
            try:
                self._loop.call_soon_threadsafe(self._clear, episode, time.monotonic())
            except RuntimeError:  # loop closed
                pass

    def _emit(self, diagnosis: Diagnosis, *, time_to_detect: float, on_loop: bool) -> None:
        stall_class = diagnosis.stall_class
        with self._lock:
            self.diagnoses.append(diagnosis)
            self.episodes = diagnosis.episode
            self.last_diagnosis = diagnosis
            self._episode = {"class": stall_class, "detected": time.monotonic(),
                             "started": time.monotonic() - time_to_detect,
                             "since_progress": diagnosis.since_progress}
            self.state = f"stalled:{stall_class}"
            kept = list(self.diagnoses)
        report.count(self.stats, diagnosis, time_to_detect)
        logger.log(classes.get(stall_class).level, "%s", report.render(diagnosis))
        report.write_file(self.cfg.diagnosis_file, kept)
        if on_loop:
            self._send_detected(diagnosis)
        elif self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._send_detected, diagnosis)
            except RuntimeError:
                pass

    def _send_detected(self, diagnosis: Diagnosis) -> None:
        self.crawler.signals.send_catch_log(ad_signals.stall_detected, diagnosis=diagnosis)

    def _clear(self, episode: dict[str, Any], now: float) -> None:
        with self._lock:
            if self._episode is not episode:
                return
            self._episode = None
        duration = now - episode["started"]
        if episode["class"] == classes.BLOCKED_LOOP.name and self._monitor_started:
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
    def _diagnosis(self, stall_class: str, evidence: list[str], **kwargs: Any) -> Diagnosis:
        return report.diagnosis(self, stall_class, evidence, **kwargs)

    # ------------------------------------------------------------------ health line
    def health(self) -> dict[str, Any]:
        """The numbers behind the health line (also for /healthz)."""
        return report.health_numbers(self)

    def log_health(self) -> None:
        try:
            logger.info("%s", report.render_health(self.health()))
        except Exception:
            logger.exception("antideadlock watchdog: health line failed")
