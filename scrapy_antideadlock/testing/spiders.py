"""SiteSpider: a plain Scrapy spider that crawls a :class:`FaultSite`.

Callbacks are spider methods, so its requests serialise with ``Request.to_dict`` (the
journal and requeue need that). Subclass and override :meth:`parse_item` or
:meth:`request_meta` to change what is scraped or how requests are sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import scrapy
from scrapy.http import Response
from twisted.python.failure import Failure

__all__ = ["SiteSpider"]

_TRUE = {"1", "true", "yes", "on"}


class SiteSpider(scrapy.Spider):
    """Listing → detail pages → items ``{"key", "name", "price", "url"}``."""

    name = "site"

    def __init__(self, start_url: str | None = None, js: bool | str = False,
                 proxy: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if start_url is None:
            raise ValueError("SiteSpider needs start_url (e.g. FaultSite.start_url)")
        self.js = js if isinstance(js, bool) else str(js).strip().lower() in _TRUE
        if self.js and "/js/" not in start_url:
            start_url = start_url.replace("/list/", "/js/list/", 1)
        self.start_url = start_url
        self.proxy = proxy or None  # sent as meta["proxy"] on every request
        self.failures: list[tuple[str, str]] = []  # (url, exception type) from the errback

    async def start(self) -> AsyncIterator[Any]:
        yield self.make_request(self.start_url, self.parse)

    def request_meta(self, kind: str) -> dict[str, Any]:
        """Meta for a request of ``kind`` ("list" or "item"); JS mode asks Playwright to render."""
        meta: dict[str, Any] = {}
        if self.proxy:
            meta["proxy"] = self.proxy
        if self.js:
            from scrapy_playwright.page import PageMethod

            meta["playwright"] = True
            meta["playwright_page_methods"] = [
                PageMethod("wait_for_selector", "body[data-ready]")]
        return meta

    def make_request(self, url: str, callback: Any, kind: str = "list") -> scrapy.Request:
        return scrapy.Request(url, callback=callback, errback=self.on_error,
                              meta=self.request_meta(kind))

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        """A listing: follow every detail link, then the next listing."""
        for href in response.css("a.item-link::attr(href)").getall():
            yield self.make_request(response.urljoin(href), self.parse_item, "item")
        next_href = response.css("a.next::attr(href)").get()
        if next_href:
            yield self.make_request(response.urljoin(next_href), self.parse, "list")

    def parse_item(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        """A detail page: one item."""
        div = response.css("div.item")
        key = div.attrib.get("data-key") if div else None
        if key:
            yield {"key": key, "name": div.css("h1.name::text").get(),
                   "price": div.css("span.price::text").get(), "url": response.url}

    def on_error(self, failure: Failure) -> None:
        request = getattr(failure, "request", None)
        url = request.url if request is not None else "?"
        self.failures.append((url, type(failure.value).__name__))
        self.logger.info("request failed: %s %s", url, type(failure.value).__name__)
