"""Scrapy downloader internals the guard uses (checked with Scrapy 2.13-2.19).

The downloader's slots (``Downloader.slots``), their queue, delay and concurrency, the
global ``total_concurrency`` and ``active`` set have no public API. The guard reads them
to size a request's deadline by the queue ahead of it, to fail a request still queued
when its deadline passes (removing it from ``slot.queue`` and errbacking its Deferred is
what Scrapy's own close does, and is safe), and to lend the concurrency of an overdue
transfer. Each use is one small function here, declared with :func:`require`.
"""

from __future__ import annotations

import inspect
from typing import Any

from . import require
from .scrapy import engine_or_none, process_download_slot, wake_engine

__all__ = ["downloader_of", "in_downloader", "lend", "queued_ahead", "remove_queued",
           "slot_of", "slot_wait_estimate"]


def _has_downloader_members() -> bool:
    from scrapy.core.downloader import Downloader

    source = inspect.getsource(Downloader.__init__)
    return all(f"self.{name}" in source for name in ("slots", "active", "total_concurrency"))


def _has_slot_members() -> bool:
    from scrapy.core.downloader import Slot

    source = inspect.getsource(Slot.__init__)
    return all(f"self.{name}" in source for name in ("queue", "delay", "concurrency"))


require("scrapy.core.downloader.Downloader.slots/active/total_concurrency",
        "deadlines that count the slot queue; lending an overdue transfer's concurrency",
        _has_downloader_members)
require("scrapy.core.downloader.Slot.queue/delay/concurrency",
        "failing a request still queued at its deadline; lending slot concurrency",
        _has_slot_members)


def downloader_of(crawler: Any) -> Any:
    """The crawler's downloader, or None before the engine exists."""
    return getattr(engine_or_none(crawler), "downloader", None)


def slot_of(downloader: Any, key: str) -> Any:
    """The downloader slot named ``key``, or None (not created yet, or already freed)."""
    slots = getattr(downloader, "slots", None)
    return slots.get(key) if slots else None


def queued_ahead(slot: Any) -> int:
    """Requests waiting in ``slot``'s queue."""
    return len(slot.queue) if slot is not None else 0


def slot_wait_estimate(slot: Any, transfer: float) -> float:
    """Seconds the queue ahead takes to drain: one per DOWNLOAD_DELAY, else by concurrency."""
    ahead = queued_ahead(slot)
    if not ahead:
        return 0.0
    return ahead * slot.delay + ahead / max(1, slot.concurrency) * transfer


def slot_delay(slot: Any) -> float:
    """``slot``'s download delay (DOWNLOAD_DELAY, or AutoThrottle's current one); 0 if none."""
    return slot.delay if slot is not None else 0.0


def in_downloader(downloader: Any, request: Any) -> bool | None:
    """Whether ``request`` is still in the downloader (None: cannot tell)."""
    active = getattr(downloader, "active", None)
    return None if active is None else request in active


def remove_queued(downloader: Any, key: str, request: Any, exc: BaseException) -> bool:
    """Take ``request`` out of slot ``key``'s queue and fail its Deferred with ``exc``."""
    from twisted.python.failure import Failure

    slot = slot_of(downloader, key)
    if slot is None:
        return False
    for pair in slot.queue:
        if pair[0] is request:
            slot.queue.remove(pair)
            pair[1].errback(Failure(exc))
            return True
    return False


def lend(crawler: Any, slot: Any, delta: int) -> None:
    """Raise (or lower) the global and ``slot``'s concurrency by ``delta``; use it at once."""
    downloader = downloader_of(crawler)
    if downloader is not None:
        downloader.total_concurrency += delta
    if slot is not None:
        slot.concurrency += delta
    if delta > 0:
        engine = engine_or_none(crawler)
        wake_engine(engine)
        process_download_slot(engine, slot)
