"""Slot latency histories stay bounded on broad crawls; cold slots use the shared prior."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from scrapy_antideadlock.downloader.policy import DeadlinePolicy
from scrapy_antideadlock.primitives import PRIOR, LatencyHistogram, LatencyTracker


def _policy(**overrides: object) -> DeadlinePolicy:
    d = dict(multiplier=3.0, buffer=1.0, min=2.0, max=60.0, initial=30.0, min_samples=20,
             window=2000, slot_histories=50, retry_backoff=2.0, lend_after=1.25, lend_min=0.25)
    d.update(overrides)
    return DeadlinePolicy(SimpleNamespace(**d))


def test_histories_are_evicted_least_recently_used_first() -> None:
    tracker = LatencyTracker(window=100, max_keys=100)
    for host in range(20_000):  # a broad crawl: one request per host
        tracker.record(f"10.0.{host // 256}.{host % 256}", 0.1)
    assert len(tracker) == 100 and tracker.evicted == 19_900
    assert tracker.samples("10.0.0.0") == 0  # the oldest hosts are gone
    assert tracker.samples("10.0.78.31") == 1  # the most recent one is kept
    assert 100 <= tracker.samples(PRIOR) <= 200  # the crawl-wide history: last 1-2 windows
    hot = "hot.example"
    for _ in range(30):
        tracker.record(hot, 0.2)
    for host in range(99):  # 99 newer keys: the hot one was used last, so it stays
        tracker.record(f"new{host}", 0.1)
    assert tracker.samples(hot) == 30
    tracker.record("one-more", 0.1)
    assert tracker.samples(hot) == 0  # now it is the least recently used


def test_a_sparse_history_is_small_and_exact_enough() -> None:
    hist = LatencyHistogram()
    hist.add(0.1)
    assert sys.getsizeof(hist.counts) < 300  # not one counter per bucket
    dense = LatencyHistogram()
    for i in range(1, 1001):
        dense.add(i / 1000)
    assert abs(dense.quantile(0.99) - 0.99) / 0.99 < 0.05
    assert abs(dense.quantile(0.5, hist) - 0.5) / 0.5 < 0.06


def test_a_cold_slot_takes_the_crawl_wide_prior_then_its_own_history() -> None:
    policy = _policy()
    assert policy.timeouts_for("new-host")[0] == 30.0  # nothing seen yet: INITIAL
    for host in range(40):
        policy.latency.record(f"h{host}", 0.2)
    policy._cache.clear()
    # p99 0.2 s over the crawl: T = 0.2 x 3 + 1 = 1.6, clamped to MIN
    assert policy.timeouts_for("new-host")[0] == 2.0
    for _ in range(20):
        policy.latency.record("slow-host", 5.0)
    assert 15.0 <= policy.timeouts_for("slow-host")[0] <= 17.0  # its own p99 now


def test_a_retry_on_a_warm_slot_keeps_its_deadline_a_cold_one_backs_off() -> None:
    policy = _policy()
    for _ in range(30):
        policy.latency.record("warm", 1.0)
    base = policy.transfer_timeout("warm", 0)
    assert policy.transfer_timeout("warm", 2) == base  # the cut was a hang, not slowness
    cold = policy.transfer_timeout("cold", 0)
    assert policy.transfer_timeout("cold", 1) == min(2 * cold, 60.0)


def test_summary_is_the_worst_slot_and_follows_new_samples() -> None:
    tracker = LatencyTracker(window=100, max_keys=3)
    assert tracker.summary() == (None, 0)
    for key, seconds in (("a", 0.1), ("b", 0.5), ("c", 0.2)):
        tracker.record(key, seconds)
    best, samples = tracker.summary()
    assert samples == 3 and abs(best - 0.5) < 0.03
    tracker.record("d", 0.05)  # evicts "a"; "b" is still the worst
    tracker.record("e", 0.05)  # evicts "b"
    best, samples = tracker.summary()
    assert samples == 3 and abs(best - 0.2) < 0.01


def test_a_request_starved_of_a_proxy_gets_longer_each_lease_retry() -> None:
    policy = _policy()
    for _ in range(30):
        policy.latency.record("warm", 0.2)
    base = policy.transfer_timeout("warm", 0)
    assert policy.transfer_timeout("warm", 0, lease_retries=2) == 4 * base
    assert policy.transfer_timeout("warm", 0, user_timeout=5.0, lease_retries=5) == 5.0


def test_a_thousand_slot_histories_cost_under_a_megabyte() -> None:
    """One request per host: the kept histories (key strings included) stay small."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracker = LatencyTracker(window=2000, max_keys=1000)
        before = tracemalloc.get_traced_memory()[0]
        for host in range(3000):
            tracker.record(f"127.0.{host // 254}.{host % 254}", 0.01 + host * 1e-5)
            if host % 3 == 0:
                tracker.censor(f"127.0.{host // 254}.{host % 254}", 2.0)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tracker) == 1000
    assert used < 1000 * 800, f"{used / 1000:.0f} bytes per slot"


def test_summary_kept_incrementally_equals_a_full_scan() -> None:
    """The worst p99 and the sample count follow records, evictions and a worst slot
    that gets faster, as a scan over every key would."""
    import random

    rng = random.Random(7)
    tracker = LatencyTracker(window=5, max_keys=8)
    for step in range(3000):
        key = f"k{rng.randrange(20)}"
        if rng.random() < 0.1:
            tracker.censor(key, 1.0)
        else:
            tracker.record(key, rng.choice((0.01, 0.02, 0.5, 2.0)) * rng.random())
        if step % 7 == 0:
            best, samples = tracker.summary()
            p99s = [tracker.quantile(k) for k in tracker.keys()]
            assert samples == sum(tracker.samples(k) for k in tracker.keys())
            assert best == max((p for p in p99s if p is not None), default=None)
