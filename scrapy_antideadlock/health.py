"""Liveness for supervisors: heartbeat file, systemd sd_notify and ``/healthz``, off-loop.

A supervisor can only restart a stuck crawl if something tells it the crawl is
stuck. Everything here runs off the loop, on the loop monitor's thread (and the HTTP
server's own), because the worst case — a blocked event loop — silences anything that
runs on the loop. All outputs report healthy
only while the crawl progresses (or is legitimately idle):

* unhealthy when the loop has not run for ``HEALTH_LOOP_BLOCKED_AFTER`` seconds
  (read from the loop monitor's heartbeat), or while the watchdog reports a stall
  (``stall_detected`` until ``stall_cleared``, or ``watchdog.state``);
* heartbeat file: rewritten (temp + rename, so readers never see half a file) with
  a small JSON status every ``HEALTH_INTERVAL`` while healthy, left to age when not;
* systemd: ``READY=1`` when the engine starts, ``WATCHDOG=1`` every
  ``WATCHDOG_USEC / 2`` while healthy (so ``WatchdogSec`` kills a stuck unit),
  ``STOPPING=1`` at close — a datagram to ``NOTIFY_SOCKET``, no dependency;
* ``GET /healthz`` on 127.0.0.1: 200 + JSON when healthy, 503 + the diagnosis when not;
  ``GET /metrics`` on the same server: Prometheus metrics (:mod:`.metrics`, needs
  ``prometheus_client``).

Thread safety: the threads read only immutable snapshots published by the loop
(``_published``), the loop monitor (thread-safe) and the stats dict (reads only).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scrapy import signals
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured

from . import settings as ad_settings
from . import signals as ad_signals
from . import stats as ad_stats
from .context import context_for
from .reactor import require_asyncio_reactor
from .timers import loop_monitor_for
from .watchdog.classes import BLOCKED_LOOP

logger = logging.getLogger(__name__)

__all__ = ["HealthExtension", "health_for", "sd_notify", "SdNotifier"]



def health_for(crawler: Crawler) -> HealthExtension | None:
    return context_for(crawler).get("health")


class SdNotifier:
    """The few lines of ``sd_notify(3)``: one datagram per message to ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, message: str) -> bool:
        if not self.address:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                self._sock.sendto(message.encode(), self.address)
                return True
            except OSError as exc:  # no listener, queue full: a supervisor problem, not ours
                logger.debug("sd_notify %r failed: %s", message, exc)
                return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def sd_notify(message: str) -> bool:
    """Send one message to systemd (False if NOTIFY_SOCKET is unset or unreachable)."""
    notifier = SdNotifier()
    try:
        return notifier.notify(message)
    finally:
        notifier.close()


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, if systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


class HealthExtension:
    """Liveness outputs served from an off-loop thread."""

    def __init__(self, crawler: Crawler) -> None:
        if not ad_settings.get(crawler.settings, "ANTIDEADLOCK_ENABLED"):
            raise NotConfigured("ANTIDEADLOCK_ENABLED is off")
        conf = ad_settings.load(crawler.settings, "health")
        self.crawler = crawler
        self.conf = conf
        self.heartbeat_path = Path(conf.heartbeat_file) if conf.heartbeat_file else None
        self.notifier = SdNotifier() if conf.sdnotify else SdNotifier("")
        self.ping_every = watchdog_interval() if self.notifier.enabled else None
        fleet = bool(ad_settings.get(crawler.settings, "ANTIDEADLOCK_FLEET_REDIS_URL"))
        if self.heartbeat_path is None and conf.http_port is None and not self.notifier.enabled \
                and not fleet:  # (fleet mode: the fleet heartbeat publishes status())
            # off by default: no message, so Scrapy logs no "Disabled ..." warning
            logger.debug("HealthExtension off: no health output configured")
            raise NotConfigured
        require_asyncio_reactor("HealthExtension", crawler.settings)
        self.http_port: int | None = None  # the bound port (HEALTH_HTTP_PORT may be 0)
        self._monitor: Any = None
        self._stall: dict[str, Any] | None = None
        self._stall_progress: tuple[Any, ...] = ()
        self._closing = False
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._job: Any = None  # the check, on the loop monitor's thread
        self._next_file = self._next_ping = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._server_thread: threading.Thread | None = None
        self._last_healthy: bool | None = None
        self.counters = {"unhealthy": 0, "pings": 0, "http": 0}
        self.metrics: Any = None
        if conf.http_port is not None:
            self.metrics = _metrics_collector(crawler, self)
        self.last_status: dict[str, Any] = {}
        context_for(crawler).put("health", self)
        context_for(crawler).put("notifier", self.notifier)  # recovery says STOPPING on exit
        crawler.signals.connect(self.engine_started, signal=signals.engine_started)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self.engine_stopped, signal=signals.engine_stopped)
        crawler.signals.connect(self.stall_detected, signal=ad_signals.stall_detected)
        crawler.signals.connect(self.stall_cleared, signal=ad_signals.stall_cleared)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> HealthExtension:
        return cls(crawler)

    # ------------------------------------------------------------------ loop side

    def engine_started(self) -> None:
        import asyncio

        if self.conf.http_port is not None:
            self._start_http()
        # READY before the check that pings: systemd must never see WATCHDOG=1 first
        self.notifier.notify(f"READY=1\nSTATUS=crawling ({self.crawler.spider.name})\n"
                             f"MAINPID={os.getpid()}")
        # after every engine_started handler began (the watchdog starts its monitor there)
        asyncio.get_event_loop().call_soon(self._attach_monitor)

    def _attach_monitor(self) -> None:
        if self._monitor is None and not self._stop.is_set():
            self._monitor = self._find_monitor()
            tick = min(self.conf.interval, self.ping_every or self.conf.interval, 0.5)
            self._job = self._monitor.add_periodic(tick, self._check, now=True)

    def _find_monitor(self) -> Any:
        """The crawler's loop monitor (the watchdog's), or one made for health."""
        return loop_monitor_for(self.crawler, interval=0.25,
                                threshold=self.conf.loop_blocked_after,
                                name="antideadlock-health-loopmonitor")

    def stall_detected(self, diagnosis: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if (diagnosis or {}).get("class") == BLOCKED_LOOP.name:
            return  # seen directly from the heartbeat; the signal arrives after the block
        self._stall_progress = self._progress()
        self._stall = dict(diagnosis or {})

    def _progress(self) -> tuple[Any, ...]:
        stats = self.crawler.stats
        if stats is None:
            return ()
        return (stats.get_value("item_scraped_count", 0),
                stats.get_value("item_dropped_count", 0))

    def stall_cleared(self, **kwargs: Any) -> None:
        self._stall = None

    def spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self._closing = True
        self.notifier.notify(f"STOPPING=1\nSTATUS=closing: {reason}")
        stats = self.crawler.stats
        stats.set_value(ad_stats.HEALTH_STATE, self.last_status.get("state", "healthy"))
        stats.set_value(ad_stats.HEALTH_UNHEALTHY, self.counters["unhealthy"])
        stats.set_value(ad_stats.HEALTH_SDNOTIFY_PINGS, self.counters["pings"])
        stats.set_value(ad_stats.HEALTH_HTTP_REQUESTS, self.counters["http"])
        self.stop()

    def engine_stopped(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the check and every thread (joined, so none outlives the crawl)."""
        self._stop.set()
        job, self._job = self._job, None
        if job is not None:
            job.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(5)
            self._server_thread = None
        self.notifier.close()
        context_for(self.crawler).remove("health", self)

    # ------------------------------------------------------------------ any thread

    def status(self) -> dict[str, Any]:
        """Health now: ``{"healthy": bool, "state": ..., ...}`` (safe from any thread)."""
        monitor = self._monitor
        running = monitor is not None and getattr(monitor, "running", True)
        age = monitor.heartbeat_age() if running else 0.0
        stats = self.crawler.stats
        status: dict[str, Any] = {
            "pid": os.getpid(),
            "spider": getattr(self.crawler.spider, "name", None),
            "uptime": round(time.monotonic() - self._started, 3),
            "loop_heartbeat_age": round(age, 3),
            "items": stats.get_value("item_scraped_count", 0) if stats else 0,
            "responses": stats.get_value("response_received_count", 0) if stats else 0,
        }
        stall = self._stall
        if stall is not None and self._progress() != self._stall_progress:
            stall = None  # items flow again (stall_cleared follows at the watchdog's next tick)
        watchdog_state = self._watchdog_state()
        if stall is None and self._stall is not None:
            watchdog_state = "flowing"
        if age >= self.conf.loop_blocked_after:
            status.update(healthy=False, state="stalled:blocked_loop",
                          diagnosis={"class": BLOCKED_LOOP.name, "blocked_for": round(age, 3),
                                     "where": (getattr(monitor, "last_episode", None) or {})
                                     .get("where", "")})
        elif stall is not None or (watchdog_state or "").startswith("stalled"):
            stall_class = (stall or {}).get("class") or (watchdog_state or "stalled:?")[8:]
            status.update(healthy=False, state=f"stalled:{stall_class}",
                          diagnosis=_jsonable(stall or self._watchdog_diagnosis()))
        elif self._closing:
            status.update(healthy=True, state="closing")
        else:
            status.update(healthy=True, state=watchdog_state or "running")
        return status

    def _watchdog_state(self) -> str | None:
        return getattr(context_for(self.crawler).get("watchdog"), "state", None)

    def _watchdog_diagnosis(self) -> Any:
        return getattr(context_for(self.crawler).get("watchdog"), "last_diagnosis", None)

    # ------------------------------------------------------------------ monitor thread

    def _check(self) -> None:
        """One health check: status, heartbeat file, sd_notify ping (on the monitor's thread,
        so it goes on while the loop is blocked)."""
        if self._stop.is_set():
            return
        try:
            status = self.status()
            self._observe(status)
            if self.metrics is not None:
                self.metrics.sample()
            now = time.monotonic()
            if status["healthy"]:
                if self.heartbeat_path is not None and now >= self._next_file:
                    self._write_heartbeat(status)
                    self._next_file = now + self.conf.interval
                if self.ping_every is not None and now >= self._next_ping:
                    if self.notifier.notify("WATCHDOG=1"):
                        self.counters["pings"] += 1
                    self._next_ping = now + self.ping_every
        except Exception:  # the check must survive anything
            logger.exception("health check failed")

    def _observe(self, status: dict[str, Any]) -> None:
        self.last_status = status
        healthy = status["healthy"]
        if healthy != self._last_healthy:
            if not healthy:
                self.counters["unhealthy"] += 1
                logger.warning("antideadlock liveness: unhealthy (%s)", status["state"])
                self.notifier.notify(f"STATUS=unhealthy: {status['state']}")
            elif self._last_healthy is not None:
                logger.info("antideadlock liveness: healthy again")
                self.notifier.notify("STATUS=crawling")
            self._last_healthy = healthy

    def _write_heartbeat(self, status: dict[str, Any]) -> None:
        path = self.heartbeat_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**status, "time": time.time()}, default=str))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ /healthz

    def _start_http(self) -> None:
        extension = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?")[0]
                if path == "/metrics" and extension.metrics is not None:
                    extension.counters["http"] += 1
                    from .metrics import CONTENT_TYPE_LATEST, render

                    self._reply(200, CONTENT_TYPE_LATEST, render(extension.metrics))
                    return
                if path not in ("/healthz", "/health", "/"):
                    self.send_error(404)
                    return
                extension.counters["http"] += 1
                status = extension.status()
                self._reply(200 if status["healthy"] else 503, "application/json",
                            json.dumps(status, default=str).encode())

            def _reply(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        server = ThreadingHTTPServer(("127.0.0.1", self.conf.http_port), Handler)
        server.daemon_threads = True
        self._server = server
        self.http_port = server.server_address[1]
        self._server_thread = threading.Thread(target=server.serve_forever,
                                               kwargs={"poll_interval": 0.2},
                                               name="antideadlock-healthz", daemon=True)
        self._server_thread.start()
        logger.info("antideadlock /healthz on http://127.0.0.1:%d/healthz%s", self.http_port,
                    "" if self.metrics is None else ", /metrics beside it")


def _metrics_collector(crawler: Crawler, health: HealthExtension) -> Any:
    """The Prometheus collector, or None (logged once) without prometheus_client."""
    try:
        from .metrics import MetricsCollector
    except ImportError:
        logger.info("antideadlock: no /metrics (pip install 'scrapy-antideadlock[metrics]')")
        return None
    return MetricsCollector(crawler, health)


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return repr(value)
