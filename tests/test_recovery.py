"""The escalation ladder on real faults: cancel, requeue, quarantine (in-process crawls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from scrapy_antideadlock.primitives.deadletter import read_dead_letters
from scrapy_antideadlock.primitives.journal import Journal
from scrapy_antideadlock.testing import Fault, FaultSite, Latency, SiteSpider, run_crawl


def ladder_settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """The whole pack through the add-on, with deadlines too long to matter here: the
    watchdog (window 1.5 s) and recovery must do the work."""
    return {
        "ADDONS": {"scrapy_antideadlock.Addon": 0},
        "ANTIDEADLOCK_WATCHDOG_WINDOW": 1.5,
        "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0,
        "ANTIDEADLOCK_DEADLINE_INITIAL": 60.0,
        "ANTIDEADLOCK_DEADLINE_MIN": 60.0,
        "ANTIDEADLOCK_DEADLINE_MAX": 60.0,
        "DOWNLOAD_TIMEOUT": 120,
        "ANTIDEADLOCK_RECOVERY_LEVEL": "close",
        "ANTIDEADLOCK_RECOVERY_MAX_REQUEUES": 2,
        "ANTIDEADLOCK_RECOVERY_GRACE": 30.0,
        "ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE": str(tmp_path / "quarantine.jsonl"),
        "CONCURRENT_REQUESTS": 8,
        **extra,
    }


def read_quarantine(path: Path) -> list[dict[str, Any]]:
    return read_dead_letters(path)


@pytest_twisted.ensureDeferred
async def test_poison_url_is_requeued_then_quarantined(tmp_path):
    site = FaultSite(pages=5, items_per_page=10, latency=Latency.fixed(0.01)).start()
    poison = "/item/k00007"
    site.add_fault(poison, Fault.hang())
    try:
        result = await run_crawl(SiteSpider, ladder_settings(tmp_path), timeout=60,
                                 start_url=site.start_url)
        hits = site.hits[poison]
    finally:
        site.stop()
    assert result.reason == "finished"
    keys = sorted(item["key"] for item in result.items)
    assert keys == sorted(k for k in site.item_keys() if k != "k00007")
    assert 3 <= hits <= 6  # first try + 2 requeues, each maybe hedged once (DEADLINE_HEDGE)
    stats = result.stats
    assert stats["antideadlock/watchdog/cancelled"] == 3
    assert stats["antideadlock/watchdog/requeued"] == 2
    assert stats["antideadlock/watchdog/quarantined"] == 1
    [record] = read_quarantine(tmp_path / "quarantine.jsonl")
    assert record["url"] == site.url(poison)
    assert record["attempts"] == 3
    assert record["class"] == "stalled_io"
    assert "cancelled by recovery" in record["reason"]
    assert result.elapsed < 40


@pytest_twisted.ensureDeferred
async def test_hang_storm_completes_with_every_reachable_item(tmp_path):
    site = FaultSite(pages=10, items_per_page=10, latency=Latency.fixed(0.01), seed=7).start()
    site.add_fault("/item/*", Fault.hang(), rate=0.1, per="url")
    try:
        result = await run_crawl(SiteSpider, ladder_settings(
            tmp_path, ANTIDEADLOCK_RECOVERY_MAX_REQUEUES=1), timeout=90,
            start_url=site.start_url)
        expected = sorted(site.expected_keys())
    finally:
        site.stop()
    hung = 100 - len(expected)
    assert hung == 10  # the storm really happened (10 % of the item pages)
    assert result.reason == "finished"
    assert sorted(item["key"] for item in result.items) == expected
    stats = result.stats
    assert stats["antideadlock/watchdog/quarantined"] == hung
    assert stats["antideadlock/watchdog/requeued"] == hung
    assert len(read_quarantine(tmp_path / "quarantine.jsonl")) == hung


@pytest_twisted.ensureDeferred
async def test_no_progress_after_grace_closes_and_the_journal_resumes(tmp_path):
    """Every item page hangs: cancel/requeue does not help, so after the grace the spider
    closes as antideadlock_stalled_io (the close finishes: in-flight downloads are
    cancelled and kept pending); a second run on the journal stores every item."""
    settings = ladder_settings(
        tmp_path, ANTIDEADLOCK_RECOVERY_GRACE=3.0, ANTIDEADLOCK_RECOVERY_MAX_REQUEUES=10,
        ANTIDEADLOCK_JOURNAL_ENABLED=True, ANTIDEADLOCK_JOURNAL_DIR=str(tmp_path / "j"))
    site = FaultSite(pages=3, items_per_page=10, latency=Latency.fixed(0.01)).start()
    site.add_fault("/item/*", Fault.hang())
    try:
        first = await run_crawl(SiteSpider, settings, timeout=60, start_url=site.start_url)
        pending = len(Journal(tmp_path / "j")._read().pending)
        site.clear_faults()
        second = await run_crawl(SiteSpider, settings, timeout=60, start_url=site.start_url)
    finally:
        site.stop()
    assert first.reason == "antideadlock_stalled_io"
    assert first.items == []
    assert first.stats["antideadlock/watchdog/closes/stalled_io"] == 1
    assert first.stats["antideadlock/watchdog/requeued"] >= 8
    assert first.elapsed < 1.5 + 3.0 + 15
    # hung item pages hold every slot, so the last listing may not have been fetched yet
    assert pending == first.stats["antideadlock/journal/pending_at_close"] >= 21
    assert second.reason == "finished"
    assert second.stats["antideadlock/journal/replayed"] == pending
    assert sorted(item["key"] for item in second.items) == sorted(site.item_keys())
