"""scrapy_antideadlock.monitors under the real Spidermon extension, at spider close.

A clean crawl (ADDONS line, real PostgreSQL, a real proxy) passes every monitor; a crawl
with planted faults fails the monitor for each: hanging pages the watchdog gives up on
(stall closes, quarantine), an item the dead-letter store cannot take (item lost), and a
proxy lease taken and never returned (lease leak).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
from psycopg import sql
from spidermon.core.actions import Action

from scrapy_antideadlock.context import context_for
from scrapy_antideadlock.monitors import AntideadlockMonitorSuite
from scrapy_antideadlock.testing import Fault, SiteSpider, run_crawl

pytestmark = pytest.mark.postgres


class Recorder(Action):
    """Keeps each monitor's status (the suite runs inside the crawl)."""

    outcomes: dict[str, str] = {}

    def run_action(self) -> None:
        Recorder.outcomes = {r.item.method_name: r.status for r in self.result.monitor_results}


class RecordedSuite(AntideadlockMonitorSuite):
    monitors_finished_actions = [Recorder]


def settings(dsn: str, table: str, tmp_path: Any, proxy: str, **extra: Any) -> dict[str, Any]:
    return {"ADDONS": {"scrapy_antideadlock.Addon": 0},
            "EXTENSIONS": {"spidermon.contrib.scrapy.extensions.Spidermon": 500},
            "SPIDERMON_ENABLED": True,
            "SPIDERMON_SPIDER_CLOSE_MONITORS": (f"{__name__}.RecordedSuite",),
            "ANTIDEADLOCK_PG_DSN": dsn,
            "ANTIDEADLOCK_PG_TABLES": {"dict": {"table": table, "key": "key"}},
            "ANTIDEADLOCK_PG_DEADLETTER_PATH": str(tmp_path / "deadletter.jsonl"),
            "ANTIDEADLOCK_PROXY_LIST": [proxy],
            "ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE": str(tmp_path / "quarantine.jsonl"),
            **extra}


def new_table(dsn: str) -> str:
    name = f"mon_items_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, name text, price text, "
                             "url text)").format(sql.Identifier(name)))
    return name


MONITORS = ("no stall left unrecovered", "0 items lost", "no leases leaked at close",
            "quarantine below the limit")


@pytest_twisted.ensureDeferred
async def test_clean_crawl_passes_every_monitor(make_fault_site, fault_proxy, pg_dsn,
                                                tmp_path) -> None:
    Recorder.outcomes = {}
    site = make_fault_site(pages=3, items_per_page=10)
    result = await run_crawl(SiteSpider, settings(pg_dsn, new_table(pg_dsn), tmp_path,
                                                  fault_proxy.url),
                             timeout=60, start_url=site.start_url)
    assert result.finished and sorted(result.keys()) == site.item_keys()
    assert Recorder.outcomes == dict.fromkeys(MONITORS, "OK"), Recorder.outcomes


class FaultySpider(SiteSpider):
    """Plants two faults: an item whose dead-letter write fails, and a leaked proxy lease."""

    leaked: Any = None

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        yield from super().parse_item(response, **kwargs)
        if response.url.endswith("/k00002"):
            yield {"key": None, "url": response.url}  # bad item -> dead-letter store
            pool = next(p for p in context_for(self.crawler).registry.pools()
                        if p.snapshot().kind == "proxy")
            FaultySpider.leaked = pool.try_acquire("planted-leak", ttl=600)  # never released


@pytest_twisted.ensureDeferred
async def test_planted_faults_fail_their_monitors(make_fault_site, fault_proxy, pg_dsn,
                                                  tmp_path) -> None:
    Recorder.outcomes, FaultySpider.leaked = {}, None
    site = make_fault_site(pages=1, items_per_page=6)
    site.add_fault("/item/k00004", Fault.hang())
    site.add_fault("/item/k00005", Fault.hang())
    blocked = tmp_path / "not-a-file"
    blocked.mkdir()  # the dead-letter store cannot append to a directory
    extra = {"ANTIDEADLOCK_PG_DEADLETTER_PATH": str(blocked),
             "ANTIDEADLOCK_WATCHDOG_WINDOW": 1.5, "ANTIDEADLOCK_RECOVERY_GRACE": 30.0,
             "ANTIDEADLOCK_RECOVERY_MAX_REQUEUES": 0, "ANTIDEADLOCK_DEADLINE_INITIAL": 60.0,
             "ANTIDEADLOCK_DEADLINE_MAX": 60.0, "ANTIDEADLOCK_MONITOR_QUARANTINE_LIMIT": 1,
             "ANTIDEADLOCK_PROXY_CAPACITY": 16}
    result = await run_crawl(FaultySpider, settings(pg_dsn, new_table(pg_dsn), tmp_path,
                                                    fault_proxy.url, **extra),
                             timeout=90, start_url=site.start_url)
    assert result.finished and FaultySpider.leaked is not None
    assert result.stats["antideadlock/watchdog/quarantined"] == 2
    assert result.stats["antideadlock/pg/deadletter_errors"] == 1
    assert Recorder.outcomes == dict.fromkeys(MONITORS, "FAIL"), Recorder.outcomes
