"""The naive sticky-proxy + held-connection crawl, with the project's pools registered in
the crawler's registry (as the README asks): a detail page keeps its proxy slot until its
item is stored, and the pipeline holds its one PostgreSQL connection while it downloads
an enrichment page through a proxy slot. Proxy capacity 2, one connection: a cycle.

``SCENARIO_NAIVE_AFTER`` items are stored normally before the pipeline turns naive
(0: naive from the first item). Shared by the watchdog tests and ``bench.detect``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import scrapy

from ...context import context_for
from ...identity import META_KEY, request_id
from ...primitives import LeasePool
from ..spiders import SiteSpider

HERE = __name__


class StickyProxyMiddleware:
    """Leases a slot of the proxy per request; detail pages keep it (a sticky session)."""

    def __init__(self, crawler: Any) -> None:
        self.proxy_url = crawler.settings["SCENARIO_PROXY_URL"]
        self.pool = LeasePool("proxy", {self.proxy_url: 2}, kind="proxy")
        context_for(crawler).registry.register(self.pool)
        self.sticky: dict[str, Any] = {}
        crawler.scenario_proxy = self

    @classmethod
    def from_crawler(cls, crawler: Any) -> StickyProxyMiddleware:
        return cls(crawler)

    async def process_request(self, request: scrapy.Request) -> None:
        lease = await self.pool.acquire(request_id(request), timeout=600)
        request.meta["proxy"] = self.proxy_url
        request.meta["scenario_lease"] = lease
        if request.meta.get("sticky"):
            self.sticky[request_id(request)] = lease

    async def process_response(self, request: scrapy.Request, response: Any) -> Any:
        if not request.meta.get("sticky"):
            request.meta["scenario_lease"].release()
        return response

    async def process_exception(self, request: scrapy.Request, exception: Exception) -> None:
        lease = request.meta.get("scenario_lease")
        if lease is not None:
            lease.release()

    def release_session(self, owner: str) -> None:
        lease = self.sticky.pop(owner, None)
        if lease is not None:
            lease.release()


class NaiveEnrichPipeline:
    """Holds the DB connection (a LeasePool over a real psycopg connection) across a download."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self.naive_after = crawler.settings.getint("SCENARIO_NAIVE_AFTER", 0)
        self.stored = 0
        crawler.scenario_pipeline = self

    @classmethod
    def from_crawler(cls, crawler: Any) -> NaiveEnrichPipeline:
        return cls(crawler)

    async def open_spider(self) -> None:
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(
            self.crawler.settings["SCENARIO_PG_DSN"], autocommit=True)
        await self.conn.execute("CREATE TABLE IF NOT EXISTS scenario_items (key text PRIMARY KEY)")
        self.db = LeasePool("db", 1, kind="pg")
        context_for(self.crawler).registry.register(self.db)

    async def close_spider(self) -> None:
        await self.conn.close()

    async def process_item(self, item: Any) -> Any:
        owner = item.pop("owner")
        try:
            lease = await self.db.acquire(owner, timeout=600)
            try:
                await self.conn.execute("SELECT 1")
                if self.stored >= self.naive_after:
                    enrich = scrapy.Request(item["url"] + "?enrich=1", dont_filter=True,
                                            meta={META_KEY: owner})
                    await self.crawler.engine.download_async(enrich)
                await self.conn.execute(
                    "INSERT INTO scenario_items VALUES (%s) ON CONFLICT DO NOTHING",
                    (item["key"],))
                self.stored += 1
            finally:
                lease.release()
        finally:
            self.crawler.scenario_proxy.release_session(owner)
        return item

    def break_pools(self) -> None:
        """End the hang from outside (tests and benchmarks): close both pools."""
        self.crawler.scenario_proxy.pool.close()
        self.db.close()


class StickySpider(SiteSpider):
    name = "sticky_proxy_pg"
    custom_settings = {
        "CONCURRENT_REQUESTS": 4,
        "DOWNLOADER_MIDDLEWARES": {f"{HERE}.StickyProxyMiddleware": 500},
        "ITEM_PIPELINES": {f"{HERE}.NaiveEnrichPipeline": 300},
    }

    def request_meta(self, kind: str) -> dict[str, Any]:
        return {"sticky": True} if kind == "item" else {}

    def parse_item(self, response: Any, **kwargs: Any) -> Iterator[Any]:
        for item in super().parse_item(response, **kwargs):
            item["owner"] = request_id(response.request)
            yield item
