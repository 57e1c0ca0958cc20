"""Hard exits and kills on real subprocess crawls; each resume completes from the journal.

- a pipeline whose ``process_item`` never returns and ignores cancellation: the preempted
  close still hangs, the close deadline fires, the process exits with EXIT_CLOSE_TIMEOUT,
  the journal holds the unfinished requests, and a resume (with a fixed pipeline) stores
  them;
- a blocked event loop: SIGKILL during the episode, or the recovery thread's own exit
  with EXIT_BLOCKED_LOOP; the resume completes the crawl.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from scrapy_antideadlock.primitives.deadletter import read_dead_letters
from scrapy_antideadlock.primitives.journal import iter_urls, read_pending
from scrapy_antideadlock.recovery import EXIT_BLOCKED_LOOP, EXIT_CLOSE_TIMEOUT
from scrapy_antideadlock.testing import FaultSite, Latency, SiteSpider, run_crawl_subprocess

HERE = "test_recovery_exit"


class HangingPipeline:
    """``process_item`` never returns for the keys in ANTIDEADLOCK_TEST_HANG_KEYS."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)

    @classmethod
    def from_crawler(cls, crawler: Any) -> HangingPipeline:
        return cls(crawler.settings.getlist("ANTIDEADLOCK_TEST_HANG_KEYS"))

    async def process_item(self, item: Any) -> Any:
        if item["key"] in self.keys:
            await asyncio.get_running_loop().create_future()  # never done
        return item


class StubbornPipeline(HangingPipeline):
    """Like HangingPipeline, but swallows every cancellation: nothing can preempt it."""

    async def process_item(self, item: Any) -> Any:
        while item["key"] in self.keys:
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                continue
        return item


class BlockingSpider(SiteSpider):
    """Blocks the event loop (time.sleep) in the callback of ANTIDEADLOCK_TEST_BLOCK_PATH,
    after touching ANTIDEADLOCK_TEST_BLOCK_MARKER."""

    def parse(self, response: Any, **kwargs: Any) -> Any:
        path = self.settings.get("ANTIDEADLOCK_TEST_BLOCK_PATH")
        if path and response.url.endswith(path):
            Path(self.settings.get("ANTIDEADLOCK_TEST_BLOCK_MARKER")).touch()
            time.sleep(120)
        yield from super().parse(response, **kwargs)


def settings_for(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "ADDONS": {"scrapy_antideadlock.Addon": 0},
        "ANTIDEADLOCK_JOURNAL_ENABLED": True,
        "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path / "journal"),
        "ANTIDEADLOCK_WATCHDOG_WINDOW": 1.5,
        "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0,
        "ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD": 1.0,
        "ANTIDEADLOCK_RECOVERY_LEVEL": "exit",
        "ANTIDEADLOCK_RECOVERY_GRACE": 2.0,
        "ANTIDEADLOCK_RECOVERY_CLOSE_DEADLINE": 3.0,
        "ANTIDEADLOCK_RECOVERY_BLOCKED_LOOP_EXIT_AFTER": 3.0,
        "CONCURRENT_REQUESTS": 8,
        **extra,
    }


@pytest.fixture
def site() -> Any:
    with FaultSite(pages=10, items_per_page=10, latency=Latency.fixed(0.02)) as s:
        yield s


def items_of(*procs: Any) -> dict[str, Any]:
    return {item["key"]: item for proc in procs for item in proc.items()}


def test_stubborn_pipeline_close_deadline_exits_and_resume_stores(site, tmp_path):
    hang = ["k00003", "k00042"]
    settings = settings_for(tmp_path, ITEM_PIPELINES={f"{HERE}.StubbornPipeline": 100})
    kwargs = {"start_url": site.start_url}
    started = time.monotonic()
    first = run_crawl_subprocess(f"{HERE}:SiteSpider_", settings | {
        "ANTIDEADLOCK_TEST_HANG_KEYS": hang}, items_path=tmp_path / "run1.jsonl",
        spider_kwargs=kwargs)
    code = first.wait(60)
    elapsed = time.monotonic() - started
    log = first.log_path.read_text()
    assert code == EXIT_CLOSE_TIMEOUT, log
    # crawl (~1 s) + window 1.5 + grace 2 + close deadline 3, plus start-up and slack
    assert elapsed < 25, elapsed
    assert "closing the spider (antideadlock_" in log  # (Scrapy may be closing already)
    assert first.stats() is None  # the close never got to spider_closed
    report = json.loads((tmp_path / "journal" / "last-exit.json").read_text())
    assert report["exit_code"] == EXIT_CLOSE_TIMEOUT and report["reason"] == "close_timeout"
    assert report["diagnosis"]["class"] in ("unknown", "deadlock")  # items wait on a Future
    assert report["journal_pending"] == 2
    assert sorted(items_of(first)) == sorted(k for k in site.item_keys() if k not in hang)
    pending_urls = iter_urls(read_pending(tmp_path / "journal"))
    assert sorted(pending_urls) == sorted(site.url(f"/item/{key}") for key in hang)

    second = run_crawl_subprocess(f"{HERE}:SiteSpider_", settings,
                                  items_path=tmp_path / "run2.jsonl", spider_kwargs=kwargs)
    assert second.wait(60) == 0, second.log_tail()
    assert sorted(items_of(second)) == sorted(hang)
    assert sorted(items_of(first, second)) == sorted(site.item_keys())
    assert second.stats()["antideadlock/journal/replayed"] == 2


@pytest.mark.parametrize("how", ["sigkill", "self_exit", "self_exit_without_watchdog"])
def test_blocked_loop_then_resume_completes(site, tmp_path, how):
    """Recovery ends a blocked loop from the loop monitor's thread; with the watchdog off
    it makes the crawler's loop monitor itself."""
    marker = tmp_path / "blocked"
    # The loop blocks ~0.1 s into the crawl, inside the journal's first flush window (0.25 s
    # by default): a hard exit writes that window's records from the monitor's thread. A
    # SIGKILL cannot: the window dies with the process (a re-crawl), so for it a short window
    # has the journal hold pending work before the block.
    settings = settings_for(tmp_path, **({"ANTIDEADLOCK_JOURNAL_FLUSH_INTERVAL": 0.01}
                                         if how == "sigkill" else {}))
    if how == "self_exit_without_watchdog":
        settings["ANTIDEADLOCK_WATCHDOG_ENABLED"] = False
    kwargs = {"start_url": site.start_url}
    first = run_crawl_subprocess(f"{HERE}:BlockingSpider", settings | {
        "ANTIDEADLOCK_TEST_BLOCK_PATH": "/list/3",
        "ANTIDEADLOCK_TEST_BLOCK_MARKER": str(marker),
        "ANTIDEADLOCK_RECOVERY_BLOCKED_LOOP_EXIT_AFTER": 60.0 if how == "sigkill" else 3.0,
    }, items_path=tmp_path / "run1.jsonl", spider_kwargs=kwargs)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and first.returncode is None, first.log_tail()
        time.sleep(0.05)
    blocked_at = time.monotonic()
    if how == "sigkill":
        time.sleep(1.5)  # inside the episode (the watchdog saw it after 1 s)
        first.kill(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    else:
        assert first.wait(30) == EXIT_BLOCKED_LOOP, first.log_tail()
        assert 2.5 < time.monotonic() - blocked_at < 15
        assert "event loop blocked" in first.log_tail(400)
        report = json.loads((tmp_path / "journal" / "last-exit.json").read_text())
        assert report["exit_code"] == EXIT_BLOCKED_LOOP
        assert report["diagnosis"]["class"] == "blocked_loop"
        assert "parse" in report["diagnosis"]["where"]  # names the blocking callback
    assert read_pending(tmp_path / "journal")

    second = run_crawl_subprocess(f"{HERE}:BlockingSpider", settings,
                                  items_path=tmp_path / "run2.jsonl", spider_kwargs=kwargs)
    assert second.wait(60) == 0, second.log_tail()
    assert sorted(items_of(first, second)) == sorted(site.item_keys())


SiteSpider_ = SiteSpider  # importable from this module for the subprocess


def test_sigterm_during_a_stuck_pipeline_ends_bounded_with_stats(site, tmp_path):
    # Scrapy's own close (SIGTERM) waits for the stuck items with no timeout; recovery bounds
    # it: the items are preempted (dead-lettered) and the graceful close completes.
    hang = ["k00003", "k00042"]
    settings = settings_for(tmp_path, ITEM_PIPELINES={f"{HERE}.HangingPipeline": 100},
                            ANTIDEADLOCK_WATCHDOG_WINDOW=60.0,
                            ANTIDEADLOCK_RECOVERY_CLOSE_DEADLINE=4.0)
    proc = run_crawl_subprocess(f"{HERE}:SiteSpider_", settings | {
        "ANTIDEADLOCK_TEST_HANG_KEYS": hang}, items_path=tmp_path / "run.jsonl",
        spider_kwargs={"start_url": site.start_url})
    deadline = time.monotonic() + 30
    while len(proc.items()) < 40:  # the crawl is well under way; the two items are stuck
        assert time.monotonic() < deadline and proc.returncode is None, proc.log_tail()
        time.sleep(0.05)
    proc.kill(signal.SIGTERM)
    sent = time.monotonic()
    assert proc.wait(30) in (0, 1), proc.log_tail()
    assert time.monotonic() - sent < 4.0 + 10  # close deadline + slack
    stats = proc.stats()
    assert stats is not None and stats["_close_reason"] == "shutdown"  # the stats dump ran
    dead = read_dead_letters(tmp_path / "journal" / "deadletter.jsonl")
    assert "k00003" in {record["item"]["key"] for record in dead} <= set(hang)
