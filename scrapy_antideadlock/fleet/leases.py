"""Redis lease backend: a LeasePool's grants shared by every worker of a fleet.

Per member (proxy) ``m`` of pool ``p`` Redis holds:

- ``<prefix>:lease:<p>:<m>:h`` — sorted set fencing token → expiry (ms, Redis clock);
- ``<prefix>:lease:<p>:<m>:o`` — hash token → "<worker> <owner>" (for ``fleet status``);
- ``<prefix>:lease:<p>:<m>:cool`` — present while the member cools down (PX);
- ``<prefix>:lease:<p>:token`` — the fencing-token counter (INCR).

Each operation is one Lua script, so it is atomic: acquire purges expired grants,
skips cooling members, picks the least-loaded member under capacity and records a
fresh token in one step. Release and renew act on a token only, so a worker whose
grant expired (and whose slot another worker now holds) releases nothing but its own
dead token. A dead worker's grants simply reach their expiry. Time is Redis's own
clock (TIME), so workers' clocks never matter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .. import stats as ad_stats
from ..primitives import BackendUnavailable
from .link import FleetLink

logger = logging.getLogger(__name__)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_PURGE = """
local function purge(h, o, now)
  local dead = redis.call('ZRANGEBYSCORE', h, '-inf', now)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', h, '-inf', now)
    redis.call('HDEL', o, unpack(dead))
  end
end
"""

# KEYS: token counter, then (holders, owners, cool) per candidate.
# ARGV: owner, ttl ms, capacity per candidate. Returns {index (0-based), token} or nil.
ACQUIRE = _NOW + _PURGE + """
local best, bestload = nil, nil
local n = (#KEYS - 1) / 3
for i = 1, n do
  local h, o, c = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  purge(h, o, now)
  if redis.call('EXISTS', c) == 0 then
    local cap = tonumber(ARGV[2 + i])
    local used = redis.call('ZCARD', h)
    if used < cap and (best == nil or used / cap < bestload) then
      best, bestload = i, used / cap
    end
  end
end
if best == nil then return nil end
local token = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[3 * best - 1], now + tonumber(ARGV[2]), token)
redis.call('HSET', KEYS[3 * best], token, ARGV[1])
return {best - 1, token}
"""

# KEYS: holders, owners. ARGV: token. 1 released, -1 had expired (late), 0 unknown.
RELEASE = _NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if tonumber(score) <= now then return -1 end
return 1
"""

# KEYS: holders, owners. ARGV: token, ttl ms. 1 renewed, 0 expired or unknown.
RENEW = _NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
if tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: cool. ARGV: ms. Never shortens a longer cooldown set by another worker.
COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
local ms = tonumber(ARGV[1])
if left < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
"""


class RedisLeaseBackend:
    """:class:`~scrapy_antideadlock.primitives.LeaseBackend` over one Redis."""

    def __init__(self, link: FleetLink, pool: str, *, max_ttl: float = 300.0,
                 poll_interval: float = 0.05) -> None:
        self.link = link
        self.pool = pool
        self.max_ttl = max_ttl
        self.poll_interval = poll_interval
        client = link.client
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._cooldown = client.register_script(COOLDOWN)

    def __str__(self) -> str:
        return f"{self.link} ({'DOWN: local leases' if self.link.down else 'shared'})"

    def keys(self, member: str) -> tuple[str, str, str]:
        base = self.link.key("lease", self.pool, member)
        return f"{base}:h", f"{base}:o", f"{base}:cool"

    @property
    def token_key(self) -> str:
        return self.link.key("lease", self.pool, "token")

    def _ms(self, ttl: float | None) -> int:
        return max(1, int(1000 * (self.max_ttl if ttl is None else min(ttl, self.max_ttl))))

    def acquire(self, candidates: Sequence[tuple[str, int]], owner: str,
                ttl: float | None) -> tuple[str, int] | None:
        keys = [self.token_key]
        for member, _ in candidates:
            keys.extend(self.keys(member))
        holder = f"{self.link.worker} {owner}"  # who, for `fleet status`
        args: list[Any] = [holder, self._ms(ttl), *(cap for _, cap in candidates)]
        try:
            got = self.link.call(self._acquire, keys=keys, args=args)
        except BackendUnavailable:
            self.link._inc(ad_stats.FLEET_LOCAL_GRANTS)
            raise
        if got is None:
            return None
        return candidates[int(got[0])][0], int(got[1])

    def release(self, member: str, token: int) -> bool:
        h, o, _ = self.keys(member)
        result = int(self.link.call(self._release, keys=[h, o], args=[token]))
        if result != 1:
            self.link._inc(ad_stats.FLEET_LATE_RELEASES)
        return result == 1

    def renew(self, member: str, token: int, ttl: float | None) -> bool:
        h, o, _ = self.keys(member)
        ok = bool(self.link.call(self._renew, keys=[h, o], args=[token, self._ms(ttl)]))
        if not ok:
            self.link._inc(ad_stats.FLEET_RENEW_LOST)
        return ok

    def cooldown(self, member: str, seconds: float) -> None:
        self.link.call(self._cooldown, keys=[self.keys(member)[2]],
                       args=[max(1, int(seconds * 1000))])

    def clear_cooldown(self, member: str) -> None:
        self.link.call(self.link.client.delete, self.keys(member)[2])


def backend_for(crawler: Any, pool: str) -> RedisLeaseBackend | None:
    """The fleet backend for ``pool`` when ANTIDEADLOCK_FLEET_REDIS_URL is set, else None.

    The crawler's :class:`FleetLink` is shared by every fleet part of that crawler.
    """
    link = link_for(crawler)
    if link is None:
        return None
    from .. import settings as ad_settings

    conf = ad_settings.load(crawler.settings, "fleet")
    backend = RedisLeaseBackend(link, pool, max_ttl=conf.lease_max_ttl,
                                poll_interval=conf.poll_interval)
    if not link.ping():
        logger.error("antideadlock fleet: %s does not answer at start; %s leases are local "
                     "until it does", link, pool)
    return backend


def link_for(crawler: Any) -> FleetLink | None:
    """The crawler's fleet link (role ``fleet_link``), or None when fleet mode is off."""
    from ..context import context_for

    ctx = context_for(crawler)
    link = ctx.get("fleet_link")
    if link is None:
        link = FleetLink.from_settings(crawler.settings, getattr(crawler, "stats", None))
        if link is not None:
            ctx.put("fleet_link", link)
    return link
