"""A TCP server on its own thread and event loop, shared by the fault site and proxy.

Its own loop means a blocked crawl (the thing under test) never blocks the server.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, TypeVar

_S = TypeVar("_S", bound="ThreadedServer")


class ThreadedServer:
    """Start/stop/context-manager plumbing; subclasses implement ``_handle`` and ``_abort_all``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = 0
        self._want_port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    def start(self: _S) -> _S:
        """Start serving (again, after :meth:`stop`, on the same port). Returns self."""
        if self._thread is not None:
            return self
        if self.port:
            self._want_port = self.port  # a restart keeps the URLs valid
        self._ready.clear()
        self._start_error = None
        name = f"{type(self).__name__}-{id(self):x}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start within 10 s")
        if self._start_error is not None:
            raise RuntimeError(f"{type(self).__name__} failed to start: {self._start_error!r}")
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Close the listener, abort every open (also hanging) connection, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(self._shutdown()))
        except RuntimeError:  # loop already closed
            pass
        thread.join(timeout)
        self._thread = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(
                self._handle, self.host, self._want_port, reuse_address=True))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = self._abort_all()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        asyncio.get_running_loop().stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _abort_all(self) -> list[asyncio.Task[Any]]:
        """Abort every connection and cancel its task; return the tasks to wait for."""
        raise NotImplementedError


Head = tuple[str, str, str, dict[str, str], list[tuple[str, str]]]


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """Read one HTTP/1.x request head: (METHOD, target, VERSION, lower-cased headers, raw
    header pairs), or None at a clean EOF. Stray blank lines between requests are skipped."""
    line = await reader.readline()
    while line in (b"\r\n", b"\n"):
        line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise ValueError("bad request line")
    headers: dict[str, str] = {}
    raw: list[tuple[str, str]] = []
    while True:
        hline = await reader.readline()
        if not hline:
            raise ConnectionError("eof in headers")
        if hline in (b"\r\n", b"\n"):
            break
        name, _, value = hline.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
        raw.append((name.strip(), value.strip()))
    return parts[0].upper(), parts[1], parts[2].upper(), headers, raw
