"""FaultProxy: a real HTTP forward proxy on 127.0.0.1 that can turn slow, black-hole or fail.

Like :class:`~scrapy_antideadlock.testing.site.FaultSite` it runs in its own thread with
its own asyncio loop. It forwards absolute-URI requests (``GET http://host/path``) and
tunnels ``CONNECT``. Each response is sent with ``Connection: close`` and the client
connection is closed after it, which Scrapy's connection pool handles cleanly. The
``mode`` can be switched at run time; it applies to requests that arrive afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
import threading
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from ._server import ThreadedServer, read_head

__all__ = ["MODES", "FaultProxy"]

MODES = ("healthy", "slow", "blackhole", "error", "reset")
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
        "proxy-authenticate", "te", "trailer", "upgrade"}


class FaultProxy(ThreadedServer):
    """An HTTP proxy whose behaviour (``mode``) a test controls."""

    def __init__(self, mode: str = "healthy", slow_delay: float = 2.0,
                 auth: tuple[str, str] | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        super().__init__(host, port)
        self._check_mode(mode)
        self._mode = mode
        self.slow_delay = slow_delay
        self.auth = auth
        self._lock = threading.Lock()
        self._requests = 0
        self._active = 0
        self._max_active = 0
        self._by_mode: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._targets: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ config and counters
    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"FaultProxy mode must be one of {MODES}, got {mode!r}")

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._check_mode(value)
        self._mode = value

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_with_auth(self, user: str | None = None, password: str | None = None) -> str:
        """``http://user:pass@host:port`` (defaults to this proxy's own credentials)."""
        if user is None and self.auth is not None:
            user, password = self.auth
        return f"http://{user}:{password}@{self.host}:{self.port}"

    @property
    def requests(self) -> int:
        """Requests received (including refused and black-holed ones)."""
        with self._lock:
            return self._requests

    @property
    def active(self) -> int:
        """Requests currently being handled (held, delayed or forwarding)."""
        with self._lock:
            return self._active

    @property
    def max_active(self) -> int:
        """Most requests handled at the same instant since start (or :meth:`reset_max_active`)."""
        with self._lock:
            return self._max_active

    def reset_max_active(self) -> None:
        with self._lock:
            self._max_active = self._active

    @property
    def by_mode(self) -> Counter[str]:
        """Requests per mode they were handled in (a copy)."""
        with self._lock:
            return Counter(self._by_mode)

    @property
    def statuses(self) -> Counter[int]:
        """Status codes the proxy itself answered with (407, 502), a copy."""
        with self._lock:
            return Counter(self._statuses)

    @property
    def targets(self) -> list[str]:
        """Target URLs (or host:port for CONNECT) in arrival order (a copy)."""
        with self._lock:
            return list(self._targets)

    # ------------------------------------------------------------------ lifecycle
    def _abort_all(self) -> list[asyncio.Task[Any]]:
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        return list(self._tasks)

    # ------------------------------------------------------------------ protocol
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await read_head(reader)
            if head is None:
                return
            method, target, version, headers, raw_headers = head
            mode = self._mode
            with self._lock:
                self._requests += 1
                self._active += 1
                self._max_active = max(self._max_active, self._active)
                self._by_mode[mode] += 1
                self._targets.append(target)
            try:
                upstream = await self._serve(reader, writer, mode, method, target, version,
                                             headers, raw_headers)
            finally:
                with self._lock:
                    self._active -= 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            if upstream is not None:
                upstream.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str,
                     method: str, target: str, version: str, headers: dict[str, str],
                     raw_headers: list[tuple[str, str]]) -> asyncio.StreamWriter | None:
        if mode == "blackhole":
            while await reader.read(65536):  # hold until the client gives up
                pass
            return None
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return None
        if self.auth is not None and not self._authorized(headers):
            await self._reply(writer, 407, "Proxy Authentication Required",
                              extra="Proxy-Authenticate: Basic realm=\"FaultProxy\"\r\n")
            return None
        if mode == "error":
            await self._reply(writer, 502, "Bad Gateway")
            return None
        if mode == "slow":
            await asyncio.sleep(self.slow_delay)
        if method == "CONNECT":
            return await self._tunnel(reader, writer, target)
        return await self._forward(reader, writer, method, target, headers, raw_headers)

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.auth is not None
        expected = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        scheme, _, token = headers.get("proxy-authorization", "").partition(" ")
        return scheme.lower() == "basic" and token.strip() == expected

    async def _reply(self, writer: asyncio.StreamWriter, status: int, reason: str,
                     extra: str = "") -> None:
        with self._lock:
            self._statuses[status] += 1
        body = f"FaultProxy: {status} {reason}\n".encode()
        writer.write(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def _open(self, host: str, port: int, writer: asyncio.StreamWriter
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, asyncio.TimeoutError):
            await self._reply(writer, 502, "Bad Gateway")
            return None

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       method: str, target: str, headers: dict[str, str],
                       raw_headers: list[tuple[str, str]]) -> asyncio.StreamWriter | None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            await self._reply(writer, 400, "Bad Request")
            return None
        opened = await self._open(parts.hostname, parts.port or 80, writer)
        if opened is None:
            return None
        up_reader, up_writer = opened
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in raw_headers if k.lower() not in _HOP]
        lines.append("Connection: close")
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        length = int(headers.get("content-length", "0") or 0)
        if length:
            up_writer.write(await reader.readexactly(length))
        await up_writer.drain()
        # The client sends nothing more: EOF from it means it gave up (cancelled), and then
        # the transfer is over here too, as for a real proxy that sees the FIN.
        relay = asyncio.ensure_future(self._relay(up_reader, writer))
        gone = asyncio.ensure_future(reader.read(1))
        try:
            while not relay.done():
                await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done() and not relay.done():
                    if not gone.cancelled() and gone.exception() is None and gone.result():
                        gone = asyncio.ensure_future(reader.read(1))  # stray bytes: ignore
                        continue
                    relay.cancel()
                    break
        finally:
            gone.cancel()
            if not relay.done():
                relay.cancel()
            await asyncio.gather(relay, gone, return_exceptions=True)
        if not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]
        return up_writer

    async def _relay(self, up_reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """Response head (hop-by-hop headers rewritten so the client does not reuse the
        connection), then the body."""
        status_line = await up_reader.readline()
        if not status_line:
            await self._reply(writer, 502, "Bad Gateway")
            return
        out = [status_line.decode("latin-1").rstrip("\r\n")]
        remaining: int | None = None
        while True:
            line = await up_reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length" and value.strip().isdigit():
                remaining = int(value.strip())
            if name not in ("connection", "keep-alive", "proxy-connection"):
                out.append(line.decode("latin-1").rstrip("\r\n"))
        out.append("Connection: close")
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        # With a Content-Length the transfer ends at its last byte (not at the upstream's
        # close, which comes later), so `active` counts exactly what a client still waits on.
        while remaining is None or remaining > 0:
            chunk = await up_reader.read(65536 if remaining is None else min(65536, remaining))
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            writer.write(chunk)
            await writer.drain()
        await writer.drain()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      target: str) -> asyncio.StreamWriter | None:
        host, _, port = target.rpartition(":")
        opened = await self._open(host.strip("[]"), int(port or 443), writer)
        if opened is None:
            return None
        up_reader, up_writer = opened
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        return up_writer
