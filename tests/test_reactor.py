"""Any reactor Scrapy supports works, or the pack refuses loudly at start.

The reactor is per process, so each crawl runs in a subprocess against the real fault
site. Under a non-asyncio reactor the add-on leaves out what needs asyncio (one
WARNING naming TWISTED_REACTOR) and the crawl runs as plain Scrapy would; a component
the user switched on explicitly makes the crawl fail at start instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scrapy_antideadlock.reactor import ASYNCIO_REACTOR
from scrapy_antideadlock.testing import run_crawl_subprocess

SPIDER = "scrapy_antideadlock.testing.spiders:SiteSpider"
ADDON = {"ADDONS": {"scrapy_antideadlock.Addon": 0}}
EPOLL = "twisted.internet.epollreactor.EPollReactor"
SELECT = "twisted.internet.selectreactor.SelectReactor"
GUARD = "scrapy_antideadlock.downloader.GuardedDownloadHandler"


def crawl(tmp_path: Path, site: Any, settings: dict[str, Any]) -> tuple[int, list[Any], str]:
    items = tmp_path / "items.jsonl"
    with run_crawl_subprocess(SPIDER, settings, items_path=items,
                              spider_kwargs={"start_url": site.start_url}) as proc:
        code = proc.wait(120)
        log = proc.log_path.read_text(errors="replace") if proc.log_path else ""
        return code, proc.items(), log


@pytest.mark.parametrize("reactor", [EPOLL, ASYNCIO_REACTOR])
def test_addon_stores_every_item_on_either_reactor(make_fault_site, tmp_path, reactor) -> None:
    site = make_fault_site(pages=20, items_per_page=10)
    code, items, log = crawl(tmp_path, site, {**ADDON, "TWISTED_REACTOR": reactor})
    assert code == 0, log[-3000:]
    assert sorted(i["key"] for i in items) == site.item_keys()  # 200 of 200
    assert "no running event loop" not in log
    refusal = [line for line in log.splitlines() if "need(s) the asyncio reactor" in line]
    if reactor == ASYNCIO_REACTOR:
        assert not refusal
    else:
        assert len(refusal) == 1 and "WARNING" in refusal[0], refusal
        assert f'TWISTED_REACTOR = "{ASYNCIO_REACTOR}"' in refusal[0]


def test_components_configured_by_hand_refuse_and_downloads_pass_through(
        make_fault_site, tmp_path) -> None:
    site = make_fault_site(pages=3, items_per_page=10)
    settings = {
        "TWISTED_REACTOR": SELECT,
        "DOWNLOADER_MIDDLEWARES": {"scrapy_antideadlock.downloader.DeadlineMiddleware": 340},
        "DOWNLOAD_HANDLERS": {"http": GUARD, "https": GUARD},
        "EXTENSIONS": {"scrapy_antideadlock.watchdog.Watchdog": 100},
    }
    code, items, log = crawl(tmp_path, site, settings)
    assert code == 0, log[-3000:]
    assert sorted(i["key"] for i in items) == site.item_keys()
    for name in ("DeadlineMiddleware", "Watchdog"):
        [line] = [ln for ln in log.splitlines() if f"{name} need(s) the asyncio" in ln]
        assert "Disabled" in line and "TWISTED_REACTOR" in line


def test_explicitly_enabled_component_fails_at_start(make_fault_site, tmp_path) -> None:
    site = make_fault_site(pages=1, items_per_page=2)
    settings = {**ADDON, "TWISTED_REACTOR": EPOLL, "ANTIDEADLOCK_PG_DSN":
                "postgresql://nobody:secret@127.0.0.1:1/none",
                "ANTIDEADLOCK_PG_TABLES": {"*": {"table": "items", "key": ["key"]}}}
    code, items, log = crawl(tmp_path, site, settings)
    assert code != 0 and not items
    assert "TWISTED_REACTOR" in log and "ANTIDEADLOCK_PG_DSN" in log
    assert "secret" not in log
    assert site.total_requests == 0  # refused before the first request
