"""What the engine, the downloader and the loop say about pending work.

The probe only reads: Scrapy's in-progress sets (through :mod:`..compat.engine`), the
downloader part's in-flight tracker when it runs, the registry's pools and the
loop's suspended tasks. The classifier turns what it gathers into a class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .. import metakeys
from ..compat import engine as compat
from ..identity import META_KEY, describe, strip_credentials
from ..primitives.registry import PoolSnapshot

logger = logging.getLogger("scrapy_antideadlock.watchdog")

__all__ = ["ITEM_KINDS", "Probe"]

ITEM_KINDS = ("pg", "buffer")  # units of these pools are held by items, not downloads


class Probe:
    """Reads one crawler's pending work; fed by the request signals for transfer times."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self._inflight_seen: dict[int, tuple[Any, float]] = {}  # id(request) -> (req, seen)
        self._transfer_started: dict[int, float] = {}

    @property
    def engine(self) -> Any:
        return compat.crawl_engine(self.crawler)

    # ------------------------------------------------------------------ signals
    def reached_downloader(self, request: Any, **kwargs: Any) -> None:
        self._transfer_started[id(request)] = time.monotonic()

    def left_downloader(self, request: Any, **kwargs: Any) -> None:
        self._transfer_started.pop(id(request), None)

    def transferring(self) -> int:
        """Requests that reached the download handler and did not leave it yet."""
        return len(self._transfer_started)

    # ------------------------------------------------------------------ readings
    def pending(self) -> dict[str, Any]:
        """Work not yet done: in progress (download or scraping) and scheduled."""
        engine = self.engine
        out: dict[str, Any] = {"in_progress": 0, "scheduled": 0, "downloading": 0,
                               "scraping": 0, "any": False}
        if engine is None:
            return out
        out["in_progress"] = len(compat.engine_inprogress(engine))
        out["downloading"] = len(compat.downloader_active(engine))
        out["scraping"] = len(compat.scraper_active(engine))
        out["scheduled"] = compat.scheduled_count(engine)
        out["any"] = (not compat.spider_is_idle(engine)) or out["in_progress"] > 0
        return out

    def slot_delay(self) -> float:
        return compat.download_slots_delay(self.engine)

    def track(self, now: float) -> None:
        """Note when each request in the downloader was first seen (for its age)."""
        engine = self.engine
        if engine is None:
            return
        current = {id(r): r for r in compat.downloader_active(engine)}
        seen = self._inflight_seen
        for key in list(seen):
            if key not in current:
                del seen[key]
        for key in list(self._transfer_started):
            if key not in current:  # left without request_left_downloader (cancelled)
                del self._transfer_started[key]
        for key, request in current.items():
            if key not in seen:
                seen[key] = (request, now)

    def inflight(self, now: float | None = None) -> list[dict[str, Any]]:
        """In-flight downloads, oldest first: request, age, stage, seconds to deadline."""
        now = time.monotonic() if now is None else now
        out = []
        tracker = inflight_tracker(self.crawler)
        if tracker is not None:
            try:
                for entry in tracker.items():
                    deadline = getattr(entry, "deadline", None)
                    out.append({"request": describe(entry.request), "owner": entry.owner,
                                "age": now - entry.started, "stage": entry.stage,
                                "deadline_in": None if deadline is None else deadline - now})
            except Exception:  # noqa: BLE001 - another component's tracker must not break us
                logger.debug("inflight tracker failed", exc_info=True)
                out = []
        if not out:
            for key, (request, first_seen) in list(self._inflight_seen.items()):
                started = self._transfer_started.get(key)
                deadline = request.meta.get(metakeys.DEADLINE)
                if deadline is None and started is not None:
                    timeout = request.meta.get("download_timeout")
                    if isinstance(timeout, (int, float)) and timeout > 0:
                        deadline = started + timeout
                out.append({"request": describe(request), "owner": request.meta.get(META_KEY),
                            "age": now - first_seen,
                            "stage": "transfer" if started is not None else "queued",
                            "deadline_in": None if deadline is None else deadline - now})
        out.sort(key=lambda e: -e["age"])
        return out

    def in_callbacks(self, limit: int = 10) -> list[str]:
        """Requests whose callback or items are still being processed."""
        return [describe(r) for r in compat.scraper_active(self.engine)[:limit]]

    def labeller(self) -> Callable[[str, PoolSnapshot | None], str]:
        """Names a pool owner for the wait-for graph: a request, or the item of one."""
        requests: dict[str, Any] = {}
        scraping: set[str] = set()
        engine = self.engine
        for request in compat.scraper_active(engine):
            if META_KEY in request.meta:
                requests.setdefault(request.meta[META_KEY], request)
                scraping.add(request.meta[META_KEY])
        for request in compat.downloader_active(engine):
            if META_KEY in request.meta:
                requests.setdefault(request.meta[META_KEY], request)

        def label(owner: str, pool: PoolSnapshot | None) -> str:
            request = requests.get(owner)
            text = f"request {owner}"
            if request is not None:
                text = f"request {owner} ({request.method} {strip_credentials(request.url)})"
            kind = pool.kind if pool is not None else ""
            if kind in ITEM_KINDS or (owner in scraping and kind not in ("proxy",)):
                return f"item of {text}"
            return text

        return label


# ---------------------------------------------------------------------- the downloader part


def _downloader_part(crawler: Any) -> Any:
    """The downloader part's module if its middleware runs in this crawl, else None.

    Asked only then, so the watchdog never creates the downloader's state as a side effect.
    """
    from ..downloader.middleware import DeadlineMiddleware

    middlewares = compat.downloader_middlewares(compat.crawl_engine(crawler))
    if not any(isinstance(mw, DeadlineMiddleware) for mw in middlewares):
        return None
    from .. import downloader

    return downloader


def inflight_tracker(crawler: Any) -> Any:
    part = _downloader_part(crawler)
    if part is None:
        return None
    try:
        return part.inflight_for(crawler)
    except Exception:  # noqa: BLE001 - another component must not break the watchdog
        return None


def latency_tracker(crawler: Any) -> Any:
    """The downloader's latency tracker (it also times slot-queue waits), or None."""
    part = _downloader_part(crawler)
    if part is None:
        return None
    try:
        return part.latency_for(crawler)[0]
    except Exception:  # noqa: BLE001
        return None
