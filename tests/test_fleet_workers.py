"""Fleet mode with real worker processes, a real Redis and real proxies.

Every crawl is a child process (``run_crawl_subprocess``) bounded by ``wait``; the
proxies count concurrent transfers themselves (``FaultProxy.max_active``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from scrapy_antideadlock.fleet.status import collect
from scrapy_antideadlock.testing import Fault, FaultSite, Latency, run_crawl_subprocess
from scrapy_antideadlock.testing.redis import scrapy_redis_settings
from scrapy_antideadlock.testing.spiders import SiteSpider

SPIDER = "scrapy_antideadlock.testing.spiders:SiteSpider"
BOUND = 60.0  # outer time bound of every worker
ITEMS = 240


class AllItemsSpider(SiteSpider):
    """Starts from every detail page, so each worker of a fleet has work from its start."""

    async def start(self):
        base = self.start_url.rsplit("/list/", 1)[0]
        pages = int(self.settings.getint("ANTIDEADLOCK_TEST_PAGES", 6))
        for i in range(ITEMS // 6 * pages):
            yield self.make_request(f"{base}/item/{FaultSite.key(i)}", self.parse_item, "item")




@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


def lease_settings(proxies: list[Any], url: str | None, prefix: str, **extra: Any
                   ) -> dict[str, Any]:
    settings = {
        "ADDONS": {"scrapy_antideadlock.Addon": 0},
        "ANTIDEADLOCK_PROXY_LIST": {proxy.url: 2 for proxy in proxies},
        "ANTIDEADLOCK_FLEET_KEY_PREFIX": prefix,
        "ANTIDEADLOCK_DEADLINE_INITIAL": 10.0,
        "ANTIDEADLOCK_WATCHDOG_ENABLED": False,
        "CONCURRENT_REQUESTS": 16,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 16,
        "LOG_LEVEL": "INFO",
        **extra,
    }
    if url is not None:
        settings["ANTIDEADLOCK_FLEET_REDIS_URL"] = url
    return settings


def run_workers(count: int, settings: dict[str, Any], site: FaultSite, tmp: Path,
                name: str) -> list[Any]:
    procs = [run_crawl_subprocess(SPIDER, settings, items_path=tmp / f"{name}{i}.jsonl",
                                  spider_kwargs={"start_url": site.start_url})
             for i in range(count)]
    for proc in procs:
        proc.wait(BOUND)
    return procs


def test_four_workers_never_exceed_two_transfers_per_proxy(make_fault_proxy, redis_url,
                                                           prefix, tmp_path):
    proxies = [make_fault_proxy() for _ in range(3)]
    with FaultSite(pages=3, items_per_page=10, latency=Latency.fixed(0.05)) as site:
        procs = run_workers(4, lease_settings(proxies, redis_url, prefix), site, tmp_path,
                            "fleet")
        for proc in procs:
            assert proc.returncode == 0, proc.log_tail()
            assert sorted(i["key"] for i in proc.items()) == site.expected_keys()
            stats = proc.stats()
            assert stats["antideadlock/proxy/leases_acquired"] >= 33
            assert "antideadlock/fleet/degraded" not in stats
        assert [p.max_active for p in proxies] == [2, 2, 2]  # contended, never above 2
        assert sum(p.requests for p in proxies) >= 4 * 33
        client = redis.Redis.from_url(redis_url)
        held = [client.zcard(k) for k in client.scan_iter(f"{prefix}:lease:proxy:*:h")]
        assert sum(held) == 0  # every worker returned its slots at close

        # The contrast: local pools, each worker believes it owns every slot.
        for proxy in proxies:
            proxy.reset_max_active()
        procs = run_workers(4, lease_settings(proxies, None, prefix), site, tmp_path,
                            "local")
        assert all(proc.returncode == 0 for proc in procs)
        assert max(p.max_active for p in proxies) > 2


# ---------------------------------------------------------------- scrapy-redis workers


def fleet_settings(redis_url: str, prefix: str, worker: str, *, reliable: bool = True,
                   proxies: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    settings = scrapy_redis_settings(redis_url, prefix, worker if reliable else None)
    settings.update({
        "ANTIDEADLOCK_WATCHDOG_ENABLED": False,
        "CONCURRENT_REQUESTS": 32,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 32,
        "LOG_LEVEL": "INFO",
    })
    if proxies:
        settings.update({
            "ANTIDEADLOCK_PROXY_LIST": {proxy.url: 2 for proxy in proxies},
            "ANTIDEADLOCK_DEADLINE_INITIAL": 5.0,
            "ANTIDEADLOCK_DEADLINE_MAX": 5.0,  # so a lease's TTL is at most 5 + 1 s
            "ANTIDEADLOCK_PROXY_LEASE_GRACE": 1.0,
            # 4 x 32 requests queue for 6 slots on a busy machine: a request may wait
            # longer than its deadline many times; it must be retried, not given up.
            "ANTIDEADLOCK_PROXY_LEASE_RETRIES": 100,
            "RETRY_TIMES": 20,
        })
    settings.update(extra)
    return settings


def start_workers(count: int, site: FaultSite, tmp: Path, **kwargs: Any) -> list[Any]:
    return [run_crawl_subprocess(AllItemsSpider, fleet_settings(worker=f"w{i}", **kwargs),
                                 items_path=tmp / f"w{i}.jsonl",
                                 spider_kwargs={"start_url": site.start_url})
            for i in range(count)]


def leased_to(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Requests in flight per worker, read from the queue's processing structure."""
    owners = client.hvals(f"{prefix}:site:requests:owner")
    counts: dict[str, int] = {}
    for owner in owners:
        counts[owner.decode()] = counts.get(owner.decode(), 0) + 1
    return counts


def wait_for(predicate: Any, timeout: float, message: str, procs: list[Any]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline or all(p.returncode is not None for p in procs):
            raise AssertionError(f"{message}\n" + "\n".join(p.log_tail(15) for p in procs))
        time.sleep(0.02)


def items_by_worker(procs: list[Any]) -> list[list[str]]:
    return [[item["key"] for item in proc.items()] for proc in procs]


def test_sigkilled_worker_loses_nothing_and_its_leases_return(make_fault_proxy, redis_url,
                                                               prefix, tmp_path):
    proxies = [make_fault_proxy() for _ in range(3)]
    client = redis.Redis.from_url(redis_url)
    with FaultSite(pages=6, items_per_page=ITEMS // 6, latency=Latency.fixed(0.1)) as site:
        procs = start_workers(4, site, tmp_path, redis_url=redis_url, prefix=prefix,
                              proxies=proxies)
        try:
            def victim() -> tuple[str, dict] | None:
                # `fleet status` must show what Redis holds: one worker's leased requests
                # and proxy lease, read in the same turn (a proxy lease lasts one download,
                # so a status read after this check may find it already released)
                fleet = collect(client, prefix)
                counts = leased_to(client, prefix)
                holders = b" ".join(v for k in client.scan_iter(f"{prefix}:lease:proxy:*:o")
                                    for v in client.hvals(k))
                for w, n in counts.items():
                    shown = fleet["workers"].get(w, {})
                    if n >= 24 and w.encode() + b" " in holders \
                            and shown.get("inflight", 0) >= 20 and shown.get("leases", 0) >= 1:
                        return w, fleet
                return None

            name, fleet = wait_for(victim, 40, "no worker held 20 requests and a proxy lease "
                                   "(as `fleet status` shows them)", procs)
            killed = procs[int(name[1:])]
            health = json.loads(client.get(f"{prefix}:worker:{name}"))
            killed.kill(signal.SIGKILL)
            assert killed.wait(10) == -signal.SIGKILL
            killed_at = time.monotonic()
            popped = leased_to(client, prefix)[name]  # exact: nobody reclaims for 3 s
            assert popped >= 20
            assert health["healthy"] and "loop_heartbeat_age" in health  # /healthz's JSON
            tokens = [(k, t) for k in client.scan_iter(f"{prefix}:lease:proxy:*:o")
                      for t, v in client.hgetall(k).items() if v.startswith(name.encode())]
            # Its leases return within their TTL (deadline <= 5 s + grace 1 s) ...
            wait_for(lambda: all(_expired(client, k, t) for k, t in tokens), 6.5,
                     "the dead worker's leases did not expire within the TTL", procs)
            assert time.monotonic() - killed_at <= 6.5
            live = [p for p in procs if p is not killed]
            for proc in live:
                assert proc.wait(BOUND) == 0, proc.log_tail()
        finally:
            for proc in procs:
                proc.kill()
        expected = site.expected_keys()
        survivors = items_by_worker(live)
        union = {key for keys in items_by_worker(procs) for key in keys}
        failed = [{k: v for k, v in p.stats().items()
                   if "gave_up" in k or "max_reached" in k or "exception_type" in k}
                  for p in live]
        assert union == set(expected), failed  # every URL, including the dead worker's
        flat = [key for keys in survivors for key in keys]
        # At least once: a request the dead worker had stored but not acknowledged is
        # crawled again (kept once by an idempotent store); among the survivors at most
        # the one it was scheduling when killed (rescued from its intent).
        assert len(flat) - len(set(flat)) <= 1
        redelivered = sum(p.stats()["antideadlock/fleet/redelivered"] for p in live
                          if "antideadlock/fleet/redelivered" in p.stats())
        assert redelivered >= popped >= 20
        assert max(p.max_active for p in proxies) <= 2
        assert client.zcard(f"{prefix}:site:requests:processing") == 0
        assert client.zcard(f"{prefix}:site:requests:pending") == 0
        assert client.hlen(f"{prefix}:site:requests:quarantine") == 0


def _expired(client: redis.Redis, owners_key: bytes, token: bytes) -> bool:
    score = client.zscore(owners_key[:-2] + b":h", token)
    seconds, micros = client.time()
    return score is None or score <= seconds * 1000 + micros / 1000


def test_plain_scrapy_redis_loses_the_killed_workers_requests(redis_url, prefix, tmp_path):
    with FaultSite(pages=6, items_per_page=ITEMS // 6, latency=Latency.fixed(0.3)) as site:
        procs = start_workers(3, site, tmp_path, redis_url=redis_url, prefix=prefix,
                              reliable=False)
        killed = procs[0]
        try:
            wait_for(lambda: len(killed.items()) >= 5, 40, "the first worker got no items",
                     procs)
            killed.kill(signal.SIGKILL)
            for proc in procs[1:]:
                assert proc.wait(BOUND) == 0, proc.log_tail()
        finally:
            for proc in procs:
                proc.kill()
        union = {key for keys in items_by_worker(procs) for key in keys}
        missing = set(site.expected_keys()) - union
        assert len(missing) >= 3  # popped by the dead worker, gone for good


def test_redis_restarted_mid_crawl_workers_carry_on(make_fault_proxy, redis_server, tmp_path):
    proxies = [make_fault_proxy() for _ in range(2)]
    prefix = "adtest:restart"
    with FaultSite(pages=3, items_per_page=ITEMS // 6, latency=Latency.fixed(0.05)) as site:
        procs = start_workers(2, site, tmp_path, redis_url=redis_server.url, prefix=prefix,
                              proxies=proxies, ANTIDEADLOCK_FLEET_RETRY_AFTER=0.2,
                              ANTIDEADLOCK_TEST_PAGES=3,
                              CONCURRENT_REQUESTS=8, CONCURRENT_REQUESTS_PER_DOMAIN=8)
        try:
            wait_for(lambda: sum(len(p.items()) for p in procs) >= ITEMS // 8, 40,
                     "no progress before the restart", procs)
            redis_server.stop()  # SIGTERM (the append-only file keeps the data)
            wait_for(lambda: any("UNREACHABLE" in p.log_path.read_text() for p in procs), 20,
                     "no worker noticed the outage", procs)
            redis_server.start()  # same port, same data
            for proc in procs:
                assert proc.wait(BOUND) == 0, proc.log_tail()
        finally:
            for proc in procs:
                proc.kill()
        union = {key for keys in items_by_worker(procs) for key in keys}
        assert union == set(site.expected_keys())
        stats = [p.stats() for p in procs]
        assert sum(s.get("antideadlock/fleet/degraded", 0) for s in stats) >= 1
        client = redis.Redis.from_url(redis_server.url)
        assert client.zcard(f"{prefix}:site:requests:processing") == 0
        assert client.zcard(f"{prefix}:site:requests:pending") == 0


class BlockingItemsSpider(AllItemsSpider):
    """Blocks the event loop in the callback of the 30th item (time.sleep)."""

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        if response.url.endswith(FaultSite.key(29)):
            time.sleep(120)
        yield from super().parse_item(response, **kwargs)


def test_hard_exit_gives_leased_requests_back_at_once(redis_url, prefix, tmp_path):
    from scrapy_antideadlock.recovery import EXIT_BLOCKED_LOOP

    with FaultSite(pages=3, items_per_page=ITEMS // 6, latency=Latency.fixed(0.05)) as site:
        settings = fleet_settings(redis_url, prefix, "hx", ANTIDEADLOCK_TEST_PAGES=3,
                                  ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT=120.0,
                                  ANTIDEADLOCK_RECOVERY_LEVEL="exit",
                                  ANTIDEADLOCK_WATCHDOG_ENABLED=True,
                                  ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD=1.0,
                                  ANTIDEADLOCK_RECOVERY_BLOCKED_LOOP_EXIT_AFTER=2.0)
        proc = run_crawl_subprocess(BlockingItemsSpider, settings,
                                    items_path=tmp_path / "hx.jsonl",
                                    spider_kwargs={"start_url": site.start_url})
        with proc:
            assert proc.wait(BOUND) == EXIT_BLOCKED_LOOP, proc.log_tail()
        client = redis.Redis.from_url(redis_url)
        # The heartbeat thread outlived the blocked loop, so without the hand-back these
        # would stay leased for the 120 s visibility timeout.
        assert client.zcard(f"{prefix}:site:requests:processing") == 0
        assert client.zcard(f"{prefix}:site:requests:pending") > 0
        after = start_workers(1, site, tmp_path, redis_url=redis_url, prefix=prefix,
                              ANTIDEADLOCK_TEST_PAGES=3)[0]
        with after:
            assert after.wait(BOUND) == 0, after.log_tail()
    union = {item["key"] for p in (proc, after) for item in p.items()}
    assert union == set(site.expected_keys())


def test_recovery_requeues_through_the_shared_queue_and_quarantines_fleet_wide(
        redis_url, prefix, tmp_path):
    poison = FaultSite.key(7)
    with FaultSite(pages=1, items_per_page=ITEMS // 6, latency=Latency.fixed(0.01)) as site:
        site.add_fault(f"/item/{poison}", Fault.hang())
        settings = fleet_settings(
            redis_url, prefix, "rq", ANTIDEADLOCK_TEST_PAGES=1,
            ANTIDEADLOCK_WATCHDOG_ENABLED=True, ANTIDEADLOCK_WATCHDOG_WINDOW=1.5,
            ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL=0, ANTIDEADLOCK_DEADLINE_INITIAL=60.0,
            ANTIDEADLOCK_DEADLINE_MIN=60.0, ANTIDEADLOCK_DEADLINE_MAX=60.0,
            DOWNLOAD_TIMEOUT=120, ANTIDEADLOCK_RECOVERY_LEVEL="close",
            ANTIDEADLOCK_RECOVERY_MAX_REQUEUES=1, ANTIDEADLOCK_RECOVERY_GRACE=30.0,
            ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE=str(tmp_path / "quarantine.jsonl"))
        proc = run_crawl_subprocess(AllItemsSpider, settings, items_path=tmp_path / "rq.jsonl",
                                    spider_kwargs={"start_url": site.start_url})
        with proc:
            assert proc.wait(BOUND) == 0, proc.log_tail()
        hits = site.hits[f"/item/{poison}"]
    stats = proc.stats()
    assert stats["antideadlock/watchdog/requeued"] == 1
    assert stats["antideadlock/fleet/pushed"] >= ITEMS // 6 + 1  # the requeued copy too
    assert 2 <= hits <= 4
    client = redis.Redis.from_url(redis_url)
    [record] = [json.loads(r) for r in client.hvals(f"{prefix}:site:requests:quarantine")]
    assert record["reason"] == "recovery" and record["attempts"] == 2
    assert record["url"].endswith(poison)
    assert client.zcard(f"{prefix}:site:requests:pending") == 0
    assert client.zcard(f"{prefix}:site:requests:processing") == 0
