"""Latency tracking with bounded memory and the timeout policy T = p99 x k + buffer.

A sparse log-bucket histogram keeps memory small per key whatever the
crawl length. Two generations are kept and rotated every ``window`` samples, so the
estimate follows the site as it speeds up or slows down while still covering at
least ``window`` recent samples.

Feedback loop: the histogram holds *successful* latencies only (the caller's duty),
and a success can never take longer than the deadline it ran under, so a run of
timeouts cannot push p99 up. A deadline hit is a *censored* sample instead: it says
the latency was at least T. The last ``recent`` outcomes of each key (successes and
censored samples) are kept apart; when most of them (three in four) were cut on a warm
slot (one with a p99), the median latency is at least T, so the policy grows the deadline to
T x multiplier + buffer, up to the
ceiling (the user's own timeout, else ``maximum``), rather than cutting every request
of a slowed-down site at a deadline it can no longer meet.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

_MIN_LATENCY = 0.001  # 1 ms: bucket 0 holds everything at or below it
_GROWTH = 1.05  # bucket width: 5 %, so the p99 estimate is within 5 % of the truth
_BUCKETS = int(math.log(3600 / _MIN_LATENCY) / math.log(_GROWTH)) + 2  # up to 1 h
_LOG_GROWTH = math.log(_GROWTH)


def _bucket(seconds: float) -> int:
    if seconds <= _MIN_LATENCY:
        return 0
    index = int(math.log(seconds / _MIN_LATENCY) / _LOG_GROWTH) + 1
    return min(index, _BUCKETS - 1)


def _upper_bound(index: int) -> float:
    return _MIN_LATENCY * _GROWTH**index


class LatencyHistogram:
    """Counts of latencies in 5 % wide log buckets from 1 ms to 1 h.

    Sparse (bucket -> count): a slot with a handful of samples costs a few hundred bytes,
    not one counter per bucket, so a broad crawl over many hosts stays small.
    """

    __slots__ = ("counts", "total", "maximum")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.maximum = 0.0

    def add(self, seconds: float, index: int | None = None) -> None:
        """Count ``seconds`` (``index``: its bucket, if the caller computed it already)."""
        if index is None:
            index = _bucket(max(0.0, seconds))
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.total += 1
        if seconds > self.maximum:
            self.maximum = seconds

    def quantile(self, q: float, other: LatencyHistogram | None = None) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (of self plus ``other``)."""
        total = self.total + (other.total if other else 0)
        if total == 0:
            return None
        maximum = max(self.maximum, other.maximum if other else 0.0)
        counts = self.counts
        if other is not None and other.counts:
            counts = dict(counts)
            for index, n in other.counts.items():
                counts[index] = counts.get(index, 0) + n
        rank = q * total
        seen = 0
        for index in sorted(counts):
            seen += counts[index]
            if seen >= rank and seen > 0:
                return min(_upper_bound(index), maximum) if index else _MIN_LATENCY
        return maximum


def _mostly_cut(cuts: int, outcomes: int) -> bool:
    """At least two cuts and three in four outcomes: a slot that slowed down. Half is
    not enough: a hang storm ends with only its hung requests and their retries left,
    about one cut per success, and must not stretch T for those last requests."""
    return cuts >= 2 and 4 * cuts >= 3 * outcomes


#: Key of the shared prior: every sample of every key, for keys not warm yet.
PRIOR = "*"


class _History:
    """One key's latency state: two histogram generations, recent outcomes, last summary.

    One small object per key (a broad crawl keeps up to ``max_keys`` of them): recent
    outcomes are a short list of floats, a cut stored negated, not a deque of tuples.
    """

    __slots__ = ("current", "previous", "recent", "p99", "n")

    def __init__(self) -> None:
        self.current: LatencyHistogram | None = None
        self.previous: LatencyHistogram | None = None
        self.recent: list[float] = []  # seconds; a deadline hit is stored as -seconds
        self.p99: float | None = None  # as of the last summary()
        self.n = 0  # samples, as of the last summary()

    def samples(self) -> int:
        cur, prev = self.current, self.previous
        return (cur.total if cur else 0) + (prev.total if prev else 0)

    def quantile(self, q: float) -> float | None:
        cur, prev = self.current, self.previous
        if cur is None:
            return prev.quantile(q) if prev else None
        return cur.quantile(q, prev)


class LatencyTracker:
    """Per-key latency quantiles from the current and the previous generation.

    At most ``max_keys`` keys are kept, least recently recorded first out, so a broad
    crawl over many hosts has bounded memory (a few hundred bytes per key); an evicted or
    new key is cold again, and the caller may fall back on :data:`PRIOR`, which holds the
    samples of every key.
    """

    def __init__(self, window: int = 2000, recent: int = 20, max_keys: int = 1000) -> None:
        if window < 1 or recent < 1:
            raise ValueError("window and recent must be >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.window = window
        self.recent = recent
        self.max_keys = max_keys
        self.evicted = 0
        self._prior = _History()
        # least recently used first; PRIOR is kept apart and never evicted
        self._keys: OrderedDict[Hashable, _History] = OrderedDict()
        self._dirty: set[Hashable] = set()  # keys recorded since the last summary()
        # summary() kept incrementally: the sum of every key's n, and the largest p99
        self._total = 0
        self._best: float | None = None
        self._best_key: Hashable = None
        self._rescan = False  # the key holding _best shrank or left: look at every key
        self._lock = threading.Lock()  # the watchdog thread reads quantiles

    def record(self, key: Hashable, seconds: float) -> None:
        """A success that took ``seconds``."""
        index = _bucket(max(0.0, seconds))  # once for both histograms
        with self._lock:
            self._add(self._prior, seconds, index)
            if key != PRIOR:
                history = self._touch(key)
                self._add(history, seconds, index)
                self._outcome(history, max(0.0, seconds))
                self._dirty.add(key)

    def censor(self, key: Hashable, seconds: float) -> None:
        """A deadline hit after ``seconds``: the latency was at least that long."""
        with self._lock:
            history = self._prior if key == PRIOR else self._touch(key)
            self._outcome(history, -max(seconds, 1e-9))

    def _add(self, history: _History, seconds: float, index: int) -> None:
        hist = history.current
        if hist is None:
            hist = history.current = LatencyHistogram()
        hist.add(seconds, index)
        if hist.total >= self.window:
            history.previous = hist
            history.current = LatencyHistogram()

    def _outcome(self, history: _History, signed: float) -> None:
        recent = history.recent
        recent.append(signed)
        if len(recent) > self.recent:
            del recent[0]

    def _get(self, key: Hashable) -> _History | None:
        return self._prior if key == PRIOR else self._keys.get(key)

    def _touch(self, key: Hashable) -> _History:
        """``key``'s history, marked most recently used; the least recent one past
        ``max_keys`` is evicted."""
        keys = self._keys
        history = keys.get(key)
        if history is not None:
            keys.move_to_end(key)
            return history
        history = keys[key] = _History()
        if len(keys) > self.max_keys:
            self._evict(*keys.popitem(last=False))
        return history

    def _evict(self, key: Hashable, history: _History) -> None:
        """Forget everything about ``key`` (called with the lock held)."""
        self._dirty.discard(key)
        self._total -= history.n
        if key == self._best_key:
            self._rescan = True
        self.evicted += 1

    def recent_outcomes(self, key: Hashable) -> list[tuple[bool, float]]:
        """The last ``recent`` outcomes of ``key``, oldest first: (censored, seconds)."""
        with self._lock:
            history = self._get(key)
            return [(s < 0, abs(s)) for s in history.recent] if history else []

    def mostly_censored(self, key: Hashable) -> bool:
        """Whether most recent outcomes of ``key`` (at least two) were deadline hits."""
        with self._lock:
            history = self._get(key)
            recent = history.recent if history else ()
            return _mostly_cut(sum(1 for s in recent if s < 0), len(recent))

    def samples(self, key: Hashable) -> int:
        with self._lock:
            history = self._get(key)
            return history.samples() if history else 0

    def quantile(self, key: Hashable, q: float = 0.99) -> float | None:
        with self._lock:
            history = self._get(key)
            return history.quantile(q) if history else None

    def summary(self, q: float = 0.99) -> tuple[float | None, int]:
        """(largest ``q``-quantile over the keys, their total samples), for a periodic
        reader: only keys recorded since the last call are recomputed, and every key only
        when the one holding the largest shrank or was evicted."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            keys = self._keys
            for key in dirty:
                history = keys.get(key)
                if history is None or history.current is None:
                    continue
                value, n = history.quantile(q), history.samples()
                self._total += n - history.n
                history.p99, history.n = value, n
                if key == self._best_key and (value is None or self._best is None
                                              or value < self._best):
                    self._rescan = True
                elif value is not None and (self._best is None or value > self._best):
                    self._best, self._best_key = value, key
            if self._rescan:
                self._rescan = False
                self._best, self._best_key = None, None
                for key, history in keys.items():
                    value = history.p99
                    if value is not None and (self._best is None or value > self._best):
                        self._best, self._best_key = value, key
            return self._best, self._total

    def keys(self) -> list[Hashable]:
        """Every key currently remembered (:data:`PRIOR` not included)."""
        with self._lock:
            return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class TimeoutPolicy:
    """T = clamp(p99 x multiplier + buffer, minimum, ceiling); ``initial`` until warmed up.

    The ceiling is ``maximum`` unless the caller passes the user's own timeout. Two
    recent signals raise T above the long-run p99: the slowest recent success
    (x multiplier + buffer), and, when most recent outcomes were deadline hits, the
    longest such hit (x multiplier + buffer).
    """

    multiplier: float = 3.0
    buffer: float = 1.0
    minimum: float = 2.0
    maximum: float = 60.0
    initial: float = 30.0
    min_samples: int = 20

    def __post_init__(self) -> None:
        if self.minimum > self.maximum:
            raise ValueError(f"minimum ({self.minimum}) > maximum ({self.maximum})")

    def timeout(self, tracker: LatencyTracker, key: Hashable, *, ceiling: float | None = None,
                initial: float | None = None) -> float:
        """The deadline for ``key``; ``initial`` (default: ``self.initial``) until warm."""
        p99 = tracker.quantile(key, 0.99) if tracker.samples(key) >= self.min_samples else None
        if p99 is None:
            seconds = self.initial if initial is None else initial
        else:
            seconds = p99 * self.multiplier + self.buffer
        outcomes = tracker.recent_outcomes(key)
        successes = [s for censored, s in outcomes if not censored]
        if successes and p99 is not None:
            seconds = max(seconds, max(successes) * self.multiplier + self.buffer)
        cuts = [s for censored, s in outcomes if censored]
        # Only a warm slot can have slowed down: on a cold one, two hung URLs would be
        # "most outcomes" and stretch everyone's deadline while they hold scarce slots.
        if p99 is not None and _mostly_cut(len(cuts), len(outcomes)):
            seconds = max(seconds, max(cuts) * self.multiplier + self.buffer)
        return self.clamp(seconds, ceiling)

    def clamp(self, seconds: float, ceiling: float | None = None) -> float:
        top = self.maximum if ceiling is None else ceiling
        return min(max(seconds, min(self.minimum, top)), top)
