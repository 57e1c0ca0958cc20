"""What a suspended task waits on, and what it holds (asyncio and Twisted, no Scrapy).

The rule behind the ``deadlock`` class is Go's "all goroutines are asleep": every
pending unit of work sleeps on an in-process primitive and nobody waits on I/O. To
apply it, each task's innermost wait is named from its frames and its leaf future:

- a frame inside ``asyncio.Lock/Semaphore/Event/Condition/Queue`` names the primitive
  (its ``self``);
- a leaf future chained to a ``concurrent.futures.Future`` is a thread-pool call;
- a leaf future made from a Deferred (``Deferred.asFuture``) is a Deferred, and a
  DeferredLock / DeferredSemaphore / DeferredQueue whose ``waiting`` list holds it names it;
- a future the project's own objects keep (``self.pending[key]``) is an unresolved Future;
- frames of a network library (asyncio streams, Playwright, psycopg...) are I/O.

A task suspended inside an ``async with X:`` body holds X: the body's line range comes
from the function's syntax tree, X from the frame's locals (names and attribute chains
only: nothing is called).
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import functools
import inspect
import linecache
import os
import sysconfig
import textwrap
from dataclasses import dataclass, field
from typing import Any

from .diagnosis import Culprit
from .tasks import coro_frames

__all__ = ["TaskWait", "Wait", "culprit_of", "culprit_of_callable", "describe_primitive",
           "inspect_task", "is_user_code", "user_frames_of_stack"]

# Wait kinds: in-process ones make the deadlock rule; the others do not.
IN_PROCESS = ("primitive", "future", "deferred", "crawl")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TESTING = os.path.join(_PACKAGE, "testing") + os.sep
_LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for key in ("stdlib", "platstdlib",
                                                                "purelib", "platlib")
                       if (p := sysconfig.get_paths().get(key))})
_IO_PARTS = tuple(f"{os.sep}{name}{os.sep}" for name in (
    "playwright", "psycopg", "psycopg_pool", "aiohttp", "httpx", "httpcore", "asyncpg",
    "redis", "aiomysql", "motor", "websockets")) + (
    f"asyncio{os.sep}streams.py", f"asyncio{os.sep}selector_events.py",
    f"asyncio{os.sep}sslproto.py", f"asyncio{os.sep}base_events.py")
_PRIMITIVE_FILES = (f"asyncio{os.sep}locks.py", f"asyncio{os.sep}queues.py")


@functools.lru_cache(maxsize=4096)
def is_user_code(filename: str) -> bool:
    """The project's own code: not the standard library, not an installed package, not
    this pack (its shipped test scenarios stand for project code and count as such)."""
    if filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    if path.startswith(_TESTING):
        return True
    if path.startswith(_PACKAGE):
        return False
    return not path.startswith(_LIBRARY_DIRS)


def culprit_of(frame: Any) -> Culprit:
    code = frame.f_code
    qualname = getattr(code, "co_qualname", code.co_name)
    return Culprit(code.co_name, code.co_filename, frame.f_lineno,
                   linecache.getline(code.co_filename, frame.f_lineno).strip(), qualname)


def culprit_of_callable(fn: Any) -> Culprit | None:
    """A function's definition line (a callback named by what it is, not where it runs)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    line = code.co_firstlineno
    text = linecache.getline(code.co_filename, line).strip()
    return Culprit(code.co_name, code.co_filename, line, text,
                   getattr(fn, "__qualname__", code.co_name))


def user_frames_of_stack(frames: list[dict[str, Any]]) -> Culprit | None:
    """The innermost project frame of a stack summary (dicts, innermost last)."""
    for f in reversed(frames):
        if is_user_code(f["file"]):
            return Culprit(f["function"], f["file"], f["line"], f.get("code") or "",
                           f.get("qualname") or f["function"])
    return None


@dataclass
class Wait:
    kind: str  # primitive | future | deferred | crawl | thread | io | library | unknown
    what: str
    obj: Any = None  # the primitive or future waited on


@dataclass
class TaskWait:
    """One suspended task: its frames, where the project's code waits, what it holds."""

    task: Any
    frames: list[Any]
    wait: Wait
    culprit: Culprit | None  # innermost project frame
    entry: Culprit | None  # outermost project frame (the component method)
    holds: list[Any] = field(default_factory=list)


# ---------------------------------------------------------------------- primitives


def _twisted_primitive_types() -> tuple[type, ...]:
    try:
        from twisted.internet.defer import DeferredLock, DeferredQueue, DeferredSemaphore
    except ImportError:  # pragma: no cover - Scrapy always has Twisted
        return ()
    return (DeferredLock, DeferredSemaphore, DeferredQueue)


_ASYNCIO_TYPES = (asyncio.Lock, asyncio.Semaphore, asyncio.Event, asyncio.Condition,
                  asyncio.Queue)


def is_primitive(obj: Any) -> bool:
    return isinstance(obj, _ASYNCIO_TYPES + _twisted_primitive_types())


def describe_primitive(obj: Any) -> str:
    """``asyncio.Semaphore@0x7f.. (0 of 2 free, 5 waiting)`` and the like."""
    kind = type(obj)
    name = f"{kind.__module__.split('.')[0]}.{kind.__name__}@{id(obj):#x}"
    if isinstance(obj, asyncio.Queue):
        getters = len(getattr(obj, "_getters", ()) or ())
        unfinished = getattr(obj, "_unfinished_tasks", 0)
        return (f"{name} ({obj.qsize()} queued, {unfinished} unfinished, "
                f"{getters} consumer(s) waiting in get())")
    if isinstance(obj, asyncio.Event):
        return f"{name} ({'set' if obj.is_set() else 'never set'}, " \
               f"{len(getattr(obj, '_waiters', ()) or ())} waiting)"
    if isinstance(obj, asyncio.Semaphore):
        value = getattr(obj, "_value", "?")
        initial = getattr(obj, "_bound_value", None)
        cap = f" of {initial}" if initial is not None else ""
        return f"{name} ({value}{cap} free, {len(getattr(obj, '_waiters', ()) or ())} waiting)"
    if isinstance(obj, (asyncio.Lock, asyncio.Condition)):
        locked = obj.locked()
        return f"{name} ({'locked' if locked else 'free'}, " \
               f"{len(getattr(obj, '_waiters', ()) or ())} waiting)"
    waiting = len(getattr(obj, "waiting", ()) or ())
    if hasattr(obj, "locked"):
        return f"{name} ({'locked' if obj.locked else 'free'}, {waiting} waiting)"
    if hasattr(obj, "tokens"):
        return f"{name} ({obj.tokens} of {obj.limit} free, {waiting} waiting)"
    return f"{name} ({waiting} waiting)"


def candidates(frames: list[Any], extra: list[Any]) -> list[tuple[Any, str]]:
    """Objects the project's frames and components reach in one step: (object, path)."""
    out: list[tuple[Any, str]] = []
    seen: set[int] = set()

    def add(obj: Any, path: str, depth: int) -> None:
        if id(obj) in seen or len(out) > 5000:
            return
        seen.add(id(obj))
        out.append((obj, path))
        if depth <= 0:
            return
        if isinstance(obj, dict):
            for key, value in list(obj.items())[:200]:
                add(value, f"{path}[{key!r}]", depth - 1)
        elif isinstance(obj, (list, tuple, set)):
            for i, value in enumerate(list(obj)[:200]):
                add(value, f"{path}[{i}]", depth - 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            try:
                attrs = list(vars(obj).items())[:100]
            except TypeError:
                return
            for key, value in attrs:
                add(value, f"{path}.{key}", depth - 1)

    for frame in frames:
        for key, value in list(frame.f_locals.items()):
            add(value, key, 2)
    for obj in extra:
        add(obj, type(obj).__name__, 2)
    return out


# ---------------------------------------------------------------------- holders


_BODIES: dict[Any, list[tuple[int, int, ast.expr]]] = {}


def _async_with_bodies(code: Any) -> list[tuple[int, int, ast.expr]]:
    """(first line, last line, context expression) of each ``async with`` in ``code``."""
    if code in _BODIES:
        return _BODIES[code]
    found: list[tuple[int, int, ast.expr]] = []
    try:
        lines, start = inspect.getsourcelines(code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        for node in ast.walk(tree):
            if isinstance(node, ast.AsyncWith) and node.body:
                first = node.body[0].lineno + start - 1
                last = (node.body[-1].end_lineno or node.body[-1].lineno) + start - 1
                found += [(first, last, item.context_expr) for item in node.items]
    except (OSError, TypeError, SyntaxError, IndentationError):
        pass
    if len(_BODIES) > 2000:
        _BODIES.clear()
    _BODIES[code] = found
    return found


def _resolve(node: ast.expr, frame: Any) -> Any:
    """Value of a name / attribute chain / constant subscript in ``frame`` (no calls)."""
    if isinstance(node, ast.Name):
        if node.id in frame.f_locals:
            return frame.f_locals[node.id]
        return frame.f_globals.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, frame)
        if base is None:
            return None
        attrs = getattr(base, "__dict__", None)
        if isinstance(attrs, dict) and node.attr in attrs:
            return attrs[node.attr]
        return inspect.getattr_static(base, node.attr, None)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        base = _resolve(node.value, frame)
        try:
            return base[node.slice.value] if isinstance(base, (dict, list, tuple)) else None
        except (KeyError, IndexError, TypeError):
            return None
    return None


def held_by(frames: list[Any]) -> list[Any]:
    """Primitives whose ``async with`` body these frames are suspended in."""
    held = []
    for frame in frames:
        for first, last, expr in _async_with_bodies(frame.f_code):
            if first <= frame.f_lineno <= last:
                obj = _resolve(expr, frame)
                if obj is not None and is_primitive(obj):
                    held.append(obj)
    return held


# ---------------------------------------------------------------------- the wait


def _closure_values(fn: Any) -> list[Any]:
    cells = getattr(fn, "__closure__", None) or ()
    out = []
    for cell in cells:
        try:
            out.append(cell.cell_contents)
        except ValueError:
            continue
    bound = getattr(fn, "__self__", None)
    if bound is not None:
        out.append(bound)
    return out


def _leaf_links(leaf: Any) -> tuple[Any, Any]:
    """(concurrent future, Deferred) the leaf asyncio future is chained to, if any."""
    from twisted.internet.defer import Deferred

    thread_future = deferred = None
    for entry in list(getattr(leaf, "_callbacks", None) or ()):
        fn = entry[0] if isinstance(entry, tuple) else entry
        for value in _closure_values(fn):
            if isinstance(value, concurrent.futures.Future):
                thread_future = value
            elif isinstance(value, Deferred):
                deferred = value
    return thread_future, deferred


def inspect_task(task: Any, components: list[Any] = (),  # type: ignore[assignment]
                 shared: list[tuple[Any, str]] | None = None) -> TaskWait | None:
    """Where ``task`` waits; None when none of its frames is the project's code.

    ``shared``: ``candidates([], components)`` computed once for many tasks.
    """
    frames = coro_frames(task.get_coro())
    users = [f for f in frames if is_user_code(f.f_code.co_filename)]
    if not users:
        return None
    culprit = culprit_of(users[-1])
    entry = culprit_of(users[0])
    holds = held_by(users)
    if shared is None:
        shared = candidates([], list(components))
    wait = _wait_of(task, frames, users, shared)
    return TaskWait(task, frames, wait, culprit, entry, holds)


def _wait_of(task: Any, frames: list[Any], users: list[Any],
             shared: list[tuple[Any, str]]) -> Wait:
    innermost_user = frames.index(users[-1])
    below = frames[innermost_user + 1:]  # library frames the project's await went into
    prim_frames = [f for f in below if f.f_code.co_filename.endswith(_PRIMITIVE_FILES)]
    if prim_frames:
        obj = prim_frames[0].f_locals.get("self")
        op = prim_frames[0].f_code.co_name
        if obj is not None and is_primitive(obj):
            return Wait("primitive", f"{op}() on {describe_primitive(obj)}", obj)
    names = [f.f_code.co_filename for f in below]
    if any(n.endswith(f"asyncio{os.sep}threads.py") for n in names):
        return Wait("thread", "a thread-pool call (asyncio.to_thread)")
    leaf = getattr(task, "_fut_waiter", None)
    thread_future, deferred = _leaf_links(leaf) if leaf is not None else (None, None)
    if thread_future is not None:
        return Wait("thread", "a thread-pool call (run_in_executor)", thread_future)
    io = next((n for n in names if any(part in n for part in _IO_PARTS)), None)
    if io is not None:
        call = below[0].f_code
        return Wait("io", f"I/O: {call.co_name}() in {_module_name(call.co_filename)}")
    if leaf is None:
        return Wait("unknown", "nothing (the task is runnable)")
    if any(f.f_code.co_filename.endswith(f"{os.sep}scrapy{os.sep}core{os.sep}engine.py")
           for f in below):
        return Wait("crawl", f"the crawl (Scrapy {below[0].f_code.co_name}: another "
                             "request of this crawl)")
    found = candidates(users, []) + shared
    if deferred is not None:
        for obj, path in found:
            if is_primitive(obj) and deferred in (getattr(obj, "waiting", None) or ()):
                return Wait("primitive", f"acquire() on {describe_primitive(obj)} ({path})",
                            obj)
        return Wait("deferred", f"Deferred@{id(deferred):#x} that never fired", deferred)
    for obj, path in found:
        if obj is leaf:
            return Wait("future", f"Future@{id(leaf):#x} never resolved ({path})", leaf)
    if not below:
        return Wait("future", f"Future@{id(leaf):#x} never resolved", leaf)
    return Wait("library", f"{_module_name(below[-1].f_code.co_filename)} "
                           f"({below[-1].f_code.co_name})")


def _module_name(filename: str) -> str:
    parts = os.path.normpath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages", "python3.11", "python3.12", "python3.13"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1:]
            return ".".join(rest)[:-3] if rest else filename
    return os.path.basename(filename)[:-3]
