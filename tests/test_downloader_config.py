"""Configuration of the downloader part: add-on wiring, classic form, bad values, and the
guard wrapping the safe Playwright handler (real Chromium)."""

from __future__ import annotations

from typing import Any

import pytest
from scrapy.settings import Settings
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler

from scrapy_antideadlock import Addon
from scrapy_antideadlock import stats as ad_stats
from scrapy_antideadlock.context import context_for
from scrapy_antideadlock.downloader import GUARD_PATH, GuardedDownloadHandler
from scrapy_antideadlock.exceptions import DeadlineExceeded
from scrapy_antideadlock.playwright import PlaywrightCallTimeout
from scrapy_antideadlock.settings import SettingError
from scrapy_antideadlock.testing import Fault, SiteSpider, chromium_launch_options, run_crawl

H11 = "scrapy.core.downloader.handlers.http11.HTTP11DownloadHandler"
H2 = "scrapy.core.downloader.handlers.http2.H2DownloadHandler"
SAFE_PW = "scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler"


def addon_settings(**values: Any) -> Settings:
    settings = Settings(values)
    Addon().update_settings(settings)
    return settings


def test_addon_enables_middleware_before_download_timeout_and_wraps_handlers() -> None:
    settings = addon_settings()
    mws = settings.getwithbase("DOWNLOADER_MIDDLEWARES")
    from scrapy_antideadlock.downloader import DeadlineMiddleware

    assert mws[DeadlineMiddleware] == 340 < 350  # sees the user's download_timeout
    handlers = settings.getwithbase("DOWNLOAD_HANDLERS")
    assert handlers["http"] == handlers["https"] == GUARD_PATH
    assert settings.getdict("ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS") == {"http": H11,
                                                                         "https": H11}
    assert handlers["ftp"] != GUARD_PATH  # only DEADLINE_SCHEMES


def test_addon_wraps_the_users_handlers_and_keeps_disabled_schemes() -> None:
    settings = addon_settings(DOWNLOAD_HANDLERS={"https": H2, "http": None})
    handlers = settings.getwithbase("DOWNLOAD_HANDLERS")
    assert handlers["https"] == GUARD_PATH and handlers["http"] is None
    assert settings.getdict("ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS") == {"https": H2}
    Addon().update_settings(settings)  # idempotent: never wraps the guard in itself
    assert settings.getdict("ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS") == {"https": H2}


def test_addon_respects_switches() -> None:
    settings = addon_settings(ANTIDEADLOCK_DEADLINE_WRAP_HANDLERS=False)
    assert settings.getwithbase("DOWNLOAD_HANDLERS")["http"] == H11
    settings = addon_settings(ANTIDEADLOCK_DEADLINE_ENABLED=False)
    assert settings.getwithbase("DOWNLOAD_HANDLERS")["http"] == H11
    from scrapy_antideadlock.downloader import DeadlineMiddleware

    assert DeadlineMiddleware not in settings.getwithbase("DOWNLOADER_MIDDLEWARES")


@pytest.mark.parametrize(("name", "value"), [
    ("ANTIDEADLOCK_PROXY_LIST", ["user:secret@nohost"]),
    ("ANTIDEADLOCK_PROXY_CAPACITY", 0),
    ("ANTIDEADLOCK_DEADLINE_LEND_MAX_FACTOR", 0.5),
    ("ANTIDEADLOCK_PROXY_FAILURE_CODES", "502,abc"),
])
def test_bad_values_name_the_setting(name: str, value: Any) -> None:
    with pytest.raises(SettingError, match=name) as info:
        addon_settings(**{name: value})
    assert "secret" not in str(info.value)


def test_guard_cannot_wrap_itself() -> None:
    crawler = get_crawler(settings_dict={
        "DOWNLOAD_HANDLERS": {"http": GUARD_PATH},
        "ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS": {"http": GUARD_PATH}})
    with pytest.raises(SettingError, match="ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS"):
        GuardedDownloadHandler.from_crawler(crawler)


def test_proxy_pool_registered_without_credentials() -> None:
    crawler = get_crawler(settings_dict={"ANTIDEADLOCK_PROXY_LIST": {
        "http://u:pw1@127.0.0.1:9001": 3, "http://127.0.0.1:9002": None},
        "ANTIDEADLOCK_PROXY_CAPACITY": 2})
    from scrapy_antideadlock.downloader import guard_for

    guard = guard_for(crawler)
    [snap] = [s for s in context_for(crawler).registry.snapshot() if s.kind == "proxy"]
    assert snap.capacity == 5 and snap.in_use == 0
    assert sorted(snap.extra["members"]) == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert "pw1" not in repr(snap) and "pw1" not in repr(guard.endpoints)
    assert guard.endpoints["http://127.0.0.1:9001"].auth == b"Basic dTpwdzE="


class JsSpider(SiteSpider):
    name = "js"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[tuple[str, BaseException]] = []

    def on_error(self, failure: Any) -> None:
        super().on_error(failure)
        self.errors.append((failure.request.url, failure.value))


@deferred_f_from_coro_f
async def test_guard_wraps_safe_playwright_and_cancels_a_hung_page(chromium: str,
                                                                   make_fault_site: Any) -> None:
    """Through the add-on: the user's Playwright handler is wrapped; a JS page that never
    answers fails at its deadline, its page is closed, the crawl completes."""
    site = make_fault_site(pages=1, items_per_page=4, js_delay_ms=10)
    site.add_fault("/js/item/k00002", Fault.hang())
    result = await run_crawl(JsSpider, {
        "ADDONS": {Addon: 0},
        "ANTIDEADLOCK_WATCHDOG_ENABLED": False,
        "DOWNLOAD_HANDLERS": {"http": SAFE_PW, "https": SAFE_PW},
        "PLAYWRIGHT_LAUNCH_OPTIONS": chromium_launch_options(),
        "PLAYWRIGHT_BROWSER_TYPE": "chromium",
        "ANTIDEADLOCK_DEADLINE_INITIAL": 4.0, "ANTIDEADLOCK_DEADLINE_MIN": 4.0,
        "RETRY_TIMES": 0, "LOG_LEVEL": "WARNING",
    }, timeout=90, start_url=site.js_start_url, js=True)
    assert result.finished
    handlers = result.crawler.settings.getwithbase("DOWNLOAD_HANDLERS")
    assert handlers["http"] == GUARD_PATH
    assert result.crawler.settings.getdict("ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS")[
        "http"] == SAFE_PW
    assert sorted(result.keys()) == ["k00000", "k00001", "k00003"]
    [(url, exc)] = result.crawler.spider.errors
    assert url.endswith("k00002")
    # The same deadline ends it from either side: the guard's tick (DeadlineExceeded), or,
    # when the handler's own bound, min(cap, time left), fires first, the browser call.
    if isinstance(exc, PlaywrightCallTimeout):
        assert exc.timeout <= 4.0 + 0.5, exc
    else:
        assert isinstance(exc, DeadlineExceeded), exc
        assert exc.stage == "transfer" and exc.elapsed < 10
    stats = result.stats
    if getattr(ad_stats, "PW_OPEN_PAGES_AT_CLOSE", None):
        assert stats.get(ad_stats.PW_OPEN_PAGES_AT_CLOSE, 0) == 0
