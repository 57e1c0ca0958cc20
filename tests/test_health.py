"""Liveness outputs: /healthz, sd_notify and the heartbeat file follow a really blocked loop.

The spider blocks the event loop with ``time.sleep`` inside a callback; probes run on
threads of the test (the loop they share with the crawl is blocked too), so what they
see is what a supervisor would see.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted

from scrapy_antideadlock import signals as ad_signals
from scrapy_antideadlock.health import SdNotifier, health_for, watchdog_interval
from scrapy_antideadlock.testing import Fault, FaultSite, Latency, SiteSpider, run_crawl

BLOCK = 3.0


class BlockingSpider(SiteSpider):
    """Blocks the loop for BLOCK seconds in the callback of one listing page."""

    block_window: list[float] = []

    def parse(self, response: Any, **kwargs: Any) -> Any:
        if response.url.endswith("/list/4"):
            BlockingSpider.block_window.append(time.monotonic())
            time.sleep(BLOCK)
            BlockingSpider.block_window.append(time.monotonic())
        yield from super().parse(response, **kwargs)


def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


class BoundPort:
    """An extension that remembers its crawler, so a probe can read the port /healthz
    bound (HEALTH_HTTP_PORT = 0: the server picks a free port itself, so tests on two
    xdist workers can never race for one picked in advance)."""

    crawler: Any = None

    @classmethod
    def from_crawler(cls, crawler: Any) -> BoundPort:
        BoundPort.crawler = crawler
        return cls()

    @staticmethod
    def port() -> int | None:
        crawler = BoundPort.crawler
        return getattr(health_for(crawler), "http_port", None) if crawler is not None else None

    @staticmethod
    def extensions(**others: int) -> dict[Any, int]:
        BoundPort.crawler = None  # not the previous test's crawl
        return {BoundPort: 0, **others}


SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)  # Linux: struct timeval per datagram


def wall_to_monotonic(wall: float) -> float:
    return wall - (time.time() - time.monotonic())


class Probe(threading.Thread):
    """Polls /healthz and the heartbeat file; drains the sd_notify socket.

    Times are when things happened, not when this (possibly starved) thread noticed:
    each /healthz exchange keeps when it was sent and when it was answered, heartbeat
    writes are their file mtimes, sd_notify messages their kernel receive timestamps
    (SO_TIMESTAMP), all converted to ``time.monotonic()``.
    """

    def __init__(self, port: Callable[[], int | None], heartbeat: str,
                 notify: socket.socket) -> None:
        super().__init__(daemon=True)
        self.port, self.heartbeat, self.notify = port, heartbeat, notify
        self.http: list[tuple[float, int, dict[str, Any]]] = []  # (sent, code, body)
        self.exchanges: list[tuple[float, float, int, dict[str, Any]]] = []  # + answered
        self.writes: set[float] = set()  # heartbeat file mtimes seen (monotonic)
        self.messages: list[tuple[float, str]] = []
        self.stop = threading.Event()
        with contextlib.suppress(OSError):
            notify.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)

    def run(self) -> None:
        port = None
        while not self.stop.is_set():
            port = port or self.port()
            sent = time.monotonic()
            try:
                if port is None:
                    raise OSError("no /healthz yet")
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                            timeout=2) as resp:
                    code, body = resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                code, body = err.code, json.loads(err.read())
            except OSError:
                code = 0
            if code:
                self.http.append((sent, code, body))
                self.exchanges.append((sent, time.monotonic(), code, body))
            try:
                self.writes.add(wall_to_monotonic(os.stat(self.heartbeat).st_mtime))
            except OSError:
                pass
            self._drain()
            self.stop.wait(0.1)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(16))
            except (BlockingIOError, OSError):
                return
            at = time.monotonic()
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP:
                    sec, usec = struct.unpack("qq", cdata[:16])
                    at = min(at, wall_to_monotonic(sec + usec / 1e6))
            for line in data.decode().splitlines():
                self.messages.append((at, line))


@pytest_twisted.ensureDeferred
async def test_blocked_loop_flips_every_output(tmp_path, monkeypatch):
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    heartbeat = str(tmp_path / "hb" / "heartbeat.json")
    BlockingSpider.block_window = []
    extensions = BoundPort.extensions(**{"scrapy_antideadlock.health.HealthExtension": 0})
    probe = Probe(BoundPort.port, heartbeat, notify)
    probe.start()
    site = FaultSite(pages=16, items_per_page=10, latency=Latency.fixed(0.05)).start()
    try:
        result = await run_crawl(BlockingSpider, {
            "EXTENSIONS": extensions,
            "ANTIDEADLOCK_HEALTH_HTTP_PORT": 0,
            "ANTIDEADLOCK_HEALTH_HEARTBEAT_FILE": heartbeat,
            "ANTIDEADLOCK_HEALTH_INTERVAL": 0.2,
            "ANTIDEADLOCK_HEALTH_LOOP_BLOCKED_AFTER": 1.0,
            "CONCURRENT_REQUESTS": 4,
        }, timeout=60, start_url=site.start_url)
    finally:
        probe.stop.set()
        probe.join(10)
        site.stop()
        notify.close()
    assert result.reason == "finished"
    assert len(result.items) == 160
    start, end = BlockingSpider.block_window
    assert end - start >= BLOCK

    # /healthz: 200 before; every request sent once the loop had been blocked for
    # LOOP_BLOCKED_AFTER (1.0 s) and answered before the block ended: 503 blocked_loop;
    # 200 after
    before = [code for _, answered, code, _ in probe.exchanges if answered < start]
    during = [(code, body) for sent, answered, code, body in probe.exchanges
              if sent > start + 1.0 and answered < end]
    after = [code for sent, _, code, _ in probe.exchanges if sent > end + 0.5]
    assert before and set(before) == {200}
    assert during and {code for code, _ in during} == {503}, during
    assert all(body["state"] == "stalled:blocked_loop" and body["loop_heartbeat_age"] >= 1.0
               for _, body in during)
    assert after and after[-1] == 200

    # sd_notify: READY first, pings that stop while blocked, STOPPING at close
    lines = [line for _, line in probe.messages]
    assert lines[0] == "READY=1"
    assert "STOPPING=1" in lines
    pings = [t for t, line in probe.messages if line == "WATCHDOG=1"]
    assert [t for t in pings if t < start]
    assert not [t for t in pings if start + 1.5 < t < end]
    assert [t for t in pings if t > end + 0.5]
    assert result.stats["antideadlock/health/sdnotify_pings"] >= 3
    assert result.stats["antideadlock/health/unhealthy"] >= 1

    # heartbeat file: rewritten while healthy, not while blocked
    assert not [m for m in probe.writes if start + 1.5 < m < end]
    assert [m for m in probe.writes if m < start]
    assert read_json(heartbeat)["healthy"] is True


def test_sd_notify_abstract_and_watchdog_env(monkeypatch):
    name = f"@antideadlock-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name[1:])
    listener.settimeout(2)
    try:
        notifier = SdNotifier(name)
        assert notifier.notify("READY=1")
        assert listener.recv(100) == b"READY=1"
        notifier.close()
    finally:
        listener.close()
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # pings were asked of another process
    assert watchdog_interval() is None
    assert not SdNotifier("").notify("READY=1")


@pytest_twisted.ensureDeferred
async def test_healthz_503_during_a_stall_and_200_after_recovery(tmp_path):
    """One download at a time; a URL that hangs for ever stalls the whole crawl, the
    watchdog names it, recovery cancels and requeues it: /healthz follows."""
    probe = Probe(BoundPort.port, str(tmp_path / "none"), _null_socket())
    extensions = BoundPort.extensions()
    probe.start()
    site = FaultSite(pages=8, items_per_page=10, latency=Latency.fixed(0.01)).start()
    site.add_fault("/item/k00075", Fault.hang())  # fetched early (LIFO)
    try:
        result = await run_crawl(SiteSpider, {
            "ADDONS": {"scrapy_antideadlock.Addon": 0},
            "EXTENSIONS": extensions,
            "ANTIDEADLOCK_HEALTH_HTTP_PORT": 0,
            "ANTIDEADLOCK_WATCHDOG_WINDOW": 1.5,
            "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 0,
            "ANTIDEADLOCK_DEADLINE_INITIAL": 60.0, "ANTIDEADLOCK_DEADLINE_MIN": 60.0,
            "ANTIDEADLOCK_RECOVERY_MAX_REQUEUES": 1,
            "ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE": str(tmp_path / "q.jsonl"),
            "ANTIDEADLOCK_DEADLINE_LEND": False,  # the hang must hold the only slot
            "CONCURRENT_REQUESTS": 1,
        }, timeout=60, start_url=site.start_url)
    finally:
        probe.stop.set()
        probe.join(10)
        site.stop()
    assert result.reason == "finished"
    assert len(result.items) == 79
    samples = probe.http
    codes = [code for _, code, _ in samples]
    assert 503 in codes and codes[0] == 200
    first = codes.index(503)
    t503, _, body = samples[first]
    assert body["state"] == "stalled:stalled_io"
    assert body["diagnosis"]["class"] == "stalled_io"
    # progress stopped at the last sample that saw the same response count
    stopped = min(t for t, _, b in samples[:first] if b["responses"] == body["responses"])
    assert t503 - stopped < 1.5 + 0.5 + 2.0
    assert 200 in codes[first:]  # recovery cancelled + requeued: healthy again
    assert result.stats["antideadlock/watchdog/requeued"] == 1
    assert result.stats["antideadlock/watchdog/quarantined"] == 1


def _null_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


@pytest_twisted.ensureDeferred
async def test_healthz_503_during_a_real_deadlock(make_fault_site, fault_proxy, pg_dsn, tmp_path):
    """The watchdog tests' naive crawl (sticky proxy sessions + a pipeline holding a real
    PostgreSQL connection across a download) deadlocks for real; /healthz says so."""
    from scrapy import signals
    from test_watchdog import wd_settings

    from scrapy_antideadlock.testing.scenarios.pools import StickySpider

    probe = Probe(BoundPort.port, str(tmp_path / "none"), _null_socket())
    site = make_fault_site(pages=1, items_per_page=4)
    detected: list[float] = []

    def opened(spider: Any, **kwargs: Any) -> None:
        crawler = spider.crawler

        def later(diagnosis: dict[str, Any], **kw: Any) -> None:  # let a few probes see it
            from twisted.internet import reactor

            detected.append(time.monotonic())
            reactor.callLater(1.5, break_knot, crawler)

        crawler.signals.connect(later, ad_signals.stall_detected, weak=False)

    def break_knot(crawler: Any) -> None:  # what the test bed does to end the hang
        crawler.scenario_pipeline.break_pools()

    class Spider(StickySpider):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            spider = super().from_crawler(crawler, *args, **kwargs)
            crawler.signals.connect(opened, signals.spider_opened, weak=False)
            return spider

    settings = wd_settings(
        tmp_path, SCENARIO_PROXY_URL=fault_proxy.url, SCENARIO_PG_DSN=pg_dsn,
        ANTIDEADLOCK_HEALTH_HTTP_PORT=0)
    settings["EXTENSIONS"] = BoundPort.extensions(
        **settings["EXTENSIONS"], **{"scrapy_antideadlock.health.HealthExtension": 0})
    probe.start()
    try:
        result = await run_crawl(Spider, settings, timeout=40, start_url=site.start_url)
    finally:
        probe.stop.set()
        probe.join(10)
    assert result.finished
    stalled = [(t, body) for t, code, body in probe.http if code == 503]
    assert stalled, [code for _, code, _ in probe.http]
    assert all(body["state"] == "stalled:deadlock" for _, body in stalled)
    assert "cycle" in stalled[0][1]["diagnosis"] and stalled[0][1]["diagnosis"]["cycle"]
    assert stalled[0][0] - detected[0] < 1.0  # at the next probe after detection
    assert [code for t, code, _ in probe.http if t < detected[0]][:1] == [200]
