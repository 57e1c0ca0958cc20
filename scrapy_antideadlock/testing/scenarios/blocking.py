"""A blocked event loop: a synchronous psycopg ``UPDATE`` in a pipeline, on a row that
another session (a report running in a transaction) keeps locked."""

from __future__ import annotations

from typing import Any

from ..spiders import SiteSpider

HERE = __name__
TABLE = "scenario_prices"


class PriceHistoryPipeline:
    def __init__(self, crawler: Any) -> None:
        self.dsn = crawler.settings["SCENARIO_PG_DSN"]

    @classmethod
    def from_crawler(cls, crawler: Any) -> PriceHistoryPipeline:
        return cls(crawler)

    def open_spider(self) -> None:
        import psycopg

        self.conn = psycopg.connect(self.dsn, autocommit=True)

    def close_spider(self) -> None:
        self.conn.close()

    def process_item(self, item: Any) -> Any:
        self.conn.execute(f"UPDATE {TABLE} SET seen = seen + 1 WHERE key = 'all'")
        return item


class PriceSpider(SiteSpider):
    name = "psycopg_row_lock"
    custom_settings = {"ITEM_PIPELINES": {f"{HERE}.PriceHistoryPipeline": 300}}


def lock_row(dsn: str) -> Any:
    """Another session takes the row lock and keeps its transaction open; close() ends it."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key text PRIMARY KEY, seen int)")
        setup.execute(f"INSERT INTO {TABLE} VALUES ('all', 0) ON CONFLICT DO NOTHING")
    holder = psycopg.connect(dsn)
    holder.execute(f"SELECT * FROM {TABLE} WHERE key = 'all' FOR UPDATE")
    return holder
