"""LeasePool: bounded, timed acquisition of exclusive units with owners and expiry.

Breaks "no preemption" and "infinite wait": every unit held has an owner and an
expiry after which it is reclaimed (the owner is told through ``on_expire``), and
every wait has a timeout that ends in a named exception. Releasing twice is a
counted no-op, never a capacity drift.

A pool has one or more *members* (e.g. proxies), each with its own capacity. A
member that fails can be put in cooldown (exponential backoff with jitter) so a
dead proxy cannot hold the pool.

A :class:`LeaseBackend` (e.g. Redis, in ``scrapy_antideadlock.fleet``) makes the
grants shared by several processes: capacity, cooldown and expiry then hold across
all of them, while waiting, timeouts and counters stay local. A backend that cannot
be reached raises :class:`BackendUnavailable` and the pool grants from its local
counts until the backend answers again.

Runs on one asyncio loop. ``snapshot()`` and the counters may be read from any
thread.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .lease_backend import (  # noqa: F401  (re-exported: the pool's public errors)
    BackendUnavailable,
    LeaseBackend,
    LeaseCounters,
    LeaseError,
    LeaseTimeout,
    PoolClosed,
    TooManyWaiters,
)
from .registry import HolderInfo, PoolSnapshot, WaiterInfo

Clock = Callable[[], float]


@dataclass(eq=False)
class Lease:
    """One unit of ``member`` held by ``owner``; release it exactly once (more is a no-op)."""

    pool: LeasePool
    member: str
    owner: str
    acquired_at: float
    expires_at: float | None
    on_expire: Callable[[Lease], object] | None = None
    id: int = 0
    released: bool = False
    release_reason: str = ""
    token: int | None = None  # fencing token of a backend grant (None: local grant)

    def release(self, reason: str = "released") -> bool:
        """Return the unit; True the first time, False (and counted) afterwards."""
        return self.pool._release(self, reason)

    def age(self, now: float | None = None) -> float:
        return (self.pool.clock() if now is None else now) - self.acquired_at


@dataclass
class _Member:
    name: str
    capacity: int
    in_use: int = 0
    granted: int = 0  # total grants, for round-robin among equally loaded members
    failures: int = 0
    cooldown_until: float = 0.0


@dataclass(eq=False)
class _Waiter:
    owner: str
    member: str | None
    future: asyncio.Future
    since: float
    ttl: float | None
    on_expire: Callable[[Lease], object] | None
    timer: asyncio.TimerHandle | None = None


class LeasePool:
    """A pool of exclusive, expiring leases over one or more members."""

    def __init__(
        self,
        name: str,
        capacity: int | Mapping[str, int],
        *,
        kind: str = "lease",
        clock: Clock = time.monotonic,
        max_waiters: int | None = None,
        cooldown_base: float = 1.0,
        cooldown_max: float = 60.0,
        rng: random.Random | None = None,
        backend: LeaseBackend | None = None,
    ) -> None:
        members = {"": capacity} if isinstance(capacity, int) else dict(capacity)
        if not members:
            raise ValueError(f"pool {name!r} needs at least one member")
        for member, cap in members.items():
            if not isinstance(cap, int) or cap < 1:
                raise ValueError(f"pool {name!r}: capacity of {member or 'the pool'} must be >= 1")
        self.name = name
        self.kind = kind
        self.clock = clock
        self.max_waiters = max_waiters
        self.cooldown_base = cooldown_base
        self.cooldown_max = cooldown_max
        self.counters = LeaseCounters()
        self._rng = rng or random.Random()
        self._members = {m: _Member(m, c) for m, c in members.items()}
        self._leases: dict[int, Lease] = {}
        self._waiters: deque[_Waiter] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._closed = False
        self._wakeup: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.backend = backend
        self._rotation = 0  # where the backend's candidate list starts (round-robin)

    # ------------------------------------------------------------------ acquiring
    @property
    def capacity(self) -> int:
        return sum(m.capacity for m in self._members.values())

    @property
    def in_use(self) -> int:
        return len(self._leases)

    def members(self) -> list[str]:
        return list(self._members)

    def try_acquire(self, owner: str, *, ttl: float | None = None,
                    on_expire: Callable[[Lease], object] | None = None,
                    member: str | None = None) -> Lease | None:
        """A lease now, or None; never waits. Waiters queued earlier go first."""
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        with self._lock:
            if self._waiters:
                return None
            return self._take(member, owner, ttl, on_expire, self.clock())

    async def acquire(self, owner: str, timeout: float, *, ttl: float | None = None,
                      on_expire: Callable[[Lease], object] | None = None,
                      member: str | None = None) -> Lease:
        """Wait at most ``timeout`` seconds for a lease; raise :class:`LeaseTimeout` past it.

        ``ttl`` (seconds from the grant) makes the lease expire; ``on_expire`` is then
        called with it after its unit was reclaimed. Cancelling the caller while it
        waits leaves nothing held.
        """
        if member is not None and member not in self._members:
            raise KeyError(f"pool {self.name!r} has no member {member!r}")
        lease = self.try_acquire(owner, ttl=ttl, on_expire=on_expire, member=member)
        if lease is not None:
            return lease
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.max_waiters is not None and len(self._waiters) >= self.max_waiters:
                self.counters.rejected_waiters += 1
                raise TooManyWaiters(self.name, self.max_waiters)
            waiter = _Waiter(owner, member, loop.create_future(), self.clock(), ttl, on_expire)
            self._waiters.append(waiter)
        waiter.timer = loop.call_later(max(0.0, timeout), self._time_out, waiter)
        self._schedule_wakeup(loop)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._drop_waiter(waiter)
            if waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:
                waiter.future.result().release("cancelled")  # granted as we were cancelled
            raise
        finally:
            if waiter.timer:
                waiter.timer.cancel()

    def _time_out(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._drop_waiter(waiter)
        waited = self.clock() - waiter.since
        self.counters.wait_timeouts += 1
        self.counters.max_wait = max(self.counters.max_wait, waited)
        waiter.future.set_exception(LeaseTimeout(self.name, waiter.owner, waited))

    def _drop_waiter(self, waiter: _Waiter) -> None:
        with self._lock:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _take(self, wanted: str | None, owner: str, ttl: float | None,
              on_expire: Callable[[Lease], object] | None, now: float) -> Lease | None:
        """A grant now (from the backend if there is one and it answers), or None."""
        if self.backend is not None:
            names = [wanted] if wanted is not None else list(self._members)
            if wanted is None and len(names) > 1:  # equal loads: rotate, like `granted`
                self._rotation = (self._rotation + 1) % len(names)
                names = names[self._rotation:] + names[:self._rotation]
            candidates = [(n, self._members[n].capacity) for n in names
                          if self._members[n].cooldown_until <= now]
            if not candidates:
                return None
            try:
                got = self.backend.acquire(candidates, owner, ttl)
            except BackendUnavailable:
                pass  # the backend said why (log, stat); grant from local counts
            else:
                if got is None:
                    return None
                return self._grant(self._members[got[0]], owner, ttl, on_expire, got[1])
        chosen = self._pick(wanted, now)
        return self._grant(chosen, owner, ttl, on_expire) if chosen else None

    def _pick(self, wanted: str | None, now: float) -> _Member | None:
        if wanted is not None:
            member = self._members[wanted]
            ok = member.in_use < member.capacity and member.cooldown_until <= now
            return member if ok else None
        best: _Member | None = None
        for member in self._members.values():
            if member.in_use >= member.capacity or member.cooldown_until > now:
                continue
            if best is None or _load_key(member) < _load_key(best):
                best = member
        return best

    def _grant(self, member: _Member, owner: str, ttl: float | None,
               on_expire: Callable[[Lease], object] | None, token: int | None = None) -> Lease:
        now = self.clock()
        lease = Lease(self, member.name, owner, now, None if ttl is None else now + ttl,
                      on_expire, next(self._ids), token=token)
        member.in_use += 1
        member.granted += 1
        self._leases[lease.id] = lease
        self.counters.acquired += 1
        return lease

    def _dispatch(self) -> None:
        """Hand free units to waiters in FIFO order, skipping those whose member is busy."""
        now = self.clock()
        granted: list[tuple[_Waiter, Lease]] = []
        with self._lock:
            refused: set[str | None] = set()  # asked already this round, and refused
            for waiter in list(self._waiters):
                if waiter.future.done():
                    self._waiters.remove(waiter)
                    continue
                if waiter.member in refused or None in refused:
                    continue
                lease = self._take(waiter.member, waiter.owner, waiter.ttl, waiter.on_expire,
                                   now)
                if lease is None:
                    refused.add(waiter.member)
                    continue
                self._waiters.remove(waiter)
                waited = now - waiter.since
                self.counters.max_wait = max(self.counters.max_wait, waited)
                granted.append((waiter, lease))
        for waiter, lease in granted:
            waiter.future.set_result(lease)
        if self._waiters:
            try:
                self._schedule_wakeup(asyncio.get_running_loop())
            except RuntimeError:
                pass

    def _schedule_wakeup(self, loop: asyncio.AbstractEventLoop) -> None:
        """If waiters wait only because members cool down, wake them when one is back.

        With a backend, units are also freed by other processes: poll while anyone waits.
        """
        now = self.clock()
        ends = [m.cooldown_until for m in self._members.values()
                if m.cooldown_until > now and m.in_use < m.capacity]
        if self.backend is not None and self._waiters:
            ends.append(now + self.backend.poll_interval)
        if not ends:
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup = loop.call_later(min(ends) - now + 0.001, self._dispatch)

    # ------------------------------------------------------------------ releasing
    def _release(self, lease: Lease, reason: str) -> bool:
        with self._lock:
            if lease.released or self._leases.get(lease.id) is not lease:
                self.counters.double_releases += 1
                return False
            lease.released = True
            lease.release_reason = reason
            del self._leases[lease.id]
            self._members[lease.member].in_use -= 1
            self.counters.released += 1
            self.counters.by_reason[reason] = self.counters.by_reason.get(reason, 0) + 1
        if lease.token is not None and self.backend is not None:
            try:
                self.backend.release(lease.member, lease.token)
            except BackendUnavailable:
                pass  # the grant expires on the backend at its TTL
        self._dispatch()
        return True

    def sweep(self, now: float | None = None) -> list[Lease]:
        """Reclaim every lease past its expiry and tell its owner; return them."""
        now = self.clock() if now is None else now
        with self._lock:
            expired = [lease for lease in self._leases.values()
                       if lease.expires_at is not None and lease.expires_at <= now]
        return [lease for lease in expired if self._reclaim(lease)]

    def _reclaim(self, lease: Lease) -> bool:
        """Release an expired ``lease`` and tell its owner; False if it was released already."""
        if not self._release(lease, "expired"):
            return False
        self.counters.expired += 1
        if lease.on_expire is not None:
            lease.on_expire(lease)
        return True

    def extend(self, lease: Lease, ttl: float | None) -> None:
        """Move a live lease's expiry to ``ttl`` seconds from now (None: no expiry).

        A backend grant that already expired cannot be renewed (its unit may be held by
        another process now): the lease is reclaimed at once, as by :meth:`sweep`.
        """
        if lease.released:
            return
        lease.expires_at = None if ttl is None else self.clock() + ttl
        if lease.token is not None and self.backend is not None:
            try:
                renewed = self.backend.renew(lease.member, lease.token, ttl)
            except BackendUnavailable:
                return
            if not renewed:  # the shared grant expired: another process may hold the unit
                lease.expires_at = self.clock()
                self._reclaim(lease)

    def start_sweeper(self, interval: float = 0.25) -> None:
        """Sweep every ``interval`` seconds on the running loop until :meth:`close`."""
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.sweep()
            if not self._closed:
                self._sweeper = loop.call_later(interval, tick)

        self._sweeper = loop.call_later(interval, tick)

    # ------------------------------------------------------------------ member health
    def mark_failure(self, member: str) -> float:
        """Put ``member`` in cooldown (exponential backoff, 50-100 % jitter); return its length."""
        with self._lock:
            state = self._members[member]
            state.failures += 1
            delay = min(self.cooldown_base * 2 ** (state.failures - 1), self.cooldown_max)
            delay *= 0.5 + self._rng.random() / 2
            state.cooldown_until = max(state.cooldown_until, self.clock() + delay)
            self.counters.cooldowns += 1
        if self.backend is not None:
            try:
                self.backend.cooldown(member, delay)
            except BackendUnavailable:
                pass
        return delay

    def mark_success(self, member: str) -> None:
        with self._lock:
            state = self._members[member]
            was_failing = state.failures > 0 or state.cooldown_until > 0
            state.failures = 0
            state.cooldown_until = 0.0
        if was_failing and self.backend is not None:
            try:
                self.backend.clear_cooldown(member)
            except BackendUnavailable:
                pass
        self._dispatch()

    def cooling_down(self) -> dict[str, float]:
        now = self.clock()
        with self._lock:
            return {m.name: m.cooldown_until - now for m in self._members.values()
                    if m.cooldown_until > now}

    # ------------------------------------------------------------------ inspection
    def holders(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def waiters(self) -> list[WaiterInfo]:
        now = self.clock()
        with self._lock:
            return [WaiterInfo(w.owner, now - w.since, w.member or "") for w in self._waiters]

    def member_use(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {m.name: (m.in_use, m.capacity) for m in self._members.values()}

    def snapshot(self) -> PoolSnapshot:
        now = self.clock()
        with self._lock:
            holders = tuple(
                HolderInfo(lease.owner, lease.member, now - lease.acquired_at,
                           None if lease.expires_at is None else lease.expires_at - now)
                for lease in self._leases.values())
            waiters = tuple(WaiterInfo(w.owner, now - w.since, w.member or "")
                            for w in self._waiters)
            members = {m.name: {"in_use": m.in_use, "capacity": m.capacity,
                                "cooldown": max(0.0, m.cooldown_until - now)}
                       for m in self._members.values()}
            extra: dict[str, object] = {"members": members}
            if self.backend is not None:
                extra["backend"] = str(self.backend)
            return PoolSnapshot(self.name, self.kind, self.capacity, len(self._leases),
                                holders, waiters, extra)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Fail every waiter with :class:`PoolClosed`; held leases stay releasable."""
        self._closed = True
        for handle in (self._wakeup, self._sweeper):
            if handle is not None:
                handle.cancel()
        with self._lock:
            waiters, self._waiters = list(self._waiters), deque()
        for waiter in waiters:
            if waiter.timer:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosed(f"pool {self.name!r} closed"))


def _load_key(member: _Member) -> tuple[float, int]:
    return (member.in_use / member.capacity, member.granted)
