"""Fleet mode with real worker processes, a real Redis and real proxies.

Every crawl is a child process (``run_crawl_subprocess``) bounded by ``wait``; the
proxies count concurrent transfers themselves (``FaultProxy.max_active``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scrapy_antideadlock.testing import FaultSite, Latency, run_crawl_subprocess

SPIDER = "scrapy_antideadlock.testing.spiders:SiteSpider"
BOUND = 60.0  # outer time bound of every worker


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"adtest:{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}*"))
    if keys:
        client.delete(*keys)


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
