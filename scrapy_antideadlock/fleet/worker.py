"""This process as a fleet member: a heartbeat key with its health, and lease renewal.

Every ``FLEET_HEARTBEAT_INTERVAL`` a thread writes ``<prefix>:worker:<id>`` (the health
JSON of ``/healthz`` plus fleet counters, expiring after ``FLEET_VISIBILITY_TIMEOUT``),
records the beat in ``<prefix>:workers`` and moves the visibility deadline of every
request leased to this worker. It runs off the event loop on purpose: a worker whose
loop is blocked keeps its requests until recovery exits it hard (then they return at
once, or at the deadline after a SIGKILL). ``python -m scrapy_antideadlock.fleet status``
reads these keys.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from scrapy import signals
from scrapy.exceptions import NotConfigured

from .. import settings as ad_settings
from .. import stats as ad_stats
from ..context import context_for
from ..primitives import BackendUnavailable
from .link import REDIS_DOWN, FleetLink, FleetRedisRequired

logger = logging.getLogger(__name__)

__all__ = ["FleetExtension", "FleetWorker", "worker_for"]

_STAT_PREFIXES = ("antideadlock/fleet/", "antideadlock/watchdog/stalls",
                  "antideadlock/proxy/", "item_scraped_count", "response_received_count")


class FleetWorker:
    """Heartbeat thread of one crawler in the fleet."""

    def __init__(self, crawler: Any, link: FleetLink) -> None:
        conf = ad_settings.load(crawler.settings, "fleet")
        self.crawler = crawler
        self.link = link
        self.interval = conf.heartbeat_interval
        self.ttl_ms = int(conf.visibility_timeout * 1000)
        self.key = link.key("worker", link.worker)
        self.queues: list[Any] = []
        self.started = time.time()
        self.state = "running"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)

    def add_queue(self, queue: Any) -> None:
        if queue not in self.queues:
            self.queues.append(queue)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._beat_safely()  # visible at once, not one interval later
        self._thread = threading.Thread(target=self._run, name="antideadlock-fleet",
                                        daemon=True)
        self._thread.start()

    def status(self) -> dict[str, Any]:
        """Health JSON (as /healthz) + fleet fields; safe from any thread."""
        from ..health import health_for

        health = health_for(self.crawler)
        status: dict[str, Any] = health.status() if health is not None else {
            "pid": os.getpid(), "healthy": True, "state": self.state}
        if self.state != "running":
            status["state"] = self.state
        stats = self.crawler.stats.get_stats() if self.crawler.stats is not None else {}
        status.update(
            worker=self.link.worker, pid=os.getpid(), started=self.started, beat=time.time(),
            spider=getattr(self.crawler.spider, "name", None),
            inflight={q.key: len(q.leased_ids()) for q in self.queues},
            stats={k: v for k, v in dict(stats).items()
                   if isinstance(v, (int, float)) and k.startswith(_STAT_PREFIXES)})
        return status

    def beat(self, client: Any = None) -> None:
        client = client or self.link.client
        pipe = client.pipeline(transaction=False)
        pipe.set(self.key, json.dumps(self.status(), default=str), px=self.ttl_ms)
        pipe.zadd(self.link.key("workers"), {self.link.worker: int(time.time() * 1000)})
        pipe.execute()
        for queue in self.queues:
            queue.renew(client)
        if self.crawler.stats is not None:
            self.crawler.stats.inc_value(ad_stats.FLEET_HEARTBEATS)

    def _beat_safely(self) -> None:
        try:
            self.link.call(self.beat)
        except (BackendUnavailable, FleetRedisRequired):
            pass  # the link logged it; the next beat retries
        except REDIS_DOWN:  # pragma: no cover - link.call maps these
            pass
        except Exception:  # noqa: BLE001 - the heartbeat must keep running
            logger.exception("antideadlock fleet: heartbeat failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat_safely()

    def stop(self) -> None:
        """Stop beating and leave the fleet (the key goes; the beat record says when)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        try:
            self.link.call(self.link.client.delete, self.key)
        except BackendUnavailable:
            pass

    def _spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self.state = f"closed:{reason}"
        self.stop()


def worker_for(crawler: Any, link: FleetLink) -> FleetWorker:
    """The crawler's fleet worker (role ``fleet_worker``), created on first use."""
    return context_for(crawler).setdefault("fleet_worker", lambda: FleetWorker(crawler, link))


class FleetExtension:
    """Extension: makes this worker visible to ``fleet status`` (ANTIDEADLOCK_FLEET_REDIS_URL)."""

    def __init__(self, crawler: Any) -> None:
        from .leases import link_for

        link = link_for(crawler)
        if link is None:
            raise NotConfigured("ANTIDEADLOCK_FLEET_REDIS_URL is not set")
        self.worker = worker_for(crawler, link)
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)

    @classmethod
    def from_crawler(cls, crawler: Any) -> FleetExtension:
        return cls(crawler)

    def _spider_opened(self, spider: Any = None) -> None:
        self.worker.start()
