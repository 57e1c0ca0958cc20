"""Four writer processes upserting overlapping keys in random order, under CPU contention.

The naive writer (unsorted multi-row transactions) must be seen to deadlock in the same
run; the pipeline's engine (dedupe + key-ordered COPY merge) must see none and store
every key with a value its writers wrote last.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import time

import psycopg
import pytest
from psycopg import sql

from scrapy_antideadlock import stats as ad_stats

pytestmark = pytest.mark.postgres

KEYS = 300
WRITERS = 4
FAST_DEADLOCK = " options='-c deadlock_timeout=20'"  # superuser: detect deadlocks in 20 ms


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        sum(i * i for i in range(10_000))


def _naive_writer(dsn: str, table: str, seed: int, transactions: int, out) -> None:
    rng = random.Random(seed)
    deadlocks = committed = 0
    stmt = sql.SQL("INSERT INTO {} (key, val) VALUES (%s, %s) ON CONFLICT (key) "
                   "DO UPDATE SET val = EXCLUDED.val").format(sql.Identifier(table))
    with psycopg.connect(dsn + FAST_DEADLOCK) as conn:
        for t in range(transactions):
            keys = rng.sample(range(KEYS), 100)  # unsorted, overlapping with other writers
            try:
                with conn.transaction(), conn.cursor() as cur:
                    for k in keys:  # one row at a time: the usual hand-written batch
                        cur.execute(stmt, [f"k{k:04d}", f"naive-{seed}-{t}"])
                committed += 1
            except psycopg.errors.DeadlockDetected:
                deadlocks += 1
    out.put(("naive", seed, deadlocks, committed))


def _engine_writer(dsn: str, table: str, seed: int, items: int, deadletter: str, out) -> None:
    from scrapy_antideadlock.pipeline import EngineOptions, Stats, UpsertEngine, parse_tables
    from scrapy_antideadlock.pipeline.config import spec_for
    from scrapy_antideadlock.primitives.deadletter import DeadLetterStore

    async def run() -> tuple[dict, dict]:
        specs = parse_tables({"dict": {"table": table, "key": "key"}})
        stats = Stats()
        engine = UpsertEngine(dsn + FAST_DEADLOCK, specs,
                              EngineOptions(batch_size=100, max_delay=0.005, pool_size=2),
                              deadletter=DeadLetterStore(deadletter), stats=stats)
        await engine.open()
        rng = random.Random(seed)
        last: dict[str, str] = {}
        pending = []
        for i in range(items):
            key = f"k{rng.randrange(KEYS):04d}"
            item = {"key": key, "val": f"engine-{seed}-{i}"}
            last[key] = item["val"]
            pending.append(asyncio.ensure_future(
                engine.submit(spec_for(specs, item), item, owner=f"w{seed}", item_type="dict")))
            if len(pending) >= 150:  # like Scrapy: a bounded number of items in flight
                await asyncio.gather(*pending)
                pending = []
        outcomes = await asyncio.gather(*pending)
        await engine.close()
        assert all(o.stored for o in outcomes)
        return stats.values, last

    values, last = asyncio.run(run())
    out.put(("engine", seed, values, last))


def _run_writers(target, args_for, ctx) -> list:
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(w), out)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=80) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return results


def _table(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, val text)").format(
            sql.Identifier(name)))
    return name


def test_four_writers_naive_deadlocks_pipeline_never(pg_dsn, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    burners = [ctx.Process(target=_burn, args=(time.monotonic() + 40,), daemon=True)
               for _ in range(max(2, os.cpu_count() or 2))]
    for b in burners:
        b.start()
    try:
        naive_table = _table(pg_dsn, f"dl_naive_{os.getpid()}")
        naive = _run_writers(_naive_writer,
                             lambda w: (pg_dsn, naive_table, w, 25), ctx)
        engine_table = _table(pg_dsn, f"dl_engine_{os.getpid()}")
        deadletter = str(tmp_path / "dl.jsonl")
        engine = _run_writers(_engine_writer,
                              lambda w: (pg_dsn, engine_table, w, 3000, deadletter), ctx)
    finally:
        for b in burners:
            b.terminate()
            b.join(5)

    naive_deadlocks = sum(r[2] for r in naive)
    assert naive_deadlocks > 0, f"the naive writer never deadlocked: {naive}"

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        final = dict(conn.execute(sql.SQL("SELECT key, val FROM {}").format(
            sql.Identifier(engine_table))).fetchall())
    written: set[str] = set()
    for _, _seed, values, last in engine:
        assert values.get(ad_stats.PG_DEADLOCKS, 0) == 0
        assert values.get(ad_stats.PG_DEAD_LETTERED, 0) == 0
        # Counts exact: every submitted item was either upserted or superseded in its batch.
        assert values[ad_stats.PG_ROWS_UPSERTED] + values.get(ad_stats.PG_DEDUP_DROPS, 0) \
            == 3000
        written |= set(last)
    assert set(final) == written
    for key, val in final.items():  # each key holds the last value one of its writers wrote
        assert val in {last.get(key) for *_, last in engine}, key
    assert not os.path.exists(deadletter)
