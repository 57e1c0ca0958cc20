"""Redis round trips per request of fleet workers, counted at the Redis client.

Each round trip is a wait on the event loop; every worker of a fleet schedules the same
start requests, so most of them are duplicates. The count wraps redis-py itself in the
worker process (every command sent alone, every pipeline), not the pack's own counters.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import redis

from scrapy_antideadlock.testing import FaultSite, Latency, run_crawl_subprocess
from scrapy_antideadlock.testing.redis import scrapy_redis_settings
from scrapy_antideadlock.testing.spiders import SiteSpider

BOUND = 60.0
ITEMS = 120
WORKERS = 3


def count_round_trips(path: str, crawler: Any) -> None:
    """Count every round trip of every Redis client in this process; write the count to
    ``path`` when the engine has stopped (after the queue's and heartbeat's last calls)."""
    from redis.client import Pipeline
    from scrapy import signals

    lock, count = threading.Lock(), [0]
    one, many = redis.Redis.execute_command, Pipeline.execute

    def counted(method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                count[0] += 1
            return method(*args, **kwargs)
        return wrapper

    redis.Redis.execute_command = counted(one)  # Pipeline buffers its own execute_command
    Pipeline.execute = counted(many)

    def write(**_: Any) -> None:
        Path(path).write_text(json.dumps(count[0]))

    crawler.signals.connect(write, signal=signals.engine_stopped, weak=False)


class CountingSpider(SiteSpider):
    """Starts from every detail page, as each worker of a fleet running one spider does."""

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> CountingSpider:
        count_round_trips(kwargs.pop("count_path"), crawler)
        return super().from_crawler(crawler, *args, **kwargs)

    async def start(self):
        base = self.start_url.rsplit("/list/", 1)[0]
        for i in range(ITEMS):
            yield self.make_request(f"{base}/item/{FaultSite.key(i)}", self.parse_item, "item")


def test_round_trips_per_request_of_a_fleet_with_duplicate_start_requests(
        redis_url, redis_prefix, tmp_path):
    """Per unique request: an intent per worker that schedules it, one dupefilter mark,
    push, pop and ack. Duplicates cost one round trip (the intent's check), not two, and
    a busy worker does not ask an empty queue after every duplicate."""
    with FaultSite(pages=1, items_per_page=ITEMS, latency=Latency.fixed(0.02)) as site:
        procs = []
        for i in range(WORKERS):
            settings = scrapy_redis_settings(redis_url, redis_prefix, f"w{i}", heartbeat=1.0,
                                             visibility=5.0)
            settings.update({"ANTIDEADLOCK_WATCHDOG_ENABLED": False, "LOG_LEVEL": "INFO",
                             "CONCURRENT_REQUESTS": 8, "CONCURRENT_REQUESTS_PER_DOMAIN": 8})
            procs.append(run_crawl_subprocess(
                CountingSpider, settings, items_path=tmp_path / f"w{i}.jsonl",
                spider_kwargs={"start_url": site.start_url,
                               "count_path": str(tmp_path / f"w{i}.count")}))
        for proc in procs:
            with proc:
                assert proc.wait(BOUND) == 0, proc.log_tail()
    stored = [item["key"] for proc in procs for item in proc.items()]
    assert sorted(set(stored)) == site.expected_keys() == sorted(stored)
    trips = sum(json.loads((tmp_path / f"w{i}.count").read_text()) for i in range(WORKERS))
    # a worker the others left no request to has no such stat
    responses = sum(proc.stats().get("response_received_count", 0) for proc in procs)
    assert responses == ITEMS
    # 3 workers: 3 intents + 1 mark + pop (the push with it) + ack = 6, + races, polls,
    # heartbeats and start-up: 6.5-7.5 measured; 9.4-10 before duplicates skipped the
    # dupefilter's call and pushes were batched.
    assert trips / responses < 8.5, f"{trips} round trips for {responses} responses"
