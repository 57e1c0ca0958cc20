"""Scrapy internals the lifecycle tracker reads (checked with Scrapy 2.13-2.19).

Preemption itself uses only public seams: the ``DOWNLOADER`` and ``ITEM_PROCESSOR``
settings (subclasses of Scrapy's classes calling the public ``fetch`` and
``process_item_async``), a spider middleware, and asyncio's task API. What is private is
*naming* the component a unit is stuck in when that component returned a Deferred (no
frame of its own is then on the stack): the loop variable ``method`` of the middleware
managers' chain functions.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from . import require

__all__ = ["chain_method", "engine_closing", "fetch", "fetch_needs_spider"]

# Scrapy's functions that call one component method after another, and the stage they
# stand for. Scrapy 2.14+: methods of the managers; 2.13: functions nested in
# DownloaderMiddlewareManager.download (the same loop variable).
_CHAIN_FUNCTIONS = {
    "_process_request": "middleware:process_request",
    "_process_response": "middleware:process_response",
    "_process_exception": "middleware:process_exception",
    "_process_chain": None,  # pipelines (process_item) and spider middlewares
    "process_request": "middleware:process_request",
    "process_response": "middleware:process_response",
    "process_exception": "middleware:process_exception",
}
_CHAIN_FILES = (os.path.join("scrapy", "core", "downloader", "middleware.py"),
                os.path.join("scrapy", "middleware.py"))


def _has_chain_locals() -> bool:
    from scrapy.core.downloader import middleware

    return "for method in self.methods" in inspect.getsource(middleware)


require("scrapy.core.downloader.middleware.DownloaderMiddlewareManager chain loop variable "
        "'method'", "naming the middleware or pipeline a stuck request waits in when it "
        "returned a Deferred", _has_chain_locals)


def chain_method(frame: Any) -> tuple[str | None, Any] | None:
    """(stage or None, the component method) if ``frame`` is one of Scrapy's chain loops."""
    code = frame.f_code
    if code.co_name not in _CHAIN_FUNCTIONS or not code.co_filename.endswith(_CHAIN_FILES):
        return None
    method = frame.f_locals.get("method")
    if method is None or not callable(method):
        return None
    return _CHAIN_FUNCTIONS[code.co_name], method


def fetch_needs_spider(downloader_cls: type) -> bool:
    """Scrapy before 2.14 requires the spider argument of ``Downloader.fetch``."""
    param = inspect.signature(downloader_cls.fetch).parameters.get("spider")
    return param is not None and param.default is inspect.Parameter.empty


def fetch(downloader: Any, parent_fetch: Any, request: Any, spider: Any, needs_spider: bool
          ) -> Any:
    """Call Scrapy's own ``Downloader.fetch`` the way this version wants it."""
    if needs_spider:
        return parent_fetch(downloader, request, spider)
    return parent_fetch(downloader, request)


def _has_slot_closing() -> bool:
    from scrapy.core import engine

    return "self.closing" in inspect.getsource(engine._Slot.__init__)


require("scrapy.core.engine._Slot.closing", "bounding a close that recovery did not start "
        "(SIGTERM, CLOSESPIDER_*) when work in progress never ends", _has_slot_closing)


def engine_closing(engine: Any) -> bool:
    """Whether the engine is closing the spider (for any reason, e.g. SIGTERM)."""
    slot = getattr(engine, "_slot", None)
    return slot is not None and getattr(slot, "closing", None) is not None
