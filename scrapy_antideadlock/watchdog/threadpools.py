"""How full the crawl's thread pools are, and which call holds each busy worker.

``asyncio.to_thread`` and ``run_in_executor(None, ...)`` use the loop's default
executor; ``deferToThread`` uses the reactor's thread pool; a project may make its own
``ThreadPoolExecutor``. A worker whose stack has a frame of the project's code is busy
with that call (an idle worker sleeps in the pool's queue).
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .diagnosis import Culprit
from .waits import culprit_of, is_user_code

__all__ = ["PoolState", "thread_pools"]


@dataclass
class PoolState:
    name: str
    size: int
    busy: int
    queued: int
    calls: list[Culprit] = field(default_factory=list)  # innermost project frame per busy worker

    @property
    def full(self) -> bool:
        return self.size > 0 and self.busy >= self.size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "busy": self.busy, "queued": self.queued,
                "calls": [str(c) for c in self.calls[:5]]}


def _busy_calls(threads: list[threading.Thread]) -> list[Culprit]:
    frames = sys._current_frames()
    calls = []
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        while frame is not None and not is_user_code(frame.f_code.co_filename):
            frame = frame.f_back
        if frame is not None:
            calls.append(culprit_of(_innermost_user(frames.get(thread.ident or -1))))
    return calls


def _innermost_user(frame: Any) -> Any:
    while frame is not None:
        if is_user_code(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return frame


def _executor_state(name: str, executor: ThreadPoolExecutor) -> PoolState:
    threads = list(getattr(executor, "_threads", ()) or ())
    queue = getattr(executor, "_work_queue", None)
    queued = queue.qsize() if queue is not None else 0
    calls = _busy_calls(threads)
    return PoolState(name, int(getattr(executor, "_max_workers", 0) or 0), len(calls), queued,
                     calls)


def _reactor_pool_state() -> PoolState | None:
    try:
        from twisted.internet import reactor
    except ImportError:  # pragma: no cover
        return None
    pool = getattr(reactor, "threadpool", None)  # created on first deferToThread only
    if pool is None:
        return None
    threads = list(getattr(pool, "threads", ()) or ())
    try:
        queued = pool._queue.qsize()
    except AttributeError:
        queued = 0
    calls = _busy_calls(threads)
    return PoolState("reactor thread pool (deferToThread)", int(pool.max), len(calls), queued,
                     calls)


def thread_pools(loop: Any, executors: list[Any] = ()) -> list[PoolState]:  # type: ignore[assignment]
    """State of the loop's default executor, the reactor's pool and ``executors``."""
    states = []
    default = getattr(loop, "_default_executor", None)
    if isinstance(default, ThreadPoolExecutor):
        states.append(_executor_state("asyncio default executor (to_thread)", default))
    reactor_pool = _reactor_pool_state()
    if reactor_pool is not None:
        states.append(reactor_pool)
    for executor in executors:
        if isinstance(executor, ThreadPoolExecutor) and executor is not default:
            states.append(_executor_state(f"ThreadPoolExecutor@{id(executor):#x}", executor))
    return states
