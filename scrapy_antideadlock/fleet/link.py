"""One worker's Redis connection for the fleet: short timeouts, loud degradation.

Every fleet call runs on the event loop, so a Redis that does not answer must cost at
most ``FLEET_REDIS_TIMEOUT`` once, not once per request: after an error the link is
*down* for ``FLEET_RETRY_AFTER`` and calls fail at once with
:class:`~scrapy_antideadlock.primitives.BackendUnavailable` (callers then use local
leases or buffer their writes). With ``FLEET_REQUIRE_REDIS`` the error is raised as
:class:`FleetRedisRequired` instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import settings as ad_settings
from .. import stats as ad_stats
from ..identity import strip_credentials
from ..primitives import BackendUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean "Redis is not there right now" (not a bug in a script).
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
              redis.ReadOnlyError, OSError)


class FleetRedisRequired(RuntimeError):
    """Redis is unreachable and ANTIDEADLOCK_FLEET_REQUIRE_REDIS forbids degrading."""


def make_client(url: str, timeout: float, **extra: Any) -> redis.Redis:
    """A client that fails within ``timeout`` and never retries on its own."""
    extra = {k: v for k, v in extra.items() if v is not None}
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0, **extra)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class FleetLink:
    """A Redis client plus its up/down state, shared by a worker's fleet parts."""

    def __init__(self, url: str, *, prefix: str = "antideadlock", timeout: float = 0.5,
                 retry_after: float = 2.0, require: bool = False, stats: Any = None,
                 worker: str | None = None, **client_kwargs: Any) -> None:
        self.url = url
        self.prefix = prefix
        self.client = make_client(url, timeout, **client_kwargs)
        self.retry_after = retry_after
        self.require = require
        self.stats = stats
        self.worker = worker or default_worker_id()
        self._down_until = 0.0
        self._down_since: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, stats: Any = None) -> FleetLink | None:
        conf = ad_settings.load(settings, "fleet")
        if not conf.redis_url:
            return None
        return cls(conf.redis_url, prefix=conf.key_prefix, timeout=conf.redis_timeout,
                   retry_after=conf.retry_after, require=conf.require_redis, stats=stats,
                   worker=conf.worker_id)

    def __str__(self) -> str:
        return f"redis {strip_credentials(self.url)}"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _inc(self, name: str) -> None:
        if self.stats is not None:
            self.stats.inc_value(name)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args)`` against Redis; BackendUnavailable while down (FleetRedisRequired)."""
        if self._down_since is not None and time.monotonic() < self._down_until \
                and not self.require:
            raise BackendUnavailable(f"{self} unreachable (retrying soon)")
        self._inc(ad_stats.FLEET_REDIS_CALLS)
        try:
            result = fn(*args, **kwargs)
        except REDIS_DOWN as exc:
            self._failed(exc)
            raise AssertionError("unreachable") from exc  # _failed always raises
        if self._down_since is not None:
            with self._lock:
                since, self._down_since = self._down_since, None
            if since is not None:
                logger.warning("antideadlock fleet: %s answers again after %.1fs; fleet "
                               "leases and the shared queue are back", self,
                               time.monotonic() - since)
        return result

    def _failed(self, exc: BaseException) -> None:
        self._inc(ad_stats.FLEET_REDIS_ERRORS)
        if self.require:
            raise FleetRedisRequired(
                f"{self} unreachable ({type(exc).__name__}: {exc}) and "
                f"ANTIDEADLOCK_FLEET_REQUIRE_REDIS is set") from exc
        now = time.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            self._down_until = now + self.retry_after
        if first:
            self._inc(ad_stats.FLEET_DEGRADED)
            logger.error("antideadlock fleet: %s UNREACHABLE (%s: %s); DEGRADED to local "
                         "proxy leases (capacity no longer shared by the fleet) and buffered "
                         "queue writes; retrying every %.1fs", self, type(exc).__name__, exc,
                         self.retry_after)
        raise BackendUnavailable(f"{self} unreachable: {exc}") from exc

    def ping(self) -> bool:
        try:
            return bool(self.call(self.client.ping))
        except BackendUnavailable:
            return False
