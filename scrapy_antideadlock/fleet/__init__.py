"""Fleet mode: many scrapy-redis workers share proxy leases and lose no request.

- :mod:`.leases` — a Redis backend for :class:`~scrapy_antideadlock.primitives.LeasePool`
  (ANTIDEADLOCK_FLEET_REDIS_URL): capacity, cooldown and expiry shared by the fleet.
- :mod:`.link` — the worker's Redis connection: short timeouts, loud degradation.

Redis (redis-py) is needed only when fleet mode is on; importing this package does not
import it.
"""

from __future__ import annotations

__all__: list[str] = []
