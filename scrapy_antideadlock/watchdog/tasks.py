"""Where the loop's pending asyncio tasks are suspended (no Scrapy import).

A stalled crawl raises nothing; its state is in the suspended coroutines. Walking a
task's ``cr_await`` chain gives every frame from the outermost coroutine to the
innermost await. Frames of the framework (Scrapy, Twisted, asyncio) are left out
of what is shown, so the line named is the project's own.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import linecache
import os
from typing import Any

__all__ = ["FRAMEWORK_PARTS", "await_chain", "is_framework", "suspended_tasks"]

_ASEND_TYPES = ("async_generator_asend", "async_generator_athrow")
FRAMEWORK_PARTS = (f"{os.sep}scrapy{os.sep}", f"{os.sep}twisted{os.sep}",
                   f"{os.sep}asyncio{os.sep}")


def is_framework(filename: str) -> bool:
    return any(part in filename for part in FRAMEWORK_PARTS)


def suspended_tasks(limit: int = 6, exclude: Any = ()) -> list[dict[str, Any]]:
    """Where the loop's pending tasks are suspended, grouped, framework-only chains left out.

    This names the await nobody registered and shows, for every class, which code waits.
    Call on the loop thread only.
    """
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        return []
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for task in tasks:
        if task.done() or task in exclude:
            continue
        chain = await_chain(task.get_coro())
        if not any(not is_framework(f[1]) for f in chain):
            continue  # only Scrapy/Twisted/asyncio machinery
        while len(chain) > 1 and is_framework(chain[0][1]):
            chain = chain[1:]  # drop the framework frames the user did not write
        shown = tuple(f"{name} ({os.path.basename(path)}:{line})"
                      for name, path, line in chain[-4:])
        group = groups.setdefault(shown, {"count": 0, "chain": list(shown), "code": "",
                                          "at": shown[-1]})
        group["count"] += 1
        user = [f for f in chain if not is_framework(f[1])]
        if user and not group["code"]:
            name, path, line = user[-1]
            group["at"] = f"{name} ({os.path.basename(path)}:{line})"
            group["code"] = linecache.getline(path, line).strip()
    return sorted(groups.values(), key=lambda g: -g["count"])[:limit]


def await_chain(coro: Any) -> list[tuple[str, str, int]]:
    """(function, file, line) of each coroutine frame, outermost first."""
    return [(f.f_code.co_name, f.f_code.co_filename, f.f_lineno) for f in coro_frames(coro)]


def coro_frames(coro: Any) -> list[Any]:
    """The frames of a coroutine / generator / async generator chain, outermost first."""
    frames: list[Any] = []
    seen = 0
    while coro is not None and seen < 50:
        seen += 1
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is not None:
            frames.append(frame)
        nxt = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
               or getattr(coro, "ag_await", None))
        if nxt is not None and type(nxt).__name__ in _ASEND_TYPES:
            # ``async for`` over an async generator awaits an asend object, which has no
            # attribute leading to its generator; the garbage collector knows it
            nxt = next((r for r in gc.get_referents(nxt) if inspect.isasyncgen(r)), None)
        coro = nxt
    return frames
