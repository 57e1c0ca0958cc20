"""PostgresUpsertPipeline against a real PostgreSQL: storing, bad input, lock and pool waits,
server restart, close while the server is down, SIGKILL durability."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
import scrapy
from psycopg import sql
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock import stats as ad_stats
from scrapy_antideadlock.context import context_for
from scrapy_antideadlock.pipeline import EngineOptions, Stats, UpsertEngine, parse_tables
from scrapy_antideadlock.pipeline.config import spec_for
from scrapy_antideadlock.primitives.deadletter import DeadLetterStore, read_dead_letters
from scrapy_antideadlock.testing import (
    Latency,
    SiteSpider,
    run_crawl,
    run_crawl_subprocess,
)
from scrapy_antideadlock.testing.harness import sleep, wait_until

pytestmark = pytest.mark.postgres

PIPELINE = "scrapy_antideadlock.pipeline.PostgresUpsertPipeline"
_tables = iter(range(10**6))


def new_table(dsn: str, extra_columns: str = "") -> str:
    name = f"pl_items_{next(_tables)}_{int(time.time() * 1000) % 10**8}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, name text, price text, "
                             "url text{})").format(sql.Identifier(name), sql.SQL(extra_columns)))
    return name


def rows(dsn: str, table: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
        names = [d.name for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def pg_settings(dsn: str, table: str, tmp_path, **extra: Any) -> dict[str, Any]:
    settings = {
        "ITEM_PIPELINES": {PIPELINE: 800},
        "ANTIDEADLOCK_PG_DSN": dsn,
        "ANTIDEADLOCK_PG_TABLES": {"dict": {"table": table, "key": "key"}},
        "ANTIDEADLOCK_PG_DEADLETTER_PATH": str(tmp_path / "deadletter.jsonl"),
        "ANTIDEADLOCK_PG_MAX_DELAY": 0.05,
    }
    settings.update({f"ANTIDEADLOCK_PG_{k.upper()}": v for k, v in extra.items()})
    return settings


def keys_of(items) -> set[str]:
    return {dict(i)["key"] for i in items if dict(i).get("key") is not None}


# --------------------------------------------------------------------------- happy path


@pytest_twisted.ensureDeferred
async def test_crawl_with_addon_stores_every_item_once(fault_site, pg_dsn, tmp_path, caplog):
    table = new_table(pg_dsn)
    dsn = pg_dsn + " password=hunter2-secret"  # trust auth ignores it; it must never show
    settings = pg_settings(dsn, table, tmp_path)
    del settings["ITEM_PIPELINES"]
    settings["ADDONS"] = {"scrapy_antideadlock.Addon": 0}
    caplog.set_level(logging.DEBUG)
    result = await run_crawl(SiteSpider, settings, timeout=60, start_url=fault_site.start_url)
    stored = rows(pg_dsn, table)
    expected = set(fault_site.expected_keys())
    assert keys_of(result.items) == expected == set(stored)
    assert not result.dropped and not result.errors
    some = result.items[0]
    assert stored[some["key"]]["name"] == some["name"]
    assert result.stats[ad_stats.PG_ROWS_UPSERTED] == len(expected)
    assert 0 < result.stats[ad_stats.PG_BATCHES] < len(expected)  # group commit
    assert result.stats[ad_stats.PG_FLUSH_LATENCY_P99] > 0
    assert "hunter2" not in caplog.text
    assert "hunter2" not in repr(result.stats)
    assert not (tmp_path / "deadletter.jsonl").exists()


# --------------------------------------------------------------------------- bad input


@dataclasses.dataclass
class Product:
    sku: str
    title: str
    tags: list


class ShopItem(scrapy.Item):
    key = scrapy.Field()
    name = scrapy.Field()


@dataclasses.dataclass
class Unconfigured:
    key: str


class MalformedSpider(scrapy.Spider):
    name = "malformed"

    def __init__(self, start_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_url = start_url

    async def start(self):
        yield scrapy.Request(self.start_url, callback=self.parse)

    def parse(self, response):
        yield {"key": "good1", "name": "a"}
        yield {"key": "dup", "name": "first"}
        yield {"key": "dup", "name": "second"}  # same batch: last one wins
        yield {"name": "no key at all"}
        yield {"key": None, "name": "null key"}
        yield {"key": "obj", "name": object()}  # no column type for it
        yield Unconfigured(key="x")
        yield {"key": "badqty", "qty": "many"}  # rejected by the server: poison row
        yield {"key": "good2", "qty": 3}
        yield Product(sku="p1", title="Lamp", tags=["a", "b"])
        yield ShopItem(key="shop1", name="from a scrapy.Item")


@pytest_twisted.ensureDeferred
async def test_malformed_items_and_duplicate_keys(fault_site, pg_dsn, tmp_path):
    table = new_table(pg_dsn, ", qty int")
    products = f"{table}_products"
    settings = pg_settings(pg_dsn, table, tmp_path, create_tables=True)
    settings["ANTIDEADLOCK_PG_TABLES"]["Product"] = {
        "table": products, "key": "sku", "columns": {"title": "name"}, "extra": "data"}
    settings["ANTIDEADLOCK_PG_TABLES"]["ShopItem"] = {"table": table, "key": "key"}
    settings["ANTIDEADLOCK_PG_MAX_DELAY"] = 0.5  # all good rows land in one batch
    result = await run_crawl(MalformedSpider, settings, timeout=60,
                             start_url=fault_site.start_url)
    stored = rows(pg_dsn, table)
    assert set(stored) == {"good1", "dup", "good2", "shop1"}
    assert stored["dup"]["name"] == "second" and stored["good2"]["qty"] == 3
    product = rows(pg_dsn, products)["p1"]
    assert product["name"] == "Lamp" and product["data"] == {"tags": ["a", "b"]}

    parked = read_dead_letters(tmp_path / "deadletter.jsonl")
    reasons = sorted(r["reason"] for r in parked)
    assert reasons == ["db_error", "missing_key", "missing_key", "unknown_type",
                       "unserialisable"]
    poison = next(r for r in parked if r["reason"] == "db_error")
    assert poison["key"] == ["badqty"] and poison["sqlstate"] == "22P02"
    assert poison["item"] == {"key": "badqty", "qty": "many"}
    assert next(r for r in parked if r["reason"] == "unknown_type")["item_type"] == "Unconfigured"
    assert all(r["table"] for r in parked if r["reason"] != "unknown_type")

    stats = result.stats
    assert stats[ad_stats.PG_BAD_ITEMS] == 4
    assert stats[ad_stats.PG_DEDUP_DROPS] == 1
    assert stats[ad_stats.PG_BATCH_SPLITS] >= 1
    assert stats[ad_stats.PG_DEAD_LETTERED] == 5
    assert stats["antideadlock/pg/dead_lettered/missing_key"] == 2
    assert len(result.dropped) == 5  # never silently: each is a DropItem with the reason
    assert len(result.items) == 6  # good1, dup x2, good2, p1, shop1


@pytest_twisted.ensureDeferred
async def test_bad_dsn_and_missing_table_fail_at_open_naming_the_setting(fault_site, pg_dsn,
                                                                       tmp_path):
    bad = "host=127.0.0.1 port=1 user=postgres password=topsecret dbname=x connect_timeout=2"
    with pytest.raises(Exception, match="ANTIDEADLOCK_PG_DSN") as info:
        await run_crawl(SiteSpider, pg_settings(bad, "t", tmp_path), timeout=30,
                        start_url=fault_site.start_url)
    assert "topsecret" not in str(info.value)
    with pytest.raises(Exception, match="ANTIDEADLOCK_PG_TABLES.*does not exist.*CREATE_TABLES"):
        await run_crawl(SiteSpider, pg_settings(pg_dsn, "no_such_table_here", tmp_path),
                        timeout=30, start_url=fault_site.start_url)
    table = new_table(pg_dsn)
    mixed = pg_settings(pg_dsn, table, tmp_path)
    mixed["ANTIDEADLOCK_PG_TABLES"]["ShopItem"] = {"table": table, "key": "key",
                                                   "conflict": "nothing"}
    with pytest.raises(Exception, match="ANTIDEADLOCK_PG_TABLES.*share table"):
        await run_crawl(SiteSpider, mixed, timeout=30, start_url=fault_site.start_url)
    assert fault_site.total_requests == 0  # nothing crawled before the errors


# --------------------------------------------------------------------------- bounded waits


def _hold_row_lock(dsn: str, table: str, key: str, hold: float, locked: threading.Event,
                   release: threading.Event) -> None:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        conn.execute(sql.SQL("SELECT 1 FROM {} WHERE key = %s FOR UPDATE").format(
            sql.Identifier(table)), [key])
        locked.set()
        release.wait(hold)
        conn.rollback()


@pytest_twisted.ensureDeferred
async def test_row_locked_elsewhere_retries_then_stores(make_fault_site, pg_dsn, tmp_path):
    site = make_fault_site(pages=4, items_per_page=10, latency=Latency.fixed(0.1))
    table = new_table(pg_dsn)
    first = site.keys_of_page(0)[0]  # written early, so later callbacks see the stall
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (key, name) VALUES (%s, 'stale')").format(
            sql.Identifier(table)), [first])
    hold = 8.0  # at most; released once the pipeline has hit lock_timeout twice
    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_row_lock,
                              args=(pg_dsn, table, first, hold, locked, release))
    holder.start()
    assert locked.wait(10)
    settings = pg_settings(pg_dsn, table, tmp_path, lock_timeout=0.3, max_attempts=60,
                           retry_budget=30, batch_size=1000)
    settings["SPIDER_MIDDLEWARES"] = {"scrapy_antideadlock.origin.ItemOriginMiddleware": 50}
    seen: list = []

    class Watching(SiteSpider):
        def parse_item(self, response, **kwargs):
            registry = context_for(self.crawler).registry
            snap = {s.kind: s for s in registry.snapshot()}
            seen.append(snap)
            if self.crawler.stats.get_value(ad_stats.PG_LOCK_TIMEOUTS, 0) >= 2 and \
                    snap["pg"].in_use == 1:
                release.set()  # the stall was seen from outside: let the batch through
            yield from super().parse_item(response, **kwargs)

    started = time.monotonic()
    try:
        result = await run_crawl(Watching, settings, timeout=60, start_url=site.start_url)
    finally:
        release.set()
        holder.join(10)
    elapsed = time.monotonic() - started
    stored = rows(pg_dsn, table)
    assert set(stored) == set(site.expected_keys()) == keys_of(result.items)
    assert stored[first]["name"] != "stale"  # written once the lock was gone
    assert result.stats[ad_stats.PG_LOCK_TIMEOUTS] >= 2
    assert result.stats["antideadlock/pg/retries/55P03"] >= 2
    assert elapsed < hold + 20  # bounded by the lock, not by the crawl
    # While blocked the registry showed the stall: the flush holding a connection, and
    # the buffered items with the ids of the requests that produced them.
    stalled = [s for s in seen if s["pg"].in_use == 1 and s["buffer"].in_use > 0]
    assert stalled, "registry never showed the flush holding the connection"
    owners = {h.owner for s in stalled for h in s["buffer"].holders}
    assert owners and all(o.startswith("r") and not o.startswith("item:") for o in owners)
    assert ad_stats.PG_DEAD_LETTERED not in result.stats
    assert not (tmp_path / "deadletter.jsonl").exists()


@deferred_f_from_coro_f
async def test_pool_exhausted_by_outside_holder_waits_bounded_then_retries(pg_dsn, tmp_path):
    table = new_table(pg_dsn)
    specs = parse_tables({"dict": {"table": table, "key": "key"}})
    stats = Stats()
    engine = UpsertEngine(pg_dsn, specs, EngineOptions(pool_size=1, acquire_timeout=0.3,
                                                       max_delay=0.01, max_attempts=50),
                          deadletter=DeadLetterStore(tmp_path / "dl.jsonl"), stats=stats)
    await engine.open()
    import asyncio

    try:
        held = await engine.pool.getconn(timeout=10)  # the outside holder takes the only one
        cur = await held.execute("SHOW idle_in_transaction_session_timeout")
        assert (await cur.fetchone())[0] == "1min"  # set on every pooled connection
        start = time.monotonic()
        item = {"key": "k1", "name": "v"}
        task = asyncio.ensure_future(engine.submit(spec_for(specs, item), item, owner="r-1",
                                                   item_type="dict"))
        await asyncio.sleep(0.1)
        snap = engine.pool_view.snapshot()
        assert [w.owner for w in snap.waiters] == ["r-1"]  # visible as a waiter
        await asyncio.sleep(1.5)
        assert not task.done()
        await engine.pool.putconn(held)
        outcome = await asyncio.wait_for(task, 10)
        elapsed = time.monotonic() - start
    finally:
        await engine.close()
    assert outcome.stored
    assert 1.5 <= elapsed < 8  # backoff is capped at 2 s, so it resumes soon after
    assert stats.values["antideadlock/pg/retries/pool_timeout"] >= 3
    assert 0.25 <= stats.values[ad_stats.PG_POOL_WAIT_MAX] < 1.0  # each wait bounded
    assert set(rows(pg_dsn, table)) == {"k1"}


# --------------------------------------------------------------------------- server faults


@pytest_twisted.ensureDeferred
async def test_postgres_restarted_mid_crawl_loses_nothing(make_fault_site, pg_server, tmp_path):
    dsn = pg_server.dsn
    site = make_fault_site(pages=10, items_per_page=10, latency=Latency.fixed(0.05))
    table = new_table(dsn)
    settings = pg_settings(dsn, table, tmp_path, acquire_timeout=1.0, retry_budget=30,
                           max_attempts=40)
    settings["CONCURRENT_REQUESTS"] = 4
    restarted = threading.Event()
    threads: list[threading.Thread] = []

    def restart() -> None:
        pg_server.restart(mode="immediate", down_for=2.0)  # a crash, then recovery
        restarted.set()

    class Restarting(SiteSpider):
        def parse_item(self, response, **kwargs):
            if not threads and self.crawler.stats.get_value(ad_stats.PG_ROWS_UPSERTED, 0) >= 20:
                threads.append(threading.Thread(target=restart))
                threads[0].start()
            yield from super().parse_item(response, **kwargs)

    try:
        result = await run_crawl(Restarting, settings, timeout=80, start_url=site.start_url)
    finally:
        for thread in threads:
            thread.join(30)
    assert restarted.is_set()
    stored = set(rows(dsn, table))
    parked = {r["key"][0] for r in read_dead_letters(tmp_path / "deadletter.jsonl")}
    yielded = keys_of(result.items) | keys_of(result.dropped)
    assert yielded == set(site.expected_keys())
    assert yielded <= stored | parked  # every item accounted for
    assert keys_of(result.items) <= stored  # scraped means stored
    assert result.stats.get(ad_stats.PG_RETRIES, 0) >= 1  # the restart was really hit


class StopServerSpider(scrapy.Spider):
    """Yields ``count`` items from one page, then stops the database server."""

    name = "stopserver"

    def __init__(self, start_url: str, server: Any, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_url, self.server, self.count = start_url, server, count

    async def start(self):
        yield scrapy.Request(self.start_url, callback=self.parse)

    def parse(self, response):
        for i in range(self.count):
            yield {"key": f"k{i:04d}", "name": "n"}
        self.server.stop("immediate")


@pytest_twisted.ensureDeferred
async def test_close_while_server_down_dead_letters_within_deadline(fault_site, pg_server,
                                                                    tmp_path):
    dsn = pg_server.dsn
    table = new_table(dsn)
    # Buffered mode with a long delay: everything is still buffered at close.
    settings = pg_settings(dsn, table, tmp_path, durability="buffered", max_delay=60,
                           batch_size=5000, close_timeout=3.0, acquire_timeout=0.5)
    result = await run_crawl(StopServerSpider, settings, timeout=40,
                             start_url=fault_site.start_url, server=pg_server, count=300)
    close_time = result.elapsed
    parked = read_dead_letters(tmp_path / "deadletter.jsonl")
    assert len(result.items) == 300  # buffered: scraped before stored (documented)
    assert {r["key"][0] for r in parked} == {f"k{i:04d}" for i in range(300)}
    assert {r["reason"] for r in parked} <= {"close_deadline", "retries_exhausted"}
    assert result.stats[ad_stats.PG_DEAD_LETTERED] == 300
    assert close_time < 3.0 + 8  # the close deadline bounded it


@pytest_twisted.ensureDeferred
async def test_server_down_in_commit_mode_items_dead_lettered_crawl_ends(fault_site, pg_server,
                                                                        tmp_path):
    dsn = pg_server.dsn
    table = new_table(dsn)
    settings = pg_settings(dsn, table, tmp_path, retry_budget=2.0, acquire_timeout=0.5,
                           close_timeout=3.0)
    result = await run_crawl(StopServerSpider, settings, timeout=40,
                             start_url=fault_site.start_url, server=pg_server, count=200)
    parked = {r["key"][0] for r in read_dead_letters(tmp_path / "deadletter.jsonl")}
    pg_server.start()
    stored = set(rows(dsn, table))
    everything = {f"k{i:04d}" for i in range(200)}
    assert keys_of(result.items) <= stored
    assert keys_of(result.dropped) <= parked
    assert stored | parked == everything
    assert result.elapsed < 30


# --------------------------------------------------------------------------- SIGKILL


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_crawl_every_scraped_item_is_stored(make_fault_site, pg_dsn,
                                                              tmp_path):
    site = make_fault_site(pages=20, items_per_page=10, latency=Latency.fixed(0.05))
    table = new_table(pg_dsn)
    settings = pg_settings(pg_dsn, table, tmp_path, max_delay=0.2)
    settings["CONCURRENT_REQUESTS"] = 8
    proc = run_crawl_subprocess("scrapy_antideadlock.testing.spiders:SiteSpider", settings,
                                items_path=tmp_path / "items.jsonl",
                                spider_kwargs={"start_url": site.start_url})
    with proc:
        await wait_until(lambda: len(proc.items()) >= 40 or proc.returncode is not None,
                         timeout=60, message="the crawl never scraped 40 items")
        assert proc.returncode is None, proc.log_tail()
        await sleep(0.1)
        proc.kill()
        proc.wait(10)
    scraped = {i["key"] for i in proc.items()}
    stored = set(rows(pg_dsn, table))
    assert len(scraped) >= 40
    assert scraped <= stored  # item_scraped fired only after commit
    assert len(stored) < len(site.expected_keys())  # really killed mid-run


@deferred_f_from_coro_f
async def test_backend_killed_mid_flush_is_retried_on_a_fresh_connection(pg_dsn, tmp_path):
    import asyncio

    table = new_table(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (key, name) VALUES ('k1', 'old')").format(
            sql.Identifier(table)))
    specs = parse_tables({"dict": {"table": table, "key": "key"}})
    stats = Stats()
    engine = UpsertEngine(pg_dsn, specs, EngineOptions(lock_timeout=20, max_delay=0.01),
                          deadletter=DeadLetterStore(tmp_path / "dl.jsonl"), stats=stats)
    await engine.open()
    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_row_lock,
                              args=(pg_dsn, table, "k1", 30, locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        item = {"key": "k1", "name": "new"}
        task = asyncio.ensure_future(engine.submit(spec_for(specs, item), item, owner="r-1",
                                                   item_type="dict"))

        def blocked_writer() -> int | None:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%%'").fetchone()
                if row:
                    conn.execute("SELECT pg_terminate_backend(%s)", [row[0]])
                return row[0] if row else None

        killed = None
        for _ in range(100):
            killed = await asyncio.to_thread(blocked_writer)
            if killed:
                break
            await asyncio.sleep(0.05)
        assert killed, "the flush never waited on the lock"
        release.set()
        outcome = await asyncio.wait_for(task, 20)
    finally:
        release.set()
        holder.join(10)
        await engine.close()
    assert outcome.stored
    assert stats.values[ad_stats.PG_RETRIES] >= 1
    labels = {k.rsplit("/", 1)[1] for k in stats.values if k.startswith(ad_stats.PG_RETRIES + "/")}
    assert labels & {"57P01", "connection"}, stats.values  # admin shutdown / connection lost
    assert rows(pg_dsn, table)["k1"]["name"] == "new"
