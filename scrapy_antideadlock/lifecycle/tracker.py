"""Where every request of the crawl is in its life, and how to preempt it there.

A request lives through stages: the downloader middlewares' ``process_request``, the
downloader slot's queue, the download, ``process_response`` / ``process_exception``, the
spider callback, and the item pipelines for each item it yields. Scrapy has no timeout
for any stage but the download, so a coroutine that awaits for ever (or a Deferred that
never fires) holds its request, and with it the spider close, for ever.

The tracker keeps one :class:`Unit` per request and stage, with what preempting it
means there (cancel the fetch Deferred, the callback's task, the pipeline task, or the
guarded download). Components in :mod:`.components` feed it; the watchdog reads
:meth:`LifecycleTracker.units`, recovery calls :meth:`LifecycleTracker.cancel`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scrapy import Request

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "LifecycleTracker", "Unit"]

#: Stage names, in the order a request lives through them.
STAGES = ("middleware:process_request", "queue", "download", "middleware:process_response",
          "middleware:process_exception", "callback", "pipeline")

#: ``resolve(request, reason) -> Request | None``: the copy to requeue after a preemption,
#: or None when the request was quarantined (or must stay pending for the next run).
Resolver = Callable[[Request, str], "Request | None"]


@dataclass(eq=False, slots=True)
class Unit:
    """One request (or one of its items) at one stage of its life."""

    request: Request | None
    stage: str
    component: str  # "" for a callback until read: named from ``callback`` then
    started: float  # time.monotonic() when it entered this stage
    item: Any = None
    task: Any = None  # the asyncio task that runs it, when known (read-only for others)
    preempted: str | None = None  # the reason, once cancelled
    cancel_fn: Callable[[Unit], bool] | None = field(default=None, repr=False)
    # seam-specific handles (how the seam finds what to cancel)
    deferred: Any = field(default=None, repr=False)
    response: Any = field(default=None, repr=False)
    callback: Any = field(default=None, repr=False)
    awaiting: bool = False  # the seam's own frame is awaiting the user's code now
    waits_on_download: bool = False  # awaits engine.download_async inside a component

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    def to_dict(self) -> dict[str, Any]:
        return {"url": getattr(self.request, "url", None), "stage": self.stage,
                "component": self.component, "age": round(self.age, 3),
                "preempted": self.preempted}


class LifecycleTracker:
    """Every unit of work alive in the crawl; one per crawler (role ``"lifecycle"``)."""

    def __init__(self) -> None:
        self._fetches: dict[Request, Unit] = {}
        self._callbacks: dict[Request, Unit] = {}
        self._items: dict[int, Unit] = {}  # id(item): items may be unhashable dicts
        self.resolver: Resolver | None = None
        self.describe: Callable[[Unit], None] | None = None  # refines stage/component
        self.on_preempted: list[Callable[[Unit], None]] = []
        self.preempted = 0
        self.dead_lettered = 0
        self.item_origin: dict[int, Request] = {}  # id(item) -> its response's request
        #: Where preempted items go (a DeadLetterStore-like ``append(records)``), set by
        #: recovery; without one they are logged in full.
        self.dead_letters: Any = None
        self.spider_name: str | None = None
        self._tables = {"fetch": self._fetches, "callback": self._callbacks,
                        "item": self._items}

    # ------------------------------------------------------------------ fed by components

    def enter(self, kind: str, key: Any, unit: Unit) -> Unit:
        self._tables[kind][key] = unit
        return unit

    def leave(self, kind: str, key: Any, unit: Unit | None = None) -> Unit | None:
        table = self._tables[kind]
        found = table.get(key)
        if found is not None and (unit is None or found is unit):
            return table.pop(key)
        return None

    def get(self, kind: str, key: Any) -> Unit | None:
        return self._tables[kind].get(key)

    # ------------------------------------------------------------------ for peers

    def units(self) -> list[Unit]:
        """Every unit alive now, oldest first, with stage and component refined."""
        found = [*self._fetches.values(), *self._callbacks.values(), *self._items.values()]
        for unit in found:
            _name(unit)
        if self.describe is not None:
            for unit in found:
                try:
                    self.describe(unit)
                except Exception:  # noqa: BLE001 - a description must never break a probe
                    logger.debug("lifecycle: cannot describe %r", unit, exc_info=True)
        return sorted(found, key=lambda unit: unit.started)

    def find(self, request_or_unit: Request | Unit) -> list[Unit]:
        if isinstance(request_or_unit, Unit):
            return [request_or_unit]
        return [unit for unit in self.units() if unit.request is request_or_unit]

    def cancel(self, request_or_unit: Request | Unit, reason: str) -> bool:
        """Preempt a request (every stage it is in) or one unit, wherever it waits.

        The request is then requeued or quarantined (decided by the resolver, i.e.
        recovery); an item is dead-lettered by the pipeline seam. Returns True if
        anything was cancelled. Call it on the event loop.
        """
        done = False
        for unit in self.find(request_or_unit):
            if unit.preempted is not None or unit.cancel_fn is None:
                continue
            _name(unit)
            unit.preempted = reason
            try:
                ok = unit.cancel_fn(unit)
            except Exception:  # noqa: BLE001
                logger.exception("lifecycle: cancelling %s failed", unit.to_dict())
                ok = False
            if not ok:
                unit.preempted = None
                continue
            done = True
            self.preempted += 1
            logger.warning("antideadlock lifecycle: preempted %s at %s (%s, %.1fs): %s",
                           getattr(unit.request, "url", "an item"), unit.stage, unit.component,
                           unit.age, reason)
            for callback in self.on_preempted:
                try:
                    callback(unit)
                except Exception:  # noqa: BLE001
                    logger.exception("lifecycle: preemption callback %r failed", callback)
        return done

    def dead_letter(self, unit: Unit) -> None:
        """Keep a preempted item with its reason: never dropped silently."""
        # imported here: itemadapter imports every item library it supports (pydantic,
        # attrs, ...), a fixed cost no crawl without a preempted item should pay
        from itemadapter import ItemAdapter

        try:
            data = ItemAdapter(unit.item).asdict()
        except TypeError:
            data = unit.item
        record = {"item": data, "reason": unit.preempted, "stage": unit.stage,
                  "component": unit.component, "waited": round(unit.age, 3),
                  "url": getattr(unit.request, "url", None), "spider": self.spider_name,
                  "kind": "preempted_item"}
        self.dead_lettered += 1
        if self.dead_letters is not None:
            try:
                self.dead_letters.append([record])
                logger.error("antideadlock lifecycle: item preempted in %s, dead-lettered in "
                             "%s: %s", unit.component, getattr(self.dead_letters, "path", "?"),
                             unit.preempted)
                return
            except Exception as exc:  # noqa: BLE001 - the log below keeps it
                logger.error("antideadlock lifecycle: cannot write the dead-letter file: %s", exc)
        logger.error("antideadlock lifecycle: item preempted in %s (%s), kept here: %r",
                     unit.component, unit.preempted, record)

    def resolve(self, request: Request, reason: str) -> Request | None:
        """What replaces a preempted request: its requeued copy, or None."""
        if self.resolver is None:
            return None
        return self.resolver(request, reason)


def _name(unit: Unit) -> None:
    """Name a callback unit's component when someone reads it (not per response)."""
    if not unit.component:
        from .describe import qualname

        unit.component = qualname(unit.callback) if unit.callback is not None else "callback"
