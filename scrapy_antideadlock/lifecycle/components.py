"""The seams that feed the lifecycle tracker and make each stage preemptible.

All three are public Scrapy extension points, so nothing of Scrapy is patched:

- :class:`LifecycleDownloader` (the ``DOWNLOADER`` setting) wraps ``fetch``: the
  downloader-middleware chain of each request runs in one asyncio task, and a frame of
  ours in it turns a preemption into the requeued copy (or ``IgnoreRequest``) instead of
  a ``CancelledError`` that would reach the spider's errback;
- :class:`LifecycleSpiderMiddleware` marks the callback stage and wraps its output, so an
  async generator callback can be preempted the same way (a coroutine callback runs in a
  task of its own, cancelled directly; the error comes back to ``process_spider_exception``);
- :class:`LifecycleItemProcessor` (the ``ITEM_PROCESSOR`` setting) wraps
  ``process_item_async``: a preempted item is dead-lettered with its reason and ends with
  :class:`~scrapy_antideadlock.exceptions.Preempted`, which frees its item slot.

A download that is transferring is preempted through the guarded download handler
(cancelling the task that awaits a transfer would leave the transfer running).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from scrapy import Request, signals
from scrapy.core.downloader import Downloader
from scrapy.crawler import Crawler
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.http import Response
from scrapy.pipelines import ItemPipelineManager
from twisted.internet.defer import CancelledError as DeferredCancelled
from twisted.python.failure import Failure

from .. import settings as ad_settings
from ..compat import lifecycle as compat
from ..context import connect_shared, context_for
from ..exceptions import Preempted
from ..reactor import require_asyncio_reactor
from .describe import describe_unit
from .tracker import LifecycleTracker, Unit

logger = logging.getLogger(__name__)

__all__ = ["LifecycleDownloader", "LifecycleItemProcessor", "LifecycleSpiderMiddleware",
           "tracker_for"]

_CANCELLED = (asyncio.CancelledError, DeferredCancelled)


def tracker_for(crawler: Crawler) -> LifecycleTracker:
    """The crawler's lifecycle tracker (created on first use)."""
    return context_for(crawler).setdefault("lifecycle", LifecycleTracker)


def _absorb_cancel(task: Any) -> bool:
    """After catching our own CancelledError: True if no other cancel is pending."""
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    return uncancel is None or uncancel() == 0


def _enabled(crawler: Crawler) -> bool:
    return bool(ad_settings.get(crawler.settings, "ANTIDEADLOCK_ENABLED")
                and ad_settings.get(crawler.settings, "ANTIDEADLOCK_LIFECYCLE_ENABLED"))


class LifecycleDownloader(Downloader):
    """Scrapy's downloader, with every fetch tracked and preemptible."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self.tracker = tracker_for(crawler)
        self.tracker.describe = describe_unit
        self._needs_spider = compat.fetch_needs_spider(Downloader)
        self._download_async = getattr(self.middleware, "download_async", None)
        if self._download_async is not None:  # Scrapy 2.14+: the chain runs in one task
            self.middleware.download_async = self._tracked_download_async  # type: ignore
        connect_shared(crawler, self._reached, signals.request_reached_downloader)
        if self._download_async is None:
            # Before 2.14 nothing else tells process_response from process_exception. From
            # 2.14 the unit's task is known and describe_unit names the chain it awaits in
            # (so one receiver per request less); until then _left says process_response.
            connect_shared(crawler, self._downloaded, signals.response_downloaded)
        connect_shared(crawler, self._left, signals.request_left_downloader)

    def fetch(self, request: Request, spider: Any = None) -> Any:  # type: ignore[override]
        unit = Unit(request, "middleware:process_request", "downloader middlewares",
                    time.monotonic(), cancel_fn=self._cancel)
        self.tracker.enter("fetch", request, unit)
        dfd = compat.fetch(self, Downloader.fetch, request, spider or self.crawler.spider,
                           self._needs_spider)
        unit.deferred = dfd

        def done(result: Any) -> Any:
            self.tracker.leave("fetch", request, unit)
            if unit.preempted and isinstance(result, Failure) and result.check(*_CANCELLED):
                return self._outcome(unit)  # cancelled without our frame (Scrapy < 2.14)
            return result

        return dfd.addBoth(done)

    async def _tracked_download_async(self, download_func: Any, request: Request) -> Any:
        unit = self.tracker.get("fetch", request)
        task = asyncio.current_task()
        if unit is not None:
            unit.task = task
        try:
            return await self._download_async(download_func, request)
        except asyncio.CancelledError:
            if unit is None or unit.preempted is None or not _absorb_cancel(task):
                raise
            outcome = self._outcome(unit)
            if isinstance(outcome, Failure):
                outcome.raiseException()
            return outcome

    def _outcome(self, unit: Unit) -> Request | Failure:
        """The requeued copy, else IgnoreRequest (quarantined, or kept for the next run)."""
        assert unit.request is not None and unit.preempted is not None
        copy = self.tracker.resolve(unit.request, unit.preempted)
        if copy is not None:
            return copy
        return Failure(IgnoreRequest(f"preempted at {unit.stage}: {unit.preempted}"))

    def _cancel(self, unit: Unit) -> bool:
        describe_unit(unit)
        if unit.stage == "download" or (unit.stage == "queue" and self._transferring(unit)):
            return False  # the guarded handler cancels transfers (recovery asks it)
        if unit.task is not None and not unit.task.done():
            return bool(unit.task.cancel(f"antideadlock: {unit.preempted}"))
        dfd = unit.deferred
        if dfd is None or dfd.called:
            return False
        dfd.cancel()
        return True

    def _transferring(self, unit: Unit) -> bool:
        key = unit.request.meta.get(self.DOWNLOAD_SLOT) if unit.request is not None else None
        slot = self.slots.get(key) if key is not None else None
        return slot is not None and unit.request in slot.transferring

    # signals: where the request is between middleware and handler
    def _reached(self, request: Request, **kwargs: Any) -> None:
        unit = self.tracker.get("fetch", request)
        if unit is not None:
            unit.stage, unit.component = "queue", f"downloader slot {self.get_slot_key(request)}"
            unit.started = time.monotonic()

    def _downloaded(self, response: Response, request: Request, **kwargs: Any) -> None:
        unit = self.tracker.get("fetch", request)
        if unit is not None:
            unit.stage, unit.component = "middleware:process_response", "downloader middlewares"
            unit.started = time.monotonic()

    def _left(self, request: Request, **kwargs: Any) -> None:
        unit = self.tracker.get("fetch", request)
        if unit is not None and unit.stage in ("queue", "download"):
            stage = "middleware:process_exception" if self._download_async is None \
                else "middleware:process_response"  # refined by describe_unit when read
            unit.stage, unit.component = stage, "downloader middlewares"
            unit.started = time.monotonic()


class LifecycleSpiderMiddleware:
    """Spider middleware: the callback stage, and items' requests for the pipeline stage."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.tracker = tracker_for(crawler)
        self._is_coroutine: dict[Any, bool] = {}  # callback function -> async def?
        # ItemOriginMiddleware's per-element work, when it sits right after this one in
        # the spider middlewares (the add-on's order): one output wrapper instead of two.
        self._origin = _take_over_origin(crawler)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> LifecycleSpiderMiddleware:
        if not _enabled(crawler):
            raise NotConfigured("ANTIDEADLOCK_LIFECYCLE_ENABLED is off")
        require_asyncio_reactor("LifecycleSpiderMiddleware", crawler.settings)
        return cls(crawler)

    def process_spider_input(self, response: Response) -> None:
        request = response.request
        if request is None:
            return
        callback = request.callback or getattr(self.crawler.spider, "parse", None)
        # component "": named from the callback only when a reader asks (tracker._name)
        unit = Unit(request, "callback", "", time.monotonic(), cancel_fn=self._cancel,
                    response=response, callback=callback)
        self.tracker.enter("callback", request, unit)
        if self._coroutine(callback):
            # Scrapy runs a coroutine callback in a task of its own; a frame of ours in it
            # turns a preemption into an ordinary exception (process_spider_exception)
            request.callback = _guarded(callback, unit, request)

    def _coroutine(self, callback: Any) -> bool:
        """``inspect.iscoroutinefunction``, remembered per function (asked per response)."""
        func = getattr(callback, "__func__", callback)
        try:
            found = self._is_coroutine.get(func)
            if found is None:
                found = self._is_coroutine[func] = inspect.iscoroutinefunction(callback)
            return found
        except TypeError:  # an unhashable callable
            return inspect.iscoroutinefunction(callback)

    def process_spider_output(self, response: Response, result: Iterable[Any]
                              ) -> Iterable[Any]:
        unit = self.tracker.get("callback", response.request)
        handle, owner = self._origin_handle(response)
        try:
            for element in result:
                yield self._tag(response, handle(response.request, owner, element))
        finally:
            self.tracker.leave("callback", response.request, unit)

    async def process_spider_output_async(self, response: Response, result: AsyncIterator[Any]
                                          ) -> AsyncIterator[Any]:
        request = response.request
        unit = self.tracker.get("callback", request)
        handle, owner = self._origin_handle(response)
        iterator = result.__aiter__()
        task = asyncio.current_task()  # the task that iterates the output (Scrapy's: one)
        try:
            while True:
                if unit is not None:
                    unit.task, unit.awaiting = task, True
                try:
                    element = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if unit is None or unit.preempted is None or not _absorb_cancel(task):
                        raise
                    copy = self.tracker.resolve(request, unit.preempted)
                    if copy is not None:
                        yield copy
                    break
                finally:
                    if unit is not None:
                        unit.awaiting = False
                yield self._tag(response, handle(request, owner, element))
        finally:
            self.tracker.leave("callback", request, unit)

    def process_spider_exception(self, response: Response, exception: Exception
                                 ) -> Iterable[Any] | None:
        request = response.request
        unit = self.tracker.leave("callback", request)
        if unit is None or unit.preempted is None \
                or not isinstance(exception, (*_CANCELLED, Preempted)):
            return None
        copy = self.tracker.resolve(request, unit.preempted)
        return [copy] if copy is not None else []

    def _origin_handle(self, response: Response) -> tuple[Any, list[str]]:
        """The origin middleware's element handler (or a pass-through) and its state."""
        if self._origin is None:
            return _pass_through, []
        return self._origin._handle, []

    def _tag(self, response: Response, element: Any) -> Any:
        if element is not None and not isinstance(element, Request):
            self.tracker.item_origin[id(element)] = response.request
        return element

    def _cancel(self, unit: Unit) -> bool:
        """Only while a frame of ours awaits the callback's code (else, e.g. while it
        waits for a free item slot, the pipelines are the stuck part)."""
        if unit.awaiting and unit.task is not None and not unit.task.done():
            return bool(unit.task.cancel(f"antideadlock: {unit.preempted}"))
        return False


def _pass_through(parent: Any, owner: Any, element: Any) -> Any:
    return element


def _take_over_origin(crawler: Crawler) -> Any:
    """An ItemOriginMiddleware run inside LifecycleSpiderMiddleware when the configured one
    comes right after it (nothing could see the elements between the two), else None;
    the configured one then steps aside (see ``ItemOriginMiddleware.from_crawler``)."""
    from scrapy.utils.conf import build_component_list
    from scrapy.utils.misc import load_object

    from ..origin import ItemOriginMiddleware, take_over

    try:
        order = [load_object(path) if isinstance(path, str) else path for path in
                 build_component_list(crawler.settings.getwithbase("SPIDER_MIDDLEWARES"))]
        mine = order.index(LifecycleSpiderMiddleware)
    except (ValueError, ImportError, NameError, AttributeError):
        return None
    if order[mine + 1:mine + 2] != [ItemOriginMiddleware]:
        return None
    return take_over(crawler)


def _guarded(callback: Any, unit: Unit, request: Request) -> Any:
    """``callback`` run so that a preemption ends it with :class:`Preempted`."""

    async def guarded(response: Response, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        unit.task, unit.awaiting = task, True
        try:
            return await callback(response, **kwargs)
        except asyncio.CancelledError:
            if unit.preempted is None or not _absorb_cancel(task):
                raise
            raise Preempted(unit.preempted, stage="callback") from None
        finally:
            unit.awaiting = False
            request.callback = callback  # a requeued copy must serialise as before

    guarded.__name__ = getattr(callback, "__name__", "callback")
    return guarded


class LifecycleItemProcessor(ItemPipelineManager):
    """Scrapy's item pipeline manager, with every item tracked and preemptible."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker: LifecycleTracker | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> LifecycleItemProcessor:
        manager = super().from_crawler(crawler)
        manager.tracker = tracker_for(crawler) if _enabled(crawler) else None
        return manager

    async def process_item_async(self, item: Any) -> Any:
        tracker = self.tracker
        if tracker is None:
            return await super().process_item_async(item)
        task = asyncio.current_task()
        unit = Unit(tracker.item_origin.pop(id(item), None), "pipeline", "item pipelines",
                    time.monotonic(), item=item, task=task, cancel_fn=_cancel_task)
        tracker.enter("item", id(item), unit)
        try:
            return await super().process_item_async(item)
        except asyncio.CancelledError:
            if unit.preempted is None or task is None or not _absorb_cancel(task):
                raise
            tracker.dead_letter(unit)
            raise Preempted(unit.preempted, stage=f"pipeline {unit.component}") from None
        finally:
            tracker.leave("item", id(item), unit)


def _cancel_task(unit: Unit) -> bool:
    describe_unit(unit)
    task = unit.task
    return task is not None and not task.done() and bool(
        task.cancel(f"antideadlock: {unit.preempted}"))
