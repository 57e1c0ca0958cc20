"""One crawl at the true defaults (only the ADDONS line), in a child process.

A token middleware of the project starts waiting for ever on every request after the
20th (a refresh whose Deferred never fires). The pack must end the crawl within
window + grace + close deadline, with every request not completed either pending in the
journal that it keeps by default under the project's ``.scrapy/`` folder (then the next
run, the middleware fixed, completes every item) or, once it ran out of requeues,
quarantined with its reason beside the journal.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import scrapy
from twisted.internet.defer import Deferred

from scrapy_antideadlock.primitives.journal import read_pending
from scrapy_antideadlock.testing import FaultSite, Latency, SiteSpider, run_crawl_subprocess

HERE = "test_lifecycle_defaults"
WINDOW_MAX, GRACE, CLOSE_DEADLINE = 60.0, 30.0, 30.0  # settings.py defaults
SLACK = 20.0


class TokenRefreshMiddleware:
    """After 20 requests the token "expires" and its refresh Deferred never fires."""

    def __init__(self) -> None:
        self.seen = 0

    def process_request(self, request: scrapy.Request) -> Deferred | None:
        self.seen += 1
        if self.seen > 20 and os.environ.get("SCENARIO_TOKEN_BROKEN") == "1":
            return Deferred()
        return None


@pytest.mark.slow
def test_true_defaults_end_bounded_and_resume_completes(tmp_path: Any) -> None:
    feed = tmp_path / "feed.jsonl"
    settings = {"ADDONS": {"scrapy_antideadlock.Addon": 0},
                "DOWNLOADER_MIDDLEWARES": {f"{HERE}.TokenRefreshMiddleware": 543},
                "FEEDS": {str(feed): {"format": "jsonlines"}}}
    with FaultSite(pages=6, items_per_page=10, latency=Latency.fixed(0.01)) as site:
        kwargs = {"start_url": site.start_url}
        started = time.monotonic()
        first = run_crawl_subprocess(SiteSpider, settings, items_path=tmp_path / "run1.jsonl",
                                     spider_kwargs=kwargs, cwd=tmp_path,
                                     env={**os.environ, "SCENARIO_TOKEN_BROKEN": "1"})
        code = first.wait(WINDOW_MAX + GRACE + CLOSE_DEADLINE + SLACK)
        elapsed = time.monotonic() - started
        log = first.log_tail(400)
        assert code in (0, 1, 75), log  # closed (reason not "finished"), or exit 75
        assert elapsed < WINDOW_MAX + GRACE + CLOSE_DEADLINE + SLACK, elapsed
        assert "antideadlock lifecycle: preempted" in log
        journal = tmp_path / ".scrapy" / "antideadlock" / SiteSpider.name
        pending = read_pending(journal)
        done = {item["key"] for item in first.items()}
        assert len(done) < len(site.item_keys())
        page_of = {key: n for n in range(site.pages) for key in site.keys_of_page(n)}
        quarantine = journal / "quarantine.jsonl"
        quarantined = {json.loads(line)["url"] for line in quarantine.read_text().splitlines()} \
            if quarantine.exists() else set()
        if code != 75:
            stats = first.stats()
            assert stats["item_scraped_count"] == len(done)  # the stats dump was written
            fed = {json.loads(line)["key"] for line in feed.read_text().splitlines()}
            assert fed == done  # and the feed
            if not pending:  # every stuck request ran out of requeues: all quarantined
                # a listing page links to the next one: pages past a quarantined listing
                # were never discovered, and are accounted for by it
                cut = min((n for n in range(site.pages)
                           if site.url(f"/list/{n}") in quarantined), default=site.pages)
                unaccounted = [key for key in set(site.item_keys()) - done
                               if site.url(f"/item/{key}") not in quarantined
                               and page_of[key] < cut]
                assert quarantined and unaccounted == [], unaccounted
                return
            assert stats["_close_reason"].startswith("antideadlock_"), stats["_close_reason"]
        assert pending

        second = run_crawl_subprocess(SiteSpider, settings, items_path=tmp_path / "run2.jsonl",
                                      spider_kwargs=kwargs, cwd=tmp_path)
        assert second.wait(120) == 0, second.log_tail()
    keys = done | {item["key"] for item in second.items()}
    assert sorted(keys) == sorted(site.item_keys())
    assert second.stats()["antideadlock/journal/replayed"] == len(pending)
