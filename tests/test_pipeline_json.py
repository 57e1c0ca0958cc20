"""The one-statement JSON write path stores exactly what the COPY path stores.

A matrix of Python value types, each into columns of many types, is written once with
the JSON path disabled (every batch through COPY) and once with it enabled, into two
real tables; PostgreSQL must then hold the same text for every cell, and the same
values must be refused (dead-lettered) on both paths.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock import stats as ad_stats
from scrapy_antideadlock.pipeline import EngineOptions, Stats, UpsertEngine, parse_tables
from scrapy_antideadlock.primitives.batching import Entry, dedupe_last_wins
from scrapy_antideadlock.primitives.deadletter import DeadLetterStore

pytestmark = pytest.mark.postgres

COLUMNS = {"t": "text", "i": "int8", "n": "numeric(10,3)", "f": "float8", "b": "bool",
           "bt": "bytea", "ts": "timestamptz", "tsn": "timestamp", "d": "date", "tm": "time",
           "iv": "interval", "u": "uuid", "j": "json", "jb": "jsonb", "arr": "text[]",
           "vc": "varchar(5)", "c": 'text COLLATE "C"'}

_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")
_AWARE = dt.datetime(2024, 2, 29, 13, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
_NAIVE = dt.datetime(2024, 2, 29, 13, 4, 5)
_ANY = ["plain", "tab\tnl\nback\\slash \"quote\" é 😀", "", 42, -7, 10**30, 1.5, 1e16, 0.1,
        -0.0, 1e-7, 2.5e-300, True, False, decimal.Decimal("1.50"), decimal.Decimal("NaN"),
        float("nan"), float("inf"), _UUID, _AWARE, _NAIVE, dt.date(2024, 2, 29),
        dt.time(1, 2, 3), dt.timedelta(days=1, seconds=5), b"\x00\xffab", ["a", "b"], None]
VALUES: dict[str, list[Any]] = {
    "t": _ANY,
    "i": [42, "42", 10**15, 10**30, 1.0, 1.5, "x", True, decimal.Decimal(7)],
    "n": [1.5, "2.25", decimal.Decimal("3.1415"), 7, 1e-7, 1e16, float("nan"), "abc"],
    "f": [0.1, 1e300, -0.0, 7, "1.5", 5e-324, float("inf"), float("nan"), "NaN"],
    "b": [True, False, "t", "no", 1, 0, 2],
    "bt": [b"\x00\xff", "\\x0102", "plain"],
    "ts": [_AWARE, _NAIVE, "2024-01-02 03:04:05+02", 1700000000],
    "tsn": [_NAIVE, _AWARE, "2024-01-02T03:04:05"],
    "d": [dt.date(2024, 2, 29), "2024-02-29", _NAIVE],
    "tm": [dt.time(1, 2, 3, 4), "01:02:03"],
    "iv": [dt.timedelta(days=1, microseconds=5), "1 day", 5],
    "u": [_UUID, str(_UUID), "not-a-uuid"],
    "j": [{"a": 1, "é": [1.5, None, "x\ny"]}, [], "str", 0, 1.25, None, True,
          {"nested": {"deep": ["😀", "\\"]}}],
    "jb": [{"b": 2, "a": 1}, [1, "two", None], "s", None, False, 10**20],
    "arr": [["a", "b c", None], ["x"], "{p,q}", []],
    "vc": ["abc", "abcde", "toolong", 12345, 123456],
    "c": ["B", "a", "é", 1],
}


def _create(dsn: str, name: str) -> None:
    defs = ", ".join(f"{col} {typ}" for col, typ in COLUMNS.items())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{name}" (key text COLLATE "C" PRIMARY KEY, {defs})')


def _cells(dsn: str, name: str) -> dict[str, list[str | None]]:
    cols = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in COLUMNS)
    with psycopg.connect(dsn) as conn:
        got = conn.execute(sql.SQL("SELECT key, {} FROM {}").format(
            cols, sql.Identifier(name))).fetchall()
    return {row[0]: list(row[1:]) for row in got}


async def _store(dsn: str, name: str, tmp_path, batches: list[list[dict]],
                 json_path: bool) -> tuple[UpsertEngine, set[str], int]:
    """Write ``batches`` of items; (engine, dead-lettered keys, batches sent as JSON)."""
    specs = parse_tables({"dict": {"table": name, "key": "key"}})
    deadletter = tmp_path / f"{name}.jsonl"
    engine = UpsertEngine(dsn, specs, EngineOptions(), deadletter=DeadLetterStore(deadletter),
                          stats=Stats())
    await engine.open()
    table = engine.tables[name]
    sent_as_json = 0
    plain_doc = table.json_doc

    def json_doc(rows: list[dict]) -> str | None:
        nonlocal sent_as_json
        doc = plain_doc(rows) if json_path else None
        sent_as_json += doc is not None
        return doc

    table.json_doc = json_doc  # type: ignore[method-assign]
    try:
        for items in batches:
            entries = [Entry(*table.row_of(item), "test", payload={"item": item})
                       for item in items]
            winners, _ = dedupe_last_wins(entries)
            await engine._write(table, winners, time.monotonic() + 30)
    finally:
        await engine.close()
    parked = set()
    if deadletter.exists():
        parked = {json.loads(line)["key"][0] for line in deadletter.read_text().splitlines()}
    return engine, parked, sent_as_json


def _items() -> list[dict]:
    return [{"key": f"{col}-{n:02d}", col: value}
            for col, values in VALUES.items() for n, value in enumerate(values)]


@deferred_f_from_coro_f
async def test_every_value_type_is_stored_alike_through_json_and_copy(pg_dsn, tmp_path):
    stamp = f"{int(time.time() * 1000)}"
    copy_t, json_t, mixed_t = f"json_copy_{stamp}", f"json_json_{stamp}", f"json_mixed_{stamp}"
    for name in (copy_t, json_t, mixed_t):
        _create(pg_dsn, name)
    items = _items()
    _, copy_parked, copy_json = await _store(pg_dsn, copy_t, tmp_path, [[i] for i in items],
                                             json_path=False)
    engine, json_parked, json_batches = await _store(pg_dsn, json_t, tmp_path,
                                                     [[i] for i in items], json_path=True)
    assert copy_json == 0
    # Enough of the matrix goes through JSON, and all of it is stored the same.
    assert json_batches >= 40, json_batches
    copy_cells, json_cells = _cells(pg_dsn, copy_t), _cells(pg_dsn, json_t)
    assert set(copy_cells) == set(json_cells)
    differ = {k: (copy_cells[k], json_cells[k]) for k in copy_cells
              if copy_cells[k] != json_cells[k]}
    assert not differ
    # Bad values are refused on both paths (a row-level error, or no adaptation).
    assert copy_parked == json_parked
    assert {"i-06", "u-02", "vc-02", "vc-04"} <= json_parked
    assert len(copy_cells) == len(items) - len(copy_parked)
    assert engine.stats.get_value(ad_stats.PG_DEAD_LETTERED) == len(json_parked)

    # One batch of every row JSON can carry, poison rows included: the poison rows are
    # isolated by splitting, the rest stored as through COPY, in a JSON document each try.
    table = engine.tables[json_t]
    carried = [i for i in items
               if table.json_doc([table.row_of(i)[1]]) is not None]
    _, mixed_parked, mixed_json = await _store(pg_dsn, mixed_t, tmp_path, [carried],
                                               json_path=True)
    assert mixed_json >= 1
    assert mixed_parked == {i["key"] for i in carried} & json_parked
    mixed_cells = _cells(pg_dsn, mixed_t)
    assert mixed_cells and all(mixed_cells[k] == copy_cells[k] for k in mixed_cells)
    assert len(mixed_cells) == len(carried) - len(mixed_parked)


@deferred_f_from_coro_f
async def test_json_path_bounds_waits_by_session_settings(pg_dsn, tmp_path):
    """No SET LOCAL any more: each pooled connection carries the limits itself."""
    specs = parse_tables({"dict": {"table": "never_written", "key": "key"}})
    engine = UpsertEngine(pg_dsn, specs, EngineOptions(lock_timeout=1.5, statement_timeout=7,
                                                       idle_in_transaction_timeout=9),
                          deadletter=DeadLetterStore(tmp_path / "dl.jsonl"), stats=Stats())
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await engine.writer.configure(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        got = []
        for name in ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout"):
            got.append((await (await conn.execute(f"SHOW {name}")).fetchone())[0])
    assert got == ["1500ms", "7s", "9s"]


@deferred_f_from_coro_f
async def test_percent_in_a_column_name_goes_through_copy(pg_dsn, tmp_path):
    """A ``%`` in a name would read as a parameter in the JSON statement: COPY instead."""
    name = f"json_pct_{int(time.time() * 1000)}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{name}" (key text PRIMARY KEY, "off%" text)')
    items = [{"key": "a", "off%": "10"}, {"key": "b", "off%": 20}]
    engine, parked, sent_as_json = await _store(pg_dsn, name, tmp_path, [items], json_path=True)
    assert engine.tables[name].statements(("key", "off%")).upsert is None
    assert sent_as_json == 0 and not parked
    with psycopg.connect(pg_dsn) as conn:
        got = conn.execute(f'SELECT key, "off%" FROM "{name}" ORDER BY key').fetchall()
    assert got == [("a", "10"), ("b", "20")]
