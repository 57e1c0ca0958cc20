"""DeadlineMiddleware: stamps each request with its deadline and retries missed ones later.

The user's own timeout is the *ceiling* of the adaptive deadline, never cut by
DEADLINE_MAX: ``meta["download_timeout"]``, else the spider's ``download_timeout``
attribute, else DOWNLOAD_TIMEOUT when set anywhere above Scrapy's default. The
middleware runs at 340, before Scrapy's DownloadTimeoutMiddleware (350), and reads
those three itself: at 350 every request would carry a ``download_timeout`` and a
user's value could not be told from the default any more. (Running after 350
instead would also put the deadline after RecoveryMiddleware's process_exception.)

Retries follow the user's RETRY settings. Some cuts are the pack's own doing
rather than the site's, and are retried without using RETRY_TIMES: a request cut
while still queued (it never reached the site), and a transfer cut below the ceiling
while most recent transfers of its slot were cut too, or under a deadline the slot
has since outgrown by half (the deadline was too short for the site; it grows), or
while RETRY_TIMES is left at Scrapy's default (plain Scrapy would not have cut it
there). A request's first deadline retry goes out at once (no priority change), so
hung requests leave no tail at the end of the crawl; later ones go behind fresh
work. The attempt RETRY_TIMES leaves last always runs under the user's full
timeout, so the pack never gives up on a request that plain
Scrapy would have waited for.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import NotConfigured

from .. import stats as ad_stats
from ..exceptions import DeadlineExceeded, DownloadCancelled, ProxyLeaseTimeout
from ..reactor import require_asyncio_reactor
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

_DEFAULT_PRIORITY = 0  # Scrapy's SETTINGS_PRIORITIES["default"]


class DeadlineMiddleware:
    """Deadline (lease wait + slot queue + transfer) for every request; later retries."""

    def __init__(self, crawler: Crawler) -> None:
        require_asyncio_reactor("DeadlineMiddleware", crawler.settings)
        self.crawler = crawler
        self.guard = guard_for(crawler)
        if not self.guard.deadline_enabled and self.guard.pool is None:
            raise NotConfigured("deadlines disabled and no ANTIDEADLOCK_PROXY_LIST")
        settings = crawler.settings
        self.setting_timeout: float | None = None
        if settings.getpriority("DOWNLOAD_TIMEOUT") > _DEFAULT_PRIORITY:
            self.setting_timeout = _positive(settings.getfloat("DOWNLOAD_TIMEOUT"))
        self.retry_enabled = settings.getbool("RETRY_ENABLED")
        self.retry_times = settings.getint("RETRY_TIMES")
        # Left at Scrapy's default, RETRY_TIMES budgets the failures plain Scrapy would
        # have seen; a cut below the user's ceiling is the pack's own and does not spend it.
        self.retry_times_set = settings.getpriority("RETRY_TIMES") > _DEFAULT_PRIORITY
        self.priority_adjust = self.guard.retry_priority_adjust
        self.prompt_first = True  # a request's first deadline retry keeps its priority
        if (settings.getpriority("RETRY_PRIORITY_ADJUST") > _DEFAULT_PRIORITY
                and settings.getpriority("ANTIDEADLOCK_DEADLINE_RETRY_PRIORITY_ADJUST") is None):
            self.priority_adjust = settings.getint("RETRY_PRIORITY_ADJUST")
            self.prompt_first = False

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
        if USER_TIMEOUT_KEY not in meta:  # first attempt: later copies carry it along
            meta[USER_TIMEOUT_KEY] = self.user_timeout(meta.get("download_timeout"))
        user = meta[USER_TIMEOUT_KEY]
        self.guard.begin(request, user, full=bool(user) and self._last_attempt(request))

    def user_timeout(self, meta_value: Any) -> float | None:
        """The user's own timeout: meta, else the spider attribute, else the setting."""
        if meta_value is not None:
            return _positive(meta_value)
        spider_value = getattr(self.crawler.spider, "download_timeout", None)
        if spider_value is not None:
            return _positive(spider_value)
        return self.setting_timeout

    def _last_attempt(self, request: Request) -> bool:
        """Whether the user's RETRY settings allow no further retry of ``request``."""
        meta = request.meta
        if meta.get("dont_retry") or not self.retry_enabled:
            return True
        allowed = meta.get("max_retry_times", self.retry_times)
        return meta.get("retry_times", 0) >= allowed

    def process_exception(self, request: Request, exception: Exception) -> Request | None:
        guard = self.guard
        entry = guard.inflight.get(request)
        guard.inflight.finish(request)
        if isinstance(exception, (DeadlineExceeded, ProxyLeaseTimeout)) or (
                isinstance(exception, DownloadCancelled) and exception.retry):
            # the handler has finished the entry by now: the exception names the slot
            key = entry.key if entry is not None else getattr(exception, "key", None)
            own = isinstance(exception, DeadlineExceeded) and key is not None and (
                exception.stage == "queued"
                or (exception.stage == "transfer" and (
                    not self.retry_times_set or guard.latency.mostly_censored(key)
                    or self._outgrown(request, exception, key))))
            return self._retry(request, exception, own=own)
        return None

    def _retry(self, request: Request, exception: Exception, own: bool) -> Request | None:
        """Retry (promptly by default), within RETRY_TIMES unless the cut was our own.

        A request that never got a proxy slot did not reach the site: it has its own
        budget (PROXY_LEASE_RETRIES), so lease starvation cannot eat RETRY_TIMES. A cut
        that was the pack's own (see the module docstring) uses no budget either, while
        the deadline it ran under was below the ceiling; the deadline doubles each time
        (DEADLINE_RETRY_BACKOFF), so there are few such retries.
        """
        spider = self.crawler.spider
        meta = request.meta
        new = None
        if isinstance(exception, ProxyLeaseTimeout):
            count = meta.get(LEASE_RETRY_KEY, 0)
            if not meta.get("dont_retry") and count < self.guard.lease_retries:
                new = self._copy(request, self.priority_adjust)
                new.meta[LEASE_RETRY_KEY] = count + 1
        elif own and not meta.get("dont_retry") and self._below_ceiling(request):
            new = self._copy(request, self._adjust(request, exception))
            self.guard.inc(ad_stats.DEADLINE_OWN_RETRIES)
        elif not meta.get("dont_retry") and self.retry_enabled and spider is not None:
            new = get_retry_request(request, spider=spider, reason=exception,
                                    priority_adjust=self._adjust(request, exception))
        if new is None:
            self.guard.inc(ad_stats.DEADLINE_GAVE_UP)
            return None
        if isinstance(exception, DeadlineExceeded):
            new.meta[RETRY_COUNT_KEY] = meta.get(RETRY_COUNT_KEY, 0) + 1
        new.meta.pop(DEADLINE_KEY, None)
        self.guard.inc(ad_stats.DEADLINE_RETRIES)
        return new

    def _outgrown(self, request: Request, exception: DeadlineExceeded, key: str) -> bool:
        """Whether the slot's deadline has since grown to 1.5 x what this transfer was given
        (the site slowed down and the deadline is catching up), below the ceiling."""
        budget = exception.budget
        ceiling = request.meta.get(USER_TIMEOUT_KEY) or self.guard.policy.maximum
        return (budget is not None and budget < 0.95 * ceiling
                and self.guard.timeouts_for(key)[0] > 1.5 * budget)

    def _adjust(self, request: Request, exception: Exception) -> int:
        """Priority change of a retry. A request's first deadline retry goes out at once:
        on a healthy slot a hang is one request's bad luck, and retrying it last would
        leave a tail at the end of the crawl. Later ones go behind fresh work
        (DEADLINE_RETRY_PRIORITY_ADJUST), so repeat offenders cannot starve a pool."""
        if (self.prompt_first and isinstance(exception, DeadlineExceeded)
                and not request.meta.get(RETRY_COUNT_KEY)):
            return 0
        return self.priority_adjust

    def _copy(self, request: Request, adjust: int) -> Request:
        new = request.copy()
        new.dont_filter = True
        new.priority = request.priority + adjust
        return new

    def _below_ceiling(self, request: Request) -> bool:
        """Whether doubling DEADLINE_MIN once per deadline retry so far stays under the
        ceiling: bounds the free retries to about log2(ceiling / DEADLINE_MIN)."""
        policy = self.guard.policy
        ceiling = request.meta.get(USER_TIMEOUT_KEY) or policy.maximum
        return policy.minimum * 2 ** request.meta.get(RETRY_COUNT_KEY, 0) < ceiling


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
