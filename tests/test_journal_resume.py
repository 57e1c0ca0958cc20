"""SIGKILL a real crawl mid-run and resume it: the journal loses nothing, plain JOBDIR does.

Each crawl runs in a child process (``run_crawl_subprocess``) against a real FaultSite;
items are fsynced per item by the runner, so "stored" is what the file holds.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from scrapy_antideadlock.primitives.journal import Journal
from scrapy_antideadlock.testing import FaultSite, Latency, run_crawl_subprocess

SPIDER = "scrapy_antideadlock.testing.spiders:SiteSpider"
PAGES, PER_PAGE = 30, 10  # 330 requests, 300 items


def journal_settings(directory: Path, **extra: Any) -> dict[str, Any]:
    return {
        "ANTIDEADLOCK_JOURNAL_ENABLED": True,
        "ANTIDEADLOCK_JOURNAL_DIR": str(directory),
        "EXTENSIONS": {"scrapy_antideadlock.journal.RequestJournal": 0},
        "SPIDER_MIDDLEWARES": {"scrapy_antideadlock.origin.ItemOriginMiddleware": 10},
        "CONCURRENT_REQUESTS": 8,
        **extra,
    }


@pytest.fixture
def site() -> Any:
    with FaultSite(pages=PAGES, items_per_page=PER_PAGE, latency=Latency.fixed(0.05)) as s:
        yield s


def kill_after(proc: Any, items: int, timeout: float = 40.0) -> int:
    started = time.monotonic()
    while len(proc.items()) < items:
        if proc.returncode is not None:
            raise AssertionError(f"crawl ended before the kill:\n{proc.log_tail()}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {items} items after {timeout}s:\n{proc.log_tail()}")
        time.sleep(0.02)
    proc.kill(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    return len(proc.items())


def by_key(*procs: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for proc in procs:
        for item in proc.items():
            out[item["key"]] = item
    return out


def test_sigkill_resume_with_journal_loses_nothing(site, tmp_path):
    # a small compaction threshold: the journal is rewritten several times mid-crawl; a
    # short flush window: the kill loses at most its records, so the re-crawl bound below
    # stays "in-flight work" (test_elision_in_a_crawl_... kills with the default window)
    settings = journal_settings(tmp_path / "journal",
                                ANTIDEADLOCK_JOURNAL_COMPACT_MIN_BYTES=8_000,
                                ANTIDEADLOCK_JOURNAL_FLUSH_INTERVAL=0.01)
    kwargs = {"start_url": site.start_url}
    first = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run1.jsonl",
                                 spider_kwargs=kwargs)
    killed_at = kill_after(first, 100)
    assert killed_at < PAGES * PER_PAGE
    pending = len(Journal(tmp_path / "journal")._read().pending)
    assert pending > 0  # the kill left work in flight / queued

    second = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run2.jsonl",
                                  spider_kwargs=kwargs)
    assert second.wait(60) == 0, second.log_tail()
    stats = second.stats()
    assert stats is not None and stats["_close_reason"] == "finished"
    assert stats["antideadlock/journal/pending_at_start"] == pending
    assert stats["antideadlock/journal/replayed"] == pending
    assert stats["antideadlock/journal/compactions"] >= 1

    expected = {key: {**site.item(key), "url": site.url(f"/item/{key}")}
                for key in site.expected_keys()}
    assert by_key(first, second) == expected  # every item, with the same content
    # at-least-once, and in practice close to exactly once: only in-flight work repeats
    total = len(first.items()) + len(second.items())
    assert total - len(expected) <= 8 + 2, total
    # the finished job resets the journal: nothing pending, nothing remembered
    assert Journal(tmp_path / "journal")._read().pending == {}


@pytest.mark.parametrize("journal", [False, True], ids=["plain_jobdir", "jobdir_and_journal"])
def test_sigkill_resume_with_plain_jobdir_loses_requests(tmp_path, journal):
    """600 items: enough fingerprints (> 8 KiB) that JOBDIR's requests.seen got flushed
    before the kill, while its queue index did not — the resumed run filters its own
    start URL and "finishes" at once. The journal beside the same JOBDIR loses nothing."""
    settings: dict[str, Any] = {"JOBDIR": str(tmp_path / "jobdir"), "CONCURRENT_REQUESTS": 8}
    if journal:
        settings = journal_settings(tmp_path / "journal", **settings)
    with FaultSite(pages=30, items_per_page=20, latency=Latency.fixed(0.05)) as site:
        kwargs = {"start_url": site.start_url}
        first = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run1.jsonl",
                                     spider_kwargs=kwargs)
        kill_after(first, 200)
        second = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run2.jsonl",
                                      spider_kwargs=kwargs)
        assert second.wait(60) == 0, second.log_tail()
        expected = set(site.expected_keys())
    assert second.stats()["_close_reason"] == "finished"  # it says finished ...
    missing = expected - set(by_key(first, second))
    if journal:
        assert not missing
        # the crash made JOBDIR's queue/seen-set unreliable: set aside, the journal replays
        assert second.stats()["antideadlock/journal/jobdir_reset"] == 2
    else:
        assert len(missing) > 100, len(missing)  # ... yet lost many items


def test_journal_beside_jobdir_clean_close_then_crash(site, tmp_path):
    """Clean close (item count) → JOBDIR restores its queue, the journal only the rest;
    then a SIGKILL of the resumed run → the journal still recovers everything."""
    settings = journal_settings(tmp_path / "journal", JOBDIR=str(tmp_path / "jobdir"))
    kwargs = {"start_url": site.start_url}
    first = run_crawl_subprocess(SPIDER, settings | {"CLOSESPIDER_ITEMCOUNT": 60},
                                 items_path=tmp_path / "run1.jsonl", spider_kwargs=kwargs)
    assert first.wait(60) == 1, first.log_tail()  # closed, not finished
    assert first.stats()["_close_reason"] == "closespider_itemcount"
    marker = [json.loads(line) for line in
              (tmp_path / "journal" / "journal.jsonl").read_text().splitlines()][-1]
    assert marker["t"] == "m" and marker["jobdir"] and marker["queued"]

    second = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run2.jsonl",
                                  spider_kwargs=kwargs)
    killed_at = kill_after(second, 60)
    assert killed_at >= 60
    third = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run3.jsonl",
                                 spider_kwargs=kwargs)
    assert third.wait(60) == 0, third.log_tail()
    assert sorted(by_key(first, second, third)) == sorted(site.expected_keys())
    assert "left to JOBDIR" in second.log_path.read_text()  # clean close: JOBDIR restores
    assert third.stats()["antideadlock/journal/jobdir_reset"] >= 1  # crash: set aside


def test_elision_in_a_crawl_then_sigkill_with_the_default_window_loses_nothing(site, tmp_path):
    """Most requests of a fault-free crawl are scheduled and done within one flush window:
    their "scheduled" line is never written. A SIGKILL with the default window (0.25 s)
    then loses at most a window of records, and the resume still stores every item."""
    settings = journal_settings(tmp_path / "journal")
    kwargs = {"start_url": site.start_url}
    first = run_crawl_subprocess(SPIDER, settings | {"CLOSESPIDER_ITEMCOUNT": 100},
                                 items_path=tmp_path / "run1.jsonl", spider_kwargs=kwargs)
    assert first.wait(60) == 1, first.log_tail()
    stats = first.stats()
    assert stats["_close_reason"] == "closespider_itemcount"
    scheduled, elided = (stats[f"antideadlock/journal/{n}"] for n in ("scheduled", "elided"))
    records = [json.loads(line) for line in
               (tmp_path / "journal" / "journal.jsonl").read_text().splitlines()]
    written = sum(record["t"] == "s" for record in records)
    assert elided > 0 and written == scheduled - elided < scheduled
    assert sum(record["t"] == "d" for record in records) == stats["antideadlock/journal/done"]

    second = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run2.jsonl",
                                  spider_kwargs=kwargs)
    kill_after(second, 80)
    third = run_crawl_subprocess(SPIDER, settings, items_path=tmp_path / "run3.jsonl",
                                 spider_kwargs=kwargs)
    assert third.wait(60) == 0, third.log_tail()
    assert third.stats()["_close_reason"] == "finished"
    expected = {key: {**site.item(key), "url": site.url(f"/item/{key}")}
                for key in site.expected_keys()}
    assert by_key(first, second, third) == expected
