"""A real Redis for tests: the local server if it answers, else a private ``redis-server``.

:class:`RedisServer` starts ``redis-server`` (the Debian ``redis-server`` package, or the
``redis-server`` binary on PATH) on a free port in a fresh directory, with an
append-only file so a :meth:`RedisServer.restart` keeps the data, as a production Redis
with persistence would. :func:`redis_url` returns ``ANTIDEADLOCK_TEST_REDIS_URL``, else
the server on 127.0.0.1:6379 if it answers, else starts a private one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["RedisServer", "find_redis_server", "redis_url", "scrapy_redis_settings"]


def find_redis_server() -> str | None:
    """Path of the ``redis-server`` binary, or None."""
    for candidate in (os.environ.get("ANTIDEADLOCK_TEST_REDIS_SERVER"), "/usr/bin/redis-server",
                      shutil.which("redis-server")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private ``redis-server`` the test may stop, kill and restart (same port, same data)."""

    def __init__(self, port: int | None = None, binary: str | None = None,
                 persistent: bool = True) -> None:
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server, or set "
                               "ANTIDEADLOCK_TEST_REDIS_SERVER)")
        self.port = port or _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="antideadlock-redis-"))
        self.persistent = persistent  # append-only file, fsync per write: survives restart
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else \
            ["--appendonly", "no"]
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
               str(self.dir), *aof, "--save", "", "--protected-mode", "no",
               "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _answers("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start: "
                                   f"{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop (SIGTERM: Redis flushes its append-only file first)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "redis.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_private: RedisServer | None = None


def redis_url() -> str:
    """A Redis URL for tests: the env setting, the local server, or a private one."""
    global _private
    url = os.environ.get("ANTIDEADLOCK_TEST_REDIS_URL")
    if url:
        return url
    if _answers("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0"
    if _private is None:
        _private = RedisServer().start()
        atexit.register(_private.cleanup)
    return _private.url


def scrapy_redis_settings(url: str, prefix: str, worker: str | None = None, *,
                          heartbeat: float = 0.5, visibility: float = 3.0) -> dict[str, Any]:
    """A scrapy-redis worker with the add-on, its keys under ``prefix``; with ``worker``,
    fleet mode too (the reliable queue, this worker id, short heartbeat and visibility)."""
    settings: dict[str, Any] = {
        "ADDONS": {"scrapy_antideadlock.Addon": 0},
        "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
        "SCHEDULER_PERSIST": True,
        "SCHEDULER_QUEUE_KEY": f"{prefix}:%(spider)s:requests",
        "SCHEDULER_DUPEFILTER_KEY": f"{prefix}:%(spider)s:dupefilter",
        "REDIS_URL": url,
    }
    if worker is not None:
        settings.update({
            "SCHEDULER_QUEUE_CLASS": "scrapy_antideadlock.fleet.ReliableQueue",
            "ANTIDEADLOCK_FLEET_REDIS_URL": url,
            "ANTIDEADLOCK_FLEET_KEY_PREFIX": prefix,
            "ANTIDEADLOCK_FLEET_WORKER_ID": worker,
            "ANTIDEADLOCK_FLEET_HEARTBEAT_INTERVAL": heartbeat,
            "ANTIDEADLOCK_FLEET_VISIBILITY_TIMEOUT": visibility,
        })
    return settings
