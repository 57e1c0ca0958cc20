"""DeadlineMiddleware: stamps each request with its deadline and retries missed ones later.

Runs at priority 340, before Scrapy's DownloadTimeoutMiddleware (350), so the
``download_timeout`` it sees in meta is the user's own, not the DOWNLOAD_TIMEOUT
default that middleware fills in for every request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import NotConfigured

from .. import stats as ad_stats
from ..exceptions import DeadlineExceeded, DownloadCancelled, ProxyLeaseTimeout
from .core import (
    DEADLINE_KEY,
    LEASE_RETRY_KEY,
    PROXY_MARK_KEY,
    RETRY_COUNT_KEY,
    USER_TIMEOUT_KEY,
    guard_for,
)

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)


class DeadlineMiddleware:
    """Deadline (lease wait + slot queue + transfer) for every request; later retries."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.guard = guard_for(crawler)
        if not self.guard.deadline_enabled and self.guard.pool is None:
            raise NotConfigured("deadlines disabled and no ANTIDEADLOCK_PROXY_LIST")
        self.default_timeout = crawler.settings.getfloat("DOWNLOAD_TIMEOUT")

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> DeadlineMiddleware:
        return cls(crawler)

    def process_request(self, request: Request) -> None:
        meta = request.meta
        if PROXY_MARK_KEY in meta:  # a retry/redirect copy of a request we proxied
            del meta[PROXY_MARK_KEY]
            meta.pop("proxy", None)
            meta.pop("_auth_proxy", None)
            request.headers.pop(b"Proxy-Authorization", None)
        if USER_TIMEOUT_KEY not in meta:
            meta[USER_TIMEOUT_KEY] = self._user_timeout(meta.get("download_timeout"))
        self.guard.begin(request, meta[USER_TIMEOUT_KEY])

    def _user_timeout(self, value: Any) -> float | None:
        """The user's own timeout; a value equal to DOWNLOAD_TIMEOUT counts as the default."""
        if value is None:
            return None
        value = float(value)
        return None if value <= 0 or value == self.default_timeout else value

    def process_exception(self, request: Request, exception: Exception) -> Request | None:
        guard = self.guard
        guard.inflight.finish(request)
        if isinstance(exception, (DeadlineExceeded, ProxyLeaseTimeout)) or (
                isinstance(exception, DownloadCancelled) and exception.retry):
            return self._retry(request, exception)
        return None

    def _retry(self, request: Request, exception: Exception) -> Request | None:
        """Retry later (lower priority) with a longer deadline, within RETRY_TIMES.

        A request that never got a proxy slot did not reach the site: it has its own
        budget (PROXY_LEASE_RETRIES), so lease starvation cannot eat RETRY_TIMES.
        """
        spider = self.crawler.spider
        new = None
        if isinstance(exception, ProxyLeaseTimeout):
            count = request.meta.get(LEASE_RETRY_KEY, 0)
            if not request.meta.get("dont_retry") and count < self.guard.lease_retries:
                new = request.copy()
                new.meta[LEASE_RETRY_KEY] = count + 1
                new.dont_filter = True
                new.priority = request.priority + self.guard.retry_priority_adjust
        elif not request.meta.get("dont_retry") and spider is not None:
            new = get_retry_request(request, spider=spider, reason=exception,
                                    priority_adjust=self.guard.retry_priority_adjust)
        if new is None:
            self.guard.inc(ad_stats.DEADLINE_GAVE_UP)
            return None
        if isinstance(exception, DeadlineExceeded):
            new.meta[RETRY_COUNT_KEY] = request.meta.get(RETRY_COUNT_KEY, 0) + 1
        new.meta.pop(DEADLINE_KEY, None)
        self.guard.inc(ad_stats.DEADLINE_RETRIES)
        return new
