"""A plain proxy-rotation middleware, as many projects write it (used by ``proxies`` when the
pack is off, to show what happens without proxy leases)."""

from __future__ import annotations

import itertools
from typing import Any

from scrapy import Request
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured


class RoundRobinProxyMiddleware:
    """Sets ``meta["proxy"]`` round-robin from DEMO_PROXIES; no bound, no health check."""

    def __init__(self, proxies: list[str]) -> None:
        self._next = itertools.cycle(proxies)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RoundRobinProxyMiddleware:
        proxies = crawler.settings.getlist("DEMO_PROXIES")
        if not proxies:
            raise NotConfigured("DEMO_PROXIES is empty")
        return cls(proxies)

    async def process_request(self, request: Request) -> Any:
        request.meta.setdefault("proxy", next(self._next))
        return None
