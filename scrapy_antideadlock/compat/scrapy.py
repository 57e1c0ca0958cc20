"""Scrapy engine, scraper and downloader internals (checked with Scrapy 2.13-2.19).

Scrapy has no public API for "which requests are still being worked on" or "tell me when a
request is completely done", both of which the journal, the watchdog and the Playwright page
sweeper need. These functions read them from the engine's private slot; each is declared with
:func:`require` so a Scrapy that moved them fails at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import require

logger = logging.getLogger(__name__)

__all__ = ["engine_or_none", "in_progress", "on_request_done",
           "process_download_slot", "scheduler_of", "scraper_active", "scraper_queued",
           "wake_engine"]


def _engine_slot_class() -> Any:
    from scrapy.core import engine

    return engine._Slot


def _has_slot_members() -> bool:
    import inspect

    source = inspect.getsource(_engine_slot_class())
    return all(name in source for name in ("inprogress", "nextcall", "def remove_request"))


def _has_engine_slot() -> bool:
    import inspect

    from scrapy.core.engine import ExecutionEngine

    return "self._slot" in inspect.getsource(ExecutionEngine.__init__)


def _has_process_queue() -> bool:
    from scrapy.core.downloader import Downloader

    return callable(getattr(Downloader, "_process_queue", None))


def _has_scraper_slot() -> bool:
    import inspect

    from scrapy.core import scraper

    source = inspect.getsource(scraper.Slot)
    return "self.active" in source and "self.queue" in source


require("scrapy.core.engine.ExecutionEngine._slot", "journal, watchdog, page sweeper",
        _has_engine_slot)
require("scrapy.core.engine._Slot.inprogress/nextcall/remove_request",
        "the journal's 'request done' moment and the watchdog's pending count", _has_slot_members)
require("scrapy.core.downloader.Downloader._process_queue",
        "lent concurrency used at once instead of at the next heartbeat", _has_process_queue)
require("scrapy.core.scraper.Slot.active/queue", "requests still in callbacks or pipelines",
        _has_scraper_slot)


def engine_or_none(crawler: Any) -> Any:
    """The crawler's engine, or None before the crawl started (Scrapy 2.19 raises then)."""
    try:
        return crawler.engine
    except (AttributeError, RuntimeError):
        return None


def _slot(engine: Any) -> Any:
    return getattr(engine, "_slot", None)


def in_progress(engine: Any) -> set[Any] | None:
    """Requests the engine still works on (download, middlewares, callback, pipelines)."""
    inprogress = getattr(_slot(engine), "inprogress", None)
    return inprogress if isinstance(inprogress, set) else None


def scheduler_of(engine: Any) -> Any:
    """The engine's scheduler, or None when no spider is open."""
    slot = _slot(engine)
    return slot.scheduler if slot is not None else None


def scraper_active(engine: Any) -> set[Any]:
    """Requests whose response is in a callback or whose items are in pipelines."""
    slot = getattr(getattr(engine, "scraper", None), "slot", None)
    return set(slot.active) if slot is not None else set()


def scraper_queued(engine: Any) -> set[Any]:
    """Requests whose response waits for the scraper (not yet in a callback)."""
    slot = getattr(getattr(engine, "scraper", None), "slot", None)
    return {queued[1] for queued in slot.queue} if slot is not None else set()


def on_request_done(engine: Any, callback: Callable[[Any], None]) -> bool:
    """Call ``callback(request)`` when the engine forgets a request (fully done).

    Returns False (and logs) when this Scrapy version gives no such moment.
    """
    slot = _slot(engine)
    original = getattr(slot, "remove_request", None)
    if slot is None or original is None or not hasattr(slot, "inprogress"):
        logger.error("scrapy-antideadlock: cannot observe request completion in this "
                     "Scrapy version; the journal will re-crawl finished requests")
        return False

    def remove_request(request: Any) -> None:
        if request in slot.inprogress:
            callback(request)
        original(request)

    slot.remove_request = remove_request
    return True


def wake_engine(engine: Any) -> None:
    """Ask the engine to look for work now rather than at its next heartbeat (5 s)."""
    nextcall = getattr(_slot(engine), "nextcall", None)
    if nextcall is not None:
        nextcall.schedule()


def process_download_slot(engine: Any, slot: Any) -> None:
    """Let a downloader slot start queued requests now (after its concurrency changed)."""
    process_queue = getattr(getattr(engine, "downloader", None), "_process_queue", None)
    if slot is not None and process_queue is not None:
        process_queue(slot)

