"""The handler's exceptions: each keeps the type a user's errback already checks for
(Playwright's ``TimeoutError`` / ``TargetClosedError``) and adds the Scrapy type that
``RetryMiddleware`` retries, plus the pack's details as attributes."""

from __future__ import annotations

from typing import Any

from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from scrapy.exceptions import DownloadFailedError, DownloadTimeoutError

from ..compat.playwright import target_closed_error
from ..primitives.lease import LeaseTimeout

__all__ = ["BrowserCrashed", "PlaywrightCallTimeout", "PlaywrightSlotTimeout", "attach_info"]


class PlaywrightCallTimeout(DownloadTimeoutError, PlaywrightTimeoutError):
    """A browser call overran its bound (the call cap, or the request's deadline).

    Both a Scrapy ``DownloadTimeoutError`` (retried by RetryMiddleware) and a Playwright
    ``TimeoutError`` (what an errback written for scrapy-playwright expects)."""

    def __init__(self, call: str, timeout: float, url: str = "") -> None:
        self.call, self.timeout, self.url = call, timeout, url
        where = f" for {url}" if url else ""
        message = f"Playwright {call} did not finish within {timeout:.2f}s{where}"
        PlaywrightTimeoutError.__init__(self, message)


class PlaywrightSlotTimeout(LeaseTimeout, DownloadTimeoutError):
    """No page or context slot came free in time (a LeaseTimeout that RetryMiddleware retries,
    being a DownloadTimeoutError too)."""


class BrowserCrashed(target_closed_error(), DownloadFailedError):  # type: ignore[misc]
    """The browser, context or page died under a call. Playwright's ``TargetClosedError``
    (which scrapy-playwright retries, and errbacks check for) and a Scrapy
    ``DownloadFailedError`` (retried by RetryMiddleware)."""

    def __init__(self, message: str = "", call: str = "", url: str = "") -> None:
        self.call, self.url = call, url
        super().__init__(message or None)


def attach_info(exc: BaseException, **info: Any) -> BaseException:
    """Add the pack's details to an exception without changing its type."""
    found = getattr(exc, "antideadlock", None)
    if not isinstance(found, dict):
        found = {}
        try:
            exc.antideadlock = found  # type: ignore[attr-defined]
        except AttributeError:
            return exc
    for key, value in info.items():
        found.setdefault(key, value)
    return exc
