"""GuardedDownloadHandler: wraps the configured handler of each scheme, cancellably.

Cancelling Scrapy's own transfer task hangs the engine (docs/internals.md); this handler
runs each download in a task of its own and, on a cancel or a missed deadline,
cancels that task (aborting the connection) and raises an ordinary exception, so
the engine carries on and the request reaches ``process_exception``.

Scrapy builds one handler per scheme but does not tell it which; the wrapped
handlers are therefore built once per crawler and shared by the guard instances.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import NotConfigured, NotSupported
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import build_from_crawler, load_object

from .. import settings as ad_settings
from ..context import context_for
from ..reactor import asyncio_reactor_configured
from .core import guard_for

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

logger = logging.getLogger(__name__)

WRAPPED_SETTING = "ANTIDEADLOCK_DEADLINE_WRAPPED_HANDLERS"
GUARD_PATH = "scrapy_antideadlock.downloader.GuardedDownloadHandler"


class _WrappedHandlers:
    """The real handler per scheme, built once per crawler (lazily if the class is lazy)."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        configured = ad_settings.get(crawler.settings, WRAPPED_SETTING)
        base = crawler.settings.getdict("DOWNLOAD_HANDLERS_BASE")
        handlers = crawler.settings.getwithbase("DOWNLOAD_HANDLERS")
        self.paths: dict[str, Any] = {}
        for scheme, path in handlers.items():
            if path is not None and _is_guard(path):
                inner = configured.get(scheme) or base.get(scheme)
                if inner is None:
                    continue
                if _is_guard(inner):
                    raise ad_settings.SettingError(
                        WRAPPED_SETTING, "a handler other than the guard itself", inner,
                        f"scheme {scheme!r}")
                self.paths[scheme] = inner
        self.handlers: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.closed = False
        for scheme, path in self.paths.items():  # eager ones now, as Scrapy would
            try:
                lazy = getattr(load_object(path), "lazy", True)
            except Exception:  # noqa: BLE001 - reported by get() on first use
                lazy = True
            if not lazy:
                with contextlib.suppress(NotSupported):
                    self.get(scheme)

    def get(self, scheme: str) -> Any:
        if scheme in self.handlers:
            return self.handlers[scheme]
        if scheme not in self.paths:
            raise NotSupported(f"Unsupported URL scheme '{scheme}': not wrapped by the guard")
        if scheme in self.errors:
            raise NotSupported(f"Unsupported URL scheme '{scheme}': {self.errors[scheme]}")
        try:
            handler = build_from_crawler(load_object(self.paths[scheme]), self.crawler)
        except NotConfigured as exc:
            self.errors[scheme] = str(exc)
            raise NotSupported(f"Unsupported URL scheme '{scheme}': {exc}") from None
        except Exception as exc:  # as Scrapy does: log once, then the scheme is unsupported
            logger.error('Loading "%s" for scheme "%s"', self.paths[scheme], scheme,
                         exc_info=True)
            self.errors[scheme] = str(exc)
            raise NotSupported(f"Unsupported URL scheme '{scheme}': {exc}") from None
        if not inspect.iscoroutinefunction(handler.download_request):
            raise TypeError(f"{self.paths[scheme]}: the guard wraps only handlers with "
                            "'async def download_request(self, request)'")
        self.handlers[scheme] = handler
        return handler

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for handler in self.handlers.values():
            close = getattr(handler, "close", None)
            if close is not None:
                result = close()
                if inspect.isawaitable(result):
                    await result


def _is_guard(path: Any) -> bool:
    if isinstance(path, str):
        if path in (GUARD_PATH, "scrapy_antideadlock.downloader.handler.GuardedDownloadHandler"):
            return True
        if not path.startswith("scrapy_antideadlock."):
            return False  # never import the user's handler just to compare
    try:
        return load_object(path) is GuardedDownloadHandler
    except (ImportError, NameError, ValueError, AttributeError):
        return False


class GuardedDownloadHandler:
    """Cancellable download handler; put it in DOWNLOAD_HANDLERS for http/https."""

    lazy = False

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        # Not on asyncio: the deadline middleware refused to start, so pass through
        # to the wrapped handler rather than fail every download.
        self.passthrough = not asyncio_reactor_configured(crawler.settings)
        self.guard = None if self.passthrough else guard_for(crawler)
        self.wrapped = context_for(crawler).setdefault(
            "wrapped_handlers", lambda: _WrappedHandlers(crawler))

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> GuardedDownloadHandler:
        return cls(crawler)

    async def download_request(self, request: Request) -> Response:
        handler = self.wrapped.get(urlparse_cached(request).scheme)
        if self.guard is None:
            return await handler.download_request(request)
        return await self.guard.download(request, handler)

    def cancel(self, request: Request, reason: str) -> bool:
        """Cancel one in-flight download (see :meth:`InFlightTracker.cancel`)."""
        return self.guard is not None and self.guard.inflight.cancel(request, reason)

    async def close(self) -> None:
        await self.wrapped.close()
