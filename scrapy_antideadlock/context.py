"""The crawler-scoped context: how the pack's components find their peers.

One :class:`CrawlerContext` exists per crawler, created by whichever component asks first
(usually the add-on) and stored on the crawler object itself, so it lives and dies with the
crawler and no module keeps a table of crawlers. Components register themselves under a role
name ("journal", "health", "guard", ...) and look their peers up by role; a missing peer is
``None``, never an ``ImportError`` dance.
"""

from __future__ import annotations

import threading
from typing import Any

from .primitives.registry import Registry

__all__ = ["CrawlerContext", "context_for"]

_ATTRIBUTE = "_antideadlock_context"
_create_lock = threading.Lock()  # guards creation only; the monitor thread may ask first


class CrawlerContext:
    """Per-crawler state shared by the pack's components (thread-safe lookups)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self._peers: dict[str, Any] = {}
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
