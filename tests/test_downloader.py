"""Deadlines, proxy leases and cancellable downloads against the real fault site and proxy.

Every crawl is bounded by run_crawl's timeout; after every crawl the proxy pool in the
registry must hold 0 leases with 0 waiters, and nothing may be left in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from scrapy import Request
from scrapy.core.downloader.handlers.http11 import HTTP11DownloadHandler

from scrapy_antideadlock.compat.downloader import downloader_of
from scrapy_antideadlock.context import context_for
from scrapy_antideadlock.downloader import guard_for, inflight_for
from scrapy_antideadlock.exceptions import DeadlineExceeded, DownloadCancelled
from scrapy_antideadlock.testing import Fault, SiteSpider, run_crawl

GUARD = "scrapy_antideadlock.downloader.GuardedDownloadHandler"
CLASSIC: dict[str, Any] = {
    "DOWNLOADER_MIDDLEWARES": {"scrapy_antideadlock.downloader.DeadlineMiddleware": 340},
    "DOWNLOAD_HANDLERS": {"http": GUARD, "https": GUARD},
    "ANTIDEADLOCK_DEADLINE_MIN": 1.0,
    "ANTIDEADLOCK_DEADLINE_MIN_SAMPLES": 5,
    "ANTIDEADLOCK_DEADLINE_INITIAL": 10.0,
    "RETRY_TIMES": 1,
}


class ExceptionRecorder:
    """Downloader middleware that records what reaches process_exception (test probe)."""

    seen: list[tuple[str, BaseException]] = []

    def process_exception(self, request: Request, exception: Exception) -> None:
        self.seen.append((request.url, exception))


class CapturingSpider(SiteSpider):
    """SiteSpider that keeps the failure objects and lets the test find the crawler."""

    name = "capturing"
    last: CapturingSpider | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[tuple[str, BaseException]] = []
        CapturingSpider.last = self

    def on_error(self, failure: Any) -> None:
        super().on_error(failure)
        self.errors.append((failure.request.url, failure.value))


def settings(**extra: Any) -> dict[str, Any]:
    mws = {**CLASSIC["DOWNLOADER_MIDDLEWARES"], ExceptionRecorder: 500}
    return {**CLASSIC, "DOWNLOADER_MIDDLEWARES": mws,
            **{f"ANTIDEADLOCK_{k}": v for k, v in extra.items()}}


def assert_nothing_held(result: Any) -> None:
    """The registry shows every pool empty, and no download is left in flight."""
    for snap in context_for(result.crawler).registry.snapshot():
        if snap.kind == "proxy":
            assert snap.in_use == 0, snap
            assert snap.holders == () and snap.waiters == (), snap
    assert inflight_for(result.crawler).items() == []
    guard = guard_for(result.crawler)
    if guard.pool is not None:
        c = guard.pool.counters
        assert c.acquired == c.released, c
    assert guard.lent == 0


@pytest.fixture(autouse=True)
def _reset_probe() -> None:
    ExceptionRecorder.seen = []


# --------------------------------------------------------------------------- deadlines


@pytest_twisted.ensureDeferred
async def test_hang_and_drip_fail_at_adaptive_deadline(make_fault_site) -> None:
    site = make_fault_site(pages=3, items_per_page=10)
    site.add_fault("/item/k00025", Fault.hang())
    site.add_fault("/item/k00026", Fault.drip(30.0, chunks=30))
    started = time.monotonic()
    result = await run_crawl(CapturingSpider, settings(), timeout=45,
                             start_url=site.start_url)
    assert result.finished and time.monotonic() - started < 30  # not 180 s x retries
    keys = set(result.keys())
    assert keys == set(site.item_keys()) - {"k00025", "k00026"}
    errors = {url.rsplit("/", 1)[1]: exc for url, exc in result.crawler.spider.errors}
    assert set(errors) == {"k00025", "k00026"}
    for exc in errors.values():
        assert isinstance(exc, DeadlineExceeded) and exc.stage == "transfer"
        # adaptive (p99 of ms responses x 3 + 1 s, x 2 on the retry), not INITIAL (10 s)
        assert exc.timeout is not None and exc.timeout < 5.0
        assert exc.elapsed < exc.timeout + 1.5
    stats = result.stats
    # 2 URLs x (1 try + 1 retry), plus a free retry of one whose deadline the slot has
    # since outgrown by half (a busy machine's loop lag raises p99 early in the crawl)
    own = stats.get("antideadlock/deadline/own_retries", 0)
    assert stats["antideadlock/deadline/exceeded"] == 4 + own <= 6
    assert stats["antideadlock/deadline/retries"] == 2 + own
    assert stats["antideadlock/deadline/gave_up"] == 2
    assert stats["antideadlock/deadline/timeout/127.0.0.1"] < 5.0  # adaptive, not INITIAL
    assert_nothing_held(result)


class UsersOwnHandler(HTTP11DownloadHandler):
    """A handler of the user's (not one of Scrapy's): the guard cannot know it unwinds at
    once when cancelled, so its transfers keep a task of the guard's own."""


class UsersUnwindingHandler(HTTP11DownloadHandler):
    """A handler of the user's that says it unwinds at once when cancelled."""

    antideadlock_unwinds_on_cancel = True


@pytest.mark.parametrize("wrapped", [None, f"{__name__}.UsersOwnHandler",
                                     f"{__name__}.UsersUnwindingHandler"])
@pytest_twisted.ensureDeferred
async def test_scrapys_handler_runs_inline_and_is_still_cut(make_fault_site,
                                                             wrapped: str | None) -> None:
    # Every task created for a handler's download_request is counted: a transfer by
    # Scrapy's handler runs in Scrapy's own task (only a hedge gets one), a user's handler
    # in one of the guard's. Either way the hung transfer is cut at its deadline and
    # reaches process_exception as an ordinary DeadlineExceeded, and the crawl goes on.
    site = make_fault_site(pages=2, items_per_page=10)
    site.add_fault("/item/k00007", Fault.hang())
    loop = asyncio.get_running_loop()
    made: list[str] = []
    previous = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if getattr(coro, "__qualname__", "").endswith(".download_request"):
            made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    extra = {} if wrapped is None else {"DEADLINE_WRAPPED_HANDLERS": {"http": wrapped}}
    loop.set_task_factory(counting)
    try:
        result = await run_crawl(CapturingSpider, settings(**extra), timeout=45,
                                 start_url=site.start_url)
    finally:
        loop.set_task_factory(previous)
    assert result.finished
    assert set(result.keys()) == set(site.item_keys()) - {"k00007"}
    [(url, exc)] = result.crawler.spider.errors
    assert url.endswith("k00007") and isinstance(exc, DeadlineExceeded)
    stats = result.stats
    hedges = stats.get("antideadlock/deadline/hedges", 0)
    downloads = stats["downloader/request_count"]
    assert downloads >= 23  # 2 listings + 20 items + the hung one's retry
    inline = wrapped is None or wrapped.endswith("UsersUnwindingHandler")
    assert len(made) == (hedges if inline else downloads + hedges), made[:3]
    assert_nothing_held(result)


@pytest_twisted.ensureDeferred
async def test_user_download_timeout_wins(make_fault_site) -> None:
    site = make_fault_site(pages=1, items_per_page=3)
    site.add_fault("/item/k00001", Fault.hang())

    class UserTimeoutSpider(CapturingSpider):
        def request_meta(self, kind: str) -> dict[str, Any]:
            return {"download_timeout": 1.25, "dont_retry": True}

    result = await run_crawl(UserTimeoutSpider, settings(DEADLINE_INITIAL=20.0), timeout=30,
                             start_url=site.start_url)
    [(url, exc)] = result.crawler.spider.errors
    assert url.endswith("k00001") and isinstance(exc, DeadlineExceeded)
    assert exc.timeout == 1.25 and exc.elapsed < 3.0
    assert result.stats["antideadlock/deadline/user_timeout"] == 4
    assert_nothing_held(result)


@pytest_twisted.ensureDeferred
async def test_deadline_covers_the_slot_queue(make_fault_site) -> None:
    # One transfer per domain; a hanging page goes first and holds it for 3 s. The
    # listing queued behind it (deadline 1 s) runs out of deadline *in the slot queue*:
    # it is taken out of the queue, fails as DeadlineExceeded(stage="queued") and is
    # retried later, when the slot is free again.
    site = make_fault_site(pages=1, items_per_page=4)
    site.add_fault("/hang", Fault.hang())

    class Tight(CapturingSpider):
        async def start(self) -> Any:
            yield Request(site.url("/hang"), errback=self.on_error,
                          meta={"download_timeout": 3.0, "dont_retry": True})
            await asyncio.sleep(0.3)
            async for request in super().start():
                yield request

        def request_meta(self, kind: str) -> dict[str, Any]:
            return {"download_timeout": 1.0}

    result = await run_crawl(Tight, {**settings(DEADLINE_LEND=False),
                                     "CONCURRENT_REQUESTS_PER_DOMAIN": 1, "RETRY_TIMES": 4},
                             timeout=40, start_url=site.start_url)
    assert result.finished
    assert sorted(result.keys()) == site.item_keys()
    assert result.stats["antideadlock/deadline/exceeded/queued"] >= 1
    queued = [(u, e) for u, e in ExceptionRecorder.seen
              if isinstance(e, DeadlineExceeded) and e.stage == "queued"]
    assert queued and all(u.endswith("/list/0") and e.elapsed < 2.5 for u, e in queued)
    [(url, exc)] = result.crawler.spider.errors
    assert url.endswith("/hang") and exc.stage == "transfer"
    assert_nothing_held(result)


@pytest_twisted.ensureDeferred
async def test_overdue_transfers_lend_their_slot_within_the_bound(make_fault_site) -> None:
    # CONCURRENT_REQUESTS=2 and 4 detail pages that hang: without lending, two hung
    # transfers would stop all work for their whole deadline. Overdue ones lend their
    # slot, but never more than 2 x (2 - 1) = 2 at once, so at most 4 are in flight.
    site = make_fault_site(pages=1, items_per_page=16)
    site.add_fault("/item/k0000[0-3]", Fault.hang())
    in_flight: list[int] = []

    async def sample() -> None:
        while True:
            crawler = getattr(CapturingSpider.last, "crawler", None)
            try:
                downloader = crawler.engine.downloader
            except (AttributeError, RuntimeError):  # not started yet / finished
                downloader = None
            if downloader is not None:
                in_flight.append(len(downloader.active))
            await asyncio.sleep(0.02)

    CapturingSpider.last = None
    sampler = asyncio.ensure_future(sample())
    result = await run_crawl(CapturingSpider, {
        **settings(DEADLINE_MIN_SAMPLES=3, DEADLINE_MIN=3.0, DEADLINE_LEND_MAX_FACTOR=2.0,
                   DEADLINE_HEDGE=False),  # lending alone (hedges share its bound)
        "CONCURRENT_REQUESTS": 2, "RETRY_TIMES": 0}, timeout=40, start_url=site.start_url)
    sampler.cancel()
    assert result.finished
    assert set(result.keys()) == set(site.item_keys()) - {"k00000", "k00001", "k00002",
                                                          "k00003"}
    stats = result.stats
    assert stats["antideadlock/deadline/lent"] >= 2
    assert stats["antideadlock/deadline/lent_max"] <= 2
    assert max(in_flight) <= 4
    assert in_flight and max(in_flight) > 2  # lending really happened
    assert downloader_of(result.crawler) is None or \
        result.crawler.engine.downloader.total_concurrency == 2
    assert_nothing_held(result)


# --------------------------------------------------------------------------- proxies


@pytest_twisted.ensureDeferred
async def test_blackholed_proxy_leases_come_back(make_fault_site, make_fault_proxy) -> None:
    site = make_fault_site(pages=3, items_per_page=8)
    good = make_fault_proxy()
    bad = make_fault_proxy(mode="blackhole")
    result = await run_crawl(
        CapturingSpider,
        settings(PROXY_LIST={good.url: 2, bad.url: 2}, DEADLINE_INITIAL=1.5,
                 PROXY_COOLDOWN_BASE=5.0, PROXY_LEASE_TIMEOUT=5.0),
        timeout=60, start_url=site.start_url, **{})
    assert result.finished
    assert sorted(result.keys()) == sorted(site.expected_keys())  # every reachable item
    assert bad.requests >= 1 and good.requests > bad.requests
    stats = result.stats
    assert stats["antideadlock/proxy/cooldowns"] >= 1
    assert stats["antideadlock/proxy/failures"] >= 1
    assert stats["antideadlock/proxy/leases_acquired"] == stats[
        "antideadlock/proxy/leases_released"]
    assert stats["antideadlock/proxy/held_at_close"] == 0
    assert_nothing_held(result)


@pytest.mark.parametrize("reclaim", ["expiry", "deadline"])
@pytest_twisted.ensureDeferred
async def test_all_proxy_slots_held_by_hanging_requests(make_fault_site, make_fault_proxy,
                                                        reclaim: str) -> None:
    # Two proxy slots in all; the first two detail pages hang for ever and take both.
    site = make_fault_site(pages=2, items_per_page=6)
    site.add_fault("/item/k0000[01]", Fault.hang())
    p1, p2 = make_fault_proxy(), make_fault_proxy()
    extra: dict[str, Any] = {"PROXY_LIST": {p1.url: 1, p2.url: 1}, "PROXY_LEASE_TIMEOUT": 4.0,
                             "PROXY_LEASE_GRACE": 0.5, "PROXY_COOLDOWN_BASE": 0.1,
                             "PROXY_COOLDOWN_MAX": 0.2}
    if reclaim == "expiry":  # no deadline: only the lease TTL (MAX + GRACE) reclaims
        extra.update(DEADLINE_ENABLED=False, DEADLINE_MAX=2.0)
    else:
        extra.update(DEADLINE_INITIAL=2.0)

    class HangFirst(CapturingSpider):
        def parse(self, response: Any, **kwargs: Any) -> Any:
            for request in super().parse(response, **kwargs):
                if "k0000" in request.url and request.url[-1] in "01":
                    request.priority = 10  # make sure the hanging ones go first
                yield request

    seen: list[tuple[Any, dict[str, str]]] = []  # (registry snapshot, owner -> url)

    async def watch_registry() -> None:
        while True:
            crawler = getattr(CapturingSpider.last, "crawler", None)
            if crawler is not None:
                for snap in context_for(crawler).registry.snapshot():
                    if snap.kind == "proxy":
                        owners = {e.owner: e.request.url for e in inflight_for(crawler).items()}
                        seen.append((snap, owners))
            await asyncio.sleep(0.1)

    CapturingSpider.last = None
    watcher = asyncio.ensure_future(watch_registry())
    result = await run_crawl(HangFirst, {**settings(**extra), "CONCURRENT_REQUESTS": 6},
                             timeout=60, start_url=site.start_url)
    watcher.cancel()
    assert result.finished
    # While jammed, the registry named the holders (the hanging requests, with age and
    # expiry) and the requests waiting for a slot.
    jammed = [(snap, owners) for snap, owners in seen if snap.in_use == snap.capacity == 2
              and all(owners.get(h.owner, "").endswith(("k00000", "k00001"))
                      for h in snap.holders)]
    assert jammed
    assert any(h.age > 0.5 and h.expires_in is not None
               for snap, _ in jammed for h in snap.holders)
    assert any(snap.waiters for snap, _ in jammed)
    assert set(result.keys()) == set(site.item_keys()) - {"k00000", "k00001"}
    stats = result.stats
    if reclaim == "expiry":
        assert stats["antideadlock/proxy/leases_expired"] >= 2
        # the handler's own release after the expiry was a counted no-op
        assert stats["antideadlock/proxy/double_releases_prevented"] >= 2
        assert all(isinstance(e, DeadlineExceeded) and "expired" in str(e)
                   for _, e in result.crawler.spider.errors)
    else:
        assert stats["antideadlock/deadline/exceeded/transfer"] >= 2
    # Nobody waited for a lease past its bound (lease timeout, or the deadline if shorter).
    assert stats["antideadlock/proxy/max_wait"] <= 4.0 + 0.5
    assert_nothing_held(result)


@pytest_twisted.ensureDeferred
async def test_proxy_credentials_never_logged(make_fault_site, make_fault_proxy,
                                              caplog) -> None:
    site = make_fault_site(pages=1, items_per_page=4)
    proxy = make_fault_proxy(auth=("agent", "s3cr3t-pw"))
    caplog.set_level(logging.DEBUG)
    result = await run_crawl(CapturingSpider, {**settings(PROXY_LIST=[proxy.url_with_auth()]),
                                               "LOG_LEVEL": "DEBUG"},
                             timeout=30, start_url=site.start_url)
    assert sorted(result.keys()) == sorted(site.item_keys())  # auth worked: no 407
    assert 407 not in proxy.statuses and proxy.requests >= 5  # really through the proxy
    snapshots = repr(context_for(result.crawler).registry.snapshot())
    for text in (caplog.text, repr(result.stats), snapshots):
        assert "s3cr3t-pw" not in text
    assert proxy.url in snapshots
    assert_nothing_held(result)


@pytest_twisted.ensureDeferred
async def test_preflight_warns_when_concurrency_exceeds_proxy_capacity(
        make_fault_site, fault_proxy, caplog) -> None:
    site = make_fault_site(pages=1, items_per_page=2)
    result = await run_crawl(
        CapturingSpider, {**settings(PROXY_LIST=[fault_proxy.url], PROXY_CAPACITY=3),
                          "CONCURRENT_REQUESTS": 16},
        timeout=30, start_url=site.start_url)
    text = caplog.text
    assert "preflight" in text and "proxy:proxy" not in text  # named as in the registry
    assert re.search(r"CONCURRENT_REQUESTS\s+16\s+proxy\s+3\s", text), text
    assert_nothing_held(result)


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("caller", ["loop", "thread"])
@pytest_twisted.ensureDeferred
async def test_cancel_one_download_mid_transfer(make_fault_site, fault_proxy,
                                                caller: str) -> None:
    site = make_fault_site(pages=2, items_per_page=5)
    site.add_fault("/item/k00002", Fault.drip(20.0, chunks=40))
    cancelled: list[bool] = []

    async def cancel_when_dripping() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            spider = CapturingSpider.last
            crawler = getattr(spider, "crawler", None)
            if crawler is not None:
                for entry in inflight_for(crawler).items():
                    if (entry.request.url.endswith("k00002") and entry.stage == "transfer"
                            and time.monotonic() - entry.transfer_started > 1.0):
                        tracker = inflight_for(crawler)
                        if caller == "loop":
                            cancelled.append(tracker.cancel(entry.request, "test"))
                        else:  # e.g. the watchdog's monitor thread
                            thread = threading.Thread(target=tracker.cancel_threadsafe,
                                                      args=(entry.request, "test"))
                            thread.start()
                            thread.join()
                            cancelled.append(True)
                        return
            await asyncio.sleep(0.05)

    CapturingSpider.last = None
    poller = asyncio.ensure_future(cancel_when_dripping())
    # DEADLINE_MIN well above the 1 s the canceller waits: a warm slot's deadline (p99 x 3
    # + buffer, at least MIN) must not cut the dripping transfer first
    result = await run_crawl(CapturingSpider,
                             settings(PROXY_LIST=[fault_proxy.url], DEADLINE_INITIAL=30.0,
                                      DEADLINE_MIN=10.0),
                             timeout=40, start_url=site.start_url)
    await poller
    assert cancelled == [True]
    assert result.finished and result.elapsed < 20  # did not wait for the drip
    assert set(result.keys()) == set(site.item_keys()) - {"k00002"}
    seen = [(u, e) for u, e in ExceptionRecorder.seen if u.endswith("k00002")]
    assert len(seen) == 1 and type(seen[0][1]) is DownloadCancelled
    assert seen[0][1].reason == "test" and seen[0][1].stage == "transfer"
    [(_, exc)] = result.crawler.spider.errors
    assert type(exc) is DownloadCancelled  # not retried: the canceller decides
    pool = guard_for(result.crawler).pool
    assert pool.counters.double_releases == 0
    assert pool.counters.by_reason.get("exception") == 1  # the cancelled one, once
    assert result.stats["antideadlock/deadline/cancels"] == 1
    assert_nothing_held(result)


# --------------------------------------------------------------------------- randomised


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_random_outcomes_release_each_lease_exactly_once(make_fault_site,
                                                               make_fault_proxy,
                                                               seed: int) -> None:
    rng = random.Random(seed)
    site = make_fault_site(pages=3, items_per_page=8, seed=seed)
    for key in site.item_keys():
        roll = rng.random()
        if roll < 0.1:
            site.add_fault(f"/item/{key}", Fault.hang())
        elif roll < 0.2:
            site.add_fault(f"/item/{key}", Fault.status(503), per="request", rate=0.5)
        elif roll < 0.3:
            site.add_fault(f"/item/{key}", Fault.reset(), per="request", rate=0.5)
        elif roll < 0.35:
            site.add_fault(f"/item/{key}", Fault.drip(0.6, chunks=6))
    proxies = [make_fault_proxy() for _ in range(2)]
    cancels = [3]
    grants: list[Any] = []
    releases: dict[int, int] = {}

    class Instrumented(CapturingSpider):
        async def start(self) -> Any:
            pool = guard_for(self.crawler).pool
            grant, release = pool._grant, pool._release

            def counting_grant(*args: Any, **kwargs: Any) -> Any:
                lease = grant(*args, **kwargs)
                grants.append(lease)
                return lease

            def counting_release(lease: Any, reason: str) -> bool:
                done = release(lease, reason)
                if done:
                    releases[lease.id] = releases.get(lease.id, 0) + 1
                return done

            pool._grant, pool._release = counting_grant, counting_release
            async for request in super().start():
                yield request

    async def cancel_some() -> None:
        end = time.monotonic() + 40
        while time.monotonic() < end and cancels[0]:
            spider = CapturingSpider.last
            crawler = getattr(spider, "crawler", None)
            entries = [e for e in (inflight_for(crawler).items() if crawler else [])
                       if "/item/" in e.request.url]
            if entries and rng.random() < 0.3:  # any stage: queued, lease_wait, transfer
                cancels[0] -= 1
                inflight_for(crawler).cancel(rng.choice(entries).request, "random",
                                             retry=rng.random() < 0.5)
            await asyncio.sleep(0.05)

    CapturingSpider.last = None
    canceller = asyncio.ensure_future(cancel_some())
    result = await run_crawl(
        Instrumented,
        {**settings(PROXY_LIST={p.url: 2 for p in proxies}, DEADLINE_INITIAL=1.5,
                    PROXY_LEASE_TIMEOUT=2.0, PROXY_COOLDOWN_BASE=0.1,
                    PROXY_COOLDOWN_MAX=0.3, DEADLINE_MAX=4.0, PROXY_FAILURE_CODES=[502, 503]),
         "RETRY_TIMES": 2, "CONCURRENT_REQUESTS": 8},
        timeout=80, start_url=site.start_url)
    canceller.cancel()
    assert result.finished
    assert result.stats["antideadlock/deadline/cancels"] >= 1
    assert grants, "no lease was taken"
    assert all(lease.released for lease in grants)
    assert releases == {lease.id: 1 for lease in grants}  # every lease exactly once
    assert_nothing_held(result)
