"""A scrapy-redis queue that leases requests instead of popping them.

``SCHEDULER_QUEUE_CLASS = "scrapy_antideadlock.fleet.ReliableQueue"`` — with
scrapy-redis's own ``Scheduler`` and ``RFPDupeFilter``; spiders do not change.

scrapy-redis pops destructively: a worker killed with requests in flight (or in its
callbacks) loses them. Here a pop moves the request, in one atomic script, to a
*processing* set as "leased to worker W until T"; the worker's heartbeat moves T. The
request is acknowledged (deleted) only when it is done the way the journal means it:
its callback finished and its items passed the pipelines (the
:mod:`scrapy_antideadlock.origin` moment). A worker that stops heartbeating has its
requests re-delivered by the next pop of any live worker; a request delivered
``FLEET_MAX_DELIVERIES`` times goes to a fleet-wide quarantine instead.

While Redis is unreachable, pushes are buffered in memory and written when it answers
again, requests that finish are not acknowledged (they are re-delivered later), pops
return nothing, and the queue reports pending work so the worker neither loses requests
nor closes early.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from typing import Any

from scrapy import Request, signals
from scrapy_redis.queue import Base

from .. import metakeys, timers
from .. import settings as ad_settings
from .. import stats as ad_stats
from ..compat.scrapy import engine_or_none, wake_engine
from ..context import context_for
from ..identity import strip_credentials
from ..origin import origins_for
from ..primitives import BackendUnavailable
from . import scripts
from .intents import Intents
from .leases import link_for
from .link import FleetLink
from .worker import worker_for

logger = logging.getLogger(__name__)

__all__ = ["ReliableQueue"]

# Meta that means nothing in another process (see metakeys.PROCESS_LOCAL).
_DROP_META = (*metakeys.PROCESS_LOCAL, "download_latency", "download_slot", "playwright_page")
_RECLAIM_LIMIT = 100
# A push whose request has an intent waits this long for company: the pushes that follow
# and the next pop go in one round trip. A kill meanwhile loses nothing (the intents).
_PUSH_DELAY = 0.02


class ReliableQueue(Base):
    """scrapy-redis queue class: leased pops, acks when done, re-delivery, quarantine."""

    def __init__(self, server: Any, spider: Any, key: str, serializer: Any = None) -> None:
        super().__init__(server, spider, key, serializer)
        crawler = spider.crawler
        self.crawler = crawler
        self.stats = crawler.stats
        conf = ad_settings.load(crawler.settings, "fleet")
        self.conf = conf
        self.link = link_for(crawler) or _link_from_server(server, conf, crawler.stats)
        self.worker_id = self.link.worker
        self.visibility_ms = int(conf.visibility_timeout * 1000)
        self.keys = [f"{self.key}:{name}" for name in scripts.KEYS]
        client = self.link.client
        self._scripts = {name: client.register_script(getattr(scripts, name))
                         for name in ("PUSH", "POP", "ACK", "NACK", "QUARANTINE", "RECLAIM",
                                      "RENEW", "INTENT", "DROP_INTENT")}
        self._leased: dict[Request, str] = {}  # popped and not done -> id
        self.intents = Intents(self)
        self._lock = threading.Lock()  # _leased is read by the heartbeat thread
        self._outbox: deque[tuple[str, list[Any]]] = deque()  # writes Redis did not take
        self._batch: list[Any] = []  # PUSH triples of requests with an intent, not sent yet
        self._last_len = 0
        self._len_at: float | None = None  # when _last_len (> 0) was read from Redis
        self._acks_at_pop = None  # decided at the first pop: can completion be observed?
        self._empty_at: float | None = None  # last pop found nothing (no push here since)
        self._waking = False  # an engine wake-up is scheduled (a pop was skipped)
        self.clock = time.monotonic
        self.counts = {"popped": 0, "acked": 0, "redelivered": 0, "quarantined": 0}
        if conf.heartbeat_interval * 2 > conf.visibility_timeout:
            raise ad_settings.SettingError(
                "ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT", "seconds > 2 x HEARTBEAT_INTERVAL",
                conf.visibility_timeout, "a live worker's requests would be re-delivered")
        if not crawler.settings.getbool("SCHEDULER_PERSIST"):
            logger.warning("antideadlock fleet: SCHEDULER_PERSIST is off, so the last worker "
                           "to close deletes the fleet's queue, quarantine included; set "
                           "SCHEDULER_PERSIST = True to keep them")
        origins_for(crawler).on_request_finished(self._finished)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self.intents.scheduled, signal=signals.request_scheduled)
        crawler.signals.connect(self.intents.dropped, signal=signals.request_dropped)
        context_for(crawler).put("fleet_queue", self)
        self.worker = worker_for(crawler, self.link)
        self.worker.add_queue(self)
        self.worker.start()
        try:
            self.link.call(self.link.client.sadd, self.link.key("queues"), self.key)
        except BackendUnavailable:
            pass

    # ------------------------------------------------------------------ scrapy-redis API

    def __len__(self) -> int:
        """Pending + leased anywhere in the fleet (+ buffered here): the fleet is done at 0.

        A size above 0 is reused for ``FLEET_POLL_INTERVAL`` (scrapy-redis asks at every
        idle check); a 0 never is, so a worker never closes on a stale answer."""
        if self._len_at is not None and self.clock() - self._len_at < self.conf.poll_interval:
            return self._last_len + len(self._outbox) + len(self._batch) // 3
        self._len_at = None
        try:
            pending, processing = self.link.call(self._sizes)
            self._last_len = pending + processing
            if self._last_len > 0:
                self._len_at = self.clock()
        except BackendUnavailable:
            self._last_len = max(self._last_len, 1)  # unknown: do not close while it is down
        return self._last_len + len(self._outbox) + len(self._batch) // 3

    def _sizes(self) -> tuple[int, int]:
        pipe = self.link.client.pipeline(transaction=False)
        pipe.zcard(self.keys[0]).zcard(self.keys[3]).hlen(self.keys[9])
        pending, processing, intents = pipe.execute()
        # intents: requests marked seen and not pushed yet (any worker's batch, or a dead
        # worker's, which the next pop past its deadline pushes): work, not done
        return int(pending) + int(intents), int(processing)

    def push(self, request: Request) -> None:
        self._empty_at = None
        token = self.intents.take(request)
        args = [-request.priority, self._encode_request(request), token]
        self._flush()
        if not (token and not self._outbox and self._defer(args)):
            result = None if self._outbox else self._write("PUSH", args)
            if result is None:
                self._buffer("PUSH", args)
        self._inc(ad_stats.FLEET_PUSHED)

    def _defer(self, args: list[Any]) -> bool:
        """Batch a push (its request has an intent): sent with the next pop, or after
        ``_PUSH_DELAY`` with the pushes made meanwhile, in one round trip."""
        if not _loop_running():
            return False
        if not self._batch:
            timers.later(_PUSH_DELAY, self._send_batch)
        self._batch += args
        return True

    def _send_batch(self) -> None:
        args, self._batch = self._batch, []
        if not args:
            return
        self._flush()
        if self._outbox or self._write("PUSH", args) is None:
            self._buffer_batch(args)

    def _buffer_batch(self, args: list[Any]) -> None:
        for i in range(0, len(args), 3):
            self._buffer("PUSH", args[i:i + 3])

    def pop(self, timeout: int = 0) -> Request | None:
        self._flush()
        if self._outbox:
            return None  # Redis is (still) down
        if self._empty_at is not None:
            left = self.conf.poll_interval - (self.clock() - self._empty_at)
            # Scrapy pops after every scheduled request, duplicates included: an empty
            # queue is asked at most once per FLEET_POLL_INTERVAL, not once per start
            # request. With requests in flight here, each one's end pops again; without,
            # the engine is woken when the interval ends.
            if left > 0 and (self._leased or self._wake_in(left)):
                return None
        batch, self._batch = self._batch, []
        try:
            got = self.link.call(self._scripts["POP"], keys=self.keys,
                                 args=[self.worker_id, self.visibility_ms,
                                       self.conf.max_deliveries, _RECLAIM_LIMIT, *batch])
        except BackendUnavailable:
            self._buffer_batch(batch)
            return None
        self._reclaimed(int(got[0]), int(got[1]))
        if len(got) < 3:
            self._empty_at = self.clock()
            return None
        # this pop took the last pending request: the next one may wait like an empty pop
        self._empty_at = self.clock() if int(got[5]) == 0 else None
        rid = _text(got[2])
        try:
            request = self._decode_request(got[3])
        except Exception as exc:  # a renamed callback, changed code: never loop on it
            logger.error("antideadlock fleet: cannot rebuild request %s (%s: %s); quarantined",
                         rid, type(exc).__name__, exc)
            self._quarantine(rid, {"reason": f"undecodable: {type(exc).__name__}: {exc}"})
            return None
        self.counts["popped"] += 1
        self._inc(ad_stats.FLEET_POPPED)
        if self._acks_at_pop is None:
            self._acks_at_pop = not origins_for(self.crawler).hooked
            if self._acks_at_pop:
                logger.error("antideadlock fleet: ItemOriginMiddleware is not enabled, so the "
                             "end of a request cannot be observed; requests are acknowledged "
                             "when popped (plain scrapy-redis: a dead worker loses them). Add "
                             "it to SPIDER_MIDDLEWARES (the add-on does)")
        if self._acks_at_pop:
            self._ack(rid)
            return request
        with self._lock:
            self._leased[request] = rid
        return request

    def _wake_in(self, delay: float) -> bool:
        """Have the engine look for work in ``delay`` s (else it waits for its heartbeat)."""
        if self._waking:
            return True
        if not _loop_running():
            return False
        self._waking = True
        timers.later(delay, self._wake)
        return True

    def _wake(self) -> None:
        self._waking = False
        engine = engine_or_none(self.crawler)
        if engine is not None:
            wake_engine(engine)

    def clear(self) -> None:
        """scrapy-redis calls this at close without SCHEDULER_PERSIST (and with
        SCHEDULER_FLUSH_ON_START): never while other workers are alive, whose queue it is."""
        try:
            alive = [key for key in self.link.call(
                lambda: list(self.link.client.scan_iter(self.link.key("worker", "*"))))
                if key.decode() != self.worker.key]
            if alive:
                logger.warning("antideadlock fleet: not clearing the shared queue %s: %d other "
                               "workers are alive (set SCHEDULER_PERSIST = True)", self.key,
                               len(alive))
                return
            self.link.call(self.link.client.delete, *self.keys)
        except BackendUnavailable:
            pass

    def _encode_request(self, request: Request) -> bytes:
        obj = request.to_dict(spider=self.spider)
        meta = obj["meta"] = dict(obj.get("meta") or {})  # to_dict shares the live meta
        for name in _DROP_META:
            meta.pop(name, None)
        return self.serializer.dumps(obj)

    # ------------------------------------------------------------------ done / given back

    def _finished(self, request: Request) -> None:
        """Origin tracker: ``request``'s callback and items are done (or it failed)."""
        with self._lock:
            rid = self._leased.pop(request, None)
        if rid is None:
            return  # not popped from this queue (a child, a retry copy not yet popped)
        meta = request.meta
        if meta.get(metakeys.QUARANTINED):
            attempts = int(meta.get(metakeys.REQUEUES, 0)) + 1
            self._quarantine(rid, {"reason": "recovery", "attempts": attempts,
                                   "url": strip_credentials(request.url)})
        elif meta.get(metakeys.JOURNAL_KEEP):
            self._give_back(rid)
        else:
            self._ack(rid)

    def _ack(self, rid: str) -> None:
        self._flush()
        self._len_at = None  # the fleet's size may have reached 0 with this ack
        result = None if self._outbox else self._write("ACK", [rid, self.worker_id])
        if result is None:
            # Redis was unreachable while this request ran: the requests its callback
            # yielded may have failed at scrapy-redis's dupefilter and be gone. It stays
            # leased, no longer renewed, so it is re-delivered after the visibility timeout
            # and its callback runs again (a re-crawl, never a loss).
            self._inc(ad_stats.FLEET_NOT_ACKED)
            return
        self.counts["acked"] += 1
        self._inc(ad_stats.FLEET_ACKED)
        if int(result) == 2:
            self._inc(ad_stats.FLEET_STALE_ACKS)

    def _give_back(self, rid: str) -> None:
        self._empty_at = None  # it is pending again: worth a pop at once
        self._inc(ad_stats.FLEET_NACKED)
        self._write("NACK", [rid, self.worker_id])  # if Redis is down, the TTL re-delivers

    def _quarantine(self, rid: str, record: dict[str, Any]) -> None:
        record = {**record, "worker": self.worker_id, "at": time.time()}
        self._len_at = None
        self.counts["quarantined"] += 1
        self._inc(ad_stats.FLEET_QUARANTINED)
        logger.error("antideadlock fleet: request %s quarantined fleet-wide: %s", rid, record)
        self._write("QUARANTINE", [rid, self.worker_id, json.dumps(record)])

    def _reclaimed(self, requeued: int, quarantined: int) -> None:
        if requeued:
            self.counts["redelivered"] += requeued
            self._inc(ad_stats.FLEET_REDELIVERED, requeued)
            logger.warning("antideadlock fleet: %d requests of a worker that stopped "
                           "heartbeating are back in the queue", requeued)
        if quarantined:
            self.counts["quarantined"] += quarantined
            self._inc(ad_stats.FLEET_QUARANTINED, quarantined)
            logger.error("antideadlock fleet: %d requests reached %d deliveries; quarantined "
                         "fleet-wide (%s)", quarantined, self.conf.max_deliveries,
                         self.keys[6])

    def leased_ids(self) -> list[str]:
        """Ids leased to this worker (any thread)."""
        with self._lock:
            return list(self._leased.values())

    def renew(self, client: Any) -> int:
        """Heartbeat thread: move the visibility deadline of this worker's requests."""
        ids = self.leased_ids()
        if not ids:
            return 0
        return int(self._scripts["RENEW"](keys=[self.keys[3], self.keys[4]],
                                          args=[self.worker_id, self.visibility_ms, *ids],
                                          client=client))

    def give_back_all(self) -> int:
        """Return every request still leased here to the shared queue, after sending the
        pushes batched here (any thread). A hard exit calls this while the loop is
        blocked, when the batch's timer cannot fire: unsent, each of those requests would
        keep its intent until the visibility timeout, and every worker of the fleet would
        count it as work and stay open for it."""
        self._send_batch()
        with self._lock:
            ids, self._leased = list(self._leased.values()), {}
        given = 0
        for rid in ids:
            given += int(self._write("NACK", [rid, self.worker_id]) or 0)
        if given:
            self._inc(ad_stats.FLEET_NACKED, given)
        return given

    def _spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self._flush()
        given = self.give_back_all()
        if given:
            logger.info("antideadlock fleet: %d requests still leased at close went back to "
                        "the shared queue", given)
        if self._outbox:
            logger.error("antideadlock fleet: Redis unreachable at close; %d queue writes "
                         "could not be made (requests leased here return after %.0fs)",
                         len(self._outbox), self.conf.visibility_timeout)

    # ------------------------------------------------------------------ Redis writes

    def _write(self, script: str, args: list[Any]) -> Any:
        """Run one script; None if Redis is unreachable."""
        try:
            return self.link.call(self._scripts[script], keys=self.keys, args=args)
        except BackendUnavailable:
            return None

    def _buffer(self, script: str, args: list[Any]) -> None:
        self._outbox.append((script, args))
        self._inc(ad_stats.FLEET_BUFFERED)

    def _flush(self) -> None:
        """Write what was buffered while Redis was down, oldest first."""
        while self._outbox:
            script, args = self._outbox[0]
            result = self._write(script, args)
            if result is None:
                return
            self._outbox.popleft()

    def _inc(self, name: str, count: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc_value(name, count)


def _loop_running() -> bool:
    """Batching and skipped pops need a timer that runs (not so in plain unit use)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _link_from_server(server: Any, conf: Any, stats: Any) -> FleetLink:
    """A fleet link to scrapy-redis's own Redis (when FLEET_REDIS_URL is not set)."""
    kwargs = server.connection_pool.connection_kwargs
    url = f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/" \
          f"{kwargs.get('db', 0)}"
    return FleetLink(url, prefix=conf.key_prefix, timeout=conf.redis_timeout,
                     retry_after=conf.retry_after, require=conf.require_redis, stats=stats,
                     worker=conf.worker_id, password=kwargs.get("password"),
                     username=kwargs.get("username"))
