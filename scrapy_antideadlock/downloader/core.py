"""Per-crawler state shared by the deadline middleware and the guarded download handler.

One :class:`DownloadGuard` per crawler (in the crawler context, role "guard") joins
three parts: the deadline policy (:mod:`.policy`), proxy leasing (:mod:`.leasing`) and
the in-flight tracker (:mod:`.inflight`); every Scrapy internal it touches goes
through :mod:`scrapy_antideadlock.compat.downloader`. The middleware stamps each
request with its deadline before the downloader slot queue; the handler takes the
proxy lease *after* the queue (so no lease is held while queued), runs the transfer in
its own task and turns a cancel or a missed deadline into an ordinary exception.

Cost when nothing is wrong: no task or future of its own for a transfer by one of Scrapy's
handlers (:func:`.transfer.inline`), one of each for other handlers;
deadlines are enforced by one periodic check (DEADLINE_TICK) over the requests in
flight, not by a timer per request, and per-request counters reach the stats there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from scrapy import signals

from .. import metakeys
from .. import settings as ad_settings
from .. import stats as ad_stats
from ..compat import downloader as compat
from ..context import context_for
from ..exceptions import DeadlineExceeded, DownloadCancelled
from ..identity import request_id
from .inflight import InFlightDownload, InFlightTracker
from .leasing import ProxyLeasing
from .policy import DeadlinePolicy
from .transfer import may_hedge, start_copy, transfer

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

    from ..primitives import LatencyTracker, Lease, TimeoutPolicy

logger = logging.getLogger(__name__)

DEADLINE_KEY = metakeys.DEADLINE
USER_TIMEOUT_KEY = metakeys.USER_TIMEOUT
RETRY_COUNT_KEY = metakeys.DEADLINE_RETRIES
LEASE_RETRY_KEY = metakeys.LEASE_RETRIES
PROXY_MARK_KEY = metakeys.PROXY_MARK
NO_PROXY_KEY = metakeys.NO_PROXY
_INNER_TIMEOUT_MARGIN = 0.5  # the wrapped handler's own timer fires after ours

__all__ = ["DEADLINE_KEY", "NO_PROXY_KEY", "DownloadGuard", "InFlightDownload",
           "InFlightTracker", "guard_for", "inflight_for", "latency_for"]


class DownloadGuard:
    """Deadlines, proxy leases, in-flight tracking and concurrency lending of one crawler."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        settings = crawler.settings
        ad_settings.validate_all(settings)
        d = ad_settings.load(settings, "deadline")
        self.deadline_enabled: bool = d.enabled
        self.policy_state = DeadlinePolicy(d)
        self.retry_priority_adjust: int = d.retry_priority_adjust
        self.lend: bool = d.lend
        self.tick_interval: float = d.tick
        self.cancel_grace: float = d.cancel_grace
        self.base_concurrency = settings.getint("CONCURRENT_REQUESTS")
        self.lend_cap = int(self.base_concurrency * (d.lend_max_factor - 1))
        self.lent = 0
        self.lent_max = 0
        self.hedge: bool = d.hedge
        self.hedging = 0  # transfers with a second copy asked for or running
        self.inflight = InFlightTracker(self)
        self.stats = crawler.stats
        self._counts: dict[str, int] = {}  # per-request counters, flushed each tick
        self._ticker: asyncio.TimerHandle | None = None
        self._closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._downloader: Any = None  # the engine's, once the spider is open
        self.leasing = ProxyLeasing(self, ad_settings.load(settings, "proxy"))
        if self.leasing.pool is not None:
            context_for(crawler).registry.register(self.leasing.pool)
        crawler.signals.connect(self.spider_opened, signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signals.spider_closed)

    # ------------------------------------------------------------------ parts, by old names
    @property
    def policy(self) -> TimeoutPolicy:
        return self.policy_state.policy

    @property
    def latency(self) -> LatencyTracker:
        return self.policy_state.latency

    @property
    def proxy_latency(self) -> LatencyTracker:
        return self.policy_state.proxy_latency

    @property
    def pool(self) -> Any:
        return self.leasing.pool

    @property
    def endpoints(self) -> dict[str, Any]:
        return self.leasing.endpoints

    @property
    def lease_retries(self) -> int:
        return self.leasing.lease_retries

    def timeouts_for(self, key: str) -> tuple[float, float]:
        return self.policy_state.timeouts_for(key)

    # ------------------------------------------------------------------ helpers
    def inc(self, name: str, count: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc_value(name, count)

    def count(self, name: str) -> None:
        """A per-request counter: kept here and added to the stats at the next tick."""
        self._counts[name] = self._counts.get(name, 0) + 1

    def _flush_counts(self) -> None:
        counts, self._counts = self._counts, {}
        for name, n in counts.items():
            self.inc(name, n)

    # ------------------------------------------------------------------ the middleware's part
    def begin(self, request: Request, user_timeout: float | None,
              full: bool = False) -> InFlightDownload:
        """Give ``request`` its deadline (from now) and track it.

        ``user_timeout`` is the user's own timeout: the ceiling of the adaptive
        deadline (else DEADLINE_MAX) and its value until the slot is warm; ``full``
        gives the transfer that whole ceiling (the user's last allowed attempt).
        """
        now = time.monotonic()
        downloader = self._downloader or compat.downloader_of(self.crawler)
        slot = downloader.get_slot_key(request) if downloader is not None else ""
        meta = request.meta
        # Browser renders and plain HTTP transfers of one site differ by orders of
        # magnitude: they get separate latency histories.
        key = f"{slot} [playwright]" if meta.get("playwright") else slot
        timeout: float | None = None
        provisional = False
        if user_timeout:
            self.count(ad_stats.DEADLINE_USER)
        if self.deadline_enabled:
            policy = self.policy_state
            timeout = policy.transfer_timeout(key, meta.get(RETRY_COUNT_KEY, 0), user_timeout,
                                              full, meta.get(LEASE_RETRY_KEY, 0))
            timeout += policy.queue_allowance(compat.slot_of(downloader, slot), key, timeout)
            provisional = not (full and user_timeout) and not policy.warm(key)
        elif user_timeout:
            timeout = user_timeout
        deadline = None if timeout is None else now + timeout
        entry = InFlightDownload(request, request_id(request), now, deadline, "queued", slot,
                                 timeout, key, provisional=provisional)
        if deadline is not None:
            meta[DEADLINE_KEY] = deadline
            meta["download_timeout"] = timeout
            self.count(ad_stats.DEADLINE_SET)
        self.inflight.add(entry)
        return entry

    def exceeded(self, entry: InFlightDownload, stage: str,
                 reason: str = "deadline exceeded") -> DeadlineExceeded:
        budget = None
        if stage == "transfer" and entry.transfer_started is not None:
            # A censored sample: this latency is at least the time it was given. A retry
            # that ran no longer than the slot's T tells nothing new (a hang retried).
            given = time.monotonic() - entry.transfer_started
            if (not entry.request.meta.get(RETRY_COUNT_KEY)
                    or given > 1.05 * self.timeouts_for(entry.key)[0]):
                self.latency.censor(entry.key, given)
            if entry.deadline is not None:
                budget = entry.deadline - entry.transfer_started
        self.inc(ad_stats.DEADLINE_EXCEEDED)
        self.inc(ad_stats.family(ad_stats.DEADLINE_EXCEEDED_STAGE, stage=stage))
        return DeadlineExceeded(entry.timeout, time.monotonic() - entry.started, stage, reason,
                                key=entry.key, budget=budget)

    def remove_from_slot_queue(self, entry: InFlightDownload) -> bool:
        """Fail a request still waiting in its downloader slot queue (safe: docs/internals.md)."""
        request = entry.request
        return compat.remove_queued(compat.downloader_of(self.crawler),
                                    request.meta.get("download_slot", entry.slot), request,
                                    entry.cancel_exc)

    def wants_proxy(self, request: Request) -> bool:
        return self.leasing.wants_proxy(request)

    # ------------------------------------------------------------------ the handler's part
    async def download(self, request: Request, handler: Any) -> Response:
        """Run ``handler.download_request(request)`` under the request's deadline and lease."""
        entry = self.inflight.get(request)
        if entry is None:  # the middleware is not installed: the deadline starts here
            entry = self.begin(request, None)
        leasing = self.leasing
        lease: Lease | None = None
        outcome = "exception"
        try:
            if entry.cancel_exc is not None:
                raise entry.cancel_exc
            if entry.deadline is not None and time.monotonic() >= entry.deadline:
                raise self.exceeded(entry, "queued")
            if leasing.pool is not None and leasing.wants_proxy(request):
                entry.stage = "lease_wait"
                lease = await leasing.acquire(entry, asyncio.get_running_loop())
                leasing.apply(request, lease.member)
                if entry.cancel_exc is not None:
                    raise entry.cancel_exc
            entry.stage = "transfer"
            entry.transfer_started = start = time.monotonic()
            if entry.deadline is not None:
                request.meta["download_timeout"] = (max(0.001, entry.deadline - start)
                                                    + _INNER_TIMEOUT_MARGIN)
            response = await transfer(self, entry, handler, request)
            # A winning hedge's latency is its own: timed from the first copy's start it
            # would be at least the overdue threshold (p99 x LEND_AFTER), so p99, the
            # threshold and T would feed on each other and grow without bound.
            if entry.hedge == "won" and entry.hedge_started is not None:
                start = entry.hedge_started
            seconds = time.monotonic() - start
            if lease is not None and response.status in leasing.failure_codes:
                leasing.failed(lease.member)
            else:
                self.latency.record(entry.key, seconds)
                if lease is not None:
                    leasing.succeeded(lease.member, seconds)
            outcome = "response"
            return response
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            if lease is not None and (not isinstance(exc, DownloadCancelled)
                                      or isinstance(exc, DeadlineExceeded)):
                leasing.failed(lease.member)
            raise
        finally:
            if lease is not None:
                lease.release(outcome)
            if entry.lent is not None:
                self._unlend(entry)
            if entry.hedge is not None:
                self.hedging -= 1
            self.inflight.finish(request)

    def _expire(self, entry: InFlightDownload) -> None:
        """The transfer's deadline passed: wake its handler, which raises DeadlineExceeded."""
        if entry.waiting:
            entry.cancel_exc = self.exceeded(entry, "transfer")
            entry.wake()

    def _tighten(self, entry: InFlightDownload) -> None:
        """A deadline given while the slot was cold (DEADLINE_INITIAL, or the user's own
        timeout) becomes the slot's T from the transfer's start once the slot is warm: a
        request that hung among a slot's first ones would otherwise hold its slot, and end
        the crawl, up to INITIAL later than any other hang."""
        deadline = self.policy_state.tightened(entry)
        if deadline is None:
            return
        entry.provisional = False
        if entry.deadline is not None and deadline < entry.deadline:
            entry.deadline = entry.request.meta[DEADLINE_KEY] = deadline
            entry.timeout = deadline - entry.started
            self.count(ad_stats.DEADLINE_TIGHTENED)

    # ------------------------------------------------------------------ lending
    def _lend(self, entry: InFlightDownload) -> None:
        """An overdue transfer stops counting against CONCURRENT_REQUESTS (bounded, with the
        hedges running)."""
        downloader = compat.downloader_of(self.crawler)
        if downloader is None or self.lent + self.hedging >= self.lend_cap:
            return
        slot = compat.slot_of(downloader, entry.request.meta.get("download_slot", entry.slot))
        compat.lend(self.crawler, slot, 1)
        entry.lent = slot if slot is not None else True
        self.lent += 1
        self.lent_max = max(self.lent_max, self.lent)
        self.inc(ad_stats.DEADLINE_LENT)

    def _unlend(self, entry: InFlightDownload) -> None:
        slot, entry.lent = entry.lent, None
        compat.lend(self.crawler, None if slot is True else slot, -1)
        self.lent -= 1

    # ------------------------------------------------------------------ periodic check
    def _tick(self) -> None:
        try:
            self._check(time.monotonic())
        except Exception:  # noqa: BLE001 - the checker must keep running
            logger.exception("scrapy-antideadlock deadline check failed")
        if not self._closed:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.tick_interval, self._tick)

    def _check(self, now: float) -> None:
        """Cut what is past its deadline, lend what is overdue, forget what left."""
        if self._counts:
            self._flush_counts()
        downloader = None
        for entry in self.inflight.items():
            if entry.cancel_exc is not None:
                continue
            stage = entry.stage
            if entry.provisional and stage == "transfer":
                self._tighten(entry)
            if entry.deadline is not None and now >= entry.deadline and stage != "lease_wait":
                if stage == "transfer":
                    self._expire(entry)
                else:
                    self.inflight.cancel(entry.request, "deadline",
                                         exc=self.exceeded(entry, stage))
            elif stage == "queued":
                if now - entry.started > 1.0:
                    if downloader is None:
                        downloader = compat.downloader_of(self.crawler)
                    if compat.in_downloader(downloader, entry.request) is False:
                        self.inflight.finish(entry.request)  # left the downloader another way
            elif (stage == "transfer" and entry.transfer_started is not None
                  and (entry.lent is None and self.lend
                       or entry.hedge is None and self.hedge)
                  and now - entry.transfer_started > self.timeouts_for(entry.key)[1]):
                if entry.lent is None and self.lend:
                    self._lend(entry)
                # lent slots and hedges share one budget: at most LEND_MAX_FACTOR x
                # CONCURRENT_REQUESTS transfers in flight, hedges included
                if entry.hedge is None and self.hedge and self.lent + self.hedging < \
                        self.lend_cap and may_hedge(entry) and not self._paced(entry):
                    entry.hedge = "asked"
                    self.hedging += 1
                    if entry.task is not None:  # inline: no handler of ours waits to start it
                        start_copy(self, entry)
                    else:
                        entry.wake()
        pool = self.leasing.pool
        if pool is not None:
            pool.sweep(now)

    def _paced(self, entry: InFlightDownload) -> bool:
        """Whether the request's slot paces its requests (DOWNLOAD_DELAY, AutoThrottle): a
        hedge would not wait its turn, so such a slot is not hedged."""
        slot = compat.slot_of(self._downloader or compat.downloader_of(self.crawler),
                              entry.request.meta.get("download_slot", entry.slot))
        return compat.slot_delay(slot) > 0

    # ------------------------------------------------------------------ signals
    def spider_opened(self, spider: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._downloader = compat.downloader_of(self.crawler)
        self._ticker = self.loop.call_later(self.tick_interval, self._tick)
        from .preflight import preflight

        preflight(self)

    def spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        for entry in self.inflight.items():
            self.inflight.cancel(entry.request, "spider closed")
        self._flush_counts()
        stats = self.stats
        self.policy_state.write_stats(stats)
        if stats is not None:
            stats.set_value(ad_stats.DEADLINE_LENT_MAX, self.lent_max)
        self.leasing.close(stats)


def guard_for(crawler: Crawler) -> DownloadGuard:
    """The crawler's :class:`DownloadGuard`, created on first use."""
    return context_for(crawler).setdefault("guard", lambda: DownloadGuard(crawler))


def inflight_for(crawler: Crawler) -> InFlightTracker:
    """The crawler's :class:`InFlightTracker` (contract for the watchdog)."""
    return guard_for(crawler).inflight


def latency_for(crawler: Crawler) -> tuple[LatencyTracker, TimeoutPolicy]:
    """(latency tracker, timeout policy) used for deadlines, so the watchdog can adapt."""
    guard = guard_for(crawler)
    return guard.latency, guard.policy
