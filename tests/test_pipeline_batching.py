"""Batching primitives and pipeline configuration (no database needed)."""

from __future__ import annotations

import asyncio
import random

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.pipeline.config import parse_tables, redact_dsn, scrub, spec_for
from scrapy_antideadlock.primitives.batching import (
    Backoff,
    BatchBuffer,
    BufferFull,
    Entry,
    dedupe_last_wins,
    split_halves,
)
from scrapy_antideadlock.settings import SettingError


def test_dedupe_keeps_last_and_sorts():
    entries = [Entry((k,), {"v": i}) for i, k in enumerate(["b", "a", "c", "a", "b", "a"])]
    winners, dropped = dedupe_last_wins(entries)
    assert dropped == 3
    assert [w.key for w in winners] == [("a",), ("b",), ("c",)]
    assert [w.row["v"] for w in winners] == [5, 4, 2]
    # Losers share the winner's fate, in arrival order.
    assert [e.row["v"] for e in winners[0].entries()] == [1, 3, 5]


def test_sort_never_raises_on_mixed_keys():
    entries = [Entry((1, "x")), Entry(("1", "x")), Entry((None, "y")), Entry((0, "z"))]
    winners, _ = dedupe_last_wins(entries)
    assert len(winners) == 4


def test_split_halves_keeps_order():
    entries = [Entry((i,)) for i in range(5)]
    left, right = split_halves(entries)
    assert [e.key for e in left + right] == [(i,) for i in range(5)]


def test_backoff_grows_capped_and_jittered():
    backoff = Backoff(0.1, 1.0, random.Random(1))
    delays = [backoff.delay(n) for n in range(1, 8)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert delays[0] < 0.1 and delays[-1] >= 0.5


async def _collect(batch_size, max_delay, capacity, feed):
    batches: list[list] = []

    async def flush(batch):
        await asyncio.sleep(0.01)
        batches.append([e.key[0] for e in batch])
        for e in batch:
            e.future.set_result(True)

    buffer = BatchBuffer("t", flush, batch_size=batch_size, max_delay=max_delay,
                         capacity=capacity)
    await feed(buffer)
    return buffer, batches


def _entry(i):
    return Entry((i,), None, owner=f"r{i}", future=asyncio.get_running_loop().create_future())


@deferred_f_from_coro_f
async def test_flush_on_size_group_commit_delay_and_drain():
    loop = asyncio.get_running_loop()

    async def feed(buffer):
        entries = [_entry(i) for i in range(25)]
        for e in entries:
            buffer.add(e)
        # The first goes at once (the writer was idle); what queued behind it goes in
        # full batches right after, then the rest: nobody waits for the delay.
        await asyncio.wait_for(asyncio.gather(*(e.future for e in entries)), 0.8)
        # An idle writer flushes a lone entry at once: someone awaits it (commit mode).
        lone = _entry(50)
        started = loop.time()
        buffer.add(lone)
        await asyncio.wait_for(lone.future, 0.5)
        assert loop.time() - started < 0.9  # well before max_delay (1 s)
        late = _entry(99)
        buffer.add(late)
        await buffer.drain()
        assert late.future.done() and loop.time() - started < 5

    buffer, batches = await _collect(10, 1.0, 100, feed)
    assert [len(b) for b in batches] == [1, 10, 10, 4, 1, 1]
    assert [k for b in batches for k in b] == [*range(25), 50, 99]  # one at a time, in order


@deferred_f_from_coro_f
async def test_bounded_capacity_waits_then_fails():
    gate = asyncio.Event()

    async def flush(batch):
        await gate.wait()
        for e in batch:
            e.future.set_result(True)

    buffer = BatchBuffer("t", flush, batch_size=2, max_delay=10, capacity=4)
    for i in range(4):
        buffer.add(_entry(i))
    snap = buffer.snapshot()
    assert snap.in_use == 4 and snap.exhausted
    assert {h.owner for h in snap.holders} == {"r0", "r1", "r2", "r3"}
    waiter = asyncio.ensure_future(buffer.put(_entry(7), timeout=5))
    await asyncio.sleep(0.05)
    assert [w.owner for w in buffer.snapshot().waiters] == ["r7"]
    gate.set()
    await asyncio.wait_for(waiter, 2)  # a flush freed room
    gate.clear()
    for i in range(10, 14):
        buffer.add(_entry(i))
    with pytest.raises(BufferFull):
        await buffer.put(_entry(20), timeout=0.2)
    gate.set()
    await buffer.drain()


@deferred_f_from_coro_f
async def test_flush_error_does_not_wedge_the_buffer():
    errors = []
    calls = []

    async def flush(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")

    buffer = BatchBuffer("t", flush, batch_size=2, max_delay=0.01, capacity=10,
                         on_error=lambda exc, batch: errors.append((exc, len(batch))))
    for i in range(4):
        buffer.add(_entry(i))
    await buffer.drain()
    # the first entry went at once (idle writer) and failed; the rest still went
    assert calls == [1, 2, 1] and errors == [(errors[0][0], 1)]


def test_table_config_validation_names_the_setting():
    specs = parse_tables({"Product": {"table": "shop.products", "key": ["site", "sku"],
                                      "columns": {"title": "name"}, "extra": "data"}})
    spec = specs["Product"]
    assert spec.key_columns == ("site", "sku") and spec.table_parts == ("shop", "products")
    assert spec.column_of("title") == "name"
    for bad in ({"T": {"key": "k"}}, {"T": {"table": "t"}}, {"T": {"table": "t", "key": []}},
                {"T": {"table": "t", "key": "k", "conflict": "merge"}},
                {"T": {"table": "t", "key": "k", "colums": "auto"}}, ["x"]):
        with pytest.raises(SettingError, match="ANTIDEADLOCK_PG_TABLES"):
            parse_tables(bad)


def test_spec_lookup_order():
    class Product(dict):
        pass

    specs = parse_tables({"dict": {"table": "d", "key": "k"}, "*": {"table": "any", "key": "k"},
                          "Product": {"table": "p", "key": "k"}})
    assert spec_for(specs, Product()).table == "p"
    assert spec_for(specs, {}).table == "d"
    assert spec_for(specs, object()).table == "any"
    assert spec_for(parse_tables({"dict": {"table": "d", "key": "k"}}), object()) is None


def test_dsn_password_is_redacted():
    dsn = "host=db user=app password=s3cret dbname=x"
    assert "s3cret" not in redact_dsn(dsn)
    assert "s3cret" not in scrub(f"failed for {dsn}: password s3cret wrong", dsn)
    url = "postgresql://app:s3cret@db:5432/x"
    assert "s3cret" not in redact_dsn(url)
    assert "s3cret" not in scrub(f"cannot reach {url}", url)


def test_pipeline_off_without_dsn_and_bad_values_name_the_setting():
    from scrapy.exceptions import NotConfigured
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock.pipeline import PostgresUpsertPipeline

    with pytest.raises(NotConfigured):
        PostgresUpsertPipeline.from_crawler(get_crawler(settings_dict={}))
    base = {"ANTIDEADLOCK_PG_DSN": "host=127.0.0.1 password=pw",
            "ANTIDEADLOCK_PG_TABLES": {"dict": {"table": "t", "key": "k"}}}
    for name, value in (("ANTIDEADLOCK_PG_DURABILITY", "sometimes"),
                        ("ANTIDEADLOCK_PG_LOCK_TIMEOUT", -1),
                        ("ANTIDEADLOCK_PG_TABLES", {"dict": {"table": "t"}}),
                        ("ANTIDEADLOCK_PG_TABLES", {})):
        with pytest.raises(SettingError, match=name):
            PostgresUpsertPipeline.from_crawler(get_crawler(settings_dict={**base,
                                                                           name: value}))
    pipeline = PostgresUpsertPipeline.from_crawler(get_crawler(settings_dict=base))
    assert pipeline.wait is True and pipeline.engine.options.lock_timeout == 2.0


@deferred_f_from_coro_f
async def test_lazy_buffer_waits_for_the_delay_after_a_flush():
    loop = asyncio.get_running_loop()
    batches: list[int] = []

    async def flush(batch):
        batches.append(len(batch))
        for e in batch:
            e.future.set_result(True)

    buffer = BatchBuffer("t", flush, batch_size=10, max_delay=0.5, capacity=100, eager=False)
    entries = [_entry(i) for i in range(15)]
    started = loop.time()
    for e in entries:
        buffer.add(e)
    await asyncio.wait_for(entries[9].future, 2)
    await asyncio.sleep(0.1)
    assert not entries[-1].future.done()  # nobody waits: gather a bigger batch first
    await asyncio.wait_for(entries[-1].future, 5)
    assert loop.time() - started >= 0.45 and batches == [10, 5]


def test_addon_enables_the_pipeline_only_with_a_dsn():
    from scrapy.settings import Settings

    from scrapy_antideadlock.addon import Addon
    from scrapy_antideadlock.pipeline import PostgresUpsertPipeline

    def pipelines(extra):
        settings = Settings({"ANTIDEADLOCK_WATCHDOG_ENABLED": False, **extra})
        Addon().update_settings(settings)
        return settings.getdict("ITEM_PIPELINES")

    assert PostgresUpsertPipeline not in pipelines({})
    with_dsn = pipelines({"ANTIDEADLOCK_PG_DSN": "host=127.0.0.1"})
    assert with_dsn.get(PostgresUpsertPipeline) == 800
    assert PostgresUpsertPipeline not in pipelines({"ANTIDEADLOCK_PG_DSN": "host=127.0.0.1",
                                                    "ANTIDEADLOCK_PG_ENABLED": False})


@deferred_f_from_coro_f
async def test_batches_due_one_after_another_are_flushed_by_one_task():
    """Each task the buffer starts costs its waiting entries a turn of the event loop."""
    tasks: list[asyncio.Task | None] = []
    release = asyncio.Event()

    async def flush(batch):
        tasks.append(asyncio.current_task())
        await release.wait()
        for e in batch:
            e.future.set_result(True)

    buffer = BatchBuffer("t", flush, batch_size=2, max_delay=10, capacity=100)
    entries = [_entry(i) for i in range(5)]
    for e in entries:  # the first goes at once, the rest queue behind it
        buffer.add(e)
    release.set()
    await asyncio.wait_for(asyncio.gather(*(e.future for e in entries)), 2)
    assert len(tasks) == 3 and len(set(tasks)) == 1  # 1 + 2 + 2 entries, one task
    await asyncio.wait_for(buffer.drain(), 2)
    assert buffer.task is None
    later = _entry(9)
    buffer.add(later)  # an idle writer starts a new task
    await asyncio.wait_for(later.future, 2)
    assert len(tasks) == 4 and tasks[-1] is not tasks[0]


@deferred_f_from_coro_f
async def test_bounded_runs_in_the_callers_task_and_times_out():
    from scrapy_antideadlock.pipeline.support import bounded

    async def which_task():
        await asyncio.sleep(0)
        return asyncio.current_task()

    here = asyncio.current_task()
    ran_in = await bounded(which_task(), 1.0)
    assert ran_in is here or not hasattr(asyncio, "timeout")  # 3.10 falls back to wait_for
    started = asyncio.get_running_loop().time()
    with pytest.raises((asyncio.TimeoutError, TimeoutError)):  # the same class on 3.11+
        await bounded(asyncio.sleep(10), 0.1)
    assert asyncio.get_running_loop().time() - started < 2
    if hasattr(here, "cancelling"):  # Python 3.11+: the timeout's cancel was taken back
        assert here.cancelling() == 0
