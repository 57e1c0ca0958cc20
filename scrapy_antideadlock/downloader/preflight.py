"""Preflight: warn at start when concurrency exceeds a pool (more requests may be active than the pool has units)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..context import context_for

if TYPE_CHECKING:
    from .core import DownloadGuard

logger = logging.getLogger(__name__)

#: Kinds of registry pools whose units requests take: proxy slots, browser contexts, pages.
REQUEST_POOL_KINDS = frozenset({"proxy", "context", "page"})


def preflight_rows(guard: DownloadGuard) -> list[tuple[str, int, str, int, str]]:
    """(setting, value, pool, capacity, consequence) for every concurrency above a pool."""
    settings = guard.crawler.settings
    total = settings.getint("CONCURRENT_REQUESTS")
    per_domain = settings.getint("CONCURRENT_REQUESTS_PER_DOMAIN")
    per_ip = settings.getint("CONCURRENT_REQUESTS_PER_IP")
    rows = []
    for snap in context_for(guard.crawler).registry.snapshot():
        # Only pools a request takes a unit of can make requests wait. The pipeline's
        # connections and buffers are taken by items after the download, never held
        # across crawl I/O: no request ever waits for them.
        if snap.capacity <= 0 or snap.kind not in REQUEST_POOL_KINDS:
            continue
        checks = [("CONCURRENT_REQUESTS", total)]
        if snap.kind == "proxy":
            checks.append(("CONCURRENT_REQUESTS_PER_IP" if per_ip else
                           "CONCURRENT_REQUESTS_PER_DOMAIN", per_ip or per_domain))
        for name, value in checks:
            if value > snap.capacity:
                rows.append((name, value, snap.name, snap.capacity,
                             f"up to {value - snap.capacity} requests wait for a unit"))
    return rows


def preflight(guard: DownloadGuard) -> None:
    rows = preflight_rows(guard)
    if not rows:
        return
    head = ("setting", "value", "pool", "capacity", "consequence")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
             for row in [head, *rows]]
    logger.warning("scrapy-antideadlock preflight: concurrency exceeds pool capacity; "
                   "requests will queue for it (bounded by their deadline):\n%s",
                   "\n".join(lines))
