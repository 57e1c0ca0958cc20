"""Downloader middleware: turn a recovery cancel of a transfer into a requeue."""

from __future__ import annotations

from scrapy import Request
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured

from .. import metakeys
from .. import settings as ad_settings
from ..context import context_for
from ..reactor import require_asyncio_reactor

__all__ = ["RecoveryMiddleware"]


class RecoveryMiddleware:
    """Turn a recovery cancel into a requeue (or a quarantine), so errbacks never see it.

    Its priority (330) is below the deadline middleware's (340), so that one sees the
    exception first (``process_exception`` runs from the downloader outwards) and
    finishes its bookkeeping; a plain cancel is not retried there.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.ctx = context_for(crawler)
        self.ctx.put("recovery_middleware", self)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RecoveryMiddleware:
        if ad_settings.get(crawler.settings, "ANTIDEADLOCK_RECOVERY_LEVEL") == "off":
            raise NotConfigured("ANTIDEADLOCK_RECOVERY_LEVEL is off")
        require_asyncio_reactor("RecoveryMiddleware", crawler.settings)
        return cls(crawler)

    def process_exception(self, request: Request, exception: Exception) -> Request | None:
        stall_class = request.meta.get(metakeys.RECOVERY_CANCEL)
        if stall_class is None:
            return None
        recovery = self.ctx.get("recovery")
        if recovery is None:
            request.meta.pop(metakeys.RECOVERY_CANCEL, None)
            return None
        return recovery.requeue_or_quarantine(request, stall_class)
