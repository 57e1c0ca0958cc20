"""Fleet mode vs scrapy-redis without it: 4 workers, 8 proxies x 2 slots, 1 % hanging
requests, one worker SIGKILLed at half-time.

- *fleet*: the full add-on in fleet mode: ``ReliableQueue`` + proxy leases in Redis
  (ANTIDEADLOCK_FLEET_REDIS_URL);
- *local*: the same workers without fleet mode: scrapy-redis's own queue, and each
  worker leases proxies from the add-on's local pool (the "local counter per worker": it
  believes it owns every slot). Plain Scrapy has no proxy pool to compare with, so this
  side isolates what fleet mode adds; it has the same deadlines, retries and limits.

Both modes get the same time limit (``--limit``): workers still running at it are killed,
and what they had not stored counts as lost. The modes alternate order over ``--rounds``;
figures are medians.

Per mode: unique items/min of the fleet, requests lost (expected keys never stored),
fleet leases still live after their TTL, most concurrent transfers seen at any proxy
(counted by the proxy) and Redis round trips per request. Then the added latency of one
lease (acquire + release: two round trips) in microseconds, local pool vs Redis backend.
It runs its own ``redis-server`` unless given one.

    python -m bench.fleet [--items 2000] [--limit 240] [--rounds 1]
                          [--redis-url redis://127.0.0.1:6380/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from scrapy_antideadlock.testing import FaultProxy, FaultSite, Latency, run_crawl_subprocess
from scrapy_antideadlock.testing.redis import scrapy_redis_settings
from scrapy_antideadlock.testing.site import Fault
from scrapy_antideadlock.testing.spiders import SiteSpider

from .common import load_line

ROOT = Path(__file__).resolve().parents[1]
WORKERS, PROXIES, SLOTS = 4, 8, 2


class ItemsSpider(SiteSpider):
    """Starts from every detail page (``count`` of them), so every worker has work."""

    def __init__(self, count: int | str = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = int(count)

    async def start(self):  # noqa: ANN201 - async generator
        base = self.start_url.rsplit("/list/", 1)[0]
        for i in range(self.count):
            yield self.make_request(f"{base}/item/{FaultSite.key(i)}", self.parse_item, "item")


def worker_settings(mode: str, url: str, prefix: str, worker: str,
                    proxies: list[FaultProxy]) -> dict[str, Any]:
    settings = scrapy_redis_settings(url, prefix, worker if mode == "fleet" else None,
                                     heartbeat=1.0, visibility=5.0)
    settings.update({
        "ANTIDEADLOCK_PROXY_LIST": {p.url: SLOTS for p in proxies},
        "ANTIDEADLOCK_DEADLINE_MIN": 1.0,
        "ANTIDEADLOCK_DEADLINE_INITIAL": 3.0,
        # PROXY_LEASE_GRACE stays at its default (5 s): the workers' loops stall for 2-3 s
        # on this shared machine (watchdog/loop_lag_max), and a 1 s grace let grants lapse
        # in Redis under transfers still running (fleet/late_releases, an extra transfer
        # at a proxy), against docs/fleet.md's advice
        "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0,
        "CONCURRENT_REQUESTS": 16,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 16,
        "RETRY_TIMES": 1,
        "LOG_LEVEL": "WARNING",
    })
    return settings


def run_mode(mode: str, url: str, site: FaultSite, proxies: list[FaultProxy], items: int,
             tmp: Path, limit: float) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    prefix = f"bench:{mode}:{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(url)
    client.config_resetstat()  # a private server: commandstats are this run's
    for proxy in proxies:
        proxy.reset_max_active()
    started = time.monotonic()
    procs = [run_crawl_subprocess(
        "bench.fleet:ItemsSpider", worker_settings(mode, url, prefix, f"w{i}", proxies),
        items_path=tmp / f"{mode}-w{i}.jsonl",
        spider_kwargs={"start_url": site.start_url, "count": items},
        pythonpath=[str(ROOT)]) for i in range(WORKERS)]
    expected = set(site.expected_keys())
    victim = procs[0]
    while sum(len(p.items()) for p in procs) < len(expected) // 2:
        if all(p.returncode is not None for p in procs) or time.monotonic() - started > limit:
            break
        time.sleep(0.05)
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    cut = 0
    for proc in procs[1:]:
        try:
            proc.wait(max(0.1, limit - (time.monotonic() - started)))
        except TimeoutError:
            proc.kill(signal.SIGKILL)
            cut += 1
    elapsed = time.monotonic() - started
    stored: dict[str, int] = {}
    for proc in procs:
        for item in proc.items():
            stored[item["key"]] = stored.get(item["key"], 0) + 1
    stats = [p.stats() or {} for p in procs[1:]]  # the victim's died with it
    time.sleep(max(0.0, killed_at + 10 - time.monotonic()))  # past every lease's TTL
    return {
        "mode": mode, "elapsed_s": round(elapsed, 1),
        "items_per_min": round(len(stored) / elapsed * 60, 1),
        "expected": len(expected), "stored_unique": len(set(stored) & expected),
        "lost": len(expected - set(stored)),
        "duplicates": sum(n - 1 for n in stored.values()),
        "leases_live_after_ttl": _live_leases(client, prefix),
        "max_concurrent_at_a_proxy": max(p.max_active for p in proxies),
        "round_trips_per_request": _round_trips(mode, client, stats),
        "redelivered": sum(s.get("antideadlock/fleet/redelivered", 0) for s in stats),
        "degraded": sum(s.get("antideadlock/fleet/degraded", 0) for s in stats),
        # why a proxy could see more than its capacity: grants made locally while Redis
        # was unreachable; grants that lapsed in Redis before their holder let go (its
        # loop was late past PROXY_LEASE_GRACE): releases or renewals found them expired
        **{name: sum(s.get(f"antideadlock/{stat}", 0) for s in stats) for name, stat in (
            ("local_grants", "fleet/local_grants"), ("late_releases", "fleet/late_releases"),
            ("renew_lost", "fleet/renew_lost"), ("leases_expired", "proxy/leases_expired"),
            ("lease_timeouts", "proxy/lease_timeouts"), ("cooldowns", "proxy/cooldowns"))},
        "loop_lag_max_s": max((s.get("antideadlock/watchdog/loop_lag_max", 0) for s in stats),
                              default=0),
        "killed_after_s": round(killed_at - started, 1),
        "workers_cut_at_limit": cut,
        "exit_codes": [p.returncode for p in procs],
    }


def _round_trips(mode: str, client: redis.Redis, stats: list[dict[str, Any]]) -> float:
    """Redis round trips per response. Fleet: the pack's own count plus the dupefilter's
    SADD per scheduled request (not for the duplicates the fleet queue dropped before it),
    per surviving worker. Plain: scrapy-redis's commands from the server's commandstats (a
    pop is one MULTI/EXEC round trip)."""
    if mode == "fleet":
        calls = sum(s.get("antideadlock/fleet/redis_calls", 0)
                    + s.get("scheduler/enqueued/redis", 0) + s.get("dupefilter/filtered", 0)
                    - s.get("antideadlock/fleet/duplicates_dropped", 0)
                    for s in stats)
        return round(calls / max(1, sum(s.get("response_received_count", 0) for s in stats)),
                     2)
    commands = client.info("commandstats")
    calls = sum(commands.get(f"cmdstat_{name}", {}).get("calls", 0)
                for name in ("sadd", "zadd", "zcard", "exec", "ping"))
    responses = sum(s.get("response_received_count", 0) for s in stats)
    return round(calls / max(1, responses), 2)  # includes the victim's calls: an upper bound


def _live_leases(client: redis.Redis, prefix: str) -> int:
    seconds, micros = client.time()
    now = seconds * 1000 + micros / 1000
    return sum(client.zcount(key, now, "+inf")
               for key in client.scan_iter(f"{prefix}:lease:*:h"))


def lease_latency(url: str, rounds: int = 3000) -> tuple[float, float]:
    """µs per acquire + release: local LeasePool vs the same pool over Redis."""
    from scrapy_antideadlock.fleet.leases import RedisLeaseBackend
    from scrapy_antideadlock.fleet.link import FleetLink
    from scrapy_antideadlock.primitives import LeasePool

    prefix = f"bench:lat:{uuid.uuid4().hex[:6]}"
    members = {f"http://proxy-{i}:8080": SLOTS for i in range(PROXIES)}

    async def measure(pool: LeasePool) -> float:
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(rounds // 5):
                pool.try_acquire(f"r{i}", ttl=30).release()
            samples.append((time.perf_counter() - t0) / (rounds // 5) * 1e6)
        return statistics.median(samples)

    local = asyncio.run(measure(LeasePool("proxy", members)))
    link = FleetLink(url, prefix=prefix)
    shared = asyncio.run(measure(LeasePool("proxy", members,
                                           backend=RedisLeaseBackend(link, "proxy"))))
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    return local, shared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000 if os.environ.get("BENCH_REPORT")
                        else 2000)
    parser.add_argument("--limit", type=float, default=240.0,
                        help="seconds each mode gets (workers still running are killed)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--redis-url", default=None,
                        help="a Redis of its own (CONFIG RESETSTAT is used); default: a "
                             "private redis-server")
    args = parser.parse_args()
    from scrapy_antideadlock.testing.redis import RedisServer

    server = None if args.redis_url else RedisServer(persistent=False).start()
    url = args.redis_url or server.url
    per_page = 50
    site = FaultSite(pages=max(1, args.items // per_page), items_per_page=per_page,
                     latency=Latency.lognormal(0.05, 0.5, cap=0.5)).start()
    site.add_fault("/item/*", Fault.hang(), rate=0.01)
    proxies = [FaultProxy().start() for _ in range(PROXIES)]
    runs: dict[str, list[dict[str, Any]]] = {"fleet": [], "local": []}
    print(f"{load_line()} (start); limit {args.limit:.0f} s for each mode, "
          f"{args.rounds} alternating round(s)", flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                for mode in ("fleet", "local") if rnd % 2 == 0 else ("local", "fleet"):
                    runs[mode].append(run_mode(mode, url, site, proxies, args.items,
                                               Path(tmp) / f"r{rnd}", args.limit))
                    print(json.dumps(runs[mode][-1]), flush=True)
        local_us, redis_us = lease_latency(url)
    finally:
        for proxy in proxies:
            proxy.stop()
        site.stop()
        if server is not None:
            server.cleanup()
    print(f"{load_line()} (end)")
    print(f"lease acquire+release: local {local_us:.1f} us, redis {redis_us:.1f} us")

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    what = (f"{WORKERS} workers, 1 SIGKILLed at half-time, limit {args.limit:.0f} s each, "
            f"median of {args.rounds}")
    local = "no fleet mode (scrapy-redis queue, per-worker local proxy pool)"
    for mode, who in (("fleet", "fleet mode"), ("local", local)):
        print(f"RESULT fleet.items_per_min_{mode} {med(mode, 'items_per_min'):g} items/min "
              f"# {who}; {what}")
        print(f"RESULT fleet.lost_{mode} {med(mode, 'lost'):g} count "
              f"# {who}: expected keys never stored; {what}")
        print(f"RESULT fleet.max_per_proxy_{mode} {med(mode, 'max_concurrent_at_a_proxy'):g} "
              f"count # {who}: most transfers at one proxy (capacity {SLOTS})")
    print(f"RESULT fleet.leases_leaked {med('fleet', 'leases_live_after_ttl'):g} count "
          f"# fleet leases live after TTL")
    print(f"RESULT fleet.round_trips_per_request {med('fleet', 'round_trips_per_request'):g} "
          f"count # Redis round trips per response, fleet mode; without it (scrapy-redis "
          f"queue only): {med('local', 'round_trips_per_request'):g}")
    print(f"RESULT fleet.lease_added_latency {redis_us - local_us:.1f} us "
          f"# acquire+release, Redis vs local")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
