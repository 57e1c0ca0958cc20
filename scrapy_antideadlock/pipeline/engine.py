"""The PostgreSQL upsert engine behind the pipeline (no Scrapy import).

Why it cannot deadlock or hang:

* **Ordering.** Each batch is deduplicated by key and merged with ``INSERT ... SELECT
  ... ORDER BY key ON CONFLICT``, from one JSON parameter (one autocommit statement) or,
  for values JSON cannot carry exactly, from a temp table filled by COPY: every writer
  locks rows in key order, so no two transactions wait on each other in a cycle. One
  flush per table at a time, so a later batch never overtakes an earlier.
* **Bounded waits.** Pool acquire has a timeout and a bounded queue; every pooled
  connection has ``lock_timeout``, ``statement_timeout`` and
  ``idle_in_transaction_session_timeout`` set for its session; the pool checks
  connections before use (:mod:`.write`) so those killed by a server restart are
  replaced. A connection is held only inside a flush, never while an item waits for
  anything else.
* **Retries, then parking.** Transient failures (deadlock, lock/statement timeout,
  serialization, shutdown, connection loss, pool timeout) are retried with jittered
  exponential backoff within a per-batch time budget. Row-level errors (bad data,
  constraint violations) split the batch to isolate the poison rows. Whatever cannot
  be stored is parked in the dead-letter store with the reason: never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from .. import stats as ad_stats
from ..primitives.batching import (
    Backoff,
    BatchBuffer,
    BufferFull,
    Entry,
    dedupe_last_wins,
    split_halves,
)
from ..primitives.deadletter import DeadLetterStore
from ..primitives.deadline import LatencyHistogram
from .config import TableSpec, redact_dsn, scrub
from .rows import (
    _ROW_LEVEL,
    STORED,
    BadItem,
    Outcome,
    PgConfigError,
    Table,
    classify,
    resolve_table,
)
from .support import EngineOptions, PgPoolView, Stats, bounded
from .write import BatchWriter

logger = logging.getLogger(__name__)

__all__ = ["EngineOptions", "Outcome", "PgConfigError", "Stats", "UpsertEngine"]


class UpsertEngine:
    """Batched, ordered, bounded upserts of rows into PostgreSQL tables."""

    def __init__(self, dsn: str, specs: Mapping[str, TableSpec], options: EngineOptions, *,
                 deadletter: DeadLetterStore, stats: Any | None = None,
                 dsn_setting: str = "ANTIDEADLOCK_PG_DSN") -> None:
        self.dsn = dsn
        self.specs = dict(specs)
        self.options = options
        self.deadletter = deadletter
        self.stats = stats if stats is not None else Stats()
        self.dsn_setting = dsn_setting
        self.pool: AsyncConnectionPool | None = None
        self.pool_view = PgPoolView(f"{options.name}:connections", options.pool_size)
        self.tables: dict[str, Table] = {}  # table name -> how batches are written
        self._by_type: dict[str, Table] = {}  # item type -> how its items become rows
        self.buffers: dict[str, BatchBuffer] = {}
        self._backoff = Backoff(options.backoff_base, options.backoff_max)
        self._latency = LatencyHistogram()
        self._tokens = itertools.count(1)
        self._soft_deadline: float | None = None
        self._closed = False
        self._pool_wait_max = 0.0
        self.writer = BatchWriter(options)  # session limits, pool check, JSON or COPY

    # ------------------------------------------------------------------ open
    async def open(self) -> None:
        """Check the DSN, resolve (or create) tables, open the pool. Errors name settings."""
        opts = self.options
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                connect_timeout=max(1, int(opts.connect_timeout))),
                opts.connect_timeout + 1)
        except (psycopg.Error, OSError, asyncio.TimeoutError) as exc:
            raise PgConfigError(
                f"{self.dsn_setting}: cannot connect to {redact_dsn(self.dsn)}: "
                f"{scrub(str(exc) or type(exc).__name__, self.dsn)}") from None
        try:
            for spec in self.specs.values():
                table = self._by_type[spec.item_type] = await resolve_table(conn, spec, self.options.create_tables)
                first = self.tables.setdefault(spec.table, table)
                if (first.spec.key_columns, first.spec.conflict) != (spec.key_columns,
                                                                     spec.conflict):
                    raise PgConfigError(
                        f"ANTIDEADLOCK_PG_TABLES: {first.spec.item_type} and {spec.item_type} "
                        f"share table {spec.table!r} but differ in key columns or conflict "
                        f"action; items of one table are merged in the same statements")
        finally:
            await conn.close()
        for name, table in self.tables.items():
            self.buffers[name] = BatchBuffer(
                f"{opts.name}:buffer:{name}", self._flush_factory(table),
                batch_size=opts.batch_size, max_delay=opts.max_delay,
                capacity=max(opts.capacity, opts.batch_size), on_error=self._flush_crashed,
                eager=opts.eager_flush)
        self.pool = AsyncConnectionPool(
            self.dsn, min_size=1, max_size=opts.pool_size, open=False,
            timeout=opts.acquire_timeout, max_waiting=opts.max_waiting,
            configure=self.writer.configure, check=self.writer.check,
            name=opts.name, reconnect_timeout=max(60.0, opts.retry_budget))
        await self.pool.open(wait=False)

    # ------------------------------------------------------------------ submit
    def enqueue(self, spec: TableSpec | None, fields: Mapping[str, Any], *, owner: str,
                item_type: str) -> Awaitable[Outcome]:
        """Queue one item; await the result for its outcome (committed or parked).

        Same as ``await submit(..., wait=True)`` but, on the common path (a valid item
        and room in the buffer), the awaitable is the item's own future: no coroutine
        per item. Cancelling the wait cancels only this item's future, not its write.
        """
        if spec is not None:
            table = self._by_type[spec.item_type]
            buffer = self.buffers[spec.table]
            if buffer.has_room():
                try:
                    key, row = table.row_of(fields)
                except BadItem:
                    pass  # submit() parks it
                else:
                    future = asyncio.get_running_loop().create_future()
                    buffer.add(Entry(key, row, owner, payload={"item_type": item_type,
                                                               "item": fields},
                                     future=future))
                    return future
        return self.submit(spec, fields, owner=owner, item_type=item_type, wait=True)

    async def submit(self, spec: TableSpec | None, fields: Mapping[str, Any], *, owner: str,
                     item_type: str, wait: bool = True) -> Outcome:
        """Queue one item; with ``wait`` return when it is committed or parked."""
        if spec is None:
            return await self._park_bad(fields, owner, item_type, None, BadItem(
                "unknown_type", f"no table configured for item type {item_type!r} "
                                f"(ANTIDEADLOCK_PG_TABLES)"))
        try:
            key, row = self._by_type[spec.item_type].row_of(fields)
        except BadItem as exc:
            return await self._park_bad(fields, owner, item_type, spec.table, exc)
        loop = asyncio.get_running_loop()
        entry = Entry(key, row, owner, payload={"item_type": item_type, "item": fields},
                      future=loop.create_future())
        buffer = self.buffers[spec.table]
        if buffer.has_room():
            buffer.add(entry)
        else:
            try:
                await buffer.put(entry, self.options.acquire_timeout + self.options.retry_budget)
            except BufferFull as exc:
                await self._park([entry], spec.table, "buffer_full", None, str(exc))
        if not wait:
            return entry.future.result() if entry.future.done() else STORED
        return await entry.future

    async def _park_bad(self, fields: Mapping[str, Any], owner: str, item_type: str,
                        table: str | None, exc: BadItem) -> Outcome:
        entry = Entry((), None, owner, payload={"item_type": item_type, "item": dict(fields)},
                      future=asyncio.get_running_loop().create_future())
        self.stats.inc_value(ad_stats.PG_BAD_ITEMS)
        await self._park([entry], table, exc.reason, None, exc.detail)
        return entry.future.result()

    # ------------------------------------------------------------------ flush
    def _flush_factory(self, table: Table) -> Callable[[list[Entry]], Any]:
        async def flush(batch: list[Entry]) -> None:
            started = time.monotonic()
            winners, dropped = dedupe_last_wins(batch)
            if dropped:
                self.stats.inc_value(ad_stats.PG_DEDUP_DROPS, dropped)
            await self._write(table, winners, started + self.options.retry_budget)
            self._latency.add(time.monotonic() - started)
            self.stats.set_value(ad_stats.PG_FLUSH_LATENCY_P99,
                                 round(self._latency.quantile(0.99) or 0.0, 4))
        return flush

    def _flush_crashed(self, exc: BaseException, batch: list[Entry]) -> None:
        logger.error("pg: flush failed unexpectedly: %s", scrub(repr(exc), self.dsn))
        task = asyncio.get_running_loop().create_task(
            self._park(batch, None, "internal_error", None, repr(exc)))
        task.add_done_callback(lambda _t: None)

    async def _write(self, table: Table, entries: list[Entry], budget_end: float) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._attempt(table, entries, budget_end)
            except Exception as exc:  # noqa: BLE001 - classified below
                label = classify(exc)
                message = scrub(str(exc) or type(exc).__name__, self.dsn)
                if label is None and isinstance(exc, psycopg.Error):
                    if len(entries) > 1 and (exc.sqlstate or "")[:2] in _ROW_LEVEL:
                        self.stats.inc_value(ad_stats.PG_BATCH_SPLITS)
                        for half in split_halves(entries):
                            await self._write(table, half, budget_end)
                        return
                    await self._park(_flat(entries), table.spec.table, "db_error",
                                     exc.sqlstate, message)
                    return
                if label is None:  # not a database error: a bug or bad data in adaptation
                    if len(entries) > 1:
                        self.stats.inc_value(ad_stats.PG_BATCH_SPLITS)
                        for half in split_halves(entries):
                            await self._write(table, half, budget_end)
                        return
                    await self._park(_flat(entries), table.spec.table, "write_error",
                                     None, f"{type(exc).__name__}: {message}")
                    return
                self._count_retry(label)
                now = time.monotonic()
                pause = self._backoff.delay(attempt)
                end = budget_end if self._soft_deadline is None else min(budget_end,
                                                                          self._soft_deadline)
                if attempt >= self.options.max_attempts or now + pause >= end:
                    reason = "close_deadline" if self._soft_deadline and now + pause >= \
                        self._soft_deadline else "retries_exhausted"
                    await self._park(_flat(entries), table.spec.table, reason, label,
                                     f"after {attempt} attempts: {message}")
                    return
                logger.info("pg: %s on %s (%d rows), retry %d in %.2fs", label,
                            table.spec.table, len(entries), attempt, pause)
                await asyncio.sleep(pause)
                continue
            self.stats.inc_value(ad_stats.PG_ROWS_UPSERTED, len(entries))
            self.stats.inc_value(ad_stats.PG_BATCHES)
            for winner in entries:
                if winner.superseded:  # same key earlier in the batch: same fate
                    for entry in winner.superseded:
                        entry.settle(STORED)
                winner.settle(STORED)
            return

    def _count_retry(self, label: str) -> None:
        self.stats.inc_value(ad_stats.PG_RETRIES)
        self.stats.inc_value(ad_stats.family(ad_stats.PG_RETRIES_BY, sqlstate=label))
        if label == "40P01":
            self.stats.inc_value(ad_stats.PG_DEADLOCKS)
        elif label == "55P03":
            self.stats.inc_value(ad_stats.PG_LOCK_TIMEOUTS)

    async def _attempt(self, table: Table, entries: list[Entry], budget_end: float) -> None:
        assert self.pool is not None
        opts = self.options
        cols = tuple(sorted({c for e in entries for c in e.row},
                            key=lambda c: (c not in table.spec.key_columns, c)))
        token = next(self._tokens)
        self.pool_view.waiting(token, entries[0].owner, f"flush:{table.spec.table}")
        bound = opts.acquire_timeout + opts.statement_timeout + 2.0
        if self._soft_deadline is not None:
            bound = min(bound, max(0.1, self._soft_deadline - time.monotonic()))
        try:
            await bounded(self._transaction(table, entries, cols, token), bound)
        finally:
            self.pool_view.done(token)

    async def _transaction(self, table: Table, entries: list[Entry], cols: tuple[str, ...],
                           token: int) -> None:
        """Take a pooled connection, write the batch (:class:`BatchWriter`), give it back."""
        assert self.pool is not None
        asked = time.monotonic()
        try:
            conn = await self.pool.getconn(timeout=self.options.acquire_timeout)
        finally:  # a wait that timed out counts too
            waited = time.monotonic() - asked
            if waited > self._pool_wait_max:
                self._pool_wait_max = waited
                self.stats.set_value(ad_stats.PG_POOL_WAIT_MAX, round(waited, 4))
        try:
            self.pool_view.holding(token)
            await self.writer.write(conn, table, entries, cols)
        finally:  # back to the pool at once: never held outside a flush
            await self.pool.putconn(conn)

    # ------------------------------------------------------------------ parking
    async def _park(self, entries: list[Entry], table: str | None, reason: str,
                    sqlstate: str | None, detail: str) -> None:
        """Write unsettled ``entries`` to the dead-letter store and settle them (once)."""
        todo = [e for e in entries if not e.settled]
        if not todo:
            return
        for entry in todo:  # claim them, so a concurrent close does not park them twice
            entry.settled = True
        records = [{"reason": reason, "sqlstate": sqlstate, "detail": detail, "table": table,
                    "owner": e.owner, "key": list(e.key), **(e.payload or {})} for e in todo]
        outcome = Outcome(False, reason, detail)
        try:
            await asyncio.to_thread(self.deadletter.append, records)
        except Exception as exc:  # noqa: BLE001 - must not lose them silently
            self.stats.inc_value(ad_stats.PG_DEADLETTER_ERRORS, len(todo))
            logger.error("pg: could not write %d rows to the dead-letter store %s (%r); "
                         "keys: %s", len(todo), self.deadletter.path, exc,
                         [r["key"] for r in records][:50])
            outcome = Outcome(False, "deadletter_failed", f"{reason}: {detail}")
        else:
            self.stats.inc_value(ad_stats.PG_DEAD_LETTERED, len(todo))
            self.stats.inc_value(ad_stats.family(ad_stats.PG_DEAD_LETTERED_BY, reason=reason),
                                 len(todo))
            logger.warning("pg: %d row(s) of %s dead-lettered (%s%s): %s", len(todo),
                           table or "?", reason, f" {sqlstate}" if sqlstate else "", detail)
        finally:  # also when cancelled at the close deadline: the append thread goes on
            for entry in todo:
                if entry.future is not None and not entry.future.done():
                    entry.future.set_result(outcome)

    # ------------------------------------------------------------------ close
    async def close(self) -> None:
        """Flush with a deadline; park whatever is left by then; close the pool (bounded)."""
        if self._closed:
            return
        self._closed = True
        timeout = self.options.close_timeout
        start = time.monotonic()
        hard = start + timeout
        self._soft_deadline = hard - min(2.0, timeout * 0.2)
        buffers = list(self.buffers.values())
        for buffer in buffers:
            buffer.flush_now()
        if buffers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(b.drain() for b in buffers)),
                                       max(0.0, hard - time.monotonic()))
        leftovers: list[Entry] = []
        tasks = []
        for buffer in buffers:
            pending, flushing = buffer.take_all()
            leftovers += pending + flushing
            if buffer.task is not None:
                buffer.task.cancel()
                tasks.append(buffer.task)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if leftovers:
            await self._park(leftovers, None, "close_deadline", None,
                             f"not written within ANTIDEADLOCK_PG_CLOSE_TIMEOUT={timeout}s")
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(timeout=1.0), 3.0)
        self.stats.set_value(ad_stats.PG_FLUSH_LATENCY_P99,
                             round(self._latency.quantile(0.99) or 0.0, 4))


def _flat(winners: list[Entry]) -> list[Entry]:
    return [e for w in winners for e in w.entries()]
