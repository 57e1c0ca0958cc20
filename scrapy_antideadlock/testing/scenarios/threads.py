"""A thread pool starved by blocking calls: a pipeline geocodes each item with a blocking
HTTP call (no timeout) in ``asyncio.to_thread``; the geocoder never answers."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from ..spiders import SiteSpider

HERE = __name__


class GeocodePipeline:
    def __init__(self, crawler: Any) -> None:
        self.base = crawler.settings.get("SCENARIO_SITE_URL") or ""

    @classmethod
    def from_crawler(cls, crawler: Any) -> GeocodePipeline:
        return cls(crawler)

    def geocode(self, key: str) -> bytes:
        with urllib.request.urlopen(f"{self.base}/geo/{key}") as answer:  # no timeout
            return answer.read()

    async def process_item(self, item: Any) -> Any:
        item["geo"] = len(await asyncio.to_thread(self.geocode, item["key"]))
        return item


class GeocodeSpider(SiteSpider):
    name = "thread_pool_starved"
    custom_settings = {"ITEM_PIPELINES": {f"{HERE}.GeocodePipeline": 300}}
