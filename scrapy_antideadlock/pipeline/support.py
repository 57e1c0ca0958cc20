"""The engine's options, a stats sink for use without Scrapy, its registry view, and
the bound on one flush."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..primitives.registry import HolderInfo, PoolSnapshot, WaiterInfo

_T = TypeVar("_T")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


async def bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
    """``await awaitable`` for at most ``seconds`` (``TimeoutError`` after that).

    Unlike ``asyncio.wait_for`` on Python 3.11, this runs the awaitable in the caller's
    task: no task to start and none to finish, each of which costs a turn of the event
    loop, and a flush's items wait for every turn while the crawl keeps the loop busy.
    """
    if _timeout is None:  # Python 3.10
        return await asyncio.wait_for(awaitable, seconds)
    async with _timeout(seconds):
        return await awaitable


class Stats:
    """Minimal stats sink (Scrapy's StatsCollector has the same three methods)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def inc_value(self, key: str, count: int = 1, start: int = 0) -> None:
        self.values[key] = self.values.get(key, start) + count

    def set_value(self, key: str, value: Any) -> None:
        self.values[key] = value

    def max_value(self, key: str, value: Any) -> None:
        self.values[key] = max(self.values.get(key, value), value)

    def get_value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


@dataclass
class EngineOptions:
    """Engine knobs; the pipeline fills them from the pg settings (same names)."""

    batch_size: int = 1000
    max_delay: float = 0.1
    capacity: int = 10000
    pool_size: int = 4
    acquire_timeout: float = 5.0
    max_waiting: int = 16
    lock_timeout: float = 2.0
    statement_timeout: float = 30.0
    idle_in_transaction_timeout: float = 60.0
    max_attempts: int = 6
    retry_budget: float = 30.0  # seconds per batch, retries included
    backoff_base: float = 0.05
    backoff_max: float = 2.0
    close_timeout: float = 30.0
    create_tables: bool = False
    connect_timeout: float = 10.0
    eager_flush: bool = True  # commit mode: items wait, so flush right after a flush
    name: str = "pg"


class PgPoolView:
    """Registry view of the connection pool: holders are flushes, waiters are flushes."""

    kind = "pg"

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._lock = threading.Lock()
        self._holders: dict[int, tuple[str, str, float]] = {}
        self._waiters: dict[int, tuple[str, str, float]] = {}

    def waiting(self, token: int, owner: str, member: str) -> None:
        with self._lock:
            self._waiters[token] = (owner, member, time.monotonic())

    def holding(self, token: int) -> None:
        with self._lock:
            owner, member, _ = self._waiters.pop(token, ("", "", 0.0))
            self._holders[token] = (owner, member, time.monotonic())

    def done(self, token: int) -> None:
        with self._lock:
            self._waiters.pop(token, None)
            self._holders.pop(token, None)

    def snapshot(self) -> PoolSnapshot:
        now = time.monotonic()
        with self._lock:
            holders = tuple(HolderInfo(o, m, now - t) for o, m, t in self._holders.values())
            waiters = tuple(WaiterInfo(o, now - t, m) for o, m, t in self._waiters.values())
        return PoolSnapshot(self.name, self.kind, self.capacity, len(holders), holders, waiters)
