"""A hand-written PostgreSQL pipeline as many projects have one (``db_pool`` without the pack).

Batches of 50 items, each written with ``executemany`` in one transaction, in the order
the items came, through a pool of 2 connections, no lock timeout. Two batches that
touch the same keys in different orders can deadlock; PostgreSQL then aborts one of
them after ``deadlock_timeout`` and its rows are lost. Counted in ``demo/naive_pg/*``.
"""

from __future__ import annotations

import logging
from typing import Any

from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured

logger = logging.getLogger(__name__)

BATCH = 50


class NaivePostgresPipeline:
    def __init__(self, crawler: Crawler, dsn: str) -> None:
        self.crawler = crawler
        self.dsn = dsn
        self.buffer: list[dict[str, Any]] = []
        self.pool: Any = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> NaivePostgresPipeline:
        dsn = crawler.settings.get("ANTIDEADLOCK_PG_DSN")
        if not dsn:
            raise NotConfigured("no database")
        return cls(crawler, dsn)

    async def open_spider(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.pool = AsyncConnectionPool(self.dsn, min_size=2, max_size=2, open=False)
        await self.pool.open()
        async with self.pool.connection() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS price_observations "
                               "(key text PRIMARY KEY, price numeric, seen_on text)")

    async def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        self.buffer.append(item)
        if len(self.buffer) >= BATCH:
            batch, self.buffer = self.buffer, []
            await self._write(batch)
        return item

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        import psycopg

        stats = self.crawler.stats
        try:
            async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO price_observations (key, price, seen_on) "
                    "VALUES (%(key)s, %(price)s, %(seen_on)s) ON CONFLICT (key) DO UPDATE "
                    "SET price = EXCLUDED.price, seen_on = EXCLUDED.seen_on", batch)
            stats.inc_value("demo/naive_pg/rows_written", len(batch))
        except psycopg.errors.DeadlockDetected:
            stats.inc_value("demo/naive_pg/deadlocks")
            stats.inc_value("demo/naive_pg/rows_lost", len(batch))
            logger.error("naive pipeline: deadlock, %d rows lost", len(batch))

    async def close_spider(self) -> None:
        if self.buffer:
            await self._write(self.buffer)
        await self.pool.close()
