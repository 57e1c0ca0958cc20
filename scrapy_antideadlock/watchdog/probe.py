"""What the engine, the downloader and the loop say about pending work.

The probe only reads: Scrapy's in-progress sets (through :mod:`..compat.engine`), the
downloader part's in-flight tracker when it runs, the registry's pools and the
loop's suspended tasks. The classifier turns what it gathers into a class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import metakeys
from ..compat import engine as compat
from ..identity import META_KEY, describe, strip_credentials
from ..primitives.registry import PoolSnapshot
from .diagnosis import Culprit, StuckUnit
from .waits import TaskWait, candidates, describe_primitive, inspect_task

logger = logging.getLogger("scrapy_antideadlock.watchdog")

__all__ = ["ITEM_KINDS", "Probe", "UnitsReader"]

ITEM_KINDS = ("pg", "buffer")  # units of these pools are held by items, not downloads
MAX_TASKS = 5000  # suspended tasks inspected per diagnosis (bounded time on the loop)
#: Seconds one reading of the slots' largest download delay is reused. A broad crawl keeps
#: a downloader slot per host (thousands), and reading every slot on every tick made the
#: tick's cost grow with the hosts crawled. The delay only raises the stall window's floor
#: (which is at least WATCHDOG_WINDOW_MIN, 10 s by default), so a few seconds' lag is safe.
SLOT_DELAY_TTL = 5.0


class Probe:
    """Reads one crawler's pending work; fed by the request signals for transfer times."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self._inflight_seen: dict[int, tuple[Any, float]] = {}  # id(request) -> (req, seen)
        self._transfer_started: dict[int, float] = {}
        self._slot_delay = 0.0
        self._slot_delay_read = float("-inf")

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

    def transferring_requests(self) -> list[Any]:
        return [r for key, (r, _) in list(self._inflight_seen.items())
                if key in self._transfer_started]

    def age_of(self, request: Any, now: float, default: float) -> float:
        """Seconds since the request reached the downloader (from the signal; else since a
        tick first saw it there, which lags by up to a tick; else ``default``)."""
        seen = self._inflight_seen.get(id(request)) if request is not None else None
        if seen is None:
            return default
        started = self._transfer_started.get(id(request))
        return now - (seen[1] if started is None else min(seen[1], started))

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
        out["any"] = self.busy()
        return out

    def busy(self) -> bool:
        """Whether any work is pending (``pending()["any"]``), read cheaply for the tick:
        Scrapy's idle test counts the scheduler's queues (one per slot in a broad crawl),
        so it runs only when nothing is in progress."""
        engine = self.engine
        if engine is None:
            return False
        return bool(compat.engine_inprogress(engine)) or not compat.spider_is_idle(engine)

    def slot_delay(self, now: float | None = None) -> float:
        """The largest download delay of any slot, read at most every SLOT_DELAY_TTL s."""
        now = time.monotonic() if now is None else now
        if now - self._slot_delay_read >= SLOT_DELAY_TTL:
            self._slot_delay = compat.download_slots_delay(self.engine)
            self._slot_delay_read = now
        return self._slot_delay

    def longest_deadline(self) -> float:
        """The longest deadline the downloader part gave a download in transfer (0 if none).

        Only transfers: a request stuck before the handler (in a middleware) is not a slow
        download, and its deadline must not stretch the window."""
        tracker = inflight_tracker(self.crawler)
        try:
            return max((e.timeout for e in tracker.items()
                        if e.timeout and getattr(e, "stage", "transfer") == "transfer"),
                       default=0.0) if tracker is not None else 0.0
        except Exception:  # noqa: BLE001 - another component's tracker must not break us
            return 0.0

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
                since = first_seen if started is None else min(first_seen, started)
                out.append({"request": describe(request), "owner": request.meta.get(META_KEY),
                            "age": now - since,
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


# ---------------------------------------------------------------------- pending units

_STAGE_BY_METHOD = {"process_request": "middleware:process_request",
                    "process_response": "middleware:process_response",
                    "process_exception": "middleware:process_exception",
                    "process_item": "pipeline", "open_spider": "pipeline",
                    "process_spider_output": "spider_middleware",
                    "process_spider_input": "spider_middleware"}


def _request_of(frames: list[Any]) -> Any:
    """The Scrapy request a task works for, from its frames' locals (outermost first)."""
    from scrapy import Request
    from scrapy.http import Response

    for frame in frames:
        local = frame.f_locals
        for name in ("request", "response"):
            value = local.get(name)
            if isinstance(value, Request):
                return value
            if isinstance(value, Response):
                return value.request
    return None


def _stage_of(entry: Culprit | None) -> str:
    if entry is None:
        return "unknown"
    return _STAGE_BY_METHOD.get(entry.function, "callback")


class UnitsReader:
    """Every pending unit of work, with what it waits on (read at detection time only)."""

    def __init__(self, probe: Probe, lifecycle: Any) -> None:
        self.probe = probe
        self.lifecycle = lifecycle

    def read(self, now: float, default_age: float,
             exclude: Any = ()) -> tuple[list[StuckUnit], list[TaskWait]]:  # type: ignore[assignment]
        engine = self.probe.engine
        spider = getattr(self.probe.crawler, "spider", None)
        components = [*compat.downloader_middlewares(engine), *compat.item_pipelines(engine)]
        if spider is not None:
            components.append(spider)
        tracked = {}
        if self.lifecycle is not None:
            try:
                tracked = {u.task: u for u in self.lifecycle.units() if u.task is not None}
            except Exception:  # noqa: BLE001 - a peer's tracker must not break the probe
                logger.debug("lifecycle units failed", exc_info=True)
        try:
            tasks = [t for t in asyncio.all_tasks(asyncio.get_running_loop())
                     if not t.done() and t not in exclude]
        except RuntimeError:
            tasks = []
        shared = candidates([], components)  # what the components reach, read once
        waits = [w for w in (inspect_task(t, shared=shared) for t in tasks[:MAX_TASKS])
                 if w is not None]
        holders: dict[int, list[TaskWait]] = {}
        for w in waits:
            for held in w.holds:
                holders.setdefault(id(held), []).append(w)
        units: list[StuckUnit] = []
        covered: set[int] = set()
        for w in waits:
            unit = tracked.get(w.task)
            request = unit.request if unit is not None else _request_of(w.frames)
            if request is not None:
                covered.add(id(request))
            waiting_on = w.wait.what
            if w.wait.obj is not None and id(w.wait.obj) in holders:
                names = sorted({h.entry.qualname if h.entry else "?"
                                for h in holders[id(w.wait.obj)] if h is not w})
                if names:
                    waiting_on += (f", held by {len(holders[id(w.wait.obj)])} task(s) in "
                                   f"{', '.join(names[:3])}")
            units.append(StuckUnit(
                request, unit.stage if unit is not None else _stage_of(w.entry),
                unit.component if unit is not None else (w.entry.qualname if w.entry else "?"),
                unit.age if unit is not None else self.probe.age_of(request, now, default_age),
                waiting_on, [describe_primitive(h) for h in w.holds], w.culprit, w.task,
                wait_kind=w.wait.kind))
        for request in self.probe.transferring_requests():
            if id(request) not in covered:
                covered.add(id(request))
                units.append(StuckUnit(request, "download", "download handler",
                                       self.probe.age_of(request, now, default_age),
                                       "socket (reached the download handler)",
                                       wait_kind="io"))
        return units, waits
