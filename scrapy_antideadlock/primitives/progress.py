"""Sliding-window progress meter over cumulative counters (no Scrapy).

Scrapy's own stats are cumulative counters (``item_scraped_count``...). The meter
samples them and answers "how much did X grow during the last W seconds" for any
W up to ``horizon`` — a sliding window, not LogStats' tumbling one, so a flatline is
seen W seconds after the last event whatever the sampling phase. Only change points
are stored, so a quiet counter costs nothing and memory stays bounded by the number
of changes within the horizon.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

Clock = Callable[[], float]


class SlidingCounter:
    """Change points ``(t, value)`` of one cumulative counter within ``horizon`` seconds."""

    __slots__ = ("horizon", "_points", "last_change", "value")

    def __init__(self, horizon: float) -> None:
        if not horizon > 0:
            raise ValueError("horizon must be > 0")
        self.horizon = horizon
        self._points: deque[tuple[float, float]] = deque()
        self.last_change: float | None = None
        self.value: float = 0.0

    def observe(self, value: float, now: float) -> bool:
        """Record the counter's current value; True if it grew since the last sample."""
        grew = value > self.value
        if value != self.value or not self._points:
            self._points.append((now, value))
            if grew:
                self.last_change = now
            self.value = value
        self._trim(now)
        return grew

    def _trim(self, now: float) -> None:
        # Keep one point at or before the horizon so value_at(now - horizon) stays exact.
        limit = now - self.horizon
        points = self._points
        while len(points) > 1 and points[1][0] <= limit:
            points.popleft()

    def value_at(self, t: float) -> float:
        """The counter's value at time ``t`` (its first known value if ``t`` is older)."""
        result = self._points[0][1] if self._points else 0.0
        for when, value in self._points:
            if when > t:
                break
            result = value
        return result

    def delta(self, window: float, now: float) -> float:
        """Growth during the last ``window`` seconds (clamped to the horizon)."""
        if not self._points:
            return 0.0
        return self.value - self.value_at(now - min(window, self.horizon))


class ProgressMeter:
    """Named cumulative counters split into *progress* (work done) and *churn* (work tried).

    ``sample()`` is fed from the loop; the read methods may be called from any thread.
    """

    def __init__(self, progress: Iterable[str], churn: Iterable[str] = (),
                 other: Iterable[str] = (), *, horizon: float = 600.0,
                 clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.horizon = horizon
        self.progress_names = tuple(progress)
        self.churn_names = tuple(churn)
        self._counters: dict[str, SlidingCounter] = {
            name: SlidingCounter(horizon)
            for name in (*self.progress_names, *self.churn_names, *other)}
        self._lock = threading.Lock()
        self.started = clock()
        self.last_progress: float = self.started  # start counts as progress: no stall at t=0

    def sample(self, values: Mapping[str, float], now: float | None = None) -> bool:
        """Record current counter values; True if any progress counter grew."""
        now = self.clock() if now is None else now
        progressed = False
        with self._lock:
            for name, counter in self._counters.items():
                grew = counter.observe(float(values.get(name, 0) or 0), now)
                if grew and name in self.progress_names:
                    progressed = True
            if progressed:
                self.last_progress = now
        return progressed

    def mark_progress(self, now: float | None = None) -> None:
        """Count an event that is progress but has no counter (e.g. a stall was cleared)."""
        with self._lock:
            self.last_progress = self.clock() if now is None else now

    def since_progress(self, now: float | None = None) -> float:
        return (self.clock() if now is None else now) - self.last_progress

    def delta(self, name: str, window: float, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        with self._lock:
            counter = self._counters.get(name)
            return counter.delta(window, now) if counter else 0.0

    def progress_in(self, window: float, now: float | None = None) -> float:
        return sum(self.delta(name, window, now) for name in self.progress_names)

    def churn_in(self, window: float, now: float | None = None) -> float:
        return sum(self.delta(name, window, now) for name in self.churn_names)

    def totals(self) -> dict[str, float]:
        with self._lock:
            return {name: counter.value for name, counter in self._counters.items()}

    def window_report(self, window: float, now: float | None = None) -> dict[str, float]:
        """Growth of every counter during the last ``window`` seconds (for diagnostics)."""
        now = self.clock() if now is None else now
        return {name: self.delta(name, window, now) for name in self._counters}
