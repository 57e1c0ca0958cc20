"""Off-loop monitor: sees a blocked event loop from its own thread and names the blocker.

Every in-loop monitor (LogStats, CloseSpider, telnet) goes silent exactly when the
loop is blocked. Here the loop only posts a heartbeat every ``interval`` seconds;
a daemon thread measures the heartbeat's lag and, when none arrived for
``threshold`` seconds, captures the loop thread's current Python stack
(``sys._current_frames``) once per episode and calls the blocked callbacks — on the
monitor thread, while the loop is still blocked. It also samples the loop thread's
CPU time, which tells an idle wait (deadlock) from a spinning one (livelock).

Its thread is also the pack's one off-loop thread for other work that must go on while
the loop is blocked (a liveness ping): :meth:`LoopMonitor.add_periodic` and
:meth:`LoopMonitor.add_deadline` run jobs there, between the monitor's own checks.

No Scrapy import: it takes any asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], object]


def _thread_cpu_clock(thread_id: int) -> Callable[[], float]:
    """CPU seconds of one thread (Linux/BSD), else of the whole process."""
    try:
        clock_id = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock_id)
    except (AttributeError, OSError, OverflowError):
        return time.process_time
    return lambda: time.clock_gettime(clock_id)


class Job:
    """A job on the monitor's thread: once at ``due``, or every ``interval`` from then."""

    def __init__(self, due: float, interval: float | None, fn: Callable[..., object],
                 args: tuple[Any, ...]) -> None:
        self.due = due
        self.interval = interval
        self.fn = fn
        self.args = args
        self.active = True
        self.running = threading.RLock()  # held while the job runs

    def cancel(self, timeout: float = 5.0) -> None:
        """No further runs; a run in progress on another thread is waited for (bounded)."""
        self.active = False
        if self.running.acquire(timeout=timeout):
            self.running.release()


class LoopMonitor:
    """Heartbeat, lag statistics, blocked-loop episodes and CPU use of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *, interval: float = 0.1,
                 threshold: float = 5.0, cpu_horizon: float = 600.0,
                 lag_samples: int = 3000, name: str = "antideadlock-loopmonitor") -> None:
        if not interval > 0 or not threshold > interval:
            raise ValueError("need 0 < interval < threshold")
        self.loop = loop
        self.interval = interval
        self.threshold = threshold
        self.name = name
        self.clock = time.monotonic
        self._blocked_callbacks: list[Callback] = []
        self._unblocked_callbacks: list[Callback] = []
        self._late_callbacks: list[tuple[float, Callback]] = []  # (after seconds, fn)
        self._late_called: set[int] = set()  # ids of late callbacks run this episode
        self._lock = threading.Lock()
        self._lags: deque[float] = deque(maxlen=lag_samples)
        self._max_lag = 0.0
        self._last_beat = self.clock()
        self._expected = self._last_beat + interval
        self._handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loop_thread_id: int | None = None
        self._cpu_clock: Callable[[], float] = time.process_time
        self._cpu: deque[tuple[float, float]] = deque()
        self.cpu_horizon = cpu_horizon
        self.blocked = False
        self.episodes = 0
        self.last_episode: dict[str, Any] | None = None
        self.longest_block = 0.0
        self.thread_cpu = 0.0  # CPU seconds the monitor thread used (its own overhead)
        self._jobs: list[Job] = []
        self._wake = threading.Event()  # a job was added, or stop

    # ------------------------------------------------------------------ callbacks
    def add_blocked_callback(self, fn: Callback, after: float | None = None) -> None:
        """``fn(info)`` runs on the monitor thread once per blocked episode: when the loop
        has been blocked for ``threshold`` seconds, or for ``after`` seconds if given
        (e.g. recovery's exit deadline; ``info["blocked_for"]`` is the age then)."""
        if after is None or after <= self.threshold:
            self._blocked_callbacks.append(fn)
        else:
            self._late_callbacks.append((after, fn))

    def add_unblocked_callback(self, fn: Callback) -> None:
        """``fn(info)`` runs on the monitor thread when the loop beats again."""
        self._unblocked_callbacks.append(fn)

    # ------------------------------------------------------------------ jobs
    def add_periodic(self, interval: float, fn: Callable[[], object], *,
                     now: bool = False) -> Job:
        """Run ``fn()`` on the monitor's thread every ``interval`` seconds while it runs
        (first at once if ``now``). It must be quick: the monitor's own check waits for it.
        An exception is logged and the job keeps its schedule."""
        if not interval > 0:
            raise ValueError("interval must be > 0")
        return self._add(Job(self.clock() + (0.0 if now else interval), interval, fn, ()))

    def add_deadline(self, at: float, fn: Callable[..., object], *args: Any) -> Job:
        """Run ``fn(*args)`` once on the monitor's thread at ``at`` (on the monitor's
        clock, ``time.monotonic``) unless cancelled first, whether the loop runs or not."""
        return self._add(Job(at, None, fn, args))

    def _add(self, job: Job) -> Job:
        with self._lock:
            self._jobs.append(job)
        self._wake.set()
        return job

    def _run_due_jobs(self, now: float) -> None:
        with self._lock:
            self._jobs = [job for job in self._jobs if job.active]
            due = [job for job in self._jobs if job.due <= now]
        for job in due:
            if not job.active:
                continue
            if job.interval is None:
                job.active = False
            else:  # a fixed schedule; beats missed while busy are skipped
                job.due = max(job.due + job.interval, now)
            with job.running:
                if not job.active and job.interval is not None:
                    continue  # cancelled meanwhile
                try:
                    job.fn(*job.args)
                except Exception:  # a broken job must not kill the monitor
                    logger.exception("loop monitor job %r failed", job.fn)

    def _next_job_due(self) -> float | None:
        with self._lock:
            dues = [job.due for job in self._jobs if job.active]
        return min(dues) if dues else None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start beating and watching; call from the loop's thread (the running loop is used
        if none was given). Callbacks may be added before or after."""
        if self._thread is not None:
            return
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self.loop_thread_id = threading.get_ident()
        self._cpu_clock = _thread_cpu_clock(self.loop_thread_id)
        now = self.clock()
        self._last_beat = now
        self._expected = now + self.interval
        self._handle = self.loop.call_later(self.interval, self._beat)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and the heartbeat; joins so no thread outlives the crawl."""
        self._stop.set()
        self._wake.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ loop side
    def _beat(self) -> None:
        now = self.clock()
        lag = max(0.0, now - self._expected)
        with self._lock:
            self._lags.append(lag)
            self._max_lag = max(self._max_lag, lag)
            self._last_beat = now
        self._expected = now + self.interval
        if not self._stop.is_set() and self.loop is not None:
            self._handle = self.loop.call_later(self.interval, self._beat)

    # ------------------------------------------------------------------ readings
    def heartbeat_age(self) -> float:
        """Seconds since the loop last ran the heartbeat (≈ interval when healthy)."""
        with self._lock:
            return self.clock() - self._last_beat

    def lag_stats(self) -> dict[str, float]:
        """Loop lag (how late the heartbeat ran): p50/p99 of recent beats, max ever, now."""
        with self._lock:
            lags = sorted(self._lags)
            current = max(0.0, self.clock() - self._expected)
            maximum = max(self._max_lag, current if self.blocked else 0.0)
        if not lags:
            return {"p50": 0.0, "p99": 0.0, "max": maximum, "current": current, "samples": 0}
        return {"p50": lags[len(lags) // 2], "p99": lags[min(len(lags) - 1,
                                                              int(len(lags) * 0.99))],
                "max": maximum, "current": current, "samples": len(lags)}

    def cpu_fraction(self, window: float) -> float | None:
        """Share of one core the loop thread used over the last ``window`` seconds."""
        with self._lock:
            if len(self._cpu) < 2:
                return None
            t_now, c_now = self._cpu[-1]
            start = self._cpu[0]
            for point in self._cpu:
                if point[0] >= t_now - window:
                    break
                start = point
        elapsed = t_now - start[0]
        if elapsed <= 0:
            return None
        return max(0.0, (c_now - start[1]) / elapsed)

    def loop_stack(self, limit: int | None = None) -> str:
        """The loop thread's current Python stack (empty if unknown)."""
        if self.loop_thread_id is None:
            return ""
        frame = sys._current_frames().get(self.loop_thread_id)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame, limit=limit))

    # ------------------------------------------------------------------ thread side
    def _run(self) -> None:
        # Wake often enough to report within threshold + 0.5 s, rarely enough not to
        # compete with the loop for the GIL (each wake-up can preempt it).
        poll = min(max(self.interval, self.threshold / 10), 0.5, self.threshold / 4)
        try:
            self._watch(poll)
        finally:
            self.thread_cpu = time.thread_time()

    def _watch(self, poll: float) -> None:
        block_started = 0.0
        next_check = self.clock() + poll
        while not self._stop.is_set():
            wake_at = next_check
            job_due = self._next_job_due()
            if job_due is not None:
                wake_at = min(wake_at, job_due)
            self._wake.wait(max(0.0, wake_at - self.clock()))
            self._wake.clear()
            if self._stop.is_set():
                break
            self._run_due_jobs(self.clock())
            now = self.clock()
            if now < next_check:
                continue
            next_check = now + poll
            self._sample_cpu(now)
            age = self.heartbeat_age()
            if not self.blocked and age >= self.threshold:
                self.blocked = True
                self.episodes += 1
                block_started = now - age
                info = self._blocked_info(age)
                self.last_episode = info
                logger.debug("event loop blocked for %.2fs", age)
                self._call(self._blocked_callbacks, info)
            if self.blocked and age >= self.threshold:
                self._call_late(age)
            elif self.blocked and age < self.threshold:
                self._late_called.clear()
                self.blocked = False
                duration = now - age - block_started
                self.longest_block = max(self.longest_block, duration)
                self._call(self._unblocked_callbacks,
                           {"blocked_for": duration, "episode": self.episodes})

    def _call_late(self, age: float) -> None:
        for after, fn in list(self._late_callbacks):
            if age >= after and id(fn) not in self._late_called:
                self._late_called.add(id(fn))
                self._call([fn], {**(self.last_episode or {}), "blocked_for": age})

    def _sample_cpu(self, now: float) -> None:
        try:
            cpu = self._cpu_clock()
        except OSError:  # the loop thread is gone
            return
        with self._lock:
            self._cpu.append((now, cpu))
            while len(self._cpu) > 2 and self._cpu[1][0] < now - self.cpu_horizon:
                self._cpu.popleft()

    def _blocked_info(self, age: float) -> dict[str, Any]:
        frame = sys._current_frames().get(self.loop_thread_id or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        where = ""
        if frame is not None:
            code = frame.f_code
            where = f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"
        return {"blocked_for": age, "stack": stack, "where": where,
                "frames": _frame_summary(frame), "episode": self.episodes,
                "detected_at": self.clock(), "threshold": self.threshold}

    def _call(self, callbacks: list[Callback], info: dict[str, Any]) -> None:
        for fn in list(callbacks):
            try:
                fn(info)
            except Exception:  # a broken callback must not kill the monitor
                logger.exception("loop monitor callback %r failed", fn)


def _frame_summary(frame: Any, limit: int = 30) -> list[dict[str, Any]]:
    """Innermost-last frames as dicts (function, file, line) for the JSON diagnosis."""
    if frame is None:
        return []
    summary = traceback.extract_stack(frame, limit=limit)
    qualnames = []
    while frame is not None and len(qualnames) < len(summary):
        qualnames.append(getattr(frame.f_code, "co_qualname", frame.f_code.co_name))
        frame = frame.f_back
    qualnames.reverse()  # innermost last, like the summary
    return [{"function": f.name, "qualname": q, "file": f.filename, "line": f.lineno,
             "code": f.line or ""} for f, q in zip(summary, qualnames, strict=True)]
