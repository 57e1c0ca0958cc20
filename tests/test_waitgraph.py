"""Wait-for graph and progress meter: pure primitives, no Scrapy, milliseconds each."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.primitives.lease import LeasePool
from scrapy_antideadlock.primitives.progress import ProgressMeter, SlidingCounter
from scrapy_antideadlock.primitives.registry import HolderInfo, PoolSnapshot, Registry, WaiterInfo
from scrapy_antideadlock.primitives.waitgraph import analyse


def snap(name: str, kind: str, capacity: int, holders: list[str], waiters: list[str],
         members: dict | None = None) -> PoolSnapshot:
    return PoolSnapshot(name, kind, capacity, len(holders),
                        tuple(HolderInfo(o, "", 1.0 + i) for i, o in enumerate(holders)),
                        tuple(WaiterInfo(o, 0.5) for o in waiters),
                        {"members": members} if members else {})


def test_two_pool_cycle_is_a_knot_rendered_as_a_path() -> None:
    proxy = snap("proxy", "proxy", 1, ["A"], ["B"])
    db = snap("db", "pg", 1, ["B"], ["A"])
    graph = analyse([proxy, db])
    assert graph.deadlocked == ["A", "B"]
    assert len(graph.cycles) == 1
    text = graph.cycles[0].text
    assert text == ("request A holds proxy pool → waits for pg 'db' → held by request B → "
                    "waits for proxy pool → held by request A (cycle)")
    assert set(graph.cycles[0].pools) == {"proxy", "db"}
    json.dumps(graph.to_dict())  # serialisable for the diagnosis file


def test_cycle_with_a_free_unit_is_not_a_deadlock() -> None:
    # A waits for proxy, which B holds, but the proxy pool still has a free unit.
    proxy = snap("proxy", "proxy", 2, ["B"], ["A"])
    db = snap("db", "pg", 1, ["A"], ["B"])
    graph = analyse([proxy, db])
    assert not graph.has_deadlock and not graph.cycles


def test_holder_outside_the_knot_can_still_finish() -> None:
    # proxy has 2 units: one held by B (waiting for db held by A), one by C (not waiting).
    proxy = snap("proxy", "proxy", 2, ["B", "C"], ["A"])
    db = snap("db", "pg", 1, ["A"], ["B"])
    graph = analyse([proxy, db])
    assert not graph.has_deadlock  # C holds proxy and does not wait: it can release
    assert [s.pool for s in graph.starved] == ["db"]  # weaker evidence only


def test_starved_pool_whose_holders_all_wait_elsewhere() -> None:
    # db exhausted, held by A which waits for "pages" — a pool with a free unit but a
    # member in cooldown: holders all wait, no knot.
    db = snap("db", "pg", 1, ["A"], ["B"])
    pages = snap("pages", "page", 2, ["X"], ["A"],
                 members={"p": {"capacity": 2, "in_use": 1, "cooldown": 0}})
    graph = analyse([db, pages])
    assert not graph.has_deadlock
    assert [s.pool for s in graph.starved] == ["db"]


def test_member_specific_wait_uses_that_member_only() -> None:
    members = {"p1": {"capacity": 1, "in_use": 1, "cooldown": 0},
               "p2": {"capacity": 1, "in_use": 0, "cooldown": 0}}
    proxy = PoolSnapshot("proxy", "proxy", 2, 1, (HolderInfo("B", "p1"),),
                         (WaiterInfo("A", 1.0, "p1"),), {"members": members})
    db = snap("db", "pg", 1, ["A"], ["B"])
    graph = analyse([proxy, db])
    assert graph.deadlocked == ["A", "B"]  # A insists on p1 although p2 is free
    assert "[p1]" in graph.cycles[0].text


def test_three_owner_cycle_and_label_callback() -> None:
    a = snap("a", "proxy", 1, ["r1"], ["r3"])
    b = snap("b", "pg", 1, ["r2"], ["r1"])
    c = snap("c", "page", 1, ["r3"], ["r2"])
    graph = analyse([a, b, c], label=lambda owner, pool: f"<{owner}:{pool.kind}>")
    assert graph.deadlocked == ["r1", "r2", "r3"]
    cycle = graph.cycles[0]
    assert cycle.owners == ["r1", "r2", "r3"]
    assert cycle.text.count("→") == 6 and "<r2:pg>" in cycle.text


def test_large_graph_is_bounded() -> None:
    owners = [f"r{i}" for i in range(300)]
    pools = [snap(f"p{i}", "pg", 1, [owners[i]], [owners[(i + 1) % 300]]) for i in range(300)]
    graph = analyse(pools)
    assert len(graph.deadlocked) == 300 and len(graph.cycles) == 1


@deferred_f_from_coro_f
async def test_knot_from_real_lease_pools_and_registry() -> None:
    registry = Registry()
    proxy, db = LeasePool("proxy", 1, kind="proxy"), LeasePool("db", 1, kind="pg")
    registry.register(proxy)
    registry.register(db)
    held_p = await proxy.acquire("A", timeout=5)
    held_d = await db.acquire("B", timeout=5)
    wait_a = asyncio.ensure_future(db.acquire("A", timeout=5))
    wait_b = asyncio.ensure_future(proxy.acquire("B", timeout=5))
    await asyncio.sleep(0.01)
    graph = analyse(registry.snapshot())
    assert graph.deadlocked == ["A", "B"]
    assert "pg 'db'" in graph.cycles[0].text
    held_p.release()  # break it: B gets the proxy
    lease_b = await wait_b
    assert lease_b.owner == "B"
    assert not analyse(registry.snapshot()).has_deadlock
    wait_a.cancel()
    held_d.release()
    lease_b.release()


# ---------------------------------------------------------------------- progress meter


def test_sliding_counter_is_a_sliding_window() -> None:
    counter = SlidingCounter(horizon=10)
    for t, value in [(0, 0), (1, 5), (2, 5), (3, 9), (4, 9)]:
        counter.observe(value, t)
    assert counter.delta(1.5, 4) == 4  # value at 2.5 is 5
    assert counter.delta(3.5, 4) == 9  # value at 0.5 is 0
    assert counter.delta(0.5, 4) == 0
    assert counter.last_change == 3


def test_sliding_counter_memory_is_bounded_by_horizon() -> None:
    counter = SlidingCounter(horizon=1.0)
    for i in range(10000):
        counter.observe(i, i * 0.01)
    assert len(counter._points) <= 102
    assert counter.delta(0.5, 99.99) == pytest.approx(50, abs=1)


def test_progress_meter_since_progress_and_churn() -> None:
    clock = [100.0]
    meter = ProgressMeter(["items"], ["retries"], horizon=60, clock=lambda: clock[0])
    assert meter.since_progress() == 0
    meter.sample({"items": 0, "retries": 0}, 100.0)
    meter.sample({"items": 3, "retries": 0}, 101.0)
    meter.sample({"items": 3, "retries": 40}, 103.0)
    meter.sample({"items": 3, "retries": 80}, 104.0)
    clock[0] = 104.5
    assert meter.since_progress() == pytest.approx(3.5)
    assert meter.churn_in(2.0) == 80 and meter.progress_in(2.0) == 0
    assert meter.progress_in(10.0) == 3
    # sub-second windows work
    meter.sample({"items": 4, "retries": 80}, 104.6)
    assert meter.progress_in(0.2, now=104.7) == 1 and meter.since_progress(104.7) == \
        pytest.approx(0.1)


# ---------------------------------------------------------------------- property: knot = simulation


def _simulate(pools: dict[str, tuple[int, list[str]]], waits: dict[str, str]) -> set[str]:
    """Reference: let every owner that can proceed finish and release; who is left waits."""
    free = {name: cap - len(holders) for name, (cap, holders) in pools.items()}
    owners = {o for _, holders in pools.values() for o in holders} | set(waits)
    finished: set[str] = set()
    changed = True
    while changed:
        changed = False
        for owner in sorted(owners - finished):
            wanted = waits.get(owner)
            if wanted is None or free[wanted] > 0:
                for name, (_, holders) in pools.items():
                    free[name] += holders.count(owner)
                finished.add(owner)
                changed = True
    return set(waits) - finished


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_knot_matches_release_simulation(data: st.DataObject) -> None:
    owners = [f"r{i}" for i in range(data.draw(st.integers(2, 6)))]
    pools: dict[str, tuple[int, list[str]]] = {}
    for p in range(data.draw(st.integers(1, 4))):
        cap = data.draw(st.integers(1, 3))
        holders = data.draw(st.lists(st.sampled_from(owners), max_size=cap))
        pools[f"p{p}"] = (cap, holders)
    waits = {o: data.draw(st.sampled_from(sorted(pools))) for o in owners
             if data.draw(st.booleans())}
    snaps = [PoolSnapshot(name, "pg", cap, len(holders),
                          tuple(HolderInfo(h) for h in holders),
                          tuple(WaiterInfo(o) for o, w in waits.items() if w == name))
             for name, (cap, holders) in pools.items()]
    graph = analyse(snaps)
    assert set(graph.deadlocked) == _simulate(pools, waits)
    for cycle in graph.cycles:  # every reported cycle lies inside the knot
        assert set(cycle.owners) <= set(graph.deadlocked)
    if graph.deadlocked:
        assert graph.cycles, "a knot always contains a cycle to show"
