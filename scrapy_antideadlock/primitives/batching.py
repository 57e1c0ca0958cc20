"""Batching for deadlock-free bulk writes: dedupe, key order, group commit, backoff.

Two writers can only deadlock on rows if they lock them in opposite orders, so every
batch is deduplicated by key (last write wins; a duplicate inside one ``ON CONFLICT``
statement is an error anyway) and sorted by key before it is written.

:class:`BatchBuffer` collects entries and hands them to one flush at a time (so a
later batch never overtakes an earlier one for the same key) when the batch is
full, when the oldest entry waited ``max_delay`` (nobody awaits entries), at once when
someone does (group commit: what queued behind the previous flush goes next), or when
asked to drain. Entries
hold a slot of a bounded buffer; a producer that finds it full waits with a timeout.
No Scrapy import; runs on one asyncio loop, ``snapshot()`` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from .registry import HolderInfo, PoolSnapshot, WaiterInfo

__all__ = ["Backoff", "BatchBuffer", "BufferFull", "Entry", "dedupe_last_wins", "split_halves"]


@dataclass(eq=False, slots=True)
class Entry:
    """One row waiting to be written, with the request that produced it.

    Slotted: thousands are in flight at once, and every object without a ``__dict__``
    is one less for the cyclic GC to traverse (a visible share of per-item cost).
    """

    key: tuple
    row: Any = None
    owner: str = ""
    since: float = 0.0
    payload: Any = None  # what to park in a dead-letter store if the row fails
    future: asyncio.Future | None = None  # settled by the flush; None: nobody waits
    superseded: list[Entry] | None = None  # same key, earlier in the batch
    settled: bool = False  # outcome decided (stored or parked); even if the waiter left

    def settle(self, outcome: Any) -> bool:
        """Record the outcome once; True the first time."""
        if self.settled:
            return False
        self.settled = True
        if self.future is not None and not self.future.done():
            self.future.set_result(outcome)
        return True

    def entries(self) -> list[Entry]:
        """This entry and every earlier one it superseded (they share its fate)."""
        return [*self.superseded, self] if self.superseded else [self]


def dedupe_last_wins(entries: Sequence[Entry]) -> tuple[list[Entry], int]:
    """One entry per key (the last), sorted by key; also return how many were dropped.

    The winner keeps the losers in ``superseded`` so their waiters learn the outcome.
    """
    winners: dict[Hashable, Entry] = {}
    for entry in entries:
        previous = winners.pop(entry.key, None)
        if previous is not None:
            entry.superseded = [*(previous.superseded or ()), previous,
                                *(entry.superseded or ())]
        winners[entry.key] = entry
    dropped = len(entries) - len(winners)
    try:
        ordered = sorted(winners.values(), key=lambda e: e.key)
    except TypeError:  # mixed key types or None: a total order that never raises
        ordered = sorted(winners.values(), key=lambda e: _sort_key(e.key))
    return ordered, dropped


def _sort_key(key: tuple) -> tuple:
    # None sorts first and mixed types by type name, so sorting never raises.
    return tuple((v is not None, type(v).__name__, v) for v in key)


def split_halves(entries: Sequence[Entry]) -> list[list[Entry]]:
    """Split a failed batch to isolate poison rows (each half keeps key order)."""
    middle = len(entries) // 2
    return [list(entries[:middle]), list(entries[middle:])]


class Backoff:
    """Jittered exponential backoff: base x 2^n, capped, times a factor in [0.5, 1)."""

    def __init__(self, base: float = 0.05, cap: float = 5.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self._rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        """Pause before retry number ``attempt`` (1 = first retry)."""
        raw = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        return raw * (0.5 + self._rng.random() / 2)


class BufferFull(TimeoutError):
    """No buffer slot became free within the timeout."""


class BatchBuffer:
    """Bounded buffer that flushes in batches, one flush at a time, on size/delay/drain.

    ``flush(batch)`` must settle every entry of the batch (write it or park it) and
    should not raise; an exception is reported through ``on_error`` and the batch is
    considered done, so the buffer never wedges.
    """

    def __init__(self, name: str, flush: Callable[[list[Entry]], Awaitable[None]], *,
                 batch_size: int, max_delay: float, capacity: int, kind: str = "buffer",
                 clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[BaseException, list[Entry]], None] | None = None,
                 eager: bool = True) -> None:
        if batch_size < 1 or capacity < batch_size:
            raise ValueError("need 1 <= batch_size <= capacity")
        self.name, self.kind = name, kind
        self.batch_size, self.max_delay, self.capacity = batch_size, max_delay, capacity
        self.clock = clock
        self._flush_fn = flush
        self._on_error = on_error
        self.eager = eager  # flush right after the previous flush (producers are waiting)
        self._pending: list[Entry] = []
        self._flushing: list[Entry] = []
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._space_waiters: dict[int, tuple[str, float, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.flushes = 0

    # ------------------------------------------------------------------ producing
    @property
    def size(self) -> int:
        return len(self._pending) + len(self._flushing)

    def has_room(self) -> bool:
        return self.size < self.capacity

    async def put(self, entry: Entry, timeout: float) -> None:
        """Add ``entry``, waiting at most ``timeout`` s for a free slot (:class:`BufferFull`)."""
        if self.size >= self.capacity:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while self.size >= self.capacity:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BufferFull(f"buffer {self.name!r} full ({self.capacity}) "
                                     f"for {timeout:.1f}s")
                waiter = loop.create_future()
                wid = next(self._ids)
                with self._lock:
                    self._space_waiters[wid] = (entry.owner, self.clock(), waiter)
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), remaining)
                except asyncio.TimeoutError:
                    pass
                finally:
                    with self._lock:
                        self._space_waiters.pop(wid, None)
        self.add(entry)

    def add(self, entry: Entry) -> None:
        """Add without waiting (the caller checked capacity or accepts going over)."""
        if not entry.since:
            entry.since = self.clock()
        with self._lock:
            self._pending.append(entry)
        self._kick()

    # ------------------------------------------------------------------ flushing
    def _kick(self) -> None:
        """Start a flush if one is due and none runs; else arm the delay timer."""
        if self._task is not None:
            return
        batch = self._take_due()
        if batch is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(batch))

    def _take_due(self) -> list[Entry] | None:
        """The next batch if one is due (now in flight), else None (the timer armed).

        Group commit clocks itself: with ``eager`` (someone awaits each entry) an idle
        writer flushes at once, and entries that arrived during a flush go right after
        it, so a batch is whatever queued behind the last commit and no entry waits for a
        timer (at 16 concurrent requests, a 100 ms gathering delay would hold every item
        that long). ``max_delay`` gathers a batch only when nobody waits (buffered mode:
        bigger batches, fewer transactions).
        """
        if not self._pending:
            return None
        due = (self.eager or self._draining or len(self._pending) >= self.batch_size
               or self.clock() - self._pending[0].since >= self.max_delay)
        if not due:
            if self._timer is None:
                wait = self.max_delay - (self.clock() - self._pending[0].since)
                self._timer = asyncio.get_running_loop().call_later(max(0.0, wait),
                                                                    self._on_timer)
            return None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            batch = self._pending[:self.batch_size]
            del self._pending[:self.batch_size]
            self._flushing = batch
        return batch

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    async def _run(self, batch: list[Entry]) -> None:
        """Flush ``batch``, then every batch due after it, in this one task: a new task
        per flush would cost its entries one more turn of a busy event loop."""
        try:
            while True:
                try:
                    await self._flush_fn(batch)
                except Exception as exc:  # noqa: BLE001 - reported, the buffer must go on
                    if self._on_error is not None:
                        self._on_error(exc, batch)
                finally:
                    self.flushes += 1
                    with self._lock:
                        self._flushing = []
                    self._wake_space_waiters()
                next_batch = self._take_due()
                if next_batch is None:
                    return
                batch = next_batch
        finally:
            self._task = None
            self._kick()

    def _wake_space_waiters(self) -> None:
        with self._lock:
            waiters = [w for _, _, w in self._space_waiters.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Flush everything buffered now and wait until the last flush is done."""
        self._draining = True
        try:
            while self._pending or self._task is not None:
                self._kick()
                task = self._task
                if task is not None:
                    await asyncio.shield(task)
        finally:
            self._draining = False

    def flush_now(self) -> None:
        """Make the buffered entries due at once (e.g. at close) without waiting."""
        self._draining = True
        self._kick()

    def take_all(self) -> tuple[list[Entry], list[Entry]]:
        """Remove and return (buffered, in-flight) entries: the close deadline passed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            pending, self._pending = self._pending, []
            flushing = self._flushing
        return pending, flushing

    @property
    def task(self) -> asyncio.Task | None:
        return self._task

    # ------------------------------------------------------------------ inspection
    def snapshot(self, limit: int = 100) -> PoolSnapshot:
        """Entries held (owner, table, age) and producers waiting for a slot."""
        now = self.clock()
        with self._lock:
            flushing = list(self._flushing)
            pending = list(self._pending)
            waiters = tuple(WaiterInfo(owner, now - since, self.name)
                            for owner, since, _ in self._space_waiters.values())
        held = flushing + pending
        holders = tuple(HolderInfo(e.owner, self.name, now - e.since) for e in held[:limit])
        return PoolSnapshot(self.name, self.kind, self.capacity, len(held), holders, waiters,
                            {"buffered": len(pending), "flushing": len(flushing),
                             "flushes": self.flushes})
