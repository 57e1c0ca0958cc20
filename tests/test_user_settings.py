"""The user's explicit settings win: the pack never makes a working crawl worse.

Every crawl runs with the ADDONS line against the real fault site, bounded in time.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from scrapy_antideadlock.testing import Fault, Latency, SiteSpider, run_crawl

ADDON = {"ADDONS": {"scrapy_antideadlock.Addon": 0}}


class SlowApiSpider(SiteSpider):
    """A plain spider; how the user states their timeout is chosen per test."""

    name = "slow_api"
    how = "setting"
    value = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.how == "attribute":
            self.download_timeout = self.value

    def request_meta(self, kind: str) -> dict[str, Any]:
        meta = super().request_meta(kind)
        if self.how == "meta":
            meta["download_timeout"] = self.value
        return meta


async def _slow_api_crawl(make_fault_site: Any, how: str, answer: float, user: float,
                          extra: dict[str, Any], timeout: float) -> Any:
    site = make_fault_site(pages=1, items_per_page=8)
    site.add_fault("/item/*", Fault.slow_headers(answer))
    spider = type("Spider", (SlowApiSpider,), {"how": how, "value": user})
    settings = {**ADDON, **extra}
    if how == "setting":
        settings["DOWNLOAD_TIMEOUT"] = user
    result = await run_crawl(spider, settings, timeout=timeout, start_url=site.start_url)
    assert result.finished, result.diagnostics
    assert sorted(result.keys()) == site.item_keys(), result.crawler.spider.failures
    stats = result.stats
    assert stats.get("antideadlock/deadline/exceeded", 0) == 0
    assert stats.get("antideadlock/watchdog/stalls", 0) == 0  # slow, not stuck
    assert stats.get("antideadlock/watchdog/cancelled", 0) == 0
    assert stats["antideadlock/deadline/user_timeout"] >= 9
    return result


@pytest.mark.parametrize("how", ["setting", "attribute", "meta"])
@pytest_twisted.ensureDeferred
async def test_user_timeout_is_the_ceiling_not_deadline_max(make_fault_site, how: str) -> None:
    # Scaled: pages answer in 3 s, the user allows 15 s, DEADLINE_MAX is 1 s, and the
    # watchdog's first window is 1 s: a download inside its deadline is no stall either.
    await _slow_api_crawl(make_fault_site, how, answer=3.0, user=15.0,
                          extra={"ANTIDEADLOCK_DEADLINE_MAX": 1.0,
                                 "ANTIDEADLOCK_DEADLINE_MIN": 0.5,
                                 "ANTIDEADLOCK_WATCHDOG_WINDOW_INITIAL": 1.0,
                                 "ANTIDEADLOCK_WATCHDOG_WINDOW_MIN": 1.0,
                                 "ANTIDEADLOCK_WATCHDOG_WINDOW_BUFFER": 0.5}, timeout=60)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_70s_api_with_download_timeout_300_at_true_defaults(make_fault_site) -> None:
    # The reported case, unscaled: plain Scrapy stores 8/8; so must the pack.
    await _slow_api_crawl(make_fault_site, "setting", answer=70.0, user=300.0, extra={},
                          timeout=200)


@pytest_twisted.ensureDeferred
async def test_user_timeout_ceiling_holds_for_the_last_retry(make_fault_site) -> None:
    # After warm-up the adaptive deadline is ~1 s; one page answers in 4 s, within the
    # user's 10 s. With RETRY_TIMES=0 its only attempt runs under the full 10 s.
    # (Scrapy's default queue is LIFO: k00001 is among the last pages fetched.)
    site = make_fault_site(pages=2, items_per_page=12)
    site.add_fault("/item/k00001", Fault.slow_headers(4.0))
    settings = {**ADDON, "DOWNLOAD_TIMEOUT": 10.0, "RETRY_TIMES": 0,
                "CONCURRENT_REQUESTS_PER_DOMAIN": 2, "ANTIDEADLOCK_DEADLINE_MIN_SAMPLES": 5,
                "ANTIDEADLOCK_DEADLINE_MIN": 0.5}
    result = await run_crawl(SiteSpider, settings, timeout=60, start_url=site.start_url)
    assert result.finished, result.diagnostics
    assert sorted(result.keys()) == site.item_keys(), result.crawler.spider.failures


@pytest.mark.parametrize("retry_times", [None, 2])
@pytest_twisted.ensureDeferred
async def test_site_that_slows_down_mid_crawl_loses_nothing(make_fault_site,
                                                            retry_times: int | None) -> None:
    # Scaled from 0.1 s -> 20 s: 0.02 s -> 4 s after 25 items, with RETRY_TIMES left at
    # Scrapy's default or set by the user (2, the same value). The deadline learned on
    # the fast pages is ~0.3 s; the slowed site cuts most transfers, so the deadline
    # grows (censored samples) instead of spending the user's retries.
    site = make_fault_site(pages=4, items_per_page=15, latency=Latency.fixed(0.02))
    served: set[str] = set()

    def slowed(path: str) -> bool:  # the 26th distinct detail page on answers in 4 s
        if not path.startswith("/item/"):
            return False
        if len(served) < 25:
            served.add(path)
        return path not in served

    site.add_fault(slowed, Fault.slow_headers(4.0))

    settings = {**ADDON, "ANTIDEADLOCK_DEADLINE_MIN": 0.25, "ANTIDEADLOCK_DEADLINE_BUFFER": 0.2,
                "ANTIDEADLOCK_DEADLINE_MIN_SAMPLES": 10}
    if retry_times is not None:
        settings["RETRY_TIMES"] = retry_times
    result = await run_crawl(SiteSpider, settings, timeout=120, start_url=site.start_url)
    assert result.finished, result.diagnostics
    assert sorted(result.keys()) == site.item_keys(), result.crawler.spider.failures
    stats = result.stats
    assert stats["antideadlock/deadline/exceeded/transfer"] >= 1  # the slowdown was felt
    assert stats.get("antideadlock/deadline/gave_up", 0) == 0
    assert stats["antideadlock/deadline/timeout/127.0.0.1"] > 4.0  # grew past the new latency


@pytest_twisted.ensureDeferred
async def test_retry_enabled_false_means_no_deadline_retry(make_fault_site) -> None:
    # The user turned retries off: a hanging page fails once, at the user's timeout.
    site = make_fault_site(pages=1, items_per_page=3)
    site.add_fault("/item/k00001", Fault.hang())
    settings = {**ADDON, "RETRY_ENABLED": False, "DOWNLOAD_TIMEOUT": 2.0}
    result = await run_crawl(SiteSpider, settings, timeout=30, start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == ["k00000", "k00002"]
    assert result.crawler.spider.failures == [(site.url("/item/k00001"), "DeadlineExceeded")]
    assert site.hits["/item/k00001"] == 1
    assert "antideadlock/deadline/retries" not in result.stats
