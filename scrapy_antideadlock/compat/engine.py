"""What the watchdog reads from Scrapy's engine, downloader and scraper (2.13-2.19).

"What is pending now, and where" has no public API: the engine keeps it in its slot,
the downloader in ``active`` and ``slots``, the scraper in its slot. Each read is one
function that returns an empty value when the object is not there (before the crawl,
after the close); the shared engine-slot reads live in :mod:`.scrapy`.
"""

from __future__ import annotations

from typing import Any

from . import require
from . import scrapy as _scrapy

__all__ = ["crawl_engine", "download_slots_delay", "downloader_active",
           "downloader_middlewares", "engine_inprogress", "item_pipelines", "scheduled_count",
           "scraper_active", "spider_is_idle"]


def _has_downloader_members() -> bool:
    import inspect

    from scrapy.core.downloader import Downloader

    source = inspect.getsource(Downloader.__init__)
    return all(f"self.{name}" in source for name in ("active", "slots", "middleware"))


def _has_itemproc() -> bool:
    import inspect

    from scrapy.core.scraper import Scraper

    return "self.itemproc" in inspect.getsource(Scraper.__init__)


require("scrapy.core.downloader.Downloader.active/slots/middleware",
        "the watchdog's view of requests in the downloader and its download delay",
        _has_downloader_members)
require("scrapy.core.scraper.Scraper.itemproc",
        "the watchdog's list of item pipelines (to find the primitives they wait on)",
        _has_itemproc)

crawl_engine = _scrapy.engine_or_none


def engine_inprogress(engine: Any) -> list[Any]:
    """Requests the engine handles now (from the downloader to the end of their callback)."""
    return list(_scrapy.in_progress(engine) or ())


def downloader_active(engine: Any) -> list[Any]:
    """Requests inside the downloader (its middlewares, slot queues and transfers)."""
    try:
        return list(engine.downloader.active)
    except (AttributeError, RuntimeError):
        return []


def scraper_active(engine: Any) -> list[Any]:
    """Requests whose response is in a callback or whose items are in pipelines."""
    return list(_scrapy.scraper_active(engine))


def scheduled_count(engine: Any) -> int:
    """Requests in the scheduler (0 when it cannot say)."""
    scheduler = _scrapy.scheduler_of(engine)
    try:
        return len(scheduler) if scheduler is not None and hasattr(scheduler, "__len__") else 0
    except (TypeError, RuntimeError):
        return 0


def spider_is_idle(engine: Any) -> bool:
    """Scrapy's own idle test (True when no spider is open)."""
    if _scrapy.scheduler_of(engine) is None:
        return True
    try:
        return bool(engine.spider_is_idle())
    except (RuntimeError, AttributeError, TypeError):
        return True


def download_slots_delay(engine: Any) -> float:
    """The largest download delay of any slot (DOWNLOAD_DELAY, AutoThrottle)."""
    slots = getattr(getattr(engine, "downloader", None), "slots", None) or {}
    try:
        return max((float(slot.delay) for slot in list(slots.values())), default=0.0)
    except (TypeError, ValueError, AttributeError):
        return 0.0


def downloader_middlewares(engine: Any) -> list[Any]:
    try:
        return list(engine.downloader.middleware.middlewares)
    except (AttributeError, RuntimeError):
        return []


def item_pipelines(engine: Any) -> list[Any]:
    try:
        return list(engine.scraper.itemproc.middlewares)
    except (AttributeError, RuntimeError):
        return []
