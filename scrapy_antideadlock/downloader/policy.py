"""Deadline policy of the guard: how long a request may take, from what was observed.

Transfer times of successful responses, per latency key (the downloader slot, or
"<slot> [playwright]"), feed T = p99 x multiplier + buffer (:class:`TimeoutPolicy`).
Waits for a lease or in the slot queue never enter the histories, so contention cannot
inflate p99 and the deadline cannot feed on its own waits; the predictable queue wait
is added on top instead (:meth:`DeadlinePolicy.queue_allowance`).

Memory stays bounded on broad crawls: at most DEADLINE_SLOT_HISTORIES keys are kept
(least recently used out), and a key with too few samples of its own uses the shared
prior, the histogram of every transfer of the crawl, before falling back to INITIAL.
"""

from __future__ import annotations

import time
from typing import Any

from .. import metakeys
from .. import stats as ad_stats
from ..compat import downloader as compat
from ..primitives import PRIOR, LatencyTracker, TimeoutPolicy

_TIMEOUT_CACHE_TTL = 0.5  # recompute a key's deadline at most twice a second
_STAT_SLOTS = 20  # per-slot close stats for the busiest slots only (broad crawls)


class DeadlinePolicy:
    """Latency histories and the deadline of a request's next attempt."""

    def __init__(self, d: Any) -> None:
        self.policy = TimeoutPolicy(d.multiplier, d.buffer, d.min, d.max, d.initial,
                                    d.min_samples)
        self.latency = LatencyTracker(d.window, max_keys=d.slot_histories)
        self.proxy_latency = LatencyTracker(d.window, max_keys=d.slot_histories)
        self.retry_backoff: float = d.retry_backoff
        self.lend_after: float = d.lend_after
        self.lend_min: float = d.lend_min
        self._cache: dict[str, tuple[float, float, float, bool]] = {}
        self._cache_max = 2 * d.slot_histories

    def warm(self, key: str) -> bool:
        return self._entry(key)[3]

    def timeouts_for(self, key: str) -> tuple[float, float]:
        """(adaptive deadline T without its ceiling, overdue threshold for lending) of ``key``,
        cached briefly."""
        entry = self._entry(key)
        return entry[1], entry[2]

    def _entry(self, key: str) -> tuple[float, float, float, bool]:
        """(valid until, T, lend threshold, warm) of ``key``, recomputed twice a second."""
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached
        latency, policy = self.latency, self.policy
        lend_after = float("inf")  # no p99 yet: nothing is "clearly overdue"
        unbounded = float("inf")  # the ceiling is applied per request
        warm = latency.samples(key) >= policy.min_samples
        if warm:
            timeout = policy.timeout(latency, key, ceiling=unbounded)
            p99 = latency.quantile(key, 0.99) or 0.0
            lend_after = max(self.lend_min, p99 * self.lend_after)
        elif latency.samples(PRIOR) >= policy.min_samples:
            # a cold slot: what the crawl saw so far, cached like any key (on a broad
            # crawl nearly every request is a new slot: one prior T per 0.5 s, not each)
            timeout = self._entry(PRIOR)[1]
        else:
            timeout = policy.timeout(latency, key, ceiling=unbounded)
        if len(self._cache) >= self._cache_max:
            self._cache.clear()
        entry = self._cache[key] = (now + _TIMEOUT_CACHE_TTL, timeout, lend_after, warm)
        return entry

    def transfer_timeout(self, key: str, retries: int, user_timeout: float | None = None,
                         full: bool = False, lease_retries: int = 0) -> float:
        """T for this attempt, at most the ceiling (the user's own timeout, else MAX).

        The user's timeout is also the value until the slot is warm, and the whole of it on
        their last allowed attempt (``full``). A retry on a warm slot keeps T: the slot
        answers in time, so the cut was this request's hang, not slowness, and a longer
        deadline would only lengthen the crawl's tail (a slot that really slowed down
        raises T itself through its censored samples). On a cold slot, or one where most
        recent transfers were cut, each retry gets DEADLINE_RETRY_BACKOFF times more. So does a request that timed out waiting for a
        proxy (``lease_retries``): it never reached the site, and hung holders of the pool
        must not starve it of its lease retries.
        """
        ceiling = user_timeout or self.policy.maximum
        if full and user_timeout:
            return user_timeout
        _, timeout, _, warm = self._entry(key)
        if user_timeout and not warm:
            timeout = user_timeout  # not warm yet: the user's value, not INITIAL
        timeout = min(timeout, ceiling)
        # cold, or most of the slot is being cut: slowness, not this request's hang
        slowed = warm and retries and self.latency.mostly_censored(key)
        backoff = (retries if not warm or slowed else 0) + lease_retries
        if backoff:
            timeout = min(timeout * self.retry_backoff ** backoff, ceiling)
        return timeout

    def tightened(self, entry: Any) -> float | None:
        """The deadline of a transfer that began while its slot was cold, now that the
        slot is warm: the transfer's start + this attempt's T (as
        :meth:`transfer_timeout` gives it now); None while the slot is still cold."""
        if entry.transfer_started is None or not self.warm(entry.key):
            return None
        meta = entry.request.meta
        timeout = self.transfer_timeout(entry.key, meta.get(metakeys.DEADLINE_RETRIES, 0),
                                        meta.get(metakeys.USER_TIMEOUT),
                                        lease_retries=meta.get(metakeys.LEASE_RETRIES, 0))
        return entry.transfer_started + timeout

    def queue_allowance(self, slot: Any, key: str, transfer: float) -> float:
        """Time the slot queue ahead of a new request will predictably take.

        With DOWNLOAD_DELAY a slot starts one request per delay; without, a queue of n
        drains in about n / concurrency transfer times. Capped at DEADLINE_MAX.
        """
        if not compat.queued_ahead(slot):
            return 0.0
        p50 = self.latency.quantile(key, 0.5) or transfer
        return min(compat.slot_wait_estimate(slot, p50), self.policy.maximum)

    def write_stats(self, stats: Any) -> None:
        """Per-slot p99 and T for the busiest slots (all of them on a narrow crawl)."""
        if stats is None:
            return
        latency = self.latency
        keys = sorted(latency.keys(), key=latency.samples, reverse=True)[:_STAT_SLOTS]
        for key in keys:
            p99 = latency.quantile(key, 0.99)
            if p99 is None:
                continue
            name = str(key).replace("/", "_") or "-"
            stats.set_value(ad_stats.family(ad_stats.DEADLINE_P99, slot=name), round(p99, 4))
            stats.set_value(ad_stats.family(ad_stats.DEADLINE_TIMEOUT, slot=name),
                            round(self.policy.timeout(latency, key), 4))
        if latency.evicted:
            stats.set_value(ad_stats.DEADLINE_SLOTS_EVICTED, latency.evicted)
