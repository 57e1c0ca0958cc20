"""A crawler-scoped registry of every bounded resource, and the snapshot format they share.

Components register anything with ``name``, ``kind`` and ``snapshot()`` (a
:class:`LeasePool`, or an adapter over psycopg_pool or Playwright's limits). The
watchdog, the preflight check, the stats and the health line read only snapshots —
never a component's privates — and they may do so from another thread, so
``snapshot()`` must be thread-safe and cheap.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class HolderInfo:
    """One unit of a pool held by ``owner`` (a request id) for ``age`` seconds."""

    owner: str
    member: str = ""
    age: float = 0.0
    expires_in: float | None = None  # None: no expiry


@dataclass(frozen=True)
class WaiterInfo:
    """``owner`` has waited ``waited`` seconds for a unit of the pool."""

    owner: str
    waited: float = 0.0
    member: str = ""  # a specific member asked for, else ""


@dataclass(frozen=True)
class PoolSnapshot:
    name: str
    kind: str  # "proxy", "pg", "page", "context", "buffer", ...
    capacity: int
    in_use: int
    holders: tuple[HolderInfo, ...] = ()
    waiters: tuple[WaiterInfo, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exhausted(self) -> bool:
        return self.capacity > 0 and self.in_use >= self.capacity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Pool(Protocol):
    name: str
    kind: str

    def snapshot(self) -> PoolSnapshot: ...


class Registry:
    """Every pool of one crawler (the crawler context holds it: ``context_for(crawler).registry``)."""

    def __init__(self) -> None:
        self._pools: dict[str, Pool] = {}
        self._lock = threading.Lock()

    def register(self, pool: Pool) -> None:
        if not isinstance(pool, Pool):
            raise TypeError(f"{pool!r} has no name/kind/snapshot()")
        with self._lock:
            if pool.name in self._pools and self._pools[pool.name] is not pool:
                raise ValueError(f"a pool named {pool.name!r} is already registered")
            self._pools[pool.name] = pool

    def unregister(self, pool: Pool) -> None:
        with self._lock:
            if self._pools.get(pool.name) is pool:
                del self._pools[pool.name]

    def pools(self) -> list[Pool]:
        with self._lock:
            return list(self._pools.values())

    def snapshot(self) -> list[PoolSnapshot]:
        """A snapshot of every pool; a pool whose snapshot fails is reported, not fatal."""
        out = []
        for pool in self.pools():
            try:
                out.append(pool.snapshot())
            except Exception as exc:  # noqa: BLE001 - diagnostics must not crash
                out.append(PoolSnapshot(pool.name, pool.kind, 0, 0,
                                        extra={"error": f"{type(exc).__name__}: {exc}"}))
        return out
