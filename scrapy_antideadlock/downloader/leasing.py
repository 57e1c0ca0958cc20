"""Proxy leasing for the guard: a proxy slot is taken after the slot queue, never held
while queued, and its lease expires with the request's deadline (plus a grace).

:class:`ProxyLeasing` owns the crawler's proxy :class:`LeasePool` (registered in the
crawler's registry so the watchdog and preflight see it), puts the granted proxy in
``meta["proxy"]``, marks members failed or healthy, and writes the pool's close stats.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .. import metakeys
from .. import settings as ad_settings
from .. import stats as ad_stats
from ..exceptions import DownloadCancelled, ProxyLeaseTimeout
from ..primitives import LeasePool, LeaseTimeout, PoolClosed
from .proxies import ProxyEndpoint, parse_proxies

if TYPE_CHECKING:
    from scrapy import Request

    from ..primitives import Lease
    from .core import DownloadGuard
    from .inflight import InFlightDownload


class ProxyLeasing:
    """The proxy pool of one crawler (``pool`` is None without ANTIDEADLOCK_PROXY_LIST)."""

    def __init__(self, guard: DownloadGuard, p: Any) -> None:
        self.guard = guard
        self.pool: LeasePool | None = None
        self.endpoints: dict[str, ProxyEndpoint] = {}
        self.lease_timeout: float = p.lease_timeout
        self.lease_grace: float = p.lease_grace
        self.lease_retries: int = p.lease_retries
        self.failure_codes = frozenset(p.failure_codes)
        if p.enabled and p.list:
            self.endpoints, caps = parse_proxies(p.list, p.capacity)
            self.pool = LeasePool("proxy", caps, kind="proxy", cooldown_base=p.cooldown_base,
                                  cooldown_max=p.cooldown_max,
                                  backend=_fleet_backend(guard.crawler))

    def wants_proxy(self, request: Request) -> bool:
        meta = request.meta
        if self.pool is None:
            return False
        if meta.get(metakeys.NO_PROXY) or ("proxy" in meta and metakeys.PROXY_MARK not in meta):
            self.guard.inc(ad_stats.PROXY_SKIPPED)
            return False
        return request.url.startswith(("http://", "https://"))

    async def acquire(self, entry: InFlightDownload, loop: asyncio.AbstractEventLoop) -> Lease:
        """A proxy lease for ``entry``, bounded by its deadline and PROXY_LEASE_TIMEOUT."""
        guard, pool = self.guard, self.pool
        assert pool is not None
        now = time.monotonic()
        remaining = None if entry.deadline is None else max(0.0, entry.deadline - now)
        bound = self.lease_timeout if remaining is None else min(self.lease_timeout, remaining)
        life = guard.policy.maximum if remaining is None else remaining
        ttl = life + self.lease_grace

        def on_expire(_lease: Lease, entry: InFlightDownload = entry) -> None:
            guard.inflight.cancel(entry.request, "proxy lease expired", exc=guard.exceeded(
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

    def apply(self, request: Request, member: str) -> None:
        """Send ``request`` through proxy ``member`` (credentials only in the header)."""
        endpoint = self.endpoints[member]
        meta = request.meta
        meta["proxy"] = endpoint.url
        meta[metakeys.PROXY_MARK] = endpoint.name
        if endpoint.auth is not None:
            request.headers[b"Proxy-Authorization"] = endpoint.auth
            meta["_auth_proxy"] = endpoint.url
        else:
            request.headers.pop(b"Proxy-Authorization", None)
            meta.pop("_auth_proxy", None)

    def failed(self, member: str) -> None:
        assert self.pool is not None
        self.guard.inc(ad_stats.PROXY_FAILURES)
        self.pool.mark_failure(member)

    def succeeded(self, member: str, seconds: float) -> None:
        assert self.pool is not None
        self.guard.policy_state.proxy_latency.record(member, seconds)
        self.pool.mark_success(member)

    def close(self, stats: Any) -> None:
        """Release what is still held, close the pool, write its counters to ``stats``."""
        pool = self.pool
        if pool is None:
            return
        held = pool.holders()
        for lease in held:
            lease.release("spider_closed")
        pool.close()
        if stats is None:
            return
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


def _fleet_backend(crawler: Any) -> Any:
    """The fleet's Redis lease backend when ANTIDEADLOCK_FLEET_REDIS_URL is set, else None."""
    if not ad_settings.get(crawler.settings, "ANTIDEADLOCK_FLEET_REDIS_URL"):
        return None
    from ..fleet.leases import backend_for

    return backend_for(crawler, "proxy")
