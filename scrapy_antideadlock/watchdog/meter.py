"""What counts as progress and churn, and how long a flatline may last (the window).

Progress is items (scraped, dropped, upserted) and new distinct requests; responses
alone are not progress, so a callback that re-requests itself is seen. The window is
fixed by setting, or adaptive: p99 of request durations x MULTIPLIER + BUFFER, clamped.
"""

from __future__ import annotations

import time
from typing import Any

from ..settings import SettingError
from .diagnosis import Culprit
from .waits import culprit_of_callable

__all__ = ["RequestFlow", "check_settings", "counter_values", "p99_of", "stall_window"]

# exception names that mean "the peer did not answer in time" (Twisted, Scrapy, this pack)
_TIMEOUT_WORDS = ("TimeoutError", "DeadlineExceeded", "DownloadCancelled", "ResponseNeverReceived")


def counter_values(values: dict[str, Any], cfg: Any, pools: list[Any]) -> dict[str, float]:
    """The meter's counters from the crawl's stats and the registry's pools."""
    out: dict[str, float] = {}
    for kind, names in (("progress", cfg.progress_stats), ("churn", cfg.churn_stats)):
        for name in names:
            out[f"{kind}:{name}"] = _stat_total(values, name)
    grants = 0
    for pool in pools:
        counters = getattr(pool, "counters", None)
        grants += int(getattr(counters, "acquired", 0) or 0)
    out["churn:lease_grants"] = grants
    out["timeouts"] = float(sum(
        v for k, v in values.items()
        if k.startswith("downloader/exception_type_count/") and _is_number(v)
        and any(word in k for word in _TIMEOUT_WORDS)))
    return out


def p99_of(trackers: list[Any]) -> tuple[float | None, int]:
    """Largest p99 over the first tracker that has samples (and the sample count)."""
    for tracker in trackers:  # a LatencyTracker keeps this incrementally: cheap per tick
        summary = getattr(tracker, "summary", None)
        if summary is not None:
            best, samples = summary(0.99)
            if samples:
                return best, samples
    tracker = next((t for t in trackers if t is not None
                    and any(t.samples(k) for k in t.keys())), trackers[-1])
    best: float | None = None
    samples = 0
    for key in tracker.keys():
        samples += tracker.samples(key)
        value = tracker.quantile(key, 0.99)
        if value is not None and (best is None or value > best):
            best = value
    return best, samples


def stall_window(cfg: Any, p99: float | None, samples: int, slot_delay: float,
                 longest_deadline: float = 0.0) -> float:
    """The stall window: fixed by setting, else adaptive from request durations."""
    if cfg.window is not None:
        return cfg.window
    if p99 is None or samples < cfg.window_min_samples:
        base = cfg.window_initial
    else:
        base = p99 * cfg.window_multiplier + cfg.window_buffer
    window = min(max(base, cfg.window_min), cfg.window_max)
    # A polite crawl (DOWNLOAD_DELAY, AutoThrottle) is slow by design, not stalled.
    window = max(window, 2 * slot_delay + cfg.window_buffer)
    # A download still inside the deadline it was given (up to the user's own
    # DOWNLOAD_TIMEOUT) is slow, not stuck: its deadline ends it.
    return max(window, longest_deadline + cfg.window_buffer)


class RequestFlow:
    """Recently scheduled requests: which callback keeps asking for pages (livelock evidence).

    A ring of the last ``size`` requests in three flat arrays, not a deque of tuples: a
    tuple holding a callback is one more object for the garbage collector to walk per
    request kept (thousands in any crawl), and the callback is kept as its function, not
    the request's bound method, so nothing of the request outlives it here. Read from
    any thread: a write racing the read can only change one entry.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._when = [float("-inf")] * size
        self._callback: list[Any] = [None] * size
        self._repeat = bytearray(size)
        self._next = 0

    def scheduled(self, request: Any) -> None:
        i = self._next
        callback = request.callback
        self._when[i] = time.monotonic()
        self._callback[i] = getattr(callback, "__func__", callback)
        self._repeat[i] = request.dont_filter
        self._next = i + 1 if i + 1 < self._size else 0

    def requesters(self, window: float, now: float) -> list[tuple[Culprit, int, int]]:
        """(callback, requests, dont_filter requests) over the last ``window`` seconds."""
        counts: dict[Any, list[int]] = {}
        since = now - window
        for when, fn, repeat in zip(list(self._when), list(self._callback),
                                    bytes(self._repeat), strict=True):
            if when >= since and fn is not None:
                entry = counts.setdefault(fn, [0, 0])
                entry[0] += 1
                entry[1] += repeat
        out = []
        for fn, (count, repeats) in counts.items():
            culprit = culprit_of_callable(fn)
            if culprit is not None:
                out.append((culprit, count, repeats))
        return out


def _stat_total(values: dict[str, Any], name: str) -> float:
    """``name`` itself if set, else the sum of its family ``name/...`` (no double count)."""
    value = values.get(name)
    if _is_number(value):
        return float(value)
    prefix = name + "/"
    return float(sum(v for k, v in values.items() if k.startswith(prefix) and _is_number(v)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_settings(cfg: Any) -> None:
    """Settings that are each valid but contradict one another fail at start."""
    if cfg.window_min > cfg.window_max:
        raise SettingError(
            "ANTIDEADLOCK_WATCHDOG_WINDOW_MIN", "seconds <= ANTIDEADLOCK_WATCHDOG_WINDOW_MAX",
            cfg.window_min)
    if cfg.blocked_threshold <= cfg.heartbeat:
        raise SettingError(
            "ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD",
            "seconds > ANTIDEADLOCK_WATCHDOG_HEARTBEAT", cfg.blocked_threshold)
