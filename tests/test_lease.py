"""LeasePool: the invariants every component relies on (no Scrapy, milliseconds each)."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scrapy_antideadlock.context import context_for
from scrapy_antideadlock.primitives import (
    LeasePool,
    LeaseTimeout,
    PoolClosed,
    Registry,
    TooManyWaiters,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    """Run on a private loop in its own thread: pytest-twisted owns this thread's loop."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, asyncio.wait_for(coro, 10)).result(timeout=20)


def test_capacity_is_enforced_and_release_frees_a_unit():
    async def main():
        pool = LeasePool("p", 2)
        a = await pool.acquire("a", 1)
        b = await pool.acquire("b", 1)
        assert pool.in_use == 2
        assert pool.try_acquire("c") is None
        assert a.release() is True
        c = pool.try_acquire("c")
        assert c is not None and pool.in_use == 2
        b.release()
        c.release()
        assert pool.in_use == 0

    run(main())


def test_double_release_is_a_counted_noop_not_a_drift():
    async def main():
        pool = LeasePool("p", 1)
        lease = await pool.acquire("a", 1)
        assert lease.release() is True
        assert lease.release() is False
        assert lease.release("again") is False
        assert pool.counters.double_releases == 2
        assert pool.counters.released == 1
        # capacity must still be exactly 1: two more acquires cannot both succeed
        first = pool.try_acquire("b")
        assert first is not None
        assert pool.try_acquire("c") is None

    run(main())


def test_acquire_times_out_with_named_error_and_leaves_no_waiter():
    async def main():
        pool = LeasePool("proxy", 1)
        held = await pool.acquire("a", 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(LeaseTimeout) as info:
            await pool.acquire("b", 0.1)
        assert 0.09 <= loop.time() - start < 1.0
        assert info.value.pool == "proxy" and info.value.owner == "b"
        assert pool.waiters() == []
        assert pool.counters.wait_timeouts == 1
        held.release()
        assert pool.in_use == 0

    run(main())


def test_waiters_are_served_fifo_on_release():
    async def main():
        pool = LeasePool("p", 1)
        held = await pool.acquire("first", 1)
        order = []

        async def want(name):
            lease = await pool.acquire(name, 2)
            order.append(name)
            lease.release()

        tasks = [asyncio.ensure_future(want(n)) for n in ("w1", "w2", "w3")]
        await asyncio.sleep(0.01)
        assert [w.owner for w in pool.waiters()] == ["w1", "w2", "w3"]
        held.release()
        await asyncio.gather(*tasks)
        assert order == ["w1", "w2", "w3"]
        assert pool.in_use == 0

    run(main())


def test_cancelled_waiter_holds_nothing_even_if_granted_at_cancel_time():
    async def main():
        pool = LeasePool("p", 1)
        held = await pool.acquire("a", 1)
        task = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0.01)
        held.release()  # grants the unit to b's future ...
        task.cancel()  # ... and b is cancelled before it ever runs
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.in_use == 0
        assert pool.waiters() == []
        assert pool.try_acquire("c") is not None

    run(main())


def test_cancelled_waiter_is_removed_from_queue():
    async def main():
        pool = LeasePool("p", 1)
        held = await pool.acquire("a", 1)
        task = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.waiters() == []
        held.release()
        assert pool.in_use == 0

    run(main())


def test_expired_lease_is_reclaimed_and_owner_notified():
    async def main():
        clock = FakeClock()
        pool = LeasePool("p", 1, clock=clock)
        expired = []
        lease = await pool.acquire("a", 1, ttl=5, on_expire=expired.append)
        assert pool.sweep() == []
        clock.now += 5.01
        assert pool.sweep() == [lease]
        assert expired == [lease]
        assert lease.released and lease.release_reason == "expired"
        assert pool.in_use == 0
        assert lease.release() is False  # the late release of the old holder is a no-op
        assert pool.counters.expired == 1
        b = pool.try_acquire("b")
        assert b is not None and pool.try_acquire("c") is None

    run(main())


def test_expiry_hands_the_unit_to_a_waiter():
    async def main():
        pool = LeasePool("p", 1)
        pool.start_sweeper(0.02)
        await pool.acquire("stuck", 1, ttl=0.05)
        lease = await pool.acquire("next", 2)  # would wait for ever without expiry
        assert lease.owner == "next"
        pool.close()

    run(main())


def test_members_least_loaded_and_cooldown():
    async def main():
        clock = FakeClock()
        pool = LeasePool("proxy", {"p1": 2, "p2": 2}, clock=clock, rng=random.Random(1))
        leases = [pool.try_acquire(f"r{i}") for i in range(4)]
        assert sorted(lease.member for lease in leases) == ["p1", "p1", "p2", "p2"]
        for lease in leases:
            lease.release()
        delay = pool.mark_failure("p1")
        assert 0.5 <= delay <= 1.0
        assert [pool.try_acquire(f"x{i}").member for i in range(2)] == ["p2", "p2"]
        assert pool.try_acquire("x3") is None  # p1 cooling down, p2 full
        assert pool.mark_failure("p1") >= 0.5  # backoff grows: second failure 1-2 s
        assert pool.counters.cooldowns == 2
        clock.now += 3
        assert pool.try_acquire("x4").member == "p1"

    run(main())


def test_waiter_wakes_when_cooldown_ends():
    async def main():
        pool = LeasePool("proxy", {"only": 1}, cooldown_base=0.1)
        pool.mark_failure("only")
        lease = await pool.acquire("r", 2)
        assert lease.member == "only"

    run(main())


def test_max_waiters_and_close():
    async def main():
        pool = LeasePool("p", 1, max_waiters=1)
        await pool.acquire("a", 1)
        waiting = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0.01)
        with pytest.raises(TooManyWaiters):
            await pool.acquire("c", 5)
        pool.close()
        with pytest.raises(PoolClosed):
            await waiting

    run(main())


def test_snapshot_lists_holders_and_waiters_for_the_registry():
    async def main():
        pool = LeasePool("proxy", {"p1": 1}, kind="proxy")
        registry = Registry()
        registry.register(pool)
        await pool.acquire("req-1", 1, ttl=30)
        task = asyncio.ensure_future(pool.acquire("req-2", 5))
        await asyncio.sleep(0.01)
        (snap,) = registry.snapshot()
        assert snap.exhausted and snap.in_use == 1 and snap.capacity == 1
        assert [h.owner for h in snap.holders] == ["req-1"]
        assert snap.holders[0].member == "p1" and 29 < snap.holders[0].expires_in <= 30
        assert [w.owner for w in snap.waiters] == ["req-2"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_registry_per_owner_and_duplicate_names():
    class Crawler:
        pass

    c1, c2 = Crawler(), Crawler()
    assert context_for(c1).registry is context_for(c1).registry
    assert context_for(c1).registry is not context_for(c2).registry
    context_for(c1).registry.register(LeasePool("x", 1))
    with pytest.raises(ValueError):
        context_for(c1).registry.register(LeasePool("x", 1))
    with pytest.raises(TypeError):
        context_for(c1).registry.register(object())


OPS = st.lists(
    st.tuples(st.sampled_from(["acquire", "release", "release_again", "expire", "cancel_waiter"]),
              st.integers(0, 7)),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, capacity=st.integers(1, 3))
def test_random_sequences_never_drift(ops, capacity):
    """Whatever mix of acquire/release/double release/expiry/cancel: in_use matches live leases,
    never exceeds capacity, nobody waits while a unit is free, and all units come back."""

    async def main():
        clock = FakeClock()
        pool = LeasePool("p", {"m1": capacity, "m2": 1}, clock=clock)
        live, released, waiting = [], [], []
        for op, arg in ops:
            if op == "acquire":
                task = asyncio.ensure_future(pool.acquire(f"o{arg}", 5, ttl=arg + 1))
                waiting.append(task)
            elif op == "release" and live:
                lease = live.pop(arg % len(live))
                lease.release()
                released.append(lease)
            elif op == "release_again" and released:
                assert released[arg % len(released)].release() is False
            elif op == "expire":
                clock.now += arg
                for lease in pool.sweep():
                    live.remove(lease)
                    released.append(lease)
            elif op == "cancel_waiter" and waiting:
                waiting[arg % len(waiting)].cancel()
            await asyncio.sleep(0)
            for task in [t for t in waiting if t.done()]:
                waiting.remove(task)
                if not task.cancelled():
                    live.append(task.result())
            assert pool.in_use == len(live) == len({id(x) for x in live})
            assert pool.in_use <= pool.capacity
            if pool.waiters():
                assert pool.in_use == pool.capacity  # no waiter while a unit is free
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for lease in list(live):
            lease.release()
        # granted-at-cancel leases were returned by the pool itself
        assert pool.in_use == 0
        assert pool.waiters() == []
        assert [pool.try_acquire("end") is not None for _ in range(capacity + 1)] == [True] * (
            capacity + 1)

    run(main())
