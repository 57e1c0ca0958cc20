"""Not a stall: a spider kept open with nothing pending, like scrapy-redis's RedisSpider
waiting for URLs (``spider_idle`` raises ``DontCloseSpider``). It closes by itself after
``SCENARIO_IDLE_FOR`` seconds of idleness."""

from __future__ import annotations

import time
from typing import Any

from scrapy import signals
from scrapy.exceptions import DontCloseSpider

from ..spiders import SiteSpider


class WaitingForUrlsSpider(SiteSpider):
    name = "idle_waiting_for_urls"

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
        spider = super().from_crawler(crawler, *args, **kwargs)
        spider.idle_since = None
        crawler.signals.connect(spider.on_idle, signals.spider_idle)
        return spider

    def on_idle(self) -> None:
        if self.idle_since is None:
            self.idle_since = time.monotonic()
        if time.monotonic() - self.idle_since < self.settings.getfloat("SCENARIO_IDLE_FOR", 20):
            raise DontCloseSpider
