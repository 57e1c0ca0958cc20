"""The watchdog's evidence and classifier without Scrapy: what a suspended task waits on,
what it holds, and which class the evidence makes (pure functions, milliseconds)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, DeferredLock

from scrapy_antideadlock.primitives.waitgraph import WaitGraph
from scrapy_antideadlock.testing import wait_until
from scrapy_antideadlock.watchdog.classify import Evidence, classify
from scrapy_antideadlock.watchdog.diagnosis import Culprit, Diagnosis, StuckUnit
from scrapy_antideadlock.watchdog.threadpools import PoolState
from scrapy_antideadlock.watchdog.waits import inspect_task, is_user_code


class Pool:
    def __init__(self) -> None:
        self.sem = asyncio.Semaphore(1)
        self.lock = DeferredLock()
        self.pending: dict[str, asyncio.Future[int]] = {}

    async def holder(self, release: asyncio.Event) -> None:
        async with self.sem:
            await release.wait()

    async def waiter(self) -> None:
        async with self.sem:
            pass

    async def deferred_lock_waiter(self) -> None:
        await self.lock.acquire().asFuture(asyncio.get_running_loop())

    async def future_waiter(self) -> int:
        self.pending["k"] = asyncio.get_running_loop().create_future()
        return await self.pending["k"]

    async def never_fired(self) -> None:
        await Deferred().asFuture(asyncio.get_running_loop())


started = threading.Event()


def _blocking(stop: threading.Event) -> None:
    started.set()
    stop.wait(5)


async def _inspect_all() -> dict[str, Any]:
    pool = Pool()
    release = asyncio.Event()
    stop = threading.Event()
    await pool.lock.acquire().asFuture(asyncio.get_running_loop())  # held by nobody's task
    tasks = {"holder": asyncio.ensure_future(pool.holder(release)),
             "waiter": asyncio.ensure_future(pool.waiter()),
             "dlock": asyncio.ensure_future(pool.deferred_lock_waiter()),
             "future": asyncio.ensure_future(pool.future_waiter()),
             "deferred": asyncio.ensure_future(pool.never_fired()),
             "thread": asyncio.ensure_future(asyncio.to_thread(_blocking, stop))}
    await wait_until(lambda: "k" in pool.pending and pool.lock.waiting and pool.sem.locked()
                     and getattr(pool.sem, "_waiters", None) and started.is_set(), timeout=10)
    found = {name: inspect_task(task, [pool]) for name, task in tasks.items()}
    stop.set()
    release.set()
    pool.lock.release()
    pool.pending["k"].set_result(1)
    for name in ("deferred", "thread"):
        tasks[name].cancel()
    await wait_until(lambda: all(t.done() for t in tasks.values()), timeout=10)
    return {"pool": pool, **found}


@pytest_twisted.ensureDeferred
async def test_what_each_task_waits_on_and_holds() -> None:
    found = await _inspect_all()
    pool = found["pool"]
    holder, waiter = found["holder"], found["waiter"]
    assert holder.holds == [pool.sem]  # suspended inside ``async with self.sem:``
    assert holder.wait.kind == "primitive" and "asyncio.Event" in holder.wait.what
    assert waiter.wait.kind == "primitive" and waiter.wait.obj is pool.sem
    assert "asyncio.Semaphore" in waiter.wait.what and "1 waiting" in waiter.wait.what
    assert waiter.culprit.function == "waiter" and waiter.culprit.code == "async with self.sem:"
    assert found["dlock"].wait.obj is pool.lock and "DeferredLock" in found["dlock"].wait.what
    assert found["future"].wait.kind == "future" and "pending['k']" in found["future"].wait.what
    assert found["deferred"].wait.kind == "deferred"
    assert found["thread"] is None  # no frame of this module: the call itself is in a thread


def test_user_code_is_what_the_project_wrote() -> None:
    import asyncio as stdlib

    import scrapy

    import scrapy_antideadlock.watchdog.waits as ours
    from scrapy_antideadlock.testing.scenarios import locks

    assert is_user_code(__file__) and is_user_code(locks.__file__)
    assert not is_user_code(stdlib.__file__) and not is_user_code(scrapy.__file__)
    assert not is_user_code(ours.__file__)


def _unit(kind: str, what: str = "x", *, component: str = "P.process_item",
          holds: list[str] | None = None, fn: str = "process_item") -> StuckUnit:
    return StuckUnit(None, "pipeline", component, 5.0, what, holds or [],
                     Culprit(fn, "/p/pipelines.py", 10, "await x"), wait_kind=kind)


def test_all_asleep_and_nothing_on_the_network_is_a_deadlock_blaming_the_holder() -> None:
    sem = "asyncio.Semaphore@0x1 (0 of 2 free, 3 waiting)"
    units = [_unit("primitive", f"__aenter__() on {sem}", component="M.process_request",
                   fn="process_request") for _ in range(3)]
    units.append(_unit("crawl", "the crawl (Scrapy download_async)", holds=[sem]))
    verdict = classify(Evidence(window=3.0, units=units))
    assert verdict.stall_class == "deadlock" and verdict.culprit.function == "process_item"
    assert any(line.startswith("hold and wait: P.process_item") for line in verdict.evidence)
    # one request still on the network: not every unit is asleep
    assert classify(Evidence(window=3.0, units=units, transferring=1)).stall_class == "unknown"


def test_the_other_classes() -> None:
    io = [_unit("io", "I/O: evaluate()")]
    assert classify(Evidence(window=3.0, units=io)).stall_class == "stalled_io"
    full = PoolState("default", 4, 4, 2, [Culprit("geocode", "/p/x.py", 3)])
    verdict = classify(Evidence(window=3.0, units=[_unit("thread")], pools=[full]))
    assert verdict.stall_class == "starved" and verdict.culprit.function == "geocode"
    churn = Evidence(window=3.0, churn=500, requesters=[(Culprit("parse", "/p/s.py", 9), 500,
                                                         500)])
    verdict = classify(churn)
    assert verdict.stall_class == "livelock" and verdict.culprit.function == "parse"
    assert classify(Evidence(window=3.0, units=[_unit("library")])).stall_class == "unknown"
    knot = WaitGraph(deadlocked=["a", "b"])
    assert classify(Evidence(window=3.0, graph=knot)).stall_class == "deadlock"
    # a request in the middleware is not a download that got no answer
    queued = [{"stage": "queued", "age": 9.0, "deadline_in": -1.0, "request": "r"}]
    assert classify(Evidence(window=3.0, inflight=queued)).stall_class == "unknown"


def test_diagnosis_is_its_own_json() -> None:
    import json

    diag = Diagnosis("deadlock", 1, 3.0, 3.2, ["e"], Culprit("f", "/p/a.py", 3, "x"),
                     [_unit("primitive")])
    data = json.loads(json.dumps(diag))
    assert data["class"] == "deadlock" and data["culprit"]["function"] == "f"
    assert data["units"][0]["wait_kind"] == "primitive" and diag.get("cycle") is None


# ---------------------------------------------------------------------- request flow


class _Spider:
    def parse(self, response: Any) -> None: ...

    def parse_item(self, response: Any) -> None: ...


def test_request_flow_counts_callbacks_in_the_window_and_keeps_nothing_of_the_request(
        ) -> None:
    import gc
    import time
    import weakref

    from scrapy import Request

    from scrapy_antideadlock.watchdog.meter import RequestFlow

    flow = RequestFlow(size=8)
    spider = _Spider()
    for i in range(12):  # wraps the ring: only the last 8 are kept
        callback = spider.parse if i % 3 else spider.parse_item
        flow.scheduled(Request(f"http://example.invalid/{i}", callback=callback,
                               dont_filter=i >= 10))
    counts = {c.function: (n, r) for c, n, r in flow.requesters(60.0, time.monotonic())}
    # i = 4..11: parse_item for 6 and 9, parse for the other six (10 and 11 dont_filter)
    assert counts == {"parse": (6, 2), "parse_item": (2, 0)}
    assert flow.requesters(60.0, time.monotonic() + 120) == []  # all outside the window
    # the requests' bound methods (and so the spider) are not kept alive by the flow
    ref = weakref.ref(spider)
    del spider, callback
    gc.collect()
    assert ref() is None
