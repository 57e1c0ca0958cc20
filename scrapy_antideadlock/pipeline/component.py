"""Scrapy item pipeline: deadlock-free batched upserts into PostgreSQL.

A thin adapter over :class:`~scrapy_antideadlock.pipeline.engine.UpsertEngine`: it reads
the pg settings once, turns items into field mappings through
itemadapter, and maps the engine's outcome to Scrapy's: stored -> the item passes
on (so ``item_scraped`` means "committed" in the default mode), parked in the
dead-letter store -> ``DropItem`` with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

from itemadapter import ItemAdapter
from scrapy.crawler import Crawler
from scrapy.exceptions import DropItem, NotConfigured

from .. import settings as ad_settings
from .. import stats as ad_stats
from ..context import context_for
from ..primitives.deadletter import DeadLetterStore
from ..reactor import ASYNCIO_REACTOR, asyncio_reactor_configured, reactor_name
from .config import SpecResolver, TableSpec, item_type_name, parse_tables, redact_dsn
from .engine import EngineOptions, UpsertEngine

logger = logging.getLogger(__name__)


try:
    from ..origin import origins_for
except ImportError:  # pragma: no cover - origin is part of this package
    origins_for = None


def owner_of(crawler: Crawler, item: Any, tracker: Any = None) -> str:
    """The request id that produced ``item`` (origin tracker), else a per-item placeholder."""
    if tracker is None and origins_for is not None:
        tracker = origins_for(crawler)
    if tracker is not None:
        owner = tracker.owner_of(item)
        if owner:
            return owner
    return f"item:{id(item):x}"


class PostgresUpsertPipeline:
    """Writes items to PostgreSQL in deduplicated, key-ordered, bounded batches."""

    def __init__(self, crawler: Crawler) -> None:
        conf = ad_settings.load(crawler.settings, "pg")
        if not conf.enabled:
            raise NotConfigured("ANTIDEADLOCK_PG_ENABLED is False")
        if not conf.dsn:
            raise NotConfigured("ANTIDEADLOCK_PG_DSN is not set")
        if not asyncio_reactor_configured(crawler.settings):  # items would not be stored
            raise ad_settings.SettingError("TWISTED_REACTOR", f'"{ASYNCIO_REACTOR}"',
                                           reactor_name(crawler.settings),
                                           "the PostgreSQL pipeline (ANTIDEADLOCK_PG_DSN) needs it")
        self.crawler = crawler
        self.specs: dict[str, TableSpec] = parse_tables(conf.tables)
        if not self.specs:
            raise ad_settings.SettingError(
                "ANTIDEADLOCK_PG_TABLES", "at least one item type -> table spec", conf.tables,
                "nothing to write to")
        self.spec_of = SpecResolver(self.specs)
        self.wait = conf.durability == "commit"
        options = EngineOptions(
            batch_size=conf.batch_size, max_delay=conf.max_delay,
            capacity=max(conf.buffer_capacity, conf.batch_size), pool_size=conf.pool_size,
            acquire_timeout=conf.acquire_timeout, max_waiting=conf.max_waiting,
            lock_timeout=conf.lock_timeout, statement_timeout=conf.statement_timeout,
            idle_in_transaction_timeout=conf.idle_in_transaction_timeout,
            max_attempts=conf.max_attempts, retry_budget=conf.retry_budget,
            close_timeout=conf.close_timeout, create_tables=conf.create_tables,
            eager_flush=self.wait)
        self.deadletter = DeadLetterStore(conf.deadletter_path,
                                          lock_timeout=conf.deadletter_lock_timeout)
        self.engine = UpsertEngine(conf.dsn, self.specs, options, deadletter=self.deadletter,
                                   stats=crawler.stats)
        self.registry = context_for(crawler).registry
        self.stats = crawler.stats
        # Looked up once: process_item runs per item.
        self.origins = origins_for(crawler) if origins_for is not None else None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> PostgresUpsertPipeline:
        return cls(crawler)

    async def open_spider(self) -> None:
        await self.engine.open()
        self.registry.register(self.engine.pool_view)
        for buffer in self.engine.buffers.values():
            self.registry.register(buffer)
        logger.info("pg pipeline: writing %s to %s (%s mode)",
                    ", ".join(f"{t}->{s.table}" for t, s in self.specs.items()),
                    redact_dsn(self.engine.dsn), "commit" if self.wait else "buffered")

    async def process_item(self, item: Any) -> Any:
        self.stats.inc_value(ad_stats.PG_ITEMS)
        # Shallow: the engine snapshots values into the row; nested items go to JSON as dicts.
        fields = item if type(item) is dict else dict(ItemAdapter(item).items())
        spec, owner = self.spec_of(item), owner_of(self.crawler, item, self.origins)
        if self.wait:  # the item's future itself on the common path (no coroutine per item)
            outcome = await self.engine.enqueue(spec, fields, owner=owner,
                                                item_type=item_type_name(item))
        else:
            outcome = await self.engine.submit(spec, fields, owner=owner,
                                               item_type=item_type_name(item), wait=False)
        if not outcome.stored:
            raise DropItem(f"not stored ({outcome.reason}): {outcome.detail}; "
                           f"see {self.deadletter.path}")
        return item

    async def close_spider(self) -> None:
        try:
            await self.engine.close()
        finally:
            self.registry.unregister(self.engine.pool_view)
            for buffer in self.engine.buffers.values():
                self.registry.unregister(buffer)
