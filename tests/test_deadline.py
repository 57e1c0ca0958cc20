"""LatencyTracker and TimeoutPolicy (primitives/deadline.py): no Scrapy, milliseconds."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scrapy_antideadlock.primitives import LatencyTracker, TimeoutPolicy


def test_p99_within_bucket_width_of_the_truth() -> None:
    rng = random.Random(7)
    samples = [0.1 * math.exp(0.5 * rng.gauss(0, 1)) for _ in range(5000)]
    tracker = LatencyTracker(window=10_000)
    for s in samples:
        tracker.record("slot", s)
    true_p99 = sorted(samples)[int(0.99 * len(samples)) - 1]
    estimate = tracker.quantile("slot", 0.99)
    assert true_p99 <= estimate <= true_p99 * 1.06


def test_keys_are_independent_and_unknown_is_none() -> None:
    tracker = LatencyTracker()
    tracker.record("a", 0.01)
    tracker.record("b", 5.0)
    assert tracker.quantile("a") < 0.02 and tracker.quantile("b") >= 4.9
    assert tracker.quantile("c") is None and tracker.samples("c") == 0
    assert sorted(tracker.keys()) == ["a", "b"]


def test_generations_follow_a_site_that_speeds_up() -> None:
    tracker = LatencyTracker(window=100)
    for _ in range(100):
        tracker.record("s", 2.0)
    for _ in range(200):  # two windows later the slow generation is gone
        tracker.record("s", 0.05)
    assert tracker.quantile("s", 0.99) < 0.06
    assert tracker.samples("s") <= 200


def test_policy_initial_until_warm_then_adaptive_and_clamped() -> None:
    policy = TimeoutPolicy(multiplier=3, buffer=1, minimum=2, maximum=10, initial=7,
                           min_samples=5)
    tracker = LatencyTracker()
    for _ in range(4):
        tracker.record("s", 0.5)
    assert policy.timeout(tracker, "s") == 7  # not warm yet
    tracker.record("s", 0.5)
    assert policy.timeout(tracker, "s") == pytest.approx(0.5 * 3 + 1, rel=0.06)
    for _ in range(100):
        tracker.record("slow", 30.0)
        tracker.record("fast", 0.001)
    for _ in range(5):
        tracker.record("slow", 30.0)
    assert policy.timeout(tracker, "slow") == 10  # clamped to maximum
    assert policy.timeout(tracker, "fast") == 2  # clamped to minimum


def test_policy_rejects_min_above_max() -> None:
    with pytest.raises(ValueError):
        TimeoutPolicy(minimum=5, maximum=1)


@given(st.lists(st.floats(min_value=0.0005, max_value=50.0), min_size=20, max_size=300))
def test_no_feedback_loop_deadline_bounded_by_successes(latencies: list[float]) -> None:
    """Only successes are recorded, and a success took less than its deadline: the next
    deadline is at most multiplier x the largest success + buffer, and never above max."""
    policy = TimeoutPolicy(multiplier=3, buffer=1, minimum=1, maximum=60, initial=30,
                           min_samples=20)
    tracker = LatencyTracker(window=50)
    deadline = policy.initial
    for latency in latencies:
        if latency < deadline:  # the request succeeded within its deadline
            tracker.record("s", latency)
        # timeouts are not recorded
        deadline = policy.timeout(tracker, "s")
        assert policy.minimum <= deadline <= policy.maximum
    if tracker.samples("s") >= 20:
        biggest = max(0.001, max(x for x in latencies if x < 60))  # 1 ms: first bucket
        assert deadline <= max(policy.minimum, min(policy.maximum, biggest * 1.05 * 3 + 1))


def test_censored_majority_grows_the_deadline_up_to_the_ceiling() -> None:
    """Deadline hits are lower bounds: when most recent outcomes were cut at T, the
    median latency is at least T, so T grows (x multiplier + buffer), up to the ceiling."""
    policy = TimeoutPolicy(multiplier=3, buffer=1, minimum=1, maximum=60, initial=30,
                           min_samples=5)
    tracker = LatencyTracker(recent=10)
    for _ in range(50):
        tracker.record("s", 0.01)
    fast = policy.timeout(tracker, "s")
    assert fast == pytest.approx(1.03, abs=0.01)  # learned on the fast site
    tracker.censor("s", fast)  # one outlier (a hang) changes nothing
    assert policy.timeout(tracker, "s") == fast and not tracker.mostly_censored("s")
    deadline = 1.0
    for _ in range(10):  # the site slowed down to 20 s: every transfer is cut
        tracker.censor("s", deadline)
        deadline = policy.timeout(tracker, "s", ceiling=300)
    assert tracker.mostly_censored("s")
    assert deadline > 20  # grew past the new latency instead of cutting for ever
    assert policy.timeout(tracker, "s") == 60  # DEADLINE_MAX when no ceiling is given
    for _ in range(10):  # it answers again, in 20 s: the deadline stays above that
        tracker.record("s", 20.0)
    assert policy.timeout(tracker, "s", ceiling=300) == 61
    for _ in range(10):  # and speeds up again: the recent slow answers age out
        tracker.record("s", 0.01)
    assert policy.timeout(tracker, "s", ceiling=300) < 62  # p99 still has the 20 s answers
    for _ in range(5000):
        tracker.record("s", 0.01)
    assert policy.timeout(tracker, "s", ceiling=300) == fast


def test_user_ceiling_bounds_and_initial_overrides() -> None:
    policy = TimeoutPolicy(minimum=2, maximum=60, initial=30, min_samples=5)
    tracker = LatencyTracker()
    assert policy.timeout(tracker, "s", ceiling=300, initial=300) == 300  # not warm: user's
    assert policy.timeout(tracker, "s", ceiling=1.5) == 1.5  # below MIN: the user's wins
    for _ in range(5):
        tracker.record("s", 70.0)
    assert policy.timeout(tracker, "s", ceiling=300) == pytest.approx(211, rel=0.06)
    assert policy.timeout(tracker, "s") == 60


def test_cuts_on_a_cold_slot_do_not_stretch_its_deadline() -> None:
    """Three URLs that hang for ever on a slot with no history yet are not a slowed-down
    site: their cuts must not raise everyone's deadline while they hold scarce slots."""
    policy = TimeoutPolicy(multiplier=3, buffer=1, minimum=1, maximum=60, initial=2,
                           min_samples=5)
    tracker = LatencyTracker(recent=10)
    tracker.record("s", 0.05)
    for _ in range(3):
        tracker.censor("s", 2.0)
    assert tracker.mostly_censored("s")
    assert policy.timeout(tracker, "s") == 2.0  # still INITIAL, not 2 x 3 + 1
