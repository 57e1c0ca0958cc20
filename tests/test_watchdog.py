"""Watchdog on real crawls: each stall class really happens and is named; no false positives."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import pytest
import pytest_twisted
from scrapy import signals

from scrapy_antideadlock import signals as ad_signals
from scrapy_antideadlock.testing import FaultSite, Latency, SiteSpider, run_crawl
from scrapy_antideadlock.watchdog import Diagnosis, render, watchdog_for

WATCHDOG = {"scrapy_antideadlock.watchdog.Watchdog": 100}


def wd_settings(tmp_path: Any, **extra: Any) -> dict[str, Any]:
    settings = {
        "EXTENSIONS": WATCHDOG,
        "ANTIDEADLOCK_WATCHDOG_WINDOW": 2.0,
        "ANTIDEADLOCK_WATCHDOG_INTERVAL": 0.1,
        "ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD": 2.0,
        "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 1.0,
        "ANTIDEADLOCK_WATCHDOG_DIAGNOSIS_FILE": str(tmp_path / "diagnosis.json"),
        "LOG_LEVEL": "INFO",
    }
    settings.update(extra)
    return settings


def read_diagnoses(tmp_path: Any) -> list[dict[str, Any]]:
    return json.loads((tmp_path / "diagnosis.json").read_text())


class SleepySpider(SiteSpider):
    """The first detail page's callback blocks the loop with time.sleep(8)."""

    slept_at: float | None = None

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        if SleepySpider.slept_at is None:
            SleepySpider.slept_at = time.monotonic()
            self.sleep_in_callback()
        yield from super().parse_item(response, **kwargs)

    def sleep_in_callback(self) -> None:
        time.sleep(8)


@pytest_twisted.ensureDeferred
async def test_blocked_loop_detected_with_stack(make_fault_site: Any, tmp_path: Any,
                                                new_monitor_threads: Any) -> None:
    site: FaultSite = make_fault_site(pages=1, items_per_page=3)
    SleepySpider.slept_at = None
    result = await run_crawl(SleepySpider, wd_settings(tmp_path), timeout=40,
                             start_url=site.start_url)
    assert result.finished and len(result.items) == 3
    diags = read_diagnoses(tmp_path)
    blocked = [d for d in diags if d["class"] == "blocked_loop"]
    assert len(blocked) == 1, [d["class"] for d in diags]
    diag = blocked[0]
    assert SleepySpider.slept_at is not None
    assert diag["monotonic"] - SleepySpider.slept_at <= 2.0 + 1.0
    assert "sleep_in_callback" in diag["stack"] and "time.sleep(8)" in diag["stack"]
    assert diag["where"].startswith("sleep_in_callback")
    assert result.stats["antideadlock/watchdog/stalls/blocked_loop"] == 1
    assert result.stats["antideadlock/watchdog/cleared"] >= 1
    assert result.stats["antideadlock/watchdog/blocked_seconds_max"] >= 5.0
    assert not new_monitor_threads()


# ---------------------------------------------------------------------- deadlock
# The naive sticky-proxy + held-connection crawl (scrapy_antideadlock.testing.scenarios.pools):
# the project's own pools registered in the registry, proxy capacity 2, one connection.


@pytest_twisted.ensureDeferred
async def test_naive_pipeline_deadlock_is_classified_with_cycle(
        make_fault_site: Any, fault_proxy: Any, pg_dsn: str, tmp_path: Any,
        new_monitor_threads: Any) -> None:
    from scrapy_antideadlock.testing.scenarios.pools import StickySpider

    site = make_fault_site(pages=1, items_per_page=4)
    found: list[dict[str, Any]] = []

    class Spider(StickySpider):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            def on_stall(diagnosis: Any, **kw: Any) -> None:
                found.append(diagnosis)
                crawler.scenario_pipeline.break_pools()  # ends the hang

            crawler.signals.connect(on_stall, ad_signals.stall_detected, weak=False)
            return super().from_crawler(crawler, *args, **kwargs)

    settings = wd_settings(tmp_path, SCENARIO_PROXY_URL=fault_proxy.url, SCENARIO_PG_DSN=pg_dsn)
    result = await run_crawl(Spider, settings, timeout=40, start_url=site.start_url)
    assert result.finished
    assert len(found) == 1, found
    diag = found[0]
    assert diag["class"] == "deadlock", diag["evidence"]
    assert diag.culprit is not None and diag.culprit.qualname == "NaiveEnrichPipeline.process_item"
    cycle = diag["cycle"]
    assert "proxy pool" in cycle and "pg 'db'" in cycle and "(cycle)" in cycle, cycle
    assert "item of request" in cycle
    assert set(diag["graph"]["cycles"][0]["pools"]) == {"proxy", "db"}
    assert diag["since_progress"] <= 2.0 + 1.0
    on_disk = read_diagnoses(tmp_path)
    assert on_disk[0]["class"] == "deadlock" and on_disk[0]["cycle"] == cycle
    table = {p["name"]: p for p in on_disk[0]["pools"]}
    assert table["proxy"]["capacity"] == 2 and table["proxy"]["in_use"] == 2
    assert table["proxy"]["waiters"] >= 1
    assert table["db"]["capacity"] == 1 and table["db"]["in_use"] == 1
    assert table["db"]["waiters"] == 1
    assert on_disk[0]["oldest_holders"] and on_disk[0]["loop"]["cpu"] is not None
    assert result.stats["antideadlock/watchdog/stalls/deadlock"] == 1
    assert fault_proxy.requests >= 3  # the downloads really went through the proxy
    assert not new_monitor_threads()


# ---------------------------------------------------------------------- livelock, stalled I/O


class ProxiedSpider(SiteSpider):
    proxy_url = ""

    def request_meta(self, kind: str) -> dict[str, Any]:
        return {"proxy": self.proxy_url}


@pytest_twisted.ensureDeferred
async def test_always_failing_proxy_with_unbounded_retries_is_livelock(
        make_fault_site: Any, make_fault_proxy: Any, tmp_path: Any,
        new_monitor_threads: Any) -> None:
    site = make_fault_site(pages=1, items_per_page=3)
    proxy = make_fault_proxy(mode="error")  # every request: 502 Bad Gateway
    found: list[dict[str, Any]] = []
    cleared: list[tuple[str, float]] = []

    class Spider(ProxiedSpider):
        proxy_url = proxy.url

        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            def on_stall(diagnosis: dict[str, Any], **kw: Any) -> None:
                found.append(diagnosis)
                proxy.mode = "healthy"  # the operator fixes the proxy: progress resumes

            def on_cleared(stall_class: str, duration: float, **kw: Any) -> None:
                cleared.append((stall_class, duration))

            crawler.signals.connect(on_stall, ad_signals.stall_detected, weak=False)
            crawler.signals.connect(on_cleared, ad_signals.stall_cleared, weak=False)
            return super().from_crawler(crawler, *args, **kwargs)

    settings = wd_settings(tmp_path, RETRY_TIMES=10**9, RETRY_HTTP_CODES=[502],
                           RETRY_PRIORITY_ADJUST=0, CONCURRENT_REQUESTS=2)
    result = await run_crawl(Spider, settings, timeout=40, start_url=site.start_url)
    assert result.finished and len(result.items) == 3
    assert [d["class"] for d in found] == ["livelock"], [d["evidence"] for d in found]
    assert found[0]["churn"] >= 10
    assert any("retry/count" in line for line in found[0]["evidence"])
    assert cleared and cleared[0][0] == "livelock"
    assert result.stats["antideadlock/watchdog/cleared"] == 1
    assert proxy.requests > 20
    assert not new_monitor_threads()


@pytest_twisted.ensureDeferred
async def test_hanging_site_is_stalled_io(make_fault_site: Any, tmp_path: Any,
                                          new_monitor_threads: Any) -> None:
    from scrapy_antideadlock.testing import Fault

    site = make_fault_site(pages=1, items_per_page=3)
    site.add_fault("/item/*", Fault.hang())
    found: list[dict[str, Any]] = []
    reached: dict[str, float] = {}  # url -> when it reached the downloader (our own clock)

    class Spider(SiteSpider):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            crawler.signals.connect(lambda diagnosis, **kw: found.append(diagnosis),
                                    ad_signals.stall_detected, weak=False)
            crawler.signals.connect(
                lambda request, **kw: reached.setdefault(request.url, time.monotonic()),
                signals.request_reached_downloader, weak=False)
            return super().from_crawler(crawler, *args, **kwargs)

    settings = wd_settings(tmp_path, DOWNLOAD_TIMEOUT=6, RETRY_ENABLED=False)
    result = await run_crawl(Spider, settings, timeout=40, start_url=site.start_url)
    assert result.finished and not result.items
    assert [d["class"] for d in found] == ["stalled_io"], [d["evidence"] for d in found]
    flight = found[0]["in_flight"]
    assert flight["count"] == 3
    # each hanging request's age is its real time in the downloader at detection (the
    # requests reach it a little after the last progress, later still under load)
    detected = found[0]["monotonic"]
    for entry in flight["oldest"]:
        url = entry["request"].split()[-1]
        assert "/item/" in url and url in reached, entry
        assert abs(entry["age"] - (detected - reached[url])) < 0.05, (entry, reached)
        assert entry["age"] > 1.0, entry  # hung for most of the 2 s window, not just sent
    assert all(e["stage"] == "transfer" for e in flight["oldest"])
    assert not new_monitor_threads()


class WaitsForeverPipeline:
    """Awaits an event nobody sets: every pending item sleeps on it, nothing is on the network."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def process_item(self, item: Any) -> Any:
        await self.never.wait()
        return item


@pytest_twisted.ensureDeferred
async def test_event_never_set_is_a_deadlock_naming_the_event_and_the_line(
        make_fault_site: Any, tmp_path: Any) -> None:
    site = make_fault_site(pages=1, items_per_page=2)
    found: list[Any] = []

    class Spider(SiteSpider):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            def on_stall(diagnosis: Any, **kw: Any) -> None:
                found.append(diagnosis)
                for pipe in crawler.engine.scraper.itemproc.middlewares:
                    if isinstance(pipe, WaitsForeverPipeline):
                        pipe.never.set()

            crawler.signals.connect(on_stall, ad_signals.stall_detected, weak=False)
            return super().from_crawler(crawler, *args, **kwargs)

    settings = wd_settings(tmp_path, ITEM_PIPELINES={WaitsForeverPipeline: 300})
    result = await run_crawl(Spider, settings, timeout=30, start_url=site.start_url)
    assert result.finished and len(result.items) == 2
    assert [d["class"] for d in found] == ["deadlock"], [d["evidence"] for d in found]
    diag = found[0]
    assert isinstance(diag, Diagnosis)
    assert diag.culprit is not None and diag.culprit.function == "process_item"
    assert diag.culprit.code == "await self.never.wait()"
    assert diag.culprit.filename == __file__
    assert any("asyncio.Event" in line and "never set" in line for line in diag.evidence)
    units = [u for u in diag.units if u.component == "WaitsForeverPipeline.process_item"]
    assert len(units) == 2 and all(u.stage == "pipeline" for u in units), diag.units
    assert all(u.wait_kind == "primitive" for u in units)
    assert diag["pending"]["scraping"] >= 1 and len(diag["in_callbacks"]) == 2
    assert "culprit: WaitsForeverPipeline.process_item (test_watchdog.py:" in render(diag)
    assert result.stats["antideadlock/watchdog/cleared"] == 1


def test_adaptive_window_follows_request_latency() -> None:
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock.watchdog import Watchdog

    crawler = get_crawler(SiteSpider, {
        "ANTIDEADLOCK_WATCHDOG_WINDOW_MIN": 4.0, "ANTIDEADLOCK_WATCHDOG_WINDOW_MAX": 30.0,
        "ANTIDEADLOCK_WATCHDOG_WINDOW_INITIAL": 20.0, "ANTIDEADLOCK_WATCHDOG_WINDOW_BUFFER": 1.0,
        "ANTIDEADLOCK_WATCHDOG_WINDOW_MIN_SAMPLES": 10})
    watchdog = Watchdog.from_crawler(crawler)
    assert watchdog_for(crawler) is watchdog
    assert watchdog.window() == 20.0  # not warmed up
    for _ in range(50):
        watchdog.latency.record("all", 0.2)
    assert watchdog.window() == 4.0  # 0.2 x 3 + 1 = 1.6, clamped up to MIN
    for _ in range(50):
        watchdog.latency.record("all", 4.0)
    assert 12.0 <= watchdog.window() <= 14.0  # p99 ~4 s: 4 x 3 + 1
    for _ in range(500):
        watchdog.latency.record("all", 60.0)
    assert watchdog.window() == 30.0  # clamped to MAX


@pytest_twisted.ensureDeferred
async def test_timeouts_retried_without_end_are_stalled_io_not_livelock(
        make_fault_site: Any, tmp_path: Any) -> None:
    from scrapy_antideadlock.testing import Fault

    site = make_fault_site(pages=1, items_per_page=2)
    site.add_fault("/item/*", Fault.hang())
    found: list[dict[str, Any]] = []

    class Spider(SiteSpider):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            def on_stall(diagnosis: dict[str, Any], **kw: Any) -> None:
                found.append(diagnosis)
                site.clear_faults()  # the peer answers again: retries now succeed

            crawler.signals.connect(on_stall, ad_signals.stall_detected, weak=False)
            return super().from_crawler(crawler, *args, **kwargs)

    settings = wd_settings(tmp_path, DOWNLOAD_TIMEOUT=0.4, RETRY_TIMES=10**6,
                           CONCURRENT_REQUESTS=2)
    result = await run_crawl(Spider, settings, timeout=40, start_url=site.start_url)
    assert result.finished and len(result.items) == 2
    assert [d["class"] for d in found] == ["stalled_io"], [d["evidence"] for d in found]
    assert "timed out" in found[0]["evidence"][0]
    assert result.stats["antideadlock/watchdog/cleared"] == 1


@pytest_twisted.ensureDeferred
async def test_sub_second_window(make_fault_site: Any, tmp_path: Any) -> None:
    from scrapy_antideadlock.testing import Fault

    site = make_fault_site(pages=1, items_per_page=2)
    site.add_fault("/item/*", Fault.hang())
    settings = wd_settings(tmp_path, ANTIDEADLOCK_WATCHDOG_WINDOW=0.6,
                           ANTIDEADLOCK_WATCHDOG_INTERVAL=0.05,
                           ANTIDEADLOCK_WATCHDOG_HEARTBEAT=0.05,
                           ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD=2.0,
                           DOWNLOAD_TIMEOUT=2.5, RETRY_ENABLED=False)
    result = await run_crawl(SiteSpider, settings, timeout=30, start_url=site.start_url)
    assert result.finished
    diags = read_diagnoses(tmp_path)
    assert diags[0]["class"] == "stalled_io" and diags[0]["window"] == 0.6
    assert 0.6 <= diags[0]["since_progress"] <= 0.6 + 0.5
    assert result.stats["antideadlock/watchdog/window"] == 0.6


# ---------------------------------------------------------------------- no false positives


@pytest_twisted.ensureDeferred
async def test_slow_but_progressing_crawl_is_not_a_stall(make_fault_site: Any, tmp_path: Any,
                                                         caplog: Any) -> None:
    # Every response takes 1.5 s, one at a time: progress every ~1.5 s, window 2.5 s.
    caplog.set_level(logging.INFO, logger="scrapy_antideadlock.watchdog")
    site = make_fault_site(pages=1, items_per_page=3, latency=Latency.fixed(1.5))
    settings = wd_settings(tmp_path, CONCURRENT_REQUESTS=1, ANTIDEADLOCK_WATCHDOG_WINDOW=2.5)
    result = await run_crawl(SiteSpider, settings, timeout=40, start_url=site.start_url)
    assert result.finished and len(result.items) == 3
    assert result.elapsed >= 4 * 1.5
    assert "antideadlock/watchdog/stalls" not in result.stats
    assert not (tmp_path / "diagnosis.json").exists()
    health = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("antideadlock health:")]
    assert len(health) >= 3  # every second
    assert all(("flowing" in line or "slow" in line) and re.search(r"in flight [01]/1,", line)
               and "watchdog armed" in line and "lag p99" in line for line in health), health


class IdleSpider(SiteSpider):
    """Crawls one listing, then stays open with nothing to do (DontCloseSpider) for 3.5 s."""

    states: list[str] = []

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
        spider = super().from_crawler(crawler, *args, **kwargs)
        spider.idle_since: float | None = None
        crawler.signals.connect(spider.on_idle, signals.spider_idle)
        return spider

    def parse(self, response: Any, **kwargs: Any) -> Any:
        yield {"key": "listing", "url": response.url}

    def on_idle(self) -> None:
        from scrapy.exceptions import DontCloseSpider

        IdleSpider.states.append(watchdog_for(self.crawler).state)
        if self.idle_since is None:
            self.idle_since = time.monotonic()
        if time.monotonic() - self.idle_since < 3.5:
            raise DontCloseSpider


@pytest_twisted.ensureDeferred
async def test_idle_spider_kept_open_is_not_a_stall(make_fault_site: Any, tmp_path: Any) -> None:
    site = make_fault_site(pages=1, items_per_page=1)
    IdleSpider.states = []
    result = await run_crawl(IdleSpider, wd_settings(tmp_path, ANTIDEADLOCK_WATCHDOG_WINDOW=1.0),
                             timeout=30, start_url=site.start_url)
    assert result.finished and len(result.items) == 1
    assert result.elapsed >= 3.5
    assert "antideadlock/watchdog/stalls" not in result.stats
    assert "idle" in IdleSpider.states
    assert not (tmp_path / "diagnosis.json").exists()


# ---------------------------------------------------------------------- settings


def test_bad_settings_fail_at_start_naming_the_setting() -> None:
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock.settings import SettingError
    from scrapy_antideadlock.watchdog import Watchdog

    for name, value in [("ANTIDEADLOCK_WATCHDOG_WINDOW", -1),
                        ("ANTIDEADLOCK_WATCHDOG_CPU_BUSY", 2),
                        ("ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD", 0.05),
                        ("ANTIDEADLOCK_WATCHDOG_WINDOW_MIN", 500)]:
        crawler = get_crawler(SiteSpider, {name: value})
        with pytest.raises(SettingError, match=name):
            Watchdog.from_crawler(crawler)


def test_off_switch_and_addon() -> None:
    from scrapy.exceptions import NotConfigured
    from scrapy.settings import Settings
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock import Addon
    from scrapy_antideadlock.watchdog import Watchdog

    crawler = get_crawler(SiteSpider, {"ANTIDEADLOCK_WATCHDOG_ENABLED": False})
    with pytest.raises(NotConfigured):
        Watchdog.from_crawler(crawler)
    assert watchdog_for(crawler) is None
    settings = Settings()
    Addon().update_settings(settings)
    assert Watchdog in settings.getwithbase("EXTENSIONS") or \
        "scrapy_antideadlock.watchdog.Watchdog" in settings.getwithbase("EXTENSIONS")
    off = Settings({"ANTIDEADLOCK_WATCHDOG_ENABLED": False})
    Addon().update_settings(off)
    assert Watchdog not in off.getwithbase("EXTENSIONS")


# ---------------------------------------------------------------------- with the whole pack


@pytest_twisted.ensureDeferred
async def test_with_the_whole_pack_uses_the_downloader_deadlines(
        make_fault_site: Any, tmp_path: Any, new_monitor_threads: Any) -> None:
    from scrapy_antideadlock.testing import Fault

    site = make_fault_site(pages=1, items_per_page=3)
    site.add_fault("/item/*", Fault.hang())
    found: list[dict[str, Any]] = []

    class Spider(SiteSpider):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            crawler.signals.connect(lambda diagnosis, **kw: found.append(diagnosis),
                                    ad_signals.stall_detected, weak=False)
            return super().from_crawler(crawler, *args, **kwargs)

    settings = wd_settings(tmp_path, ADDONS={"scrapy_antideadlock.Addon": 0},
                           ANTIDEADLOCK_DEADLINE_INITIAL=5.0, RETRY_ENABLED=False)
    del settings["EXTENSIONS"]  # the add-on enables the watchdog
    result = await run_crawl(Spider, settings, timeout=60, start_url=site.start_url)
    assert result.finished
    # (recovery may requeue the cancelled requests, which hang again: more episodes)
    assert found and {d["class"] for d in found} == {"stalled_io"}, \
        [d["evidence"] for d in found]
    oldest = found[0]["in_flight"]["oldest"]
    assert len(oldest) == 3
    # deadlines come from the downloader part's in-flight tracker
    assert all(e["deadline_in"] is not None and e["deadline_in"] < 5.0 for e in oldest)
    assert not new_monitor_threads()


@pytest_twisted.ensureDeferred
async def test_tick_reads_the_download_slots_once_per_ttl_not_per_tick(
        make_fault_site: Any, tmp_path: Any, monkeypatch: Any,
        new_monitor_threads: Any) -> None:
    """A broad crawl keeps a downloader slot per host: reading every slot's delay on every
    tick made the watchdog's cost grow with the hosts. The delay still floors the window."""
    from scrapy_antideadlock.testing import Fault
    from scrapy_antideadlock.watchdog import probe

    site = make_fault_site(pages=1, items_per_page=40)
    site.add_fault("/item/*", Fault.slow_headers(0.6))  # 10 rounds of 4: about 6 s
    reads: list[int] = []
    real = probe.compat.download_slots_delay

    def counting(engine: Any) -> float:
        reads.append(len(engine.downloader.slots))
        return real(engine)

    monkeypatch.setattr(probe.compat, "download_slots_delay", counting)
    ticks: list[float] = []

    class OneSlotPerHost(SiteSpider):
        def make_request(self, url: str, callback: Any, kind: str = "list") -> Any:
            request = super().make_request(url, callback, kind)
            request.meta["download_slot"] = f"host-{url.rsplit('/', 1)[-1]}"
            return request

        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            spider = super().from_crawler(crawler, *args, **kwargs)
            watchdog = watchdog_for(crawler)
            evaluate = watchdog._evaluate

            def counted() -> None:
                ticks.append(time.monotonic())
                evaluate()

            watchdog._evaluate = counted
            return spider

    settings = wd_settings(
        tmp_path, ANTIDEADLOCK_WATCHDOG_WINDOW=None, ANTIDEADLOCK_WATCHDOG_INTERVAL=0.02,
        ANTIDEADLOCK_WATCHDOG_WINDOW_INITIAL=1.0, ANTIDEADLOCK_WATCHDOG_WINDOW_MIN=0.5,
        ANTIDEADLOCK_WATCHDOG_WINDOW_BUFFER=1.0, ANTIDEADLOCK_WATCHDOG_WINDOW_MIN_SAMPLES=1000,
        DOWNLOAD_DELAY=0.05, CONCURRENT_REQUESTS=4)
    result = await run_crawl(OneSlotPerHost, settings, timeout=60, start_url=site.start_url)
    assert result.finished and len(result.items) == 40
    crawl_time = ticks[-1] - ticks[0]
    assert crawl_time > probe.SLOT_DELAY_TTL and len(ticks) >= 100, (crawl_time, len(ticks))
    assert max(reads) >= 20  # the slots were there to read: one per host
    assert len(reads) <= crawl_time / probe.SLOT_DELAY_TTL + 3, (len(reads), len(ticks))
    # The polite floor still holds: 2 x DOWNLOAD_DELAY + BUFFER over the 1 s initial window.
    assert result.stats["antideadlock/watchdog/window"] == pytest.approx(1.1)
