"""PostgreSQL pipeline benchmark: ``python -m bench.pipeline [--items N] [--dsn DSN]``.

Four writer processes upsert items with overlapping keys in random order, all in the
same run, with four methods:

(a) naive per-item autocommit upsert (the Scrapy-tutorial pipeline),
(b) naive unsorted 100-row batches in one transaction each (deadlocks are counted and
    the batch is lost, as a hand-written pipeline would),
(c) this pipeline's engine (the code behind PostgresUpsertPipeline.process_item, called
    per item through itemadapter, commit mode, ``--in-flight`` items in flight per writer:
    16 by default, what a crawl of 16 concurrent requests has),
(d) plain COPY into an empty table (the ceiling),
(e) like (c) in buffered mode (process_item returns once buffered; see README),
(f) the engine's write path alone, fed 5 000-row batches (the database side of (c)).

Throughput is items handled per second of wall time (first writer start to last
writer end). Writers import their modules before the clock starts, and (c) holds only
the items in flight (as a crawl does), so neither import time nor the bench's own
bookkeeping is counted against a method. "writer CPU" is the writer processes' CPU
time per item (client side only): steadier than rows/s on a shared machine. Every method
runs the same item count. What a crawl feels is measured by ``bench.pipeline_crawl``.
Sessions use ``deadlock_timeout=100ms`` (docs/pipeline.md) so (b) finishes in time;
with the server default of 1 s, (b) is about 10x slower still.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import tempfile
import time
from typing import Any

WRITERS = 4
FAST_DEADLOCK = " options='-c deadlock_timeout=100'"


def _keys(seed: int, count: int, space: int) -> list[str]:
    rng = random.Random(seed)
    return [f"k{rng.randrange(space):07d}" for _ in range(count)]


def _item(key: str, i: int, seed: int) -> dict[str, Any]:
    return {"key": key, "name": f"name-{seed}-{i}", "price": f"{(i % 5000) / 10:.2f}",
            "url": f"http://127.0.0.1/item/{key}"}


# --------------------------------------------------------------------------- writers


def _naive_per_item(dsn: str, table: str, seed: int, count: int, space: int) -> dict:
    import psycopg
    from psycopg import sql

    stmt = sql.SQL("INSERT INTO {} (key, name, price, url) VALUES (%s, %s, %s, %s) "
                   "ON CONFLICT (key) DO UPDATE SET name = EXCLUDED.name, "
                   "price = EXCLUDED.price, url = EXCLUDED.url").format(sql.Identifier(table))
    with psycopg.connect(dsn + FAST_DEADLOCK, autocommit=True) as conn:
        for i, key in enumerate(_keys(seed, count, space)):
            item = _item(key, i, seed)
            conn.execute(stmt, [item["key"], item["name"], item["price"], item["url"]])
    return {"rows": count, "deadlocks": 0}


def _naive_batches(dsn: str, table: str, seed: int, count: int, space: int) -> dict:
    import psycopg
    from psycopg import sql

    stmt = sql.SQL("INSERT INTO {} (key, name, price, url) VALUES (%s, %s, %s, %s) "
                   "ON CONFLICT (key) DO UPDATE SET name = EXCLUDED.name, "
                   "price = EXCLUDED.price, url = EXCLUDED.url").format(sql.Identifier(table))
    keys = _keys(seed, count, space)
    deadlocks = rows = 0
    with psycopg.connect(dsn + FAST_DEADLOCK) as conn:
        for start in range(0, count, 100):
            batch = {}
            for i, key in enumerate(keys[start:start + 100], start):
                batch[key] = _item(key, i, seed)  # dedupe (else 21000), but keep input order
            params = [[it["key"], it["name"], it["price"], it["url"]] for it in batch.values()]
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(stmt, params)
                rows += len(keys[start:start + 100])  # handled (duplicates included)
            except psycopg.errors.DeadlockDetected:
                deadlocks += 1  # the batch is lost, as in a hand-written pipeline
    return {"rows": rows, "deadlocks": deadlocks}


def _pipeline_buffered(dsn: str, table: str, seed: int, count: int, space: int) -> dict:
    return _pipeline(dsn, table, seed, count, space, wait=False)


IN_FLIGHT = [16]  # items in flight per writer in (c); set from --in-flight


def _pipeline(dsn: str, table: str, seed: int, count: int, space: int,
              wait: bool = True) -> dict:
    from itemadapter import ItemAdapter

    from scrapy_antideadlock.pipeline import EngineOptions, Stats, UpsertEngine, parse_tables
    from scrapy_antideadlock.pipeline.config import SpecResolver, item_type_name
    from scrapy_antideadlock.primitives.deadletter import DeadLetterStore

    async def run() -> dict:
        specs = parse_tables({"dict": {"table": table, "key": "key"}})
        spec_of = SpecResolver(specs)
        stats = Stats()
        deadletter = DeadLetterStore(os.path.join(tempfile.gettempdir(),
                                                  f"bench-pipeline-{os.getpid()}.jsonl"))
        engine = UpsertEngine(dsn + FAST_DEADLOCK, specs, EngineOptions(eager_flush=wait),
                              deadletter=deadletter, stats=stats)
        await engine.open()

        async def process_item(item: dict) -> None:  # what the Scrapy pipeline does per item
            fields = item if type(item) is dict else dict(ItemAdapter(item).items())
            if wait:
                outcome = await engine.enqueue(spec_of(item), fields, owner="bench",
                                               item_type=item_type_name(item))
            else:
                outcome = await engine.submit(spec_of(item), fields, owner="bench",
                                              item_type=item_type_name(item), wait=False)
            assert outcome.stored, outcome

        # Items in flight, like Scrapy's concurrency limits. Only those are held, as in a
        # crawl: keeping every finished task for one final gather() cost ~13 us/item here
        # (gather callbacks, and GC passes over an ever-growing heap), which is the
        # bench's overhead, not the pipeline's.
        slots = asyncio.Semaphore(IN_FLIGHT[0])
        in_flight: set[asyncio.Future] = set()

        def done(task: asyncio.Future) -> None:
            in_flight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())

        failures: list[BaseException] = []
        for i, key in enumerate(_keys(seed, count, space)):
            if not wait:  # buffered mode: returns at once (backpressure only when full)
                await process_item(_item(key, i, seed))
                continue
            await slots.acquire()
            task = asyncio.ensure_future(process_item(_item(key, i, seed)))
            task.add_done_callback(done)
            in_flight.add(task)
        while in_flight:
            await asyncio.wait(set(in_flight))
        if failures:
            raise failures[0]
        await engine.close()
        return {"rows": count, "deadlocks": stats.get_value("antideadlock/pg/deadlocks", 0),
                "upserted": stats.get_value("antideadlock/pg/rows_upserted", 0),
                "batches": stats.get_value("antideadlock/pg/batches", 0),
                "dedup": stats.get_value("antideadlock/pg/dedup_drops", 0),
                "dead_lettered": stats.get_value("antideadlock/pg/dead_lettered", 0)}

    return asyncio.run(run())


def _write_path(dsn: str, table: str, seed: int, count: int, space: int) -> dict:
    """(f): the engine's write path alone (dedupe, COPY -> temp, ordered merge, retries),
    fed 5 000-row batches directly: what the database side of (c) can do."""
    from scrapy_antideadlock.pipeline import EngineOptions, Stats, UpsertEngine, parse_tables
    from scrapy_antideadlock.primitives.batching import Entry, dedupe_last_wins
    from scrapy_antideadlock.primitives.deadletter import DeadLetterStore

    async def run() -> dict:
        specs = parse_tables({"dict": {"table": table, "key": "key"}})
        stats = Stats()
        engine = UpsertEngine(dsn + FAST_DEADLOCK, specs, EngineOptions(),
                              deadletter=DeadLetterStore(os.devnull), stats=stats)
        await engine.open()
        target = engine.tables[table]
        keys = _keys(seed, count, space)
        for start in range(0, count, 5000):
            entries = [Entry(*target.row_of(_item(key, i, seed)))
                       for i, key in enumerate(keys[start:start + 5000], start)]
            winners, _ = dedupe_last_wins(entries)
            await engine._write(target, winners, time.monotonic() + 60)
        await engine.close()
        return {"rows": count, "deadlocks": stats.get_value("antideadlock/pg/deadlocks", 0)}

    return asyncio.run(run())


def _plain_copy(dsn: str, table: str, seed: int, count: int, space: int) -> dict:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (key, name, price, url) FROM STDIN").format(
                sql.Identifier(table))) as copy:
            for i in range(count):
                item = _item(f"w{seed}-{i:07d}", i, seed)  # disjoint keys: empty-table ceiling
                copy.write_row([item["key"], item["name"], item["price"], item["url"]])
        conn.commit()
    return {"rows": count, "deadlocks": 0}


METHODS = {"a": ("naive per-item autocommit", _naive_per_item),
           "b": ("naive unsorted 100-row batches", _naive_batches),
           "c": ("PostgresUpsertPipeline (engine), commit mode", _pipeline),
           "e": ("PostgresUpsertPipeline (engine), buffered mode", _pipeline_buffered),
           "d": ("plain COPY, empty table (ceiling)", _plain_copy),
           "f": ("engine write path only, 5000-row batches", _write_path)}


def _warm_up() -> None:
    """Import what the writers use before the clock starts: the same for every method,
    so no method's rate includes ~0.3 s of imports per process (x4 on 2 cores)."""
    import itemadapter  # noqa: F401
    import psycopg  # noqa: F401

    import scrapy_antideadlock.pipeline  # noqa: F401
    import scrapy_antideadlock.pipeline.config  # noqa: F401
    import scrapy_antideadlock.primitives.deadletter  # noqa: F401


def _child(fn_name: str, args: tuple, barrier: Any, out: Any, in_flight: int = 16) -> None:
    IN_FLIGHT[0] = in_flight
    fn = METHODS[fn_name][1]
    _warm_up()
    barrier.wait()
    start, cpu = time.monotonic(), time.process_time()
    result = fn(*args)
    out.put({**result, "start": start, "end": time.monotonic(),
             "cpu": time.process_time() - cpu})


def run_method(name: str, dsn: str, per_writer: int, space: int, in_flight: int = 16) -> dict:
    import psycopg
    from psycopg import sql

    table = f"bench_pipeline_{name}_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        conn.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, name text, price text, "
                             "url text)").format(sql.Identifier(table)))
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(name, (dsn, table, w, per_writer, space),
                                               barrier, out, in_flight))
             for w in range(WRITERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    items = per_writer * WRITERS
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table))).fetchone()[0]
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
    return {"items": items, "wall": wall, "rate": items / wall, "stored": stored,
            "deadlocks": sum(r["deadlocks"] for r in results),
            "lost_rows": items - sum(r["rows"] for r in results),
            "cpu_us": sum(r["cpu"] for r in results) / items * 1e6,
            "extra": [{k: v for k, v in r.items() if k not in ("start", "end", "cpu")}
                      for r in results]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000, help="items, every method")
    parser.add_argument("--in-flight", type=int, default=16,
                        help="items in flight per writer in (c) (a 16-request crawl: ~16)")
    parser.add_argument("--keys", type=int, default=20_000, help="key space (overlap)")
    parser.add_argument("--dsn", default=None, help="default: the test bed's postgres_dsn()")
    parser.add_argument("--only", default="abcdef")
    args = parser.parse_args(argv)
    if args.dsn is None:
        from scrapy_antideadlock.testing.postgres import postgres_dsn

        args.dsn = postgres_dsn()
    from bench.common import load_line

    print(f"# bench.pipeline: {WRITERS} writer processes, key space {args.keys}, "
          f"{load_line()}")
    results = {}
    for name in args.only:
        per_writer = args.items // WRITERS
        label = METHODS[name][0]
        print(f"({name}) {label}: {per_writer * WRITERS} items ...", flush=True)
        res = results[name] = run_method(name, args.dsn, per_writer, args.keys, args.in_flight)
        print(f"    {res['rate']:>10,.0f} rows/s  wall {res['wall']:6.2f}s  "
              f"deadlocks {res['deadlocks']}  rows lost {res['lost_rows']}  "
              f"distinct keys stored {res['stored']}  "
              f"writer CPU {res['cpu_us']:.1f} us/item", flush=True)
        if name in "ce":
            extra = res["extra"]
            print(f"    upserted {sum(e['upserted'] for e in extra)} in "
                  f"{sum(e['batches'] for e in extra)} batches, deduped in batch "
                  f"{sum(e['dedup'] for e in extra)}, dead-lettered "
                  f"{sum(e['dead_lettered'] for e in extra)}")
    if "c" in results:
        c = results["c"]["rate"]
        if "a" in results:
            print(f"(c)/(a) = {c / results['a']['rate']:.1f}x   (target >= 20x)")
        if "b" in results:
            print(f"(c)/(b) = {c / results['b']['rate']:.1f}x   "
                  f"((b) lost {results['b']['deadlocks']} batches to deadlocks)")
        if "d" in results:
            print(f"(c)/(d) = {c / results['d']['rate']:.2f}   (target >= 0.4)")
        print(f"deadlocks in (c): {results['c']['deadlocks']}   (target 0)")
        n = args.items
        if "a" in results:
            print(f"RESULT pipeline.vs_naive {c / results['a']['rate']:.2f} x # pack engine "
                  f"(commit mode, {args.in_flight} in flight) / naive per-item autocommit, "
                  f"4 writers x {n // WRITERS} items each, same count")
        if "b" in results:
            print(f"RESULT pipeline.vs_naive_batches {c / results['b']['rate']:.2f} x # pack "
                  f"engine / naive unsorted 100-row batches ({results['b']['deadlocks']} "
                  "deadlocks there), same count")
            print(f"RESULT pipeline.naive_batches_deadlocks {results['b']['deadlocks']} count "
                  "# naive unsorted batches, 4 writers, overlapping keys")
        if "d" in results:
            print(f"RESULT pipeline.vs_copy {c / results['d']['rate']:.3f} ratio # pack engine "
                  "/ plain COPY into an empty table (ceiling), same count")
        print(f"RESULT pipeline.deadlocks {results['c']['deadlocks']} count # pack engine, "
              "4 writers, overlapping keys in random order")
    if "e" in results and "d" in results:
        print(f"(e)/(d) = {results['e']['rate'] / results['d']['rate']:.2f}   "
              f"(buffered mode: no per-item wait)")
    if "f" in results and "d" in results:
        print(f"(f)/(d) = {results['f']['rate'] / results['d']['rate']:.2f}   "
              f"(database side of (c) alone; deadlocks {results['f']['deadlocks']})")


if __name__ == "__main__":
    main()
