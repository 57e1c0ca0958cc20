"""How one batch reaches PostgreSQL on a pooled connection (no Scrapy import).

Two paths, chosen per batch by :meth:`~.rows.Table.json_doc`: one autocommit statement
upserting from a JSON parameter (one round trip), or, for values JSON cannot carry
exactly, BEGIN (+ the stage, once per connection), COPY into the connection's temp
stage, merge + COMMIT. Both lock rows in key order. The limits (lock, statement and
idle-in-transaction timeouts) are session settings of every pooled connection, set in
:meth:`BatchWriter.configure`, so they bound every statement of both paths.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from ..primitives.batching import Entry
from .rows import Table
from .support import EngineOptions

#: a connection that completed a statement this recently is handed out unchecked
FRESH_FOR = 1.0


class BatchWriter:
    """Per-connection state of the write path: session limits, stages, composed SQL."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        #: temp stages known to exist per pooled connection (a new session has none)
        self._stages: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        #: when each pooled connection last completed a statement without error
        self._fresh: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        #: statements as bytes, composed once (id of a Composed cached by its Table -> bytes)
        self._bytes: dict[int, tuple[sql.Composable, bytes]] = {}

    async def configure(self, conn: psycopg.AsyncConnection) -> None:
        """Bound every wait of every statement on this connection, once per session (not
        per batch: a JSON batch is a single statement with no transaction to SET LOCAL in).

        Must leave the connection idle (not in a transaction), or the pool discards it.
        """
        await conn.set_autocommit(True)
        opts = self.options
        await conn.execute(sql.SQL(
            "SET lock_timeout = {}; SET statement_timeout = {}; "
            "SET idle_in_transaction_session_timeout = {}").format(
            *(sql.Literal(int(seconds * 1000)) for seconds in (
                opts.lock_timeout, opts.statement_timeout, opts.idle_in_transaction_timeout))))

    async def check(self, conn: psycopg.AsyncConnection) -> None:
        """The pool's check before a connection is handed out: a round trip (an empty
        query) only if the connection has not just worked. One that died since (server
        restart) fails its statement, which is retried on a fresh connection."""
        used = self._fresh.get(conn)
        if used is None or time.monotonic() - used > FRESH_FOR or conn.broken:
            await AsyncConnectionPool.check_connection(conn)

    def _sql(self, conn: psycopg.AsyncConnection, query: sql.Composable) -> bytes:
        """``query`` as bytes, composed once: composing costs ~100 us per statement."""
        cached = self._bytes.get(id(query))
        if cached is None or cached[0] is not query:
            cached = self._bytes[id(query)] = (query, query.as_bytes(conn))
        return cached[1]

    async def write(self, conn: psycopg.AsyncConnection, table: Table, entries: list[Entry],
                    cols: tuple[str, ...]) -> None:
        """Upsert ``entries`` (deduplicated, in key order) with columns ``cols``.

        The stage is ``ON COMMIT DELETE ROWS``, so it is empty at every BEGIN and is not
        created and dropped (catalog writes) in every transaction.
        """
        statements = table.statements(cols)
        if statements.upsert is not None:
            doc = table.json_doc([entry.row for entry in entries])
            if doc is not None:
                await conn.execute(self._sql(conn, statements.upsert), (doc,))
                self._fresh[conn] = time.monotonic()
                return
        stages = self._stages.get(conn)
        if stages is None:
            stages = self._stages[conn] = set()
        begin = b"BEGIN"
        if statements.stage not in stages:
            begin += b"; " + self._sql(conn, statements.create)
        try:
            await conn.execute(begin)
            async with conn.cursor().copy(self._sql(conn, statements.copy)) as copy:
                for entry in entries:
                    row = entry.row
                    await copy.write_row([row.get(c) for c in cols])
            await conn.execute(self._sql(conn, statements.merge))
        except BaseException:
            if conn.info.transaction_status != TransactionStatus.IDLE:
                with contextlib.suppress(Exception):  # else the pool rolls it back
                    await conn.rollback()
            raise
        stages.add(statements.stage)  # committed, so the stage exists from now on
        self._fresh[conn] = time.monotonic()
