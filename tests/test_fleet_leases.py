"""Fleet leases in Redis: the Lua scripts and the LeasePool over them (real Redis, fast)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from scrapy_antideadlock.fleet.leases import RedisLeaseBackend
from scrapy_antideadlock.fleet.link import FleetLink, FleetRedisRequired
from scrapy_antideadlock.primitives import BackendUnavailable, LeasePool, LeaseTimeout


class Stats:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def inc_value(self, name: str, count: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + count




@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
def make_backend(redis_url, prefix):
    def make(worker: str = "w1", stats: Stats | None = None, **kwargs) -> RedisLeaseBackend:
        link = FleetLink(redis_url, prefix=prefix, worker=worker, stats=stats)
        return RedisLeaseBackend(link, "proxy", **kwargs)

    return make


def run(coro):
    """Run on a private loop in its own thread: pytest-twisted owns this thread's loop."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, asyncio.wait_for(coro, 20)).result(timeout=30)


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


# ---------------------------------------------------------------- the scripts


def test_capacity_holds_across_workers(make_backend):
    a, b = make_backend("a"), make_backend("b")
    grants = [a.acquire([("p1", 2)], "ra", 5), b.acquire([("p1", 2)], "rb", 5)]
    assert all(grants)
    assert a.acquire([("p1", 2)], "rc", 5) is None
    assert b.acquire([("p1", 2)], "rd", 5) is None
    assert a.release("p1", grants[0][1]) is True
    assert b.acquire([("p1", 2)], "re", 5) is not None


def test_tokens_are_unique_and_increasing(make_backend):
    a, b = make_backend("a"), make_backend("b")
    tokens = [x.acquire([("p1", 100)], "o", 5)[1] for x in (a, b, a, b, a)]
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


def test_acquire_picks_the_least_loaded_member(make_backend):
    a = make_backend()
    members = [("p1", 2), ("p2", 2), ("p3", 4)]
    got = [a.acquire(members, f"r{i}", 5)[0] for i in range(8)]
    assert sorted(got) == ["p1", "p1", "p2", "p2", "p3", "p3", "p3", "p3"]
    assert a.acquire(members, "r9", 5) is None


def test_acquire_of_one_member_only(make_backend):
    a = make_backend()
    assert a.acquire([("p2", 1)], "r", 5)[0] == "p2"
    assert a.acquire([("p2", 1)], "r", 5) is None
    assert a.acquire([("p1", 1)], "r", 5)[0] == "p1"


def test_expired_grant_frees_its_slot(make_backend):
    a, b = make_backend("a"), make_backend("b")
    assert a.acquire([("p1", 1)], "ra", 0.05) is not None
    assert b.acquire([("p1", 1)], "rb", 5) is None
    time.sleep(0.08)
    assert b.acquire([("p1", 1)], "rb", 5) is not None


def test_late_release_after_expiry_does_not_free_another_workers_slot(make_backend):
    stats = Stats()
    a, b, c = make_backend("a", stats), make_backend("b"), make_backend("c")
    _, token_a = a.acquire([("p1", 1)], "ra", 0.05)
    time.sleep(0.08)
    _, token_b = b.acquire([("p1", 1)], "rb", 5)  # a's grant expired: b holds the slot
    assert a.release("p1", token_a) is False  # the late release is a no-op
    assert stats.values["antideadlock/fleet/late_releases"] == 1
    assert c.acquire([("p1", 1)], "rc", 5) is None  # b still holds it
    assert a.renew("p1", token_a, 5) is False  # nor can a revive its dead grant
    assert c.acquire([("p1", 1)], "rc", 5) is None
    assert b.release("p1", token_b) is True
    assert c.acquire([("p1", 1)], "rc", 5) is not None


def test_expired_but_not_yet_purged_release_counts_as_late(make_backend):
    a = make_backend()
    _, token = a.acquire([("p1", 1)], "r", 0.03)
    time.sleep(0.05)
    assert a.release("p1", token) is False
    assert a.release("p1", token) is False  # twice: still nothing


def test_renew_moves_the_expiry(make_backend):
    a, b = make_backend("a"), make_backend("b")
    _, token = a.acquire([("p1", 1)], "r", 0.1)
    assert a.renew("p1", token, 5) is True
    time.sleep(0.15)
    assert b.acquire([("p1", 1)], "rb", 5) is None  # renewed: still held


def test_cooldown_is_fleet_wide_and_never_shortened(make_backend, redis_url):
    a, b = make_backend("a"), make_backend("b")
    a.cooldown("p1", 5)
    b.cooldown("p1", 0.01)  # a shorter cooldown from another worker does not shorten it
    assert b.acquire([("p1", 2)], "r", 5) is None
    assert b.acquire([("p1", 2), ("p2", 2)], "r", 5)[0] == "p2"
    b.clear_cooldown("p1")
    assert a.acquire([("p1", 2)], "r", 5)[0] == "p1"


def test_owner_is_recorded_and_removed(make_backend, redis_url):
    a = make_backend()
    _, token = a.acquire([("p1", 1)], "request-7", 5)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    h, o, _ = a.keys("p1")
    assert client.hget(o, str(token)) == "w1 request-7"
    a.release("p1", token)
    assert client.hlen(o) == 0 and client.zcard(h) == 0


def test_no_ttl_uses_the_longest_lease(make_backend, redis_url):
    a = make_backend(max_ttl=7.0)
    _, token = a.acquire([("p1", 1)], "r", None)
    client = redis.Redis.from_url(redis_url)
    h, _, _ = a.keys("p1")
    expiry = client.zscore(h, token)
    seconds, micros = client.time()
    assert 6.0 < (expiry - (seconds * 1000 + micros / 1000)) / 1000 <= 7.0


def test_concurrent_acquires_never_exceed_capacity(make_backend):
    backends = [make_backend(f"w{i}") for i in range(8)]

    def grab(backend: RedisLeaseBackend) -> int:
        return sum(backend.acquire([("p1", 3)], "r", 5) is not None for _ in range(20))

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(grab, backends)) == 3


# ---------------------------------------------------------------- degradation


def test_unreachable_redis_degrades_fast_and_loudly(caplog):
    stats = Stats()
    link = FleetLink("redis://127.0.0.1:1/0", prefix="x", stats=stats, retry_after=30)
    backend = RedisLeaseBackend(link, "proxy")
    started = time.monotonic()
    for _ in range(50):
        with pytest.raises(BackendUnavailable):
            backend.acquire([("p1", 1)], "r", 5)
    assert time.monotonic() - started < 2.0  # one failed connect, then fail-fast
    assert stats.values["antideadlock/fleet/degraded"] == 1
    assert stats.values["antideadlock/fleet/redis_errors"] == 1
    assert stats.values["antideadlock/fleet/local_grants"] == 50
    assert "UNREACHABLE" in caplog.text and "DEGRADED" in caplog.text


def test_require_redis_makes_it_a_hard_error():
    link = FleetLink("redis://127.0.0.1:1/0", prefix="x", require=True)
    with pytest.raises(FleetRedisRequired, match="ANTIDEADLOCK_FLEET_REQUIRE_REDIS"):
        RedisLeaseBackend(link, "proxy").acquire([("p1", 1)], "r", 5)


def test_blackholed_redis_costs_one_timeout_not_one_per_call():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        port = listener.getsockname()[1]
        link = FleetLink(f"redis://127.0.0.1:{port}/0", prefix="x", timeout=0.2,
                         retry_after=30)
        backend = RedisLeaseBackend(link, "proxy")
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(BackendUnavailable):
                backend.acquire([("p1", 1)], "r", 5)
        assert time.monotonic() - started < 1.5
    finally:
        listener.close()


# ---------------------------------------------------------------- the pool over Redis


def test_pool_shares_capacity_between_two_pools(make_backend):
    async def main():
        one = LeasePool("proxy", {"p1": 1, "p2": 1}, backend=make_backend("a"))
        two = LeasePool("proxy", {"p1": 1, "p2": 1}, backend=make_backend("b"))
        x = one.try_acquire("x", ttl=5)
        y = two.try_acquire("y", ttl=5)
        assert {x.member, y.member} == {"p1", "p2"} and x.token and y.token
        assert one.try_acquire("z", ttl=5) is None and two.try_acquire("z", ttl=5) is None
        with pytest.raises(LeaseTimeout):
            await two.acquire("z", 0.2, ttl=5)
        waiting = asyncio.ensure_future(two.acquire("w", 5, ttl=5))
        await asyncio.sleep(0.05)
        assert x.release() is True  # freed in another "process": the waiter polls
        lease = await asyncio.wait_for(waiting, 2)
        assert lease.member == x.member
        assert two.counters.wait_timeouts == 1 and two.counters.acquired == 2

    run(main())


def test_pool_double_release_and_expiry_match_local_semantics(make_backend):
    async def main():
        pool = LeasePool("proxy", {"p1": 1}, backend=make_backend())
        expired = []
        lease = pool.try_acquire("a", ttl=0.05, on_expire=expired.append)
        await asyncio.sleep(0.08)
        assert pool.sweep() == [lease] and expired == [lease]
        assert lease.release() is False and pool.counters.double_releases == 1
        assert pool.try_acquire("b", ttl=5) is not None

    run(main())


def test_pool_extend_renews_in_redis(make_backend):
    async def main():
        one = LeasePool("proxy", {"p1": 1}, backend=make_backend("a"))
        two = LeasePool("proxy", {"p1": 1}, backend=make_backend("b"))
        lease = one.try_acquire("a", ttl=0.1)
        one.extend(lease, 5)
        await asyncio.sleep(0.15)
        assert two.try_acquire("b", ttl=5) is None

    run(main())


def test_pool_extend_of_an_expired_grant_reclaims_the_lease(make_backend):
    """A grant that expired in Redis (a worker's loop was late) may be held by another
    worker already: renewing it must not keep a second live holder of the slot."""
    async def main():
        stats = Stats()
        one = LeasePool("proxy", {"p1": 1}, backend=make_backend("a", stats))
        two = LeasePool("proxy", {"p1": 1}, backend=make_backend("b"))
        expired = []
        lease = one.try_acquire("a", ttl=0.05, on_expire=expired.append)
        deadline = time.monotonic() + 5
        while (other := two.try_acquire("b", ttl=5)) is None:  # a's grant lapsed in Redis
            assert time.monotonic() < deadline, "the grant never expired in Redis"
            await asyncio.sleep(0.01)
        one.extend(lease, 5)  # too late: b holds the slot now
        assert expired == [lease] and lease.released and lease.release_reason == "expired"
        assert one.in_use == 0 and one.counters.expired == 1
        assert stats.values["antideadlock/fleet/renew_lost"] == 1
        assert other.member == "p1" and not other.released

    run(main())


def test_pool_cooldown_reaches_the_other_workers(make_backend):
    async def main():
        one = LeasePool("proxy", {"p1": 1, "p2": 1}, backend=make_backend("a"),
                        cooldown_base=5)
        two = LeasePool("proxy", {"p1": 1, "p2": 1}, backend=make_backend("b"))
        one.mark_failure("p1")
        leases = [two.try_acquire("x", ttl=5), two.try_acquire("y", ttl=5)]
        assert leases[0].member == "p2" and leases[1] is None
        one.mark_success("p1")
        assert two.try_acquire("y", ttl=5).member == "p1"

    run(main())


def test_pool_falls_back_to_local_leases_when_redis_is_down():
    async def main():
        link = FleetLink("redis://127.0.0.1:1/0", prefix="x", retry_after=30)
        pool = LeasePool("proxy", {"p1": 2}, backend=RedisLeaseBackend(link, "proxy"))
        a, b = pool.try_acquire("a", ttl=5), pool.try_acquire("b", ttl=5)
        assert a is not None and b is not None and a.token is None  # local grants
        assert pool.try_acquire("c", ttl=5) is None  # local capacity still holds
        with pytest.raises(LeaseTimeout):
            await pool.acquire("c", 0.1, ttl=5)  # bounded, never hangs
        assert a.release() is True
        assert "DOWN" in pool.snapshot().extra["backend"]

    run(main())
