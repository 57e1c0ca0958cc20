"""Name the stage and component a unit waits in, from its task's await chain.

Called only when someone asks (a diagnosis, a preemption), never per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..compat.lifecycle import chain_method
from .tracker import Unit

__all__ = ["await_chain", "describe_unit", "qualname"]


def await_chain(coro: Any) -> Iterator[Any]:
    """The frames of a suspended coroutine and of everything it awaits, outermost first."""
    seen = 0
    while coro is not None and seen < 200:
        seen += 1
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is not None:
            yield frame
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))


def qualname(obj: Any) -> str:
    func = getattr(obj, "__func__", obj)
    owner = getattr(obj, "__self__", None)
    if owner is not None and not isinstance(owner, type):
        cls = type(owner)
        return f"{cls.__module__}.{cls.__qualname__}.{getattr(func, '__name__', '?')}"
    module = getattr(func, "__module__", "") or ""
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{module}.{name}" if module else name


def describe_unit(unit: Unit) -> None:
    """Refine ``unit.stage``/``unit.component`` from the innermost component call it awaits."""
    task = unit.task
    if task is None or task.done() or unit.stage in ("queue", "download"):
        return
    found: tuple[str | None, Any] | None = None
    nested = False
    for frame in await_chain(task.get_coro()):
        hit = chain_method(frame)
        if hit is not None:
            found, nested = hit, False
        elif found is not None and frame.f_code.co_name == "download_async" \
                and frame.f_code.co_filename.endswith("engine.py"):
            nested = True  # the component awaits a download: it holds while it waits
    unit.waits_on_download = nested
    if found is None:
        return
    stage, method = found
    if stage is not None and unit.stage.startswith("middleware:"):
        unit.stage = stage
    unit.component = qualname(method)
