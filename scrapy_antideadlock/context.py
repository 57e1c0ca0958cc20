"""The crawler-scoped context: how the pack's components find their peers.

One :class:`CrawlerContext` exists per crawler, created by whichever component asks first
(usually the add-on) and stored on the crawler object itself, so it lives and dies with the
crawler and no module keeps a table of crawlers. Components register themselves under a role
name ("journal", "health", "guard", ...) and look their peers up by role; a missing peer is
``None``, never an ``ImportError`` dance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .primitives.registry import Registry

__all__ = ["CrawlerContext", "connect_shared", "context_for", "disconnect_shared"]

logger = logging.getLogger(__name__)

_ATTRIBUTE = "_antideadlock_context"
_create_lock = threading.Lock()  # guards creation only; the monitor thread may ask first


class CrawlerContext:
    """Per-crawler state shared by the pack's components (thread-safe lookups)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self._peers: dict[str, Any] = {}
        self._shared: dict[Any, SharedReceiver] = {}  # signal -> the pack's one receiver
        self._lock = threading.RLock()  # a factory may look up peers

    def put(self, role: str, component: Any) -> None:
        """Register ``component`` as this crawler's ``role`` (the last one registered wins)."""
        with self._lock:
            self._peers[role] = component

    def get(self, role: str) -> Any | None:
        """The component registered as ``role``, or ``None``."""
        with self._lock:
            return self._peers.get(role)

    def remove(self, role: str, component: Any | None = None) -> None:
        """Forget ``role`` (only if it is still ``component``, when one is given)."""
        with self._lock:
            if component is None or self._peers.get(role) is component:
                self._peers.pop(role, None)

    def setdefault(self, role: str, factory: Any) -> Any:
        """The component for ``role``, built with ``factory()`` on first use."""
        with self._lock:
            found = self._peers.get(role)
            if found is None:
                found = self._peers[role] = factory()
            return found

    def roles(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)


def context_for(crawler: Any) -> CrawlerContext:
    """The context of ``crawler``, created on first use."""
    found = getattr(crawler, _ATTRIBUTE, None)
    if found is not None:
        return found
    with _create_lock:
        found = getattr(crawler, _ATTRIBUTE, None)
        if found is None:
            found = CrawlerContext()
            setattr(crawler, _ATTRIBUTE, found)
        return found


class SharedReceiver:
    """The pack's one receiver of a per-request signal, calling each handler directly.

    Scrapy's dispatch costs a few microseconds per receiver and request (weak-reference
    lookups, argument matching); one receiver per signal for all of the pack's handlers
    pays that once. Like ``send_catch_log``, a failing handler is logged and the others
    still run; an exception the sender looks at (``IgnoreRequest`` from
    ``request_scheduled``) is raised again once every handler ran.
    """

    def __init__(self) -> None:
        self.handlers: list[Callable[..., Any]] = []

    def __call__(self, signal: Any = None, sender: Any = None, **kwargs: Any) -> None:
        raised: Exception | None = None
        for handler in self.handlers:
            try:
                handler(**kwargs)
            except Exception as exc:  # noqa: BLE001 - as Scrapy's own dispatch does
                if raised is None and _sender_reads(exc):
                    raised = exc
                else:
                    logger.error("Error caught on signal handler: %r", handler, exc_info=True)
        if raised is not None:
            raise raised


def _sender_reads(exc: Exception) -> bool:
    from scrapy.exceptions import IgnoreRequest

    return isinstance(exc, IgnoreRequest)


def connect_shared(crawler: Any, handler: Callable[..., Any], signal: Any) -> None:
    """Connect ``handler(**kwargs)`` (it gets the signal's named arguments, e.g.
    ``request``, ``spider``) to a per-request Scrapy ``signal`` through the crawler's
    one shared receiver for it. The handler is held strongly, as long as the crawler."""
    context = context_for(crawler)
    with context._lock:
        receiver = context._shared.get(signal)
        if receiver is None:
            receiver = context._shared[signal] = SharedReceiver()
            crawler.signals.connect(receiver, signal=signal)
        receiver.handlers.append(handler)


def disconnect_shared(crawler: Any, handler: Callable[..., Any], signal: Any) -> None:
    """Undo :func:`connect_shared` (the receiver leaves the signal with its last handler)."""
    context = context_for(crawler)
    with context._lock:
        receiver = context._shared.get(signal)
        if receiver is None or handler not in receiver.handlers:
            return
        receiver.handlers.remove(handler)
        if not receiver.handlers:
            del context._shared[signal]
            crawler.signals.disconnect(receiver, signal=signal)
