"""The intent protocol of the reliable queue: no request lost between "seen" and "pushed".

scrapy-redis marks a request seen (its dupefilter's SADD) before it pushes it; a worker
killed between the two would lose it for good, every later copy being "seen". So before
the dupefilter runs (``request_scheduled``) the queue writes an *intent* (the INTENT
script); the push consumes it, a drop removes it, and one left past its deadline is
pushed by the next pop of any worker. The INTENT script checks the dupefilter's set
first: a request already seen gets no intent, and with scrapy-redis's own dupefilter it
is dropped here, sparing the dupefilter's own round trip.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals
from scrapy.exceptions import IgnoreRequest

from .. import stats as ad_stats

if TYPE_CHECKING:
    from .queue import ReliableQueue

logger = logging.getLogger(__name__)


class Intents:
    """One queue's intents: written at ``request_scheduled``, taken by its push."""

    def __init__(self, queue: ReliableQueue) -> None:
        self.queue = queue
        settings = queue.crawler.settings
        found = _dupefilter_of(settings, queue.spider.name)
        self.dupefilter = found[:2] if found is not None else None
        # scrapy-redis's own request_seen (its SADD): a fingerprint in its set is a request
        # it drops, so the queue may drop it first
        self.drops_duplicates = found is not None and found[2]
        self._log_duplicates = settings.getbool("DUPEFILTER_DEBUG")
        self._pending: weakref.WeakKeyDictionary[Request, str] = weakref.WeakKeyDictionary()
        self._tokens = itertools.count(1)

    def take(self, request: Request) -> str:
        """The token of ``request``'s intent, for its push to consume ('' if none)."""
        return self._pending.pop(request, "")

    def scheduled(self, request: Request, spider: Any = None) -> None:
        """Before the dupefilter marks ``request`` seen: record it, so a kill between that
        mark and the push cannot lose it (the next pop after the deadline pushes it)."""
        if request.dont_filter:
            return  # never filtered: nothing marks it seen before the push
        queue = self.queue
        token = f"{queue.worker_id}:{next(self._tokens)}"
        args: list[Any] = [token, -request.priority, queue._encode_request(request),
                           queue.visibility_ms]
        if self.dupefilter is not None:
            key, fingerprint = self.dupefilter
            args += [key, fingerprint(request)]
        written = queue._write("INTENT", args)
        if written:
            self._pending[request] = token
            try:  # pushed or dropped in this same call stack, else abandoned
                asyncio.get_running_loop().call_soon(self._abandoned, token)
            except RuntimeError:
                pass
        elif written is not None and self.drops_duplicates:
            self._drop_duplicate(request)

    def _drop_duplicate(self, request: Request) -> None:
        """The dupefilter has seen ``request`` (the INTENT script just checked): drop it
        as scrapy-redis would after its own SADD, one round trip fewer per duplicate.
        Same stat, then ``request_dropped`` once every request_scheduled handler ran."""
        queue = self.queue
        if queue.stats is not None:
            queue.stats.inc_value("dupefilter/filtered")
        queue._inc(ad_stats.FLEET_DUPLICATES_DROPPED)
        if self._log_duplicates:
            logger.debug("Filtered duplicate request: %(request)s", {"request": request})
        send = queue.crawler.signals.send_catch_log
        try:
            asyncio.get_running_loop().call_soon(
                lambda: send(signals.request_dropped, request=request, spider=queue.spider))
        except RuntimeError:
            send(signals.request_dropped, request=request, spider=queue.spider)
        raise IgnoreRequest("duplicate (fleet queue: the dupefilter has seen it)")

    def dropped(self, request: Request, spider: Any = None) -> None:
        token = self._pending.pop(request, None)
        if token is not None:
            self.queue._write("DROP_INTENT", [token])

    def _abandoned(self, token: str) -> None:
        """Another request_scheduled handler ignored the request: forget its intent."""
        for request, pending in list(self._pending.items()):
            if pending == token:
                del self._pending[request]
                self.queue._write("DROP_INTENT", [token])


def _dupefilter_of(settings: Any, spider: str) -> tuple[str, Any, bool] | None:
    """(Redis key, fingerprint function, whether ``request_seen`` is its own) of
    scrapy-redis's RFPDupeFilter, if that (or a subclass) is in use.

    Lets an intent skip requests the dupefilter will drop (no write for a duplicate link).
    """
    from scrapy.utils.misc import load_object
    from scrapy_redis import defaults
    from scrapy_redis.dupefilter import RFPDupeFilter

    cls = load_object(settings.get("DUPEFILTER_CLASS") or defaults.SCHEDULER_DUPEFILTER_CLASS)
    if not (isinstance(cls, type) and issubclass(cls, RFPDupeFilter)):
        return None
    key = (settings.get("SCHEDULER_DUPEFILTER_KEY") or defaults.SCHEDULER_DUPEFILTER_KEY) \
        % {"spider": spider}
    own = getattr(cls, "request_seen", None) is RFPDupeFilter.request_seen
    return key, cls(None, key).request_fingerprint, own
