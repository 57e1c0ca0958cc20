"""Which request produced each item, and when a request is really done.

A request is *done* (docs/recovery.md, "Durability") only when its callback (or errback)
finished AND every item it yielded passed the pipelines (scraped, dropped or
errored; pipelines return only after commit). That is the moment Scrapy's engine
drops the request from its in-progress set: ``Scraper.enqueue_scrape`` awaits the
callback and every item, then the engine forgets the request (``compat.scrapy.on_request_done``).
There is no public signal for it, so :class:`ItemOriginMiddleware` wraps that one
method of the engine slot (checked at open; if the layout ever changes it logs an
error and the journal degrades to re-crawling, never to losing).

The spider middleware part tags each item with its request's owner id
(:meth:`OriginTracker.owner_of`, for the pipeline's wait-for graph), and gives
requests yielded by a callback their own identity: a callback that passes
``meta=response.meta`` would otherwise copy its parent's owner id and journal key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from scrapy import Request, signals
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured
from scrapy.http import Response

from . import metakeys
from .compat import scrapy as compat
from .context import context_for
from .identity import META_KEY as OWNER_META_KEY
from .identity import request_id

logger = logging.getLogger(__name__)

__all__ = ["ItemOriginMiddleware", "OriginTracker", "origins_for", "take_over", "JOURNAL_KEY"]

JOURNAL_KEY = metakeys.JOURNAL_KEY
_CHILD_RESET = (OWNER_META_KEY, JOURNAL_KEY)


class OriginTracker:
    """Crawler-scoped: item -> owner id, and "request done" callbacks.

    Tags are dropped when their request is done (all its items left the pipelines), so
    no per-item signal handler runs; without that hook (another Scrapy layout) the
    middleware falls back to the item_scraped/dropped/error signals.
    """

    def __init__(self) -> None:
        self._owners: dict[int, str] = {}  # id(item) -> owner; items may be unhashable dicts
        self._tagged: dict[Request, list[int]] = {}  # request -> ids of its tagged items
        self._done: list[Callable[[str], Any]] = []
        self._finished: list[Callable[[Request], Any]] = []
        self.hooked = False  # True once request completion is observed

    def owner_of(self, item: Any) -> str | None:
        """Request id of the response that produced ``item`` (until it left the pipelines)."""
        return self._owners.get(id(item))

    def on_request_done(self, callback: Callable[[str], Any]) -> None:
        """``callback(request_id)`` when a request's callback and all its items finished."""
        self._done.append(callback)

    def on_request_finished(self, callback: Callable[[Request], Any]) -> None:
        """Like :meth:`on_request_done` but with the request object (the journal needs meta)."""
        self._finished.append(callback)

    # -- fed by the middleware -------------------------------------------------------

    def tag(self, item: Any, request: Request, owner: str | None = None) -> None:
        key = id(item)
        self._owners[key] = owner or request_id(request)
        if self.hooked:
            tagged = self._tagged.get(request)
            if tagged is None:
                self._tagged[request] = [key]
            else:
                tagged.append(key)

    def untag(self, item: Any) -> None:
        self._owners.pop(id(item), None)

    def finished(self, request: Request) -> None:
        tagged = self._tagged.pop(request, None)
        if tagged:
            owners = self._owners
            for key in tagged:
                owners.pop(key, None)
        for callback in self._finished:
            try:
                callback(request)
            except Exception:
                logger.exception("request-finished callback %r failed", callback)
        if self._done:
            rid = request_id(request)
            for done in self._done:
                try:
                    done(rid)
                except Exception:
                    logger.exception("request-done callback %r failed", done)


def origins_for(crawler: Crawler) -> OriginTracker:
    """The crawler's tracker (created on first use; the middleware feeds it)."""
    return context_for(crawler).setdefault("origins", OriginTracker)


class ItemOriginMiddleware:
    """Spider middleware: tag items with their owner; observe request completion."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.tracker = origins_for(crawler)
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> ItemOriginMiddleware:
        if context_for(crawler).get("origin_middleware") is not None:
            # LifecycleSpiderMiddleware, right before it, runs its work in its own output
            # wrapper (one async generator per response less); no args: no log line
            raise NotConfigured
        return cls(crawler)

    def _item_left(self, item: Any, **kwargs: Any) -> None:
        self.tracker.untag(item)

    def _spider_opened(self, spider: Any = None) -> None:
        if self.tracker.hooked:
            return
        if compat.on_request_done(self.crawler.engine, self.tracker.finished):
            self.tracker.hooked = True
        else:  # no "request done" moment: drop each tag when its item leaves the pipelines
            for signal in (signals.item_scraped, signals.item_dropped, signals.item_error):
                self.crawler.signals.connect(self._item_left, signal=signal)

    # -- spider middleware -----------------------------------------------------------

    def _handle(self, parent: Request | None, owner: list[str], element: Any) -> Any:
        if isinstance(element, Request):
            if parent is not None and element is not parent:
                meta = element.meta
                for key in _CHILD_RESET:
                    if key in meta and meta[key] == parent.meta.get(key):
                        del meta[key]
        elif element is not None and parent is not None:
            if not owner:  # the response's owner id, looked up once per response
                owner.append(request_id(parent))
            self.tracker.tag(element, parent, owner[0])
        return element

    def process_spider_output(self, response: Response, result: Iterable[Any]
                              ) -> Iterable[Any]:
        parent, owner, handle = response.request, [], self._handle
        for element in result:
            yield handle(parent, owner, element)

    async def process_spider_output_async(self, response: Response,
                                          result: AsyncIterator[Any]) -> AsyncIterator[Any]:
        parent, owner, handle = response.request, [], self._handle
        async for element in result:
            yield handle(parent, owner, element)


def take_over(crawler: Crawler) -> ItemOriginMiddleware:
    """The origin middleware's work for another spider middleware to run in its output
    wrapper (call before the configured ItemOriginMiddleware is built: it steps aside)."""
    middleware = ItemOriginMiddleware(crawler)
    context_for(crawler).put("origin_middleware", middleware)
    return middleware
