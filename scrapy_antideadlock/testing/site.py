"""FaultSite: a real HTTP/1.1 server on 127.0.0.1 with pages, items and faults on demand.

It runs in its own thread with its own asyncio loop, so a crawl whose event loop is
blocked or deadlocked never blocks the site, and the site can still be stopped (which
aborts every held connection, so a hung client then errors out). HTTP is written by
hand on asyncio streams so timing, trickling and resets are exactly what the test asked.
Everything random is drawn from ``seed``: two runs with the same seed see the same site.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import html
import json
import math
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._server import ThreadedServer, read_head

__all__ = ["Fault", "FaultSite", "Latency"]

_REASONS = {
    200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 407: "Proxy Authentication Required",
    408: "Request Timeout", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}

_ADJ = ["red", "quiet", "brisk", "amber", "lucky", "solid", "tiny", "grand", "swift", "calm"]
_NOUN = ["lamp", "kettle", "anchor", "violin", "teapot", "ladder", "compass", "basket",
         "lantern", "mirror"]


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the given parts (stable across processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class Latency:
    """Delay before the response headers, drawn per (seed, path, attempt number)."""

    kind: str = "fixed"
    value: float = 0.0
    sigma: float = 0.5
    cap: float | None = None

    @classmethod
    def fixed(cls, seconds: float) -> Latency:
        if seconds < 0:
            raise ValueError("Latency.fixed: seconds must be >= 0")
        return cls("fixed", float(seconds))

    @classmethod
    def lognormal(cls, median: float, sigma: float = 0.5, cap: float | None = None) -> Latency:
        """Log-normal delay: half the draws are below ``median``; ``cap`` bounds the tail."""
        if median <= 0 or sigma < 0:
            raise ValueError("Latency.lognormal: median must be > 0 and sigma >= 0")
        return cls("lognormal", float(median), float(sigma), cap)

    def draw(self, seed: int, path: str, attempt: int) -> float:
        if self.kind == "fixed":
            return self.value
        rng = random.Random(_seed_of(seed, "latency", path, attempt))
        delay = self.value * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return min(delay, self.cap) if self.cap is not None else delay


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """What the site does instead of answering normally. Build with the class methods."""

    kind: str
    seconds: float = 0.0
    chunks: int = 1
    code: int = 200

    @classmethod
    def hang(cls) -> Fault:
        """Read the request, never answer, keep the socket open (until the client leaves)."""
        return cls("hang")

    @classmethod
    def slow_headers(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before sending anything, then answer normally."""
        return cls("slow_headers", float(seconds))

    @classmethod
    def drip(cls, seconds: float, chunks: int = 10) -> Fault:
        """Send headers at once, then trickle the body in ``chunks`` over ``seconds``."""
        return cls("drip", float(seconds), max(1, int(chunks)))

    @classmethod
    def status(cls, code: int) -> Fault:
        """Answer with this status code and a short body (no item)."""
        return cls("status", code=int(code))

    @classmethod
    def reset(cls) -> Fault:
        """Read the request then reset the TCP connection (SO_LINGER 0, close → RST)."""
        return cls("reset")

    @classmethod
    def truncate(cls) -> Fault:
        """Promise the full Content-Length, send half the body, then close (data loss)."""
        return cls("truncate")

    @classmethod
    def close(cls) -> Fault:
        """Read the request then close the connection cleanly without answering."""
        return cls("close")

    def unreachable(self, download_timeout: float | None = None) -> bool:
        """Whether a client can never get this page's content while this fault stands."""
        if self.kind in ("slow_headers", "drip"):
            return download_timeout is None or self.seconds >= download_timeout
        return True


@dataclass
class _Rule:
    match: Callable[[str], bool]
    fault: Fault
    rate: float
    per: str
    times: int | None
    index: int
    fired: int = 0

    def permanent_for(self, seed: int, path: str) -> bool:
        """True when this rule faults ``path`` on every request (per-url, no ``times``)."""
        return (self.per == "url" and self.times is None and self.match(path)
                and _unit(seed, "fault", self.index, path) < self.rate)


# --------------------------------------------------------------------------- the site


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any] | None = None
    hanging: bool = False


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: Counter[str] = field(default_factory=Counter)
    total: int = 0
    open: int = 0
    hanging: int = 0
    faults: Counter[str] = field(default_factory=Counter)


class FaultSite(ThreadedServer):
    """A deterministic catalogue site (listings → detail pages) with injectable faults."""

    def __init__(self, pages: int = 20, items_per_page: int = 10, seed: int = 0,
                 latency: Latency = Latency.fixed(0.0), host: str = "127.0.0.1",
                 port: int = 0, js_delay_ms: int = 50) -> None:
        if pages < 1 or items_per_page < 0:
            raise ValueError("FaultSite: pages must be >= 1 and items_per_page >= 0")
        super().__init__(host, port)
        self.pages = pages
        self.items_per_page = items_per_page
        self.seed = seed
        self.latency = latency
        self.js_delay_ms = js_delay_ms
        self._rules: list[_Rule] = []
        self._rules_lock = threading.Lock()
        self._rule_count = 0
        self._rng = random.Random(_seed_of(seed, "per-request"))
        self._c = _Counters()
        self._conns: set[_Conn] = set()

    # ------------------------------------------------------------------ lifecycle
    def _abort_all(self) -> list[asyncio.Task[Any]]:
        for conn in list(self._conns):
            conn.writer.transport.abort()
            if conn.task is not None:
                conn.task.cancel()
        return [c.task for c in self._conns if c.task is not None]

    # ------------------------------------------------------------------ urls and content
    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host}:{self.port}{path}"

    @property
    def start_url(self) -> str:
        return self.url("/list/0")

    @property
    def js_start_url(self) -> str:
        return self.url("/js/list/0")

    @staticmethod
    def key(index: int) -> str:
        return f"k{index:05d}"

    def keys_of_page(self, n: int) -> list[str]:
        first = n * self.items_per_page
        return [self.key(i) for i in range(first, first + self.items_per_page)]

    def item_keys(self) -> list[str]:
        """All detail-page keys in crawl order (listing 0 first)."""
        return [k for n in range(self.pages) for k in self.keys_of_page(n)]

    def item(self, key: str) -> dict[str, str]:
        """The item a detail page shows (without its url)."""
        rng = random.Random(_seed_of(self.seed, "item", key))
        name = f"{rng.choice(_ADJ).title()} {rng.choice(_NOUN)} {key}"
        return {"key": key, "name": name, "price": f"{rng.uniform(1, 500):.2f}"}

    def expected_keys(self, download_timeout: float | None = None, js: bool = False
                      ) -> list[str]:
        """Keys a correct crawler gets: detail pages reachable through unfaulted listings.

        Only permanent faults count (``per="url"``, no ``times``): a faulted listing cuts
        the rest of the chain and its items. Slow faults count as unreachable unless a
        ``download_timeout`` above their delay is given. ``js=True``: for a crawl of the
        ``/js/...`` pages (faults are matched against those paths).
        """
        prefix = "/js" if js else ""
        with self._rules_lock:
            rules = list(self._rules)

        def blocked(path: str) -> bool:
            for rule in rules:
                if rule.permanent_for(self.seed, path):
                    return rule.fault.unreachable(download_timeout)  # first selecting rule wins
            return False

        keys: list[str] = []
        for n in range(self.pages):
            if blocked(f"{prefix}/list/{n}"):
                break
            keys.extend(k for k in self.keys_of_page(n) if not blocked(f"{prefix}/item/{k}"))
        return keys

    def _render(self, path: str) -> tuple[int, str, bytes] | None:
        """(status, content type, body) for a known path, else None."""
        parts = path.strip("/").split("/")
        js = parts[0] == "js"
        if js:
            parts = parts[1:]
        prefix = "/js" if js else ""
        if path == "/":
            body = f'<html><body><a href="{prefix}/list/0">start</a></body></html>'
            return 200, "text/html; charset=utf-8", body.encode()
        if len(parts) != 2:
            return None
        kind, arg = parts
        if kind == "list" and arg.isdigit() and int(arg) < self.pages:
            n = int(arg)
            links = "".join(
                f'<li><a class="item-link" href="{prefix}/item/{k}">{k}</a></li>'
                for k in self.keys_of_page(n))
            inner = f'<ul class="items">{links}</ul>'
            if n + 1 < self.pages:
                inner += f'<a class="next" rel="next" href="{prefix}/list/{n + 1}">next</a>'
            return 200, "text/html; charset=utf-8", self._page(f"List {n}", inner, js)
        if kind == "item" and self._valid_key(arg):
            it = self.item(arg)
            inner = (f'<div class="item" data-key="{arg}"><h1 class="name">'
                     f'{html.escape(it["name"])}</h1><span class="price">{it["price"]}</span>'
                     f'</div>')
            return 200, "text/html; charset=utf-8", self._page(it["name"], inner, js)
        return None

    def _valid_key(self, key: str) -> bool:
        if len(key) != 6 or key[0] != "k" or not key[1:].isdigit():
            return False
        return int(key[1:]) < self.pages * self.items_per_page

    def _page(self, title: str, inner: str, js: bool) -> bytes:
        if not js:
            return (f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head>"
                    f"<body>{inner}</body></html>").encode()
        literal = json.dumps(inner).replace("</", "<\\/")
        script = ("<script>setTimeout(function(){"
                  f"document.getElementById('app').innerHTML={literal};"
                  "document.body.setAttribute('data-ready','1');"
                  f"}},{self.js_delay_ms});</script>")
        return (f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head>"
                f'<body><div id="app"></div>{script}</body></html>').encode()

    # ------------------------------------------------------------------ faults
    def add_fault(self, match: str | Callable[[str], bool], fault: Fault, *, rate: float = 1.0,
                  per: str = "url", times: int | None = None) -> None:
        """Fault requests whose path matches (fnmatch pattern or predicate).

        ``per="url"``: a fixed, seeded ``rate`` share of matching URLs always fault.
        ``per="request"``: each matching request faults with probability ``rate``.
        ``times``: only the first N selected requests fault. First matching rule wins.
        """
        if per not in ("url", "request"):
            raise ValueError("add_fault: per must be 'url' or 'request'")
        if not 0.0 <= rate <= 1.0:
            raise ValueError("add_fault: rate must be within [0, 1]")
        if isinstance(match, str):
            pattern = match
            matcher: Callable[[str], bool] = lambda path: fnmatch.fnmatchcase(path, pattern)  # noqa: E731
        else:
            matcher = match
        with self._rules_lock:
            self._rules.append(_Rule(matcher, fault, rate, per, times, self._rule_count))
            self._rule_count += 1

    def clear_faults(self) -> None:
        with self._rules_lock:
            self._rules.clear()

    def _select_fault(self, path: str) -> Fault | None:
        with self._rules_lock:
            for rule in self._rules:
                if not rule.match(path):
                    continue
                if rule.per == "url":
                    selected = _unit(self.seed, "fault", rule.index, path) < rule.rate
                else:
                    selected = self._rng.random() < rule.rate
                if not selected:
                    continue
                if rule.times is not None:
                    if rule.fired >= rule.times:
                        continue
                rule.fired += 1
                return rule.fault
        return None

    # ------------------------------------------------------------------ counters
    @property
    def hits(self) -> Counter[str]:
        """Requests per path (a copy; missing paths read 0)."""
        with self._c.lock:
            return Counter(self._c.hits)

    @property
    def total_requests(self) -> int:
        with self._c.lock:
            return self._c.total

    @property
    def open_connections(self) -> int:
        with self._c.lock:
            return self._c.open

    @property
    def hanging(self) -> int:
        """Connections currently held open by hang faults."""
        with self._c.lock:
            return self._c.hanging

    @property
    def faults_served(self) -> Counter[str]:
        """Faults applied so far, by kind."""
        with self._c.lock:
            return Counter(self._c.faults)

    def _count(self, attr: str, delta: int) -> None:
        with self._c.lock:
            setattr(self._c, attr, getattr(self._c, attr) + delta)

    # ------------------------------------------------------------------ protocol
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, asyncio.current_task())
        self._conns.add(conn)
        self._count("open", 1)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                method, target, version, headers = request
                keep = await self._respond(conn, reader, method, target, version, headers)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._count("open", -1)
            self._conns.discard(conn)
            if not writer.transport.is_closing():
                writer.close()

    async def _respond(self, conn: _Conn, reader: asyncio.StreamReader, method: str,
                       target: str, version: str, headers: dict[str, str]) -> bool:
        path = urlsplit(target).path or "/"
        with self._c.lock:
            attempt = self._c.hits[path]
            self._c.hits[path] += 1
            self._c.total += 1
        conn_hdr = headers.get("connection", "").lower()
        keep = (version == "HTTP/1.1" and "close" not in conn_hdr) or "keep-alive" in conn_hdr
        fault = self._select_fault(path)
        if fault is not None:
            with self._c.lock:
                self._c.faults[fault.kind] += 1
        delay = self.latency.draw(self.seed, path, attempt)
        if delay > 0:
            await asyncio.sleep(delay)
        writer = conn.writer
        if fault is not None:
            if fault.kind == "hang":
                conn.hanging = True
                self._count("hanging", 1)
                try:
                    while await reader.read(65536):  # held until the client goes away
                        pass
                finally:
                    self._count("hanging", -1)
                    conn.hanging = False
                return False
            if fault.kind == "reset":
                _rst(writer)
                return False
            if fault.kind == "close":
                writer.close()
                return False
            if fault.kind == "slow_headers":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "status":
                body = f"fault status {fault.code}\n".encode()
                await _send(writer, fault.code, "text/plain", body, method, keep)
                return keep
        rendered = self._render(path)
        if rendered is None:
            await _send(writer, 404, "text/plain", b"not found\n", method, keep)
            return keep
        status, ctype, body = rendered
        if fault is not None and fault.kind == "truncate":
            await _send(writer, status, ctype, b"", method, False, length=len(body))
            writer.write(body[: len(body) // 2])
            await writer.drain()
            writer.close()
            return False
        if fault is not None and fault.kind == "drip":
            await _send(writer, status, ctype, b"", method, keep, length=len(body))
            if method != "HEAD":
                step = max(1, math.ceil(len(body) / fault.chunks))
                pieces = [body[i:i + step] for i in range(0, len(body), step)]
                for piece in pieces:
                    await asyncio.sleep(fault.seconds / len(pieces))
                    writer.write(piece)
                    await writer.drain()
            return keep
        await _send(writer, status, ctype, body, method, keep)
        return keep


async def _read_request(reader: asyncio.StreamReader
                        ) -> tuple[str, str, str, dict[str, str]] | None:
    """The next request's head; its body (if any) is read and ignored."""
    head = await read_head(reader)
    if head is None:
        return None
    method, target, version, headers, _ = head
    length = int(headers.get("content-length", "0") or 0)
    if length:
        await reader.readexactly(length)
    return method, target, version, headers


async def _send(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, method: str,
                keep: bool, length: int | None = None) -> None:
    reason = _REASONS.get(status, "Status")
    size = len(body) if length is None else length
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {size}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n"
            f"Server: FaultSite\r\n\r\n").encode()
    writer.write(head if method == "HEAD" else head + body)
    await writer.drain()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort with SO_LINGER 0 so the peer sees a TCP RST, not a clean close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
