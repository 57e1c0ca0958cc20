"""ReliableQueue's scripts and bookkeeping, and ``fleet status``, against a real Redis (fast)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted
import redis
from scrapy import Request, Spider, signals
from scrapy.exceptions import IgnoreRequest
from scrapy.utils.test import get_crawler
from twisted.internet import reactor
from twisted.internet.task import deferLater

from scrapy_antideadlock import metakeys
from scrapy_antideadlock.fleet.leases import RedisLeaseBackend
from scrapy_antideadlock.fleet.queue import ReliableQueue
from scrapy_antideadlock.origin import origins_for


class QSpider(Spider):
    name = "q"

    def parse(self, response: Any) -> None:
        pass




@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
def make_queue(redis_url, prefix):
    made: list[ReliableQueue] = []

    def make(worker: str = "w1", **settings: Any) -> ReliableQueue:
        crawler = get_crawler(QSpider, {
            "ANTIDEADLOCK_FLEET_REDIS_URL": redis_url,
            "ANTIDEADLOCK_FLEET_KEY_PREFIX": prefix,
            "ANTIDEADLOCK_FLEET_WORKER_ID": worker,
            "ANTIDEADLOCK_FLEET_HEARTBEAT_INTERVAL": 0.05,
            "ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT": 0.3,
            "SCHEDULER_PERSIST": True,
            "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
            "SCHEDULER_DUPEFILTER_KEY": f"{prefix}:%(spider)s:dupefilter",
            **settings})
        spider = QSpider.from_crawler(crawler)
        crawler.spider = spider
        origins_for(crawler).hooked = True  # as ItemOriginMiddleware does at spider_opened
        queue = ReliableQueue(redis.Redis.from_url(redis_url), spider, f"{prefix}:q:requests")
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.worker.stop()


def finish(queue: ReliableQueue, request: Request) -> None:
    origins_for(queue.crawler).finished(request)


def test_pop_leases_and_ack_removes(make_queue):
    q = make_queue()
    q.push(Request("http://a/1", priority=0))
    assert len(q) == 1
    request = q.pop()
    assert request.url == "http://a/1"
    assert len(q) == 1  # leased, not gone
    assert q.pop() is None
    finish(q, request)
    assert len(q) == 0 and q.counts["acked"] == 1


def test_priority_then_push_order(make_queue):
    q = make_queue()
    for i, prio in enumerate([0, 5, 0, 5]):
        q.push(Request(f"http://a/{i}", priority=prio))
    assert [q.pop().url for _ in range(4)] == ["http://a/1", "http://a/3", "http://a/0",
                                               "http://a/2"]


def test_dead_workers_requests_are_redelivered(make_queue):
    a, b = make_queue("a"), make_queue("b")
    a.push(Request("http://a/1"))
    taken = a.pop()
    a.worker.stop()  # a dies: no more heartbeats
    assert b.pop() is None  # still leased to a
    time.sleep(0.4)
    again = b.pop()
    assert again is not None and again.url == taken.url
    assert b.counts["redelivered"] == 1
    finish(b, again)
    assert len(b) == 0


def test_live_workers_heartbeat_keeps_its_lease(make_queue):
    a, b = make_queue("a"), make_queue("b")
    a.push(Request("http://a/1"))
    a.pop()
    time.sleep(0.6)  # twice the visibility timeout: heartbeats moved the deadline
    assert b.pop() is None and b.counts["redelivered"] == 0


def test_max_deliveries_quarantines_fleet_wide(make_queue, redis_url):
    workers = [make_queue(f"w{i}", ANTIDEADLOCK_FLEET_MAX_DELIVERIES=2) for i in range(3)]
    workers[0].push(Request("http://a/poison"))
    for worker in workers[:2]:
        assert worker.pop() is not None
        worker.worker.stop()
        time.sleep(0.4)
    assert workers[2].pop() is None
    assert workers[2].counts["quarantined"] == 1 and len(workers[2]) == 0
    client = redis.Redis.from_url(redis_url)
    records = client.hgetall(workers[2].keys[6])
    record = json.loads(next(iter(records.values())))
    assert record["reason"] == "max_deliveries" and record["deliveries"] == 2


def test_late_ack_after_redelivery_is_stale_but_harmless(make_queue):
    a, b = make_queue("a"), make_queue("b")
    a.push(Request("http://a/1"))
    first = a.pop()
    a.worker.stop()
    time.sleep(0.4)
    second = b.pop()
    finish(a, first)  # a was only slow: its late ack removes the request
    assert a.crawler.stats.get_value("antideadlock/fleet/stale_acks") == 1
    finish(b, second)  # b's ack of the same request is a no-op
    assert len(b) == 0


def test_cancelled_for_resume_goes_back_at_once(make_queue):
    q = make_queue()
    q.push(Request("http://a/1"))
    request = q.pop()
    request.meta[metakeys.JOURNAL_KEEP] = True
    finish(q, request)
    again = q.pop()
    assert again is not None and again.url == "http://a/1"


def test_recovery_quarantine_goes_to_the_fleet(make_queue, redis_url):
    q = make_queue()
    q.push(Request("http://a/1"))
    request = q.pop()
    request.meta[metakeys.QUARANTINED] = True
    request.meta[metakeys.REQUEUES] = 2
    finish(q, request)
    assert len(q) == 0
    records = redis.Redis.from_url(redis_url).hvals(q.keys[6])
    assert len(records) == 1
    record = json.loads(records[0])
    assert record["reason"] == "recovery" and record["attempts"] == 3


def test_spider_close_gives_back_what_is_leased(make_queue):
    a, b = make_queue("a"), make_queue("b")
    for i in range(3):
        a.push(Request(f"http://a/{i}"))
    taken = [a.pop() for _ in range(3)]
    finish(a, taken[0])
    assert a.give_back_all() == 2
    assert sorted(b.pop().url for _ in range(2)) == ["http://a/1", "http://a/2"]


def test_process_local_meta_is_not_shipped(make_queue):
    q = make_queue()
    q.push(Request("http://a/1", meta={metakeys.DEADLINE: 123.0, "keep": 1}))
    request = q.pop()
    assert metakeys.DEADLINE not in request.meta and request.meta["keep"] == 1


def test_heartbeat_key_holds_the_health_json(make_queue, redis_url, prefix):
    q = make_queue("hb")
    q.push(Request("http://a/1"))
    q.pop()
    client = redis.Redis.from_url(redis_url)
    time.sleep(0.15)
    status = json.loads(client.get(f"{prefix}:worker:hb"))
    assert status["worker"] == "hb" and status["inflight"] == {q.key: 1}
    assert 0 < client.pttl(f"{prefix}:worker:hb") <= 300


def test_redis_down_buffers_pushes_and_redelivers_what_finished_meanwhile(make_queue,
                                                                         redis_server):
    q = make_queue(ANTIDEADLOCK_FLEET_REDIS_URL=redis_server.url,
                   ANTIDEADLOCK_FLEET_RETRY_AFTER=0.05)
    q.push(Request("http://a/1"))
    request = q.pop()
    redis_server.stop()
    q.push(Request("http://a/2"))  # buffered
    finish(q, request)  # not acknowledged: what its callback yielded may be lost
    assert q.pop() is None and len(q) >= 1  # unknown: never "done" while down
    redis_server.start()
    time.sleep(0.1)
    again = q.pop()  # the buffer is written first
    assert again is not None and again.url == "http://a/2"
    finish(q, again)
    time.sleep(0.35)  # the visibility timeout of the request that finished unacknowledged
    redelivered = q.pop()
    assert redelivered is not None and redelivered.url == "http://a/1"
    finish(q, redelivered)
    assert len(q) == 0
    stats = q.crawler.stats
    assert stats.get_value("antideadlock/fleet/buffered") == 1
    assert stats.get_value("antideadlock/fleet/not_acked") == 1


# ---------------------------------------------------------------- fleet status


def test_status_shows_workers_leases_inflight_and_quarantine(make_queue, redis_url, prefix):
    a, b = make_queue("wa"), make_queue("wb")
    for i in range(4):
        a.push(Request(f"http://a/{i}"))
    taken = [a.pop(), a.pop(), b.pop()]
    taken[0].meta[metakeys.QUARANTINED] = True
    finish(a, taken[0])
    backend = RedisLeaseBackend(a.link, "proxy")
    backend.acquire([("http://127.0.0.1:1", 2)], "req-1", 5)
    backend.cooldown("http://127.0.0.1:2", 30)
    assert RedisLeaseBackend(b.link, "proxy").acquire([("http://127.0.0.1:1", 2)], "r2", 5)
    b.worker.stop()  # b leaves: its key goes, its lease and request stay until their TTL
    time.sleep(0.1)

    def status(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "scrapy_antideadlock.fleet", "status",
                              "--url", redis_url, "--prefix", prefix, *extra],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    data = json.loads(status("--json"))
    assert data["workers"]["wa"]["state"] == "running" and data["workers"]["wa"]["healthy"]
    assert data["workers"]["wb"]["state"] == "gone"
    assert data["workers"]["wa"]["inflight"] == 1 and data["workers"]["wb"]["inflight"] == 1
    assert data["workers"]["wa"]["leases"] == 1 and data["workers"]["wb"]["leases"] == 1
    proxies = data["leases"]["proxy"]
    assert proxies["http://127.0.0.1:1"]["held"] == 2
    assert proxies["http://127.0.0.1:2"]["cooldown"] > 20
    queue = data["queues"][a.key]
    assert (queue["pending"], queue["leased"], queue["quarantined"]) == (1, 2, 1)
    assert queue["deliveries"] == {"1": 2} and queue["quarantine_reasons"] == {"recovery": 1}
    text = status()
    for needle in ("WORKERS", "LEASES", "QUEUES", "wa", "gone", "1 pending, 2 leased",
                   "cooldown", "recovery=1"):
        assert needle in text


def test_status_names_an_unreachable_redis():
    out = subprocess.run([sys.executable, "-m", "scrapy_antideadlock.fleet", "status",
                          "--url", "redis://127.0.0.1:1/0"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "cannot read the fleet" in out.stderr


def test_without_the_origin_hook_requests_are_acked_at_pop_not_leased_for_ever(make_queue,
                                                                               caplog):
    q = make_queue()
    origins_for(q.crawler).hooked = False
    q.push(Request("http://a/1"))
    assert q.pop() is not None
    assert len(q) == 0 and "ItemOriginMiddleware is not enabled" in caplog.text


# ---------------------------------------------------------------- the scripts, one by one


def _run(q: ReliableQueue, name: str, *args: Any) -> Any:
    return q._scripts[name](keys=q.keys, args=list(args))


def test_push_ids_keep_push_order_within_a_priority(make_queue, redis_url):
    q = make_queue()
    ids = [_run(q, "PUSH", 0, f"p{i}".encode(), "") for i in range(12)]
    assert ids == sorted(ids)  # zero-padded: "10" sorts after "9"
    members = redis.Redis.from_url(redis_url).zrange(q.keys[0], 0, -1)
    assert members == ids


def test_pop_script_moves_to_processing_with_a_deadline_in_one_step(make_queue, redis_url):
    q = make_queue()
    rid = _run(q, "PUSH", 0, b"payload", "")
    got = _run(q, "POP", "w1", 5000, 3, 10)
    client = redis.Redis.from_url(redis_url)
    assert got[2] == rid and got[3] == b"payload" and got[4] == 1
    assert client.zcard(q.keys[0]) == 0 and client.hget(q.keys[4], rid) == b"w1"
    seconds, micros = client.time()
    assert 4000 < client.zscore(q.keys[3], rid) - (seconds * 1000 + micros / 1000) <= 5000


def test_pop_skips_ids_whose_data_is_gone(make_queue, redis_url):
    q = make_queue()
    first = _run(q, "PUSH", 0, b"a", "")
    _run(q, "PUSH", 0, b"b", "")
    redis.Redis.from_url(redis_url).hdel(q.keys[1], first)
    assert _run(q, "POP", "w1", 5000, 3, 10)[3] == b"b"


def test_nack_only_by_the_holder_and_it_does_not_count_a_delivery(make_queue, redis_url):
    q = make_queue()
    rid = _run(q, "PUSH", 0, b"a", "")
    _run(q, "POP", "w1", 5000, 3, 10)
    assert _run(q, "NACK", rid, "w2") == 0
    assert _run(q, "NACK", rid, "w1") == 1
    assert redis.Redis.from_url(redis_url).hget(q.keys[5], rid) is None  # 0 deliveries
    assert _run(q, "POP", "w2", 5000, 3, 10)[4] == 1


def test_ack_results(make_queue):
    q = make_queue()
    rid = _run(q, "PUSH", 0, b"a", "")
    _run(q, "POP", "w1", 5000, 3, 10)
    assert _run(q, "ACK", rid, "w2") == 2  # someone else's lease: stale, removed anyway
    assert _run(q, "ACK", rid, "w1") == 0  # gone already
    rid = _run(q, "PUSH", 0, b"b", "")
    _run(q, "POP", "w1", 5000, 3, 10)
    assert _run(q, "ACK", rid, "w1") == 1


def test_renew_touches_only_the_callers_ids(make_queue, redis_url):
    q = make_queue()
    mine, theirs = _run(q, "PUSH", 0, b"a", ""), _run(q, "PUSH", 0, b"b", "")
    _run(q, "POP", "w1", 100, 3, 10)
    _run(q, "POP", "w2", 100, 3, 10)
    renewed = q._scripts["RENEW"](keys=[q.keys[3], q.keys[4]], args=["w1", 60000, mine, theirs])
    assert renewed == 1
    time.sleep(0.15)
    assert _run(q, "RECLAIM", "w3", 5000, 3, 10) == [1, 0]  # only w2's came back
    pending = redis.Redis.from_url(redis_url).zrange(q.keys[0], 0, -1)
    assert pending == [theirs]


def test_reclaim_is_bounded_per_call(make_queue, redis_url):
    q = make_queue()
    for i in range(5):
        _run(q, "PUSH", 0, f"{i}".encode(), "")
    ids = [_run(q, "POP", "dead", 60000, 3, 10)[2] for _ in range(5)]
    redis.Redis.from_url(redis_url).zadd(q.keys[3], dict.fromkeys(ids, 0), xx=True)  # expired
    assert _run(q, "RECLAIM", "w", 5000, 3, 2) == [2, 0]
    assert _run(q, "RECLAIM", "w", 5000, 3, 10) == [3, 0]


def test_quarantine_keeps_the_request_for_an_operator(make_queue, redis_url):
    q = make_queue()
    rid = _run(q, "PUSH", 0, b"poison", "")
    _run(q, "POP", "w1", 1, 1, 10)
    time.sleep(0.01)
    assert _run(q, "RECLAIM", "w2", 5000, 1, 10) == [0, 1]
    client = redis.Redis.from_url(redis_url)
    assert client.hget(q.keys[7], rid) == b"poison"
    record = json.loads(client.hget(q.keys[6], rid))
    assert record["last_worker"] == "w1" and record["deliveries"] == 1
    assert client.hget(q.keys[1], rid) is None and client.zcard(q.keys[0]) == 0


def test_require_redis_fails_at_start_naming_the_setting():
    from scrapy_antideadlock.fleet.leases import backend_for
    from scrapy_antideadlock.fleet.link import FleetRedisRequired

    crawler = get_crawler(QSpider, {"ANTIDEADLOCK_FLEET_REDIS_URL": "redis://127.0.0.1:1/0",
                                    "ANTIDEADLOCK_FLEET_REQUIRE_REDIS": True})
    with pytest.raises(FleetRedisRequired, match="ANTIDEADLOCK_FLEET_REQUIRE_REDIS"):
        backend_for(crawler, "proxy")


def test_visibility_shorter_than_two_heartbeats_is_refused(make_queue):
    from scrapy_antideadlock.settings import SettingError

    with pytest.raises(SettingError, match="ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT"):
        make_queue(ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT=0.05)


def test_an_intent_is_removed_by_its_push_which_goes_with_the_next_pop(make_queue,
                                                                         redis_url):
    q, other = make_queue("w1"), make_queue("w2")
    request = Request("http://a/1")
    q.intents.scheduled(request)
    client = redis.Redis.from_url(redis_url)
    assert client.hlen(q.keys[9]) == 1 and client.zcard(q.keys[10]) == 1
    calls = q.stats.get_value("antideadlock/fleet/redis_calls")
    q.push(request)  # batched: its intent covers it meanwhile, and counts as work
    assert client.zcard(q.keys[0]) == 0 and len(other) == 1
    assert q.pop().url == "http://a/1"  # pushed and popped in one round trip
    assert q.stats.get_value("antideadlock/fleet/redis_calls") == calls + 1
    assert client.hlen(q.keys[9]) == 0 and client.zcard(q.keys[10]) == 0


@pytest_twisted.ensureDeferred
async def test_batched_pushes_go_in_one_round_trip_without_a_pop(make_queue, redis_url):
    q = make_queue()
    requests = [Request(f"http://a/{i}") for i in range(5)]
    for request in requests:
        q.intents.scheduled(request)
    calls = q.stats.get_value("antideadlock/fleet/redis_calls")
    for request in requests:
        q.push(request)
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5
    while client.zcard(q.keys[0]) < 5 and time.monotonic() < deadline:
        await deferLater(reactor, 0.01, lambda: None)
    assert client.zcard(q.keys[0]) == 5 and client.hlen(q.keys[9]) == 0
    assert q.stats.get_value("antideadlock/fleet/redis_calls") == calls + 1
    assert [q.pop().url for _ in range(5)] == [r.url for r in requests]  # push order


def test_a_batched_push_lost_with_its_worker_is_pushed_from_its_intent(make_queue):
    a, b = make_queue("a"), make_queue("b")
    request = Request("http://a/batched")
    a.intents.scheduled(request)
    a.push(request)
    a._batch.clear()  # SIGKILLed before the batch was sent
    assert b.pop() is None and len(b) == 1  # not done: the intent is work
    time.sleep(0.35)
    assert b.pop().url == "http://a/batched"


def test_a_hard_exits_hand_back_sends_the_batched_pushes(make_queue, redis_url):
    """A hard exit (loop blocked: the batch's timer cannot fire) hands back through
    give_back_all: a batched push must go now, or its intent keeps every worker open."""
    a, b = make_queue("a"), make_queue("b")
    request = Request("http://a/batched")
    a.intents.scheduled(request)
    a.push(request)  # batched, not sent
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(a.keys[0]) == 0 and client.hlen(a.keys[9]) == 1
    a.give_back_all()
    assert client.zcard(a.keys[0]) == 1 and client.hlen(a.keys[9]) == 0
    assert b.pop().url == "http://a/batched"  # at once, not after the intent's deadline


def test_a_dead_workers_intent_is_pushed_by_the_next_pop(make_queue):
    a, b = make_queue("a"), make_queue("b")
    a.intents.scheduled(Request("http://a/orphan"))  # then killed: marked seen, never pushed
    assert b.pop() is None
    time.sleep(0.35)
    again = b.pop()
    assert again is not None and again.url == "http://a/orphan"
    assert b.counts["redelivered"] == 1


def test_a_late_push_after_its_intent_was_rescued_is_not_a_duplicate(make_queue, redis_url):
    a, b = make_queue("a"), make_queue("b")
    request = Request("http://a/1")
    a.intents.scheduled(request)
    time.sleep(0.35)
    assert b.pop() is not None  # rescued from the intent
    a.push(request)  # a was only slow
    assert b.pop() is None and len(b) == 1


@pytest_twisted.ensureDeferred
async def test_a_request_the_dupefilter_has_seen_is_dropped_without_an_intent(make_queue,
                                                                              redis_url):
    """The INTENT script's check already says "seen": the queue drops the request as the
    dupefilter would (stat, request_dropped), sparing the dupefilter's own round trip."""
    q = make_queue()
    key, fingerprint = q.intents.dupefilter
    request = Request("http://a/seen")
    redis.Redis.from_url(redis_url).sadd(key, fingerprint(request))
    dropped: list[Request] = []
    q.crawler.signals.connect(lambda request, spider: dropped.append(request),
                              signal=signals.request_dropped, weak=False)
    with pytest.raises(IgnoreRequest):
        q.intents.scheduled(request)
    assert redis.Redis.from_url(redis_url).hlen(q.keys[9]) == 0
    assert dropped == []  # after every request_scheduled handler ran, as Scrapy would
    await deferLater(reactor, 0, lambda: None)  # the loop's next turn
    assert dropped == [request]
    assert q.stats.get_value("dupefilter/filtered") == 1
    assert q.stats.get_value("antideadlock/fleet/duplicates_dropped") == 1
    q.intents.scheduled(Request("http://a/dont", dont_filter=True))
    assert redis.Redis.from_url(redis_url).hlen(q.keys[9]) == 0


def test_a_dropped_request_leaves_no_intent(make_queue, redis_url):
    q = make_queue()
    request = Request("http://a/1")
    q.intents.scheduled(request)
    q.intents.dropped(request)
    assert redis.Redis.from_url(redis_url).hlen(q.keys[9]) == 0


def test_clear_spares_a_queue_other_workers_still_use(make_queue):
    a, b = make_queue("a"), make_queue("b")
    a.push(Request("http://a/1"))
    a.clear()  # SCHEDULER_PERSIST off: b is alive, so nothing is deleted
    assert len(b) == 1
    b.worker.stop()
    a.clear()
    assert len(a) == 0


def test_an_empty_queue_is_asked_once_per_poll_interval_while_work_is_in_flight(make_queue):
    """Scrapy pops after every scheduled request (duplicates too): a busy worker must not
    pay a Redis round trip per start request while the shared queue is empty."""
    slow = {"ANTIDEADLOCK_FLEET_HEARTBEAT_INTERVAL": 5, "ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT": 30}
    q, other = make_queue("w1", **slow), make_queue("w2", **slow)  # no re-delivery here
    now = [100.0]
    q.clock = lambda: now[0]
    q.push(Request("http://a/1"))
    held = q.pop()
    assert held is not None and q.pop() is None  # empty: noted
    calls = q.stats.get_value("antideadlock/fleet/redis_calls")
    other.push(Request("http://a/2"))
    assert q.pop() is None  # within the interval, with work in flight: Redis not asked
    assert q.stats.get_value("antideadlock/fleet/redis_calls") == calls
    now[0] += q.conf.poll_interval + 0.001
    assert q.pop().url == "http://a/2"  # the interval passed: asked again
    assert q.pop() is None
    q.push(Request("http://a/3"))  # its own push: worth asking at once
    assert q.pop().url == "http://a/3"
    finish(q, held)
    idle = make_queue("w3", **slow)
    idle.clock = lambda: now[0]
    assert idle.pop() is None
    other.push(Request("http://a/4"))
    calls = idle.stats.get_value("antideadlock/fleet/redis_calls")
    assert idle.pop() is None  # nothing in flight: skipped, the engine woken at the end
    assert idle._waking and idle.stats.get_value("antideadlock/fleet/redis_calls") == calls
    now[0] += q.conf.poll_interval + 0.001
    assert idle.pop().url == "http://a/4"
