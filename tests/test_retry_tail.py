"""Deadline retries: prompt, lossless at the defaults, within the user's own RETRY_TIMES.

Every crawl runs with the ADDONS line against the real fault site, bounded in time;
deadlines are scaled down (DEADLINE_MIN 0.5 s) so the hangs cost little.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest_twisted

from scrapy_antideadlock.downloader import guard_for
from scrapy_antideadlock.testing import Fault, Latency, SiteSpider, run_crawl

FAST = {
    "ADDONS": {"scrapy_antideadlock.Addon": 0},
    "ANTIDEADLOCK_DEADLINE_MIN": 0.5, "ANTIDEADLOCK_DEADLINE_INITIAL": 1.0,
    "ANTIDEADLOCK_DEADLINE_MIN_SAMPLES": 5, "ANTIDEADLOCK_WATCHDOG_ENABLED": False,
    "CONCURRENT_REQUESTS": 8,
}


@pytest_twisted.ensureDeferred
async def test_a_hang_storm_loses_no_reachable_item(make_fault_site: Any) -> None:
    # 30 % of detail-page requests hang for ever, drawn per request: with only
    # RETRY_TIMES (2) for them, about 1 item in 40 would hang three times and be lost.
    site = make_fault_site(pages=2, items_per_page=30, latency=Latency.fixed(0.01))
    site.add_fault("/item/*", Fault.hang(), rate=0.3, per="request")
    result = await run_crawl(SiteSpider, FAST, timeout=120, start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == sorted(site.item_keys())
    stats = result.stats
    # the storm really happened: hung transfers were cut or hedged
    assert (stats.get("antideadlock/deadline/exceeded", 0)
            + stats.get("antideadlock/deadline/hedges", 0)) >= 10
    assert stats.get("antideadlock/deadline/gave_up", 0) == 0


@pytest_twisted.ensureDeferred
async def test_the_users_retry_times_bounds_deadline_retries(make_fault_site: Any) -> None:
    # One page hangs on every attempt on an otherwise healthy slot; the user allows one
    # retry: two attempts (each may also be hedged once), then the request is given up
    # (and reported).
    site = make_fault_site(pages=1, items_per_page=30, latency=Latency.fixed(0.01))
    site.add_fault("/item/k00007", Fault.hang())
    result = await run_crawl(SiteSpider, {**FAST, "RETRY_TIMES": 1}, timeout=60,
                             start_url=site.start_url)
    assert result.finished
    stats = result.stats
    assert stats["retry/count"] == 1
    # plus a free retry when the slot's T has since outgrown the cut attempt's deadline by
    # half (a busy machine's loop lag raises p99 early in the crawl)
    attempts = stats["antideadlock/deadline/exceeded"]
    assert attempts == 2 + stats.get("antideadlock/deadline/own_retries", 0) <= 3
    assert site.hits["/item/k00007"] <= 2 * attempts
    assert set(result.keys()) == set(site.item_keys()) - {"k00007"}  # it never answers
    assert stats["antideadlock/deadline/gave_up"] == 1
    assert stats["retry/max_reached"] == 1


@pytest_twisted.ensureDeferred
async def test_a_transfer_hung_past_p99_is_hedged_and_the_copy_wins(make_fault_site: Any) -> None:
    # The first request for one page hangs for ever, its second answers: once the slot
    # is warm, the hung transfer gets a second copy at about p99 x LEND_AFTER, long
    # before its (deliberately long) deadline, and the copy's answer is the item
    # (DEADLINE_HEDGE is on by default).
    site = make_fault_site(pages=1, items_per_page=30, latency=Latency.fixed(0.01))
    site.add_fault("/item/k00025", Fault.hang(), times=1)
    result = await run_crawl(SiteSpider, {**FAST, "ANTIDEADLOCK_DEADLINE_MIN": 30.0,
                                          "CONCURRENT_REQUESTS": 2}, timeout=60,
                             start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == sorted(site.item_keys())
    stats = result.stats
    assert stats["antideadlock/deadline/hedges"] >= 1
    assert stats["antideadlock/deadline/hedge_wins"] >= 1
    assert stats.get("antideadlock/deadline/exceeded", 0) == 0  # never waited for T
    assert site.hits["/item/k00025"] == 2


@pytest_twisted.ensureDeferred
async def test_a_slot_with_a_download_delay_is_not_hedged(make_fault_site: Any) -> None:
    # DOWNLOAD_DELAY paces the site's requests: a hedge would not wait its turn. The hung
    # transfer is cut at its deadline and retried instead.
    site = make_fault_site(pages=1, items_per_page=30, latency=Latency.fixed(0.01))
    site.add_fault("/item/k00025", Fault.hang(), times=1)
    result = await run_crawl(SiteSpider, {**FAST, "DOWNLOAD_DELAY": 0.02,
                                          "CONCURRENT_REQUESTS": 2}, timeout=60,
                             start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == sorted(site.item_keys())
    stats = result.stats
    assert stats.get("antideadlock/deadline/hedges", 0) == 0
    assert stats["antideadlock/deadline/exceeded"] == 1
    assert site.hits["/item/k00025"] == 2


class CrawlerSpider(SiteSpider):
    """Lets the test find the running crawler."""

    last: CrawlerSpider | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        CrawlerSpider.last = self


@pytest_twisted.ensureDeferred
async def test_hedges_and_lent_slots_share_one_bound(make_fault_site: Any) -> None:
    # 8 of 30 detail pages hang on every attempt, CONCURRENT_REQUESTS=2: every hung
    # transfer is overdue and wants a lent slot and a hedge. Both together stay within
    # 2 x (2 - 1) = 2, so at most 4 transfers (hedges included) are ever in flight.
    site = make_fault_site(pages=1, items_per_page=30, latency=Latency.fixed(0.01))
    site.add_fault("/item/k0001[0-7]", Fault.hang())
    seen: list[int] = []

    async def sample() -> None:
        while True:
            spider = CrawlerSpider.last
            crawler = getattr(spider, "crawler", None)
            engine = getattr(crawler, "engine", None)
            downloader = getattr(engine, "downloader", None)
            if downloader is not None:
                guard = guard_for(crawler)
                seen.append(len(downloader.active) + guard.hedging)
            await asyncio.sleep(0.01)

    CrawlerSpider.last = None
    sampler = asyncio.ensure_future(sample())
    result = await run_crawl(CrawlerSpider, {**FAST, "CONCURRENT_REQUESTS": 2,
                                             "RETRY_TIMES": 0}, timeout=60,
                             start_url=site.start_url)
    sampler.cancel()
    assert result.finished
    assert set(result.keys()) == set(site.item_keys()) - {f"k000{i}" for i in range(10, 18)}
    stats = result.stats
    assert stats["antideadlock/deadline/hedges"] >= 1
    assert stats["antideadlock/deadline/lent"] >= 1
    assert seen and max(seen) <= 4

@pytest_twisted.ensureDeferred
async def test_a_hang_among_a_cold_slots_first_requests_is_cut_once_the_slot_is_warm(
        make_fault_site: Any) -> None:
    # The very first detail-page request hangs for ever; it was sent before the slot had
    # MIN_SAMPLES successes, so it got DEADLINE_INITIAL (20 s here). Once the slot is
    # warm its deadline becomes the slot's T from its transfer's start (0.5 s): the crawl
    # ends in a few seconds, not at INITIAL.
    site = make_fault_site(pages=1, items_per_page=60, latency=Latency.fixed(0.01))
    site.add_fault("/item/*", Fault.hang(), times=1)
    result = await run_crawl(SiteSpider, {**FAST, "ANTIDEADLOCK_DEADLINE_INITIAL": 20.0,
                                          "ANTIDEADLOCK_DEADLINE_HEDGE": False}, timeout=60,
                             start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == sorted(site.item_keys())
    assert result.stats["antideadlock/deadline/tightened"] >= 1
    assert result.stats["antideadlock/deadline/exceeded"] == 1
    assert result.elapsed < 10.0  # INITIAL (20 s) would have held it


@pytest_twisted.ensureDeferred
async def test_hedged_transfers_do_not_inflate_the_slots_p99(make_fault_site: Any) -> None:
    # 20 % of detail-page requests hang, on a site answering in 10 ms. A hedge that wins
    # records its own latency (about 10 ms); timed from the hung first copy's start it
    # would record the overdue threshold (at least LEND_MIN, 0.25 s) and up, and p99,
    # threshold and T would climb together (p99 4.6 s, T 18 s in this crawl).
    site = make_fault_site(pages=4, items_per_page=50, latency=Latency.fixed(0.01))
    site.add_fault("/item/*", Fault.hang(), rate=0.2, per="request")
    result = await run_crawl(SiteSpider, {**FAST, "ANTIDEADLOCK_DEADLINE_HEDGE": True},
                             timeout=120, start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == sorted(site.item_keys())
    stats = result.stats
    assert stats["antideadlock/deadline/hedge_wins"] >= 10
    # about 0.01 s plus loop lag on a busy machine (0.3-0.5 s); climbing, 4-5 s here
    assert stats["antideadlock/deadline/p99/127.0.0.1"] < 1.5



class TimeoutsSpider(SiteSpider):
    """Remembers the deadline each successful attempt ran under (download_timeout)."""

    given: list[float] = []

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        self.given.append(response.meta["download_timeout"])
        yield from super().parse_item(response, **kwargs)


@pytest_twisted.ensureDeferred
async def test_the_end_of_a_hang_storm_does_not_stretch_the_deadline(
        make_fault_site: Any) -> None:
    # 30 % of detail-page requests hang, no hedging: the crawl ends with only hung
    # requests and their retries in flight, about one cut per success. That is no
    # slowed-down site: the last attempts keep the slot's T (about 1-2.5 s here) instead
    # of T x 3 + 1 and more (8 s and up, doubling per retry).
    site = make_fault_site(pages=3, items_per_page=50, latency=Latency.fixed(0.01))
    site.add_fault("/item/*", Fault.hang(), rate=0.3, per="request")
    TimeoutsSpider.given = []
    result = await run_crawl(TimeoutsSpider, {**FAST, "ANTIDEADLOCK_DEADLINE_HEDGE": False},
                             timeout=120, start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == sorted(site.item_keys())
    assert result.stats["antideadlock/deadline/exceeded"] >= 20
    warm = TimeoutsSpider.given[20:]  # after MIN_SAMPLES: the adaptive T (+ 0.5 s margin)
    assert max(warm) < 6.0, sorted(warm)[-10:]
