"""Quiet when fine, exact when counting: real PostgreSQL, real fault site, the ADDONS line.

* A default, correctly configured crawl logs no WARNING or ERROR from the pack.
* Every item the pipeline receives is accounted for exactly, also when keys repeat:
  ``pg/items == rows_upserted + dedup_drops + dead_lettered + deadletter_errors``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
from psycopg import sql

from scrapy_antideadlock.testing import SiteSpider, run_crawl

pytestmark = pytest.mark.postgres

ADDON = {"ADDONS": {"scrapy_antideadlock.Addon": 0}}


def pg_settings(dsn: str, table: str, tmp_path: Any) -> dict[str, Any]:
    return {**ADDON, "ANTIDEADLOCK_PG_DSN": dsn,
            "ANTIDEADLOCK_PG_TABLES": {"dict": {"table": table, "key": "key"}},
            "ANTIDEADLOCK_PG_DEADLETTER_PATH": str(tmp_path / "deadletter.jsonl")}


def new_table(dsn: str, prefix: str) -> str:
    name = f"{prefix}_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, name text, price text, "
                             "url text)").format(sql.Identifier(name)))
    return name


def count_rows(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table))).fetchone()[0]


@pytest_twisted.ensureDeferred
async def test_default_crawl_logs_no_warning_from_the_pack(make_fault_site, pg_dsn, tmp_path,
                                                           caplog) -> None:
    caplog.set_level(logging.INFO)
    site = make_fault_site(pages=4, items_per_page=10)
    table = new_table(pg_dsn, "quiet_items")
    result = await run_crawl(SiteSpider, pg_settings(pg_dsn, table, tmp_path), timeout=60,
                             start_url=site.start_url)
    assert result.finished and result.reason == "finished"
    assert count_rows(pg_dsn, table) == len(site.item_keys())
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and (
        r.name.startswith("scrapy_antideadlock") or "antideadlock" in r.getMessage())]
    assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud]
    # the pack did run: its pipeline stored, its deadline middleware stamped
    assert result.stats["antideadlock/pg/rows_upserted"] == len(site.item_keys())
    assert result.stats["antideadlock/deadline/set"] >= len(site.item_keys())


class RepeatingSpider(SiteSpider):
    """Yields every item twice, one item under a key shared by all, and one without a key."""

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        for item in super().parse_item(response, **kwargs):
            yield item
            yield dict(item)  # the same key again: same batch or a later one
            yield {**item, "key": "shared"}
            if item["key"] == "k00003":
                yield {**item, "key": None}  # cannot be stored: dead-lettered


@pytest_twisted.ensureDeferred
async def test_every_item_accounted_for_with_repeated_keys(make_fault_site, pg_dsn,
                                                           tmp_path) -> None:
    site = make_fault_site(pages=3, items_per_page=20)
    table = new_table(pg_dsn, "identity_items")
    result = await run_crawl(RepeatingSpider, pg_settings(pg_dsn, table, tmp_path), timeout=60,
                             start_url=site.start_url)
    assert result.finished
    s = result.stats
    get = lambda name: s.get(f"antideadlock/pg/{name}", 0)  # noqa: E731 - absent = 0
    received = len(site.item_keys()) * 3 + 1
    assert get("items") == received
    assert get("dedup_drops") > 0  # keys did repeat within a batch
    assert get("rows_upserted") != s["item_scraped_count"]  # the old claim was false here
    assert get("dead_lettered") == 1
    assert get("items") == (get("rows_upserted") + get("dedup_drops") + get("dead_lettered")
                            + get("deadletter_errors"))
    # with durability "commit": stored items are scraped, dead-lettered ones are dropped
    assert get("rows_upserted") + get("dedup_drops") == s["item_scraped_count"]
    assert get("dead_lettered") == s.get("item_dropped_count", 0)
    assert count_rows(pg_dsn, table) == len(site.item_keys()) + 1  # + "shared"
