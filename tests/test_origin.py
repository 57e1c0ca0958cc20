"""Item origin and request completion; journal reporting and setting errors (in-process)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import scrapy
from scrapy.exceptions import NotConfigured
from scrapy.utils.test import get_crawler

from scrapy_antideadlock.identity import request_id
from scrapy_antideadlock.journal import RequestJournal
from scrapy_antideadlock.origin import JOURNAL_KEY, origins_for
from scrapy_antideadlock.primitives.deadletter import read_dead_letters
from scrapy_antideadlock.primitives.journal import Journal
from scrapy_antideadlock.recovery import Recovery
from scrapy_antideadlock.settings import SettingError
from scrapy_antideadlock.testing import FaultSite, Latency, SiteSpider, run_crawl

ORIGIN = {"scrapy_antideadlock.origin.ItemOriginMiddleware": 10}


class MetaCopySpider(SiteSpider):
    """Passes meta=response.meta to children (common, and it copies the parent's ids)."""

    seen: list[tuple[str | None, str | None]] = []
    owners: list[tuple[str, str | None, str]] = []

    def parse(self, response: Any, **kwargs: Any) -> Any:
        request_id(response.request)  # the listing has an owner id: children must not copy it
        for request in super().parse(response, **kwargs):
            yield request.replace(meta=dict(response.meta))

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        MetaCopySpider.seen.append((request_id(response.request), response.meta.get(JOURNAL_KEY)))
        yield from super().parse_item(response, **kwargs)


class OwnerPipeline:
    def __init__(self, crawler: Any) -> None:
        self.tracker = origins_for(crawler)

    @classmethod
    def from_crawler(cls, crawler: Any) -> OwnerPipeline:
        return cls(crawler)

    async def process_item(self, item: Any) -> Any:
        MetaCopySpider.owners.append((item["key"], self.tracker.owner_of(item), item["url"]))
        return item


LIFECYCLE = "scrapy_antideadlock.lifecycle.LifecycleSpiderMiddleware"


@pytest.mark.parametrize("middlewares", [ORIGIN, {**ORIGIN, LIFECYCLE: 5}],
                         ids=["origin_alone", "inside_lifecycle"])
@pytest_twisted.ensureDeferred
async def test_items_know_their_request_and_children_get_their_own_ids(tmp_path, middlewares):
    """Alone, or run inside the lifecycle middleware right before it (the add-on's order:
    one output wrapper per response instead of two), the origin work is the same."""
    MetaCopySpider.seen, MetaCopySpider.owners = [], []
    done: list[str] = []
    with FaultSite(pages=3, items_per_page=5, latency=Latency.fixed(0.01)) as site:
        crawler_holder: dict[str, Any] = {}

        class Spider(MetaCopySpider):
            @classmethod
            def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
                origins_for(crawler).on_request_done(done.append)
                crawler_holder["c"] = crawler
                return super().from_crawler(crawler, *args, **kwargs)

        result = await run_crawl(Spider, {
            "SPIDER_MIDDLEWARES": middlewares,
            "ITEM_PIPELINES": {OwnerPipeline: 100},
            "EXTENSIONS": {RequestJournal: 0},
            "ANTIDEADLOCK_JOURNAL_ENABLED": True,
            "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path / "j"),
        }, timeout=30, start_url=site.start_url)
    assert result.reason == "finished" and len(result.items) == 15
    ids = [rid for rid, _ in MetaCopySpider.seen]
    keys = [key for _, key in MetaCopySpider.seen]
    assert len(set(ids)) == 15 and len(set(keys)) == 15  # not the parent listing's ids
    assert all(owner is not None for _, owner, _ in MetaCopySpider.owners)
    assert len({owner for _, owner, _ in MetaCopySpider.owners}) == 15
    assert set(ids) <= set(done)  # every item request reported done, after its item
    assert len(done) == 3 + 15
    assert result.stats["antideadlock/journal/done"] == 18
    assert origins_for(crawler_holder["c"]).hooked
    enabled = [type(mw).__name__ for mw in crawler_holder["c"].engine.scraper.spidermw.middlewares]
    assert ("ItemOriginMiddleware" in enabled) == (middlewares is ORIGIN)


class LambdaSpider(SiteSpider):
    """Detail requests with a lambda callback: Request.to_dict cannot serialise them."""

    def make_request(self, url: str, callback: Any, kind: str = "list") -> scrapy.Request:
        if kind == "item":
            return scrapy.Request(url, callback=lambda r: self.parse_item(r))
        return super().make_request(url, callback, kind)


@pytest_twisted.ensureDeferred
async def test_unserialisable_requests_are_reported_at_the_next_start(tmp_path):
    settings = {"SPIDER_MIDDLEWARES": ORIGIN, "EXTENSIONS": {RequestJournal: 0},
                "ANTIDEADLOCK_JOURNAL_ENABLED": True,
                "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path / "j"),
                "CLOSESPIDER_ITEMCOUNT": 3, "CONCURRENT_REQUESTS": 2}
    with FaultSite(pages=3, items_per_page=5, latency=Latency.fixed(0.05)) as site:
        first = await run_crawl(LambdaSpider, settings, timeout=30, start_url=site.start_url)
        assert first.reason == "closespider_itemcount"
        assert first.stats["antideadlock/journal/unserialisable"] >= 5
        pending = Journal(tmp_path / "j")._read().pending
        lost = [r for r in pending.values() if r["r"] is None]
        assert lost and all("/item/" in r["u"] for r in lost)
        second = await run_crawl(LambdaSpider, {**settings, "CLOSESPIDER_ITEMCOUNT": 0},
                                 timeout=30, start_url=site.start_url)
    assert second.stats["antideadlock/journal/unreplayable"] == len(lost)
    reported = read_dead_letters(tmp_path / "j" / "unreplayable.jsonl")
    assert sorted(r["url"] for r in reported) == sorted(r["u"] for r in lost)
    assert all("callback" in r["error"] or "Function" in r["error"] or r["error"]
               for r in reported)


def test_bad_settings_fail_at_start_naming_the_setting(tmp_path, monkeypatch):
    with pytest.raises(SettingError, match="ANTIDEADLOCK_RECOVERY_LEVEL"):
        Recovery.from_crawler(get_crawler(settings_dict={
            "ANTIDEADLOCK_RECOVERY_LEVEL": "sometimes"}))
    # no directory configured: per spider under .scrapy/ (like HTTPCACHE_DIR); a second
    # concurrent run of the same spider goes on without a journal instead of failing
    monkeypatch.chdir(tmp_path)
    default = RequestJournal.from_crawler(get_crawler(settings_dict={}))
    assert default.directory.resolve() == (tmp_path / ".scrapy" / "antideadlock"
                                           / "default").resolve()
    with pytest.raises(NotConfigured):
        RequestJournal.from_crawler(get_crawler(settings_dict={}))
    default.journal.close()
    with pytest.raises(SettingError, match="ANTIDEADLOCK_JOURNAL_FSYNC"):
        RequestJournal.from_crawler(get_crawler(settings_dict={
            "ANTIDEADLOCK_JOURNAL_ENABLED": True, "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path),
            "ANTIDEADLOCK_JOURNAL_FSYNC": "sometimes"}))
    journal = RequestJournal.from_crawler(get_crawler(settings_dict={
        "ANTIDEADLOCK_JOURNAL_ENABLED": True, "JOBDIR": str(tmp_path / "job")}))
    assert journal.directory == tmp_path / "job" / "antideadlock-journal"
    from scrapy_antideadlock.primitives.journal import JournalLocked

    with pytest.raises(JournalLocked, match="locked by pid"):  # one crawl per journal
        RequestJournal.from_crawler(get_crawler(settings_dict={
            "ANTIDEADLOCK_JOURNAL_ENABLED": True, "JOBDIR": str(tmp_path / "job"),
            "ANTIDEADLOCK_JOURNAL_LOCK_TIMEOUT": 0.2}))
    journal.journal.close()


def test_journaled_request_is_a_snapshot_and_unjsonable_values_are_pickled(tmp_path):
    """The journal encodes a request at its flush, after downloader middlewares changed the
    live request: what it writes is the request as scheduled; a value JSON cannot hold is
    pickled at the flush (the repair hook), and reads back."""
    crawler = get_crawler(SiteSpider, settings_dict={
        "ANTIDEADLOCK_JOURNAL_ENABLED": True, "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path / "j")})
    crawler.spider = crawler.spidercls.from_crawler(crawler, start_url="http://x/")
    journal = RequestJournal(crawler)
    live = scrapy.Request("http://user:pw@x/1", callback=crawler.spider.parse,
                          cb_kwargs={"page": [1]}, flags=["a"], meta={"tags": {"b", "a"}})
    journal.request_scheduled(live)
    live.cb_kwargs["page"] = [2]  # what a middleware may do before the flush
    live.cb_kwargs["added"] = True
    live.flags.append("changed")
    live.meta["tags"].add("c")  # one level deep: not copied, a set changed in place
    live.meta["extra"] = 1
    assert journal.journal.buffered == 1
    journal.save()  # flushes
    journal.journal.close()
    [record] = Journal(tmp_path / "j")._read().pending.values()
    request = journal._rebuild(record, crawler.spider)
    assert request is not None and request.url == "http://user:pw@x/1"
    assert request.cb_kwargs == {"page": [1]} and request.flags == ["a"]
    assert "extra" not in request.meta and request.meta["tags"] == {"a", "b", "c"}
    assert crawler.stats.get_value("antideadlock/journal/unserialisable") is None


def test_a_request_the_flush_cannot_write_is_journaled_by_url_without_credentials(tmp_path):
    crawler = get_crawler(SiteSpider, settings_dict={
        "ANTIDEADLOCK_JOURNAL_ENABLED": True, "ANTIDEADLOCK_JOURNAL_DIR": str(tmp_path / "j")})
    crawler.spider = crawler.spidercls.from_crawler(crawler, start_url="http://x/")
    journal = RequestJournal(crawler)
    journal.request_scheduled(scrapy.Request("http://user:pw@x/2", callback=crawler.spider.parse,
                                             meta={"fn": lambda: 1}))  # neither JSON nor pickle
    journal.save()
    journal.journal.close()
    [record] = Journal(tmp_path / "j")._read().pending.values()
    assert record["r"] is None and record["u"] == "http://x/2" and "lambda" in record["e"]
    assert crawler.stats.get_value("antideadlock/journal/unserialisable") == 1
