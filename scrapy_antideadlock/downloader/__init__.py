"""Deadlines, proxy-slot leases and cancellable downloads.

- :class:`DeadlineMiddleware` (DOWNLOADER_MIDDLEWARES, priority 340)
- :class:`GuardedDownloadHandler` (DOWNLOAD_HANDLERS for http/https; wraps the
  handler named in ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS)
- :func:`inflight_for`, :func:`latency_for` for the watchdog.
"""

from .core import (
    DEADLINE_KEY,
    NO_PROXY_KEY,
    DownloadGuard,
    InFlightDownload,
    InFlightTracker,
    guard_for,
    inflight_for,
    latency_for,
)
from .handler import GUARD_PATH, GuardedDownloadHandler, _is_guard
from .middleware import DeadlineMiddleware

MIDDLEWARE_PATH = "scrapy_antideadlock.downloader.DeadlineMiddleware"
MIDDLEWARE_PRIORITY = 340

__all__ = [
    "DEADLINE_KEY", "GUARD_PATH", "MIDDLEWARE_PATH", "MIDDLEWARE_PRIORITY", "NO_PROXY_KEY",
    "DeadlineMiddleware", "DownloadGuard", "GuardedDownloadHandler", "InFlightDownload",
    "InFlightTracker", "configure_download_handlers", "guard_for", "inflight_for",
    "latency_for",
]


def configure_download_handlers(settings) -> None:  # noqa: ANN001 - scrapy Settings
    """Add-on configurer: put the guard in DOWNLOAD_HANDLERS for DEADLINE_SCHEMES.

    The handler configured there before (the user's, e.g. HTTP/2 or the safe
    Playwright handler, or Scrapy's default) moves to
    ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS and is what the guard runs.
    """
    from scrapy.utils.python import global_object_name

    from .. import settings as ad_settings

    if not ad_settings.get(settings, "ANTIDEADLOCK_DEADLINE_WRAP_HANDLERS"):
        return
    if not (ad_settings.get(settings, "ANTIDEADLOCK_DEADLINE_ENABLED")
            or ad_settings.get(settings, "ANTIDEADLOCK_PROXY_LIST")):
        return
    current = settings.getwithbase("DOWNLOAD_HANDLERS")
    wrapped = dict(ad_settings.get(settings, "ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS"))
    for scheme in ad_settings.get(settings, "ANTIDEADLOCK_DEADLINE_SCHEMES"):
        path = current.get(scheme)
        if path is None:
            continue  # scheme disabled by the user
        if _is_guard(path):
            continue
        wrapped.setdefault(scheme, path if isinstance(path, str) else global_object_name(path))
        settings["DOWNLOAD_HANDLERS"][scheme] = GUARD_PATH
    settings.set("ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS", wrapped, "addon")
