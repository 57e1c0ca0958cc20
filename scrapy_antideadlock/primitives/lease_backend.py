"""The lease pool's vocabulary: its errors, counters and the shared-backend interface.

Kept apart from :mod:`.lease` so a backend (``scrapy_antideadlock.fleet``) implements
the interface without importing the pool's machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["BackendUnavailable", "LeaseBackend", "LeaseCounters", "LeaseError", "LeaseTimeout", "PoolClosed",
           "TooManyWaiters"]


class LeaseError(Exception):
    """Base of the lease errors."""


class LeaseTimeout(LeaseError):
    """No unit became free within the acquire timeout. Retryable."""

    def __init__(self, pool: str, owner: str, waited: float) -> None:
        self.pool, self.owner, self.waited = pool, owner, waited
        super().__init__(f"no free unit in pool {pool!r} for {owner} after {waited:.2f}s")


class TooManyWaiters(LeaseError):
    """The pool's waiting queue is full (``max_waiters``). Retryable."""

    def __init__(self, pool: str, max_waiters: int) -> None:
        self.pool, self.max_waiters = pool, max_waiters
        super().__init__(f"pool {pool!r} already has {max_waiters} waiters")


class PoolClosed(LeaseError):
    """The pool was closed while waiting or before acquiring."""


class BackendUnavailable(LeaseError):
    """The shared backend cannot be reached now; the pool falls back to local grants."""


class LeaseBackend(Protocol):
    """Where a shared pool records its grants (each call atomic on the backend's side).

    ``acquire`` picks the least-loaded member among ``candidates`` (name, capacity)
    that is below capacity and not cooling down, records a grant for ``owner``
    expiring after ``ttl`` seconds (None: the backend's longest lease) and returns
    (member, fencing token). ``release``/``renew`` act only on that token, so a
    holder whose grant already expired can never free or extend another's.
    """

    poll_interval: float  # how often local waiters re-ask (other processes release)

    def acquire(self, candidates: Sequence[tuple[str, int]], owner: str,
                ttl: float | None) -> tuple[str, int] | None: ...

    def release(self, member: str, token: int) -> bool: ...

    def renew(self, member: str, token: int, ttl: float | None) -> bool: ...

    def cooldown(self, member: str, seconds: float) -> None: ...

    def clear_cooldown(self, member: str) -> None: ...


@dataclass
class LeaseCounters:
    acquired: int = 0
    released: int = 0
    expired: int = 0
    double_releases: int = 0
    wait_timeouts: int = 0
    rejected_waiters: int = 0
    cooldowns: int = 0
    max_wait: float = 0.0
    by_reason: dict[str, int] = field(default_factory=dict)
