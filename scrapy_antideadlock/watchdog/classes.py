"""The stall classes, declared once (like ``stats.py`` for stats).

Every part that names a class (the classifier, the log block, stats, close reasons,
recovery, the health line, the README) takes it from here, so a class cannot be
spelled two ways. ``idle`` is listed too, although it is not a stall: a spider kept
open on purpose with nothing pending must be told apart from one that is stuck.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["BLOCKED_LOOP", "CLASSES", "DEADLOCK", "IDLE", "LIVELOCK", "STALLED_IO",
           "STALL_CLASSES", "STARVED", "StallClass", "UNKNOWN", "get"]


@dataclass(frozen=True)
class StallClass:
    """One class: its name, what it means, how loud its log block is."""

    name: str
    meaning: str
    level: int = logging.WARNING
    stall: bool = True

    @property
    def close_reason(self) -> str:
        """The spider close reason recovery uses for this class."""
        return f"antideadlock_{self.name}"


CLASSES: dict[str, StallClass] = {}


def _declare(name: str, meaning: str, **kwargs: object) -> StallClass:
    cls = StallClass(name, meaning, **kwargs)  # type: ignore[arg-type]
    CLASSES[name] = cls
    return cls


BLOCKED_LOOP = _declare(
    "blocked_loop", "The event loop thread runs code that does not yield (no heartbeat); the "
    "culprit is the innermost frame of the project's code on the loop thread.",
    level=logging.ERROR)
DEADLOCK = _declare(
    "deadlock", "Every pending unit of work is asleep on an in-process primitive (asyncio "
    "Lock/Semaphore/Event/Condition/Queue, an unresolved Future or Deferred, a DeferredLock or "
    "a pool lease) and no network I/O of the crawl is in flight; or the pools' wait-for graph "
    "has a knot.", level=logging.ERROR)
LIVELOCK = _declare(
    "livelock", "Responses or retries keep flowing but no progress is made: no items and no "
    "new distinct requests.")
STALLED_IO = _declare(
    "stalled_io", "Requests that reached the download handler wait on a peer (socket, "
    "proxy, browser) that does not answer.")
STARVED = _declare(
    "starved", "A thread pool (asyncio.to_thread, run_in_executor, deferToThread) is full of "
    "calls that do not return, so the work queued behind them never starts.")
UNKNOWN = _declare(
    "unknown", "Work is pending but none of the other classes explains the wait; the evidence "
    "(suspended tasks, pools, in-flight requests) is still reported.")
IDLE = _declare(
    "idle", "Not a stall: nothing is pending (e.g. a spider kept open by DontCloseSpider while "
    "it waits for new URLs). Nothing is cancelled or closed.", level=logging.INFO, stall=False)

#: Names of the classes that are stalls, in the order the classifier tries them.
STALL_CLASSES: tuple[str, ...] = tuple(name for name, cls in CLASSES.items() if cls.stall)


def get(name: str) -> StallClass:
    """The class named ``name`` (``unknown`` for a name nobody declared)."""
    return CLASSES.get(name, UNKNOWN)
