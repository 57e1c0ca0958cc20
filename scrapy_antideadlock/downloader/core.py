"""Per-crawler state shared by the deadline middleware and the guarded download handler.

One :class:`DownloadGuard` per crawler holds the latency trackers, the timeout
policy, the proxy :class:`LeasePool` and the :class:`InFlightTracker`. The
middleware stamps each request with its deadline before the downloader slot
queue; the handler takes the proxy lease *after* the queue (so no lease is held
while queued), runs the transfer in its own task and turns a cancel or a missed
deadline into an ordinary exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy import signals
from twisted.python.failure import Failure

from .. import metakeys
from .. import settings as ad_settings
from .. import signals as ad_signals
from .. import stats as ad_stats
from ..compat import scrapy as compat
from ..context import context_for
from ..exceptions import DeadlineExceeded, DownloadCancelled, ProxyLeaseTimeout
from ..identity import describe, request_id
from ..primitives import (
    LatencyTracker,
    LeasePool,
    LeaseTimeout,
    PoolClosed,
    TimeoutPolicy,
)
from .proxies import ProxyEndpoint, parse_proxies

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

    from ..primitives import Lease

logger = logging.getLogger(__name__)

DEADLINE_KEY = metakeys.DEADLINE
USER_TIMEOUT_KEY = metakeys.USER_TIMEOUT
RETRY_COUNT_KEY = metakeys.DEADLINE_RETRIES
LEASE_RETRY_KEY = metakeys.LEASE_RETRIES
PROXY_MARK_KEY = metakeys.PROXY_MARK
NO_PROXY_KEY = metakeys.NO_PROXY
_INNER_TIMEOUT_MARGIN = 0.5  # the wrapped handler's own timer fires after ours
_TIMEOUT_CACHE_TTL = 0.5  # recompute a slot's deadline at most twice a second


@dataclass(eq=False)
class InFlightDownload:
    """A request between the deadline middleware and the end of its transfer."""

    request: Request
    owner: str
    started: float
    deadline: float | None
    stage: str  # "queued" | "lease_wait" | "transfer"
    slot: str = ""
    timeout: float | None = None
    key: str = ""  # latency key: the slot, or "<slot> [playwright]" for browser downloads
    transfer_started: float | None = None
    lease: Lease | None = None
    cancel_exc: DownloadCancelled | None = None
    waker: asyncio.Future[None] | None = None
    lent: Any = None  # the downloader slot whose concurrency this transfer lent, or True


class InFlightTracker:
    """Every request the pack is responsible for, and the way to cancel one of them."""

    def __init__(self, guard: DownloadGuard) -> None:
        self._guard = guard
        self._entries: dict[Request, InFlightDownload] = {}

    def items(self) -> list[InFlightDownload]:
        return list(self._entries.values())

    def get(self, request: Request) -> InFlightDownload | None:
        return self._entries.get(request)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: InFlightDownload) -> None:
        self._entries[entry.request] = entry

    def finish(self, request: Request) -> None:
        self._entries.pop(request, None)

    def overdue(self, now: float | None = None) -> list[InFlightDownload]:
        now = time.monotonic() if now is None else now
        return [e for e in self._entries.values() if e.deadline is not None and e.deadline <= now]

    def cancel_threadsafe(self, request: Request, reason: str, *, retry: bool = False) -> None:
        """:meth:`cancel` from another thread (e.g. the watchdog's monitor thread)."""
        loop = self._guard.loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: self.cancel(request, reason, retry=retry))

    def cancel(self, request: Request, reason: str, *, retry: bool = False,
               exc: DownloadCancelled | None = None) -> bool:
        """Cancel ``request``; it reaches process_exception/errback as ``DownloadCancelled``.

        Returns False if the request is not in flight (or is already cancelled). Call it
        on the crawler's event loop; from another thread use :meth:`cancel_threadsafe`.
        """
        entry = self._entries.get(request)
        if entry is None or entry.cancel_exc is not None:
            return False
        entry.cancel_exc = exc or DownloadCancelled(reason, stage=entry.stage, retry=retry)
        guard = self._guard
        guard.inc(ad_stats.DEADLINE_CANCELS)
        logger.debug("cancelling %s (%s): %s", describe(request), entry.stage, entry.cancel_exc)
        guard.crawler.signals.send_catch_log(ad_signals.download_cancelled, request=request,
                                             reason=str(entry.cancel_exc))
        if entry.waker is not None and not entry.waker.done():
            entry.waker.set_result(None)  # the handler wakes and raises cancel_exc
        elif entry.stage == "queued" and guard.remove_from_slot_queue(entry):
            self.finish(request)
        # else: still in a middleware after ours; the handler raises cancel_exc on arrival
        return True


class DownloadGuard:
    """Deadlines, proxy leases, in-flight tracking and concurrency lending of one crawler."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        settings = crawler.settings
        ad_settings.validate_all(settings)
        d = ad_settings.load(settings, "deadline")
        p = ad_settings.load(settings, "proxy")
        self.deadline_enabled: bool = d.enabled
        self.policy = TimeoutPolicy(d.multiplier, d.buffer, d.min, d.max, d.initial,
                                    d.min_samples)
        # Transfer time of successful responses only, per downloader slot (and per proxy):
        # waits for a lease or in the slot queue never enter it, so contention cannot
        # inflate p99 and the deadline cannot feed on its own waits.
        self.latency = LatencyTracker(d.window)
        self.proxy_latency = LatencyTracker(d.window)
        self.retry_priority_adjust: int = d.retry_priority_adjust
        self.retry_backoff: float = d.retry_backoff
        self.lend: bool = d.lend
        self.lend_after: float = d.lend_after
        self.lend_min: float = d.lend_min
        self.tick_interval: float = d.tick
        self.cancel_grace: float = d.cancel_grace
        self.base_concurrency = settings.getint("CONCURRENT_REQUESTS")
        self.lend_cap = int(self.base_concurrency * (d.lend_max_factor - 1))
        self.lent = 0
        self.lent_max = 0
        self.inflight = InFlightTracker(self)
        self.stats = crawler.stats
        self._timeouts: dict[str, tuple[float, float, float]] = {}
        self._ticker: asyncio.TimerHandle | None = None
        self._closed = False
        self.loop: asyncio.AbstractEventLoop | None = None

        self.pool: LeasePool | None = None
        self.endpoints: dict[str, ProxyEndpoint] = {}
        self.lease_timeout: float = p.lease_timeout
        self.lease_grace: float = p.lease_grace
        self.lease_retries: int = p.lease_retries
        self.failure_codes = frozenset(p.failure_codes)
        if p.enabled and p.list:
            self.endpoints, caps = parse_proxies(p.list, p.capacity)
            self.pool = LeasePool("proxy", caps, kind="proxy", cooldown_base=p.cooldown_base,
                                  cooldown_max=p.cooldown_max, backend=_fleet_backend(crawler))
            context_for(crawler).registry.register(self.pool)

        crawler.signals.connect(self.spider_opened, signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signals.spider_closed)

    # ------------------------------------------------------------------ helpers
    def inc(self, name: str, count: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc_value(name, count)

    @property
    def _downloader(self) -> Any:
        return getattr(_engine(self.crawler), "downloader", None)

    def timeouts_for(self, slot: str) -> tuple[float, float]:
        """(adaptive deadline T without its ceiling, overdue threshold for lending) of
        ``slot``, cached briefly."""
        now = time.monotonic()
        cached = self._timeouts.get(slot)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        timeout = self.policy.timeout(self.latency, slot, ceiling=float("inf"))
        lend_after = float("inf")  # no p99 yet: nothing is "clearly overdue"
        if self.latency.samples(slot) >= self.policy.min_samples:
            p99 = self.latency.quantile(slot, 0.99) or 0.0
            lend_after = max(self.lend_min, p99 * self.lend_after)
        self._timeouts[slot] = (now + _TIMEOUT_CACHE_TTL, timeout, lend_after)
        return timeout, lend_after

    # ------------------------------------------------------------------ the middleware's part
    def begin(self, request: Request, user_timeout: float | None,
              full: bool = False) -> InFlightDownload:
        """Give ``request`` its deadline (from now) and track it.

        ``user_timeout`` is the user's own timeout: the ceiling of the adaptive
        deadline (else DEADLINE_MAX) and its value until the slot is warm; ``full``
        gives the transfer that whole ceiling (the user's last allowed attempt).
        """
        now = time.monotonic()
        downloader = self._downloader
        slot = downloader.get_slot_key(request) if downloader is not None else ""
        # Browser renders and plain HTTP transfers of one site differ by orders of
        # magnitude: they get separate latency histories.
        key = f"{slot} [playwright]" if request.meta.get("playwright") else slot
        timeout: float | None = None
        if user_timeout:
            self.inc(ad_stats.DEADLINE_USER)
        if self.deadline_enabled:
            ceiling = user_timeout or self.policy.maximum
            if full and user_timeout:
                timeout = user_timeout
            else:
                timeout = self.timeouts_for(key)[0]
                if user_timeout and self.latency.samples(key) < self.policy.min_samples:
                    timeout = user_timeout  # not warm yet: the user's value, not INITIAL
                timeout = min(timeout, ceiling)
                retries = request.meta.get(RETRY_COUNT_KEY, 0)
                if retries:
                    timeout = min(timeout * self.retry_backoff ** retries, ceiling)
            timeout += self._queue_allowance(downloader, slot, key, timeout)
        elif user_timeout:
            timeout = user_timeout
        deadline = None if timeout is None else now + timeout
        entry = InFlightDownload(request, request_id(request), now, deadline, "queued", slot,
                                 timeout, key)
        if deadline is not None:
            request.meta[DEADLINE_KEY] = deadline
            request.meta["download_timeout"] = timeout
            self.inc(ad_stats.DEADLINE_SET)
        self.inflight.add(entry)
        return entry

    def _queue_allowance(self, downloader: Any, slot_key: str, key: str,
                         transfer: float) -> float:
        """Time the slot queue ahead of a new request will predictably take.

        With DOWNLOAD_DELAY a slot starts one request per delay; without, a queue of n
        drains in about n / concurrency transfer times. Capped at DEADLINE_MAX.
        """
        slot = downloader.slots.get(slot_key) if downloader is not None else None
        if slot is None or not slot.queue:
            return 0.0
        ahead = len(slot.queue)
        p50 = self.latency.quantile(key, 0.5) or transfer
        wait = ahead * slot.delay + ahead / max(1, slot.concurrency) * p50
        return min(wait, self.policy.maximum)

    def exceeded(self, entry: InFlightDownload, stage: str,
                 reason: str = "deadline exceeded") -> DeadlineExceeded:
        if (stage == "transfer" and entry.transfer_started is not None
                and not entry.request.meta.get(RETRY_COUNT_KEY)):
            # a censored sample: this latency is at least the time it was given
            self.latency.censor(entry.key, time.monotonic() - entry.transfer_started)
        self.inc(ad_stats.DEADLINE_EXCEEDED)
        self.inc(ad_stats.family(ad_stats.DEADLINE_EXCEEDED_STAGE, stage=stage))
        return DeadlineExceeded(entry.timeout, time.monotonic() - entry.started, stage, reason)

    def remove_from_slot_queue(self, entry: InFlightDownload) -> bool:
        """Fail a request still waiting in its downloader slot queue (safe: docs/internals.md)."""
        downloader = self._downloader
        if downloader is None:
            return False
        request = entry.request
        slot = downloader.slots.get(request.meta.get("download_slot", entry.slot))
        if slot is None:
            return False
        for pair in slot.queue:
            if pair[0] is request:
                slot.queue.remove(pair)
                pair[1].errback(Failure(entry.cancel_exc))
                return True
        return False

    # ------------------------------------------------------------------ the handler's part
    def wants_proxy(self, request: Request) -> bool:
        meta = request.meta
        if self.pool is None:
            return False
        if meta.get(NO_PROXY_KEY) or ("proxy" in meta and PROXY_MARK_KEY not in meta):
            self.inc(ad_stats.PROXY_SKIPPED)
            return False
        return request.url.startswith(("http://", "https://"))

    async def download(self, request: Request, handler: Any) -> Response:
        """Run ``handler.download_request(request)`` under the request's deadline and lease."""
        entry = self.inflight.get(request)
        if entry is None:  # the middleware is not installed: the deadline starts here
            entry = self.begin(request, None)
        loop = asyncio.get_running_loop()
        lease: Lease | None = None
        outcome = "exception"
        try:
            if entry.cancel_exc is not None:
                raise entry.cancel_exc
            if entry.deadline is not None and time.monotonic() >= entry.deadline:
                raise self.exceeded(entry, "queued")
            if self.wants_proxy(request):
                entry.stage = "lease_wait"
                lease = await self._acquire(entry, loop)
                self._apply_proxy(request, self.endpoints[lease.member])
                if entry.cancel_exc is not None:
                    raise entry.cancel_exc
            entry.stage = "transfer"
            entry.transfer_started = start = time.monotonic()
            if entry.deadline is not None:
                request.meta["download_timeout"] = (max(0.001, entry.deadline - start)
                                                    + _INNER_TIMEOUT_MARGIN)
            response = await self._transfer(entry, handler, request, loop)
            end = time.monotonic()
            if lease is not None and response.status in self.failure_codes:
                self._proxy_failed(lease.member)
            else:
                self.latency.record(entry.key, end - start)
                if lease is not None:
                    self.proxy_latency.record(lease.member, end - start)
                    self.pool.mark_success(lease.member)  # type: ignore[union-attr]
            outcome = "response"
            return response
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            if lease is not None and (not isinstance(exc, DownloadCancelled)
                                      or isinstance(exc, DeadlineExceeded)):
                self._proxy_failed(lease.member)
            raise
        finally:
            if lease is not None:
                lease.release(outcome)
            if entry.lent is not None:
                self._unlend(entry)
            self.inflight.finish(request)

    async def _acquire(self, entry: InFlightDownload, loop: asyncio.AbstractEventLoop) -> Lease:
        pool = self.pool
        assert pool is not None
        now = time.monotonic()
        remaining = None if entry.deadline is None else max(0.0, entry.deadline - now)
        bound = self.lease_timeout if remaining is None else min(self.lease_timeout, remaining)
        life = self.policy.maximum if remaining is None else remaining
        ttl = life + self.lease_grace

        def on_expire(_lease: Lease, entry: InFlightDownload = entry) -> None:
            self.inflight.cancel(entry.request, "proxy lease expired", exc=self.exceeded(
                entry, entry.stage, "proxy lease expired"))

        try:
            lease = pool.try_acquire(entry.owner, ttl=ttl, on_expire=on_expire)
        except PoolClosed:
            raise DownloadCancelled("spider closed", stage="lease_wait") from None
        if lease is None:
            acquiring = loop.create_task(pool.acquire(entry.owner, bound, ttl=ttl,
                                                      on_expire=on_expire))
            entry.waker = waker = loop.create_future()
            try:
                await asyncio.wait({acquiring, waker}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                acquiring.cancel()
                raise
            finally:
                entry.waker = None
            if not acquiring.done():  # cancelled while waiting
                acquiring.cancel()
                await asyncio.wait({acquiring}, timeout=1.0)
                assert entry.cancel_exc is not None
                raise entry.cancel_exc
            try:
                lease = acquiring.result()
            except LeaseTimeout as exc:
                raise ProxyLeaseTimeout(exc.waited, pool.name, entry.owner) from None
            except PoolClosed:
                raise DownloadCancelled("spider closed", stage="lease_wait") from None
            if entry.deadline is not None:  # the TTL counts from the grant, not the call
                pool.extend(lease, max(0.0, entry.deadline - time.monotonic())
                            + self.lease_grace)
        entry.lease = lease
        return lease

    @staticmethod
    def _apply_proxy(request: Request, endpoint: ProxyEndpoint) -> None:
        meta = request.meta
        meta["proxy"] = endpoint.url
        meta[PROXY_MARK_KEY] = endpoint.name
        if endpoint.auth is not None:
            request.headers[b"Proxy-Authorization"] = endpoint.auth
            meta["_auth_proxy"] = endpoint.url
        else:
            request.headers.pop(b"Proxy-Authorization", None)
            meta.pop("_auth_proxy", None)

    def _proxy_failed(self, member: str) -> None:
        assert self.pool is not None
        self.inc(ad_stats.PROXY_FAILURES)
        self.pool.mark_failure(member)

    async def _transfer(self, entry: InFlightDownload, handler: Any, request: Request,
                        loop: asyncio.AbstractEventLoop) -> Response:
        task = loop.create_task(handler.download_request(request))
        entry.waker = waker = loop.create_future()

        def wake(_: Any = None) -> None:
            if not waker.done():
                waker.set_result(None)

        task.add_done_callback(wake)
        timer = None
        if entry.deadline is not None:
            timer = loop.call_at(loop.time() + max(0.0, entry.deadline - time.monotonic()),
                                 wake)
        try:
            await waker  # the download finished, the deadline passed, or cancel() woke us
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_retrieve)
            raise
        finally:
            entry.waker = None
            if timer is not None:
                timer.cancel()
            task.remove_done_callback(wake)
        if task.done():
            return task.result()
        exc = entry.cancel_exc
        if exc is None:
            exc = entry.cancel_exc = self.exceeded(entry, "transfer")
        task.cancel()  # our own task: Scrapy's download task just sees exc below
        await asyncio.wait({task}, timeout=self.cancel_grace)
        task.add_done_callback(_retrieve)
        if not task.done():
            logger.warning("download of %s did not unwind %.1fs after cancel; abandoned",
                           describe(request), self.cancel_grace)
        raise exc

    # ------------------------------------------------------------------ lending
    def _lend(self, entry: InFlightDownload) -> None:
        """An overdue transfer stops counting against CONCURRENT_REQUESTS (bounded)."""
        downloader = self._downloader
        if downloader is None or self.lent >= self.lend_cap:
            return
        slot = downloader.slots.get(entry.request.meta.get("download_slot", entry.slot))
        compat.lend_concurrency(downloader, 1)
        if slot is not None:
            slot.concurrency += 1
        entry.lent = slot if slot is not None else True
        self.lent += 1
        self.lent_max = max(self.lent_max, self.lent)
        self.inc(ad_stats.DEADLINE_LENT)
        _kick(self.crawler, slot)

    def _unlend(self, entry: InFlightDownload) -> None:
        slot, entry.lent = entry.lent, None
        downloader = self._downloader
        if downloader is not None:
            compat.lend_concurrency(downloader, -1)
        if slot is not True:
            slot.concurrency -= 1
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
        active = getattr(self._downloader, "active", None)
        for entry in self.inflight.items():
            if entry.cancel_exc is not None:
                continue
            if entry.stage == "queued":
                if entry.deadline is not None and now >= entry.deadline:
                    self.inflight.cancel(entry.request, "deadline",
                                         exc=self.exceeded(entry, "queued"))
                elif active is not None and entry.request not in active \
                        and now - entry.started > 1.0:
                    self.inflight.finish(entry.request)  # left the downloader another way
            elif (entry.stage == "transfer" and self.lend and entry.lent is None
                  and entry.transfer_started is not None
                  and now - entry.transfer_started > self.timeouts_for(entry.key)[1]):
                self._lend(entry)
        if self.pool is not None:
            self.pool.sweep(now)

    # ------------------------------------------------------------------ signals
    def spider_opened(self, spider: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._ticker = self.loop.call_later(self.tick_interval, self._tick)
        from .preflight import preflight

        preflight(self)

    def spider_closed(self, spider: Any = None, reason: str = "") -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        for entry in self.inflight.items():
            self.inflight.cancel(entry.request, "spider closed")
        stats = self.stats
        for slot in self.latency.keys():
            p99 = self.latency.quantile(slot, 0.99)
            name = _stat_key(str(slot))
            if p99 is not None and stats is not None:
                stats.set_value(ad_stats.family(ad_stats.DEADLINE_P99, slot=name), round(p99, 4))
                stats.set_value(ad_stats.family(ad_stats.DEADLINE_TIMEOUT, slot=name),
                                round(self.policy.timeout(self.latency, slot), 4))
        if stats is not None:
            stats.set_value(ad_stats.DEADLINE_LENT_MAX, self.lent_max)
        pool = self.pool
        if pool is None:
            return
        held = pool.holders()
        for lease in held:
            lease.release("spider_closed")
        pool.close()
        if stats is not None:
            c = pool.counters
            for name, value in ((ad_stats.PROXY_ACQUIRED, c.acquired),
                                (ad_stats.PROXY_RELEASED, c.released),
                                (ad_stats.PROXY_EXPIRED, c.expired),
                                (ad_stats.PROXY_WAIT_TIMEOUTS, c.wait_timeouts),
                                (ad_stats.PROXY_DOUBLE_RELEASES, c.double_releases),
                                (ad_stats.PROXY_COOLDOWNS, c.cooldowns),
                                (ad_stats.PROXY_MAX_WAIT, round(c.max_wait, 4)),
                                (ad_stats.PROXY_HELD_AT_CLOSE, len(held))):
                stats.set_value(name, value)


def _fleet_backend(crawler: Crawler) -> Any:
    """The fleet's Redis lease backend when ANTIDEADLOCK_FLEET_REDIS_URL is set, else None."""
    if not ad_settings.get(crawler.settings, "ANTIDEADLOCK_FLEET_REDIS_URL"):
        return None
    from ..fleet.leases import backend_for

    return backend_for(crawler, "proxy")


def _stat_key(slot: str) -> str:
    return slot.replace("/", "_") or "-"


def _kick(crawler: Crawler, slot: Any) -> None:
    """Let the engine and the slot use a lent unit now, not at the next heartbeat (5 s)."""
    engine = _engine(crawler)
    compat.wake_engine(engine)
    compat.process_download_slot(engine, slot)


def _engine(crawler: Crawler) -> Any:
    """The engine, or None before the crawl started (Scrapy 2.19 raises then)."""
    try:
        return crawler.engine
    except (AttributeError, RuntimeError):
        return None


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


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
