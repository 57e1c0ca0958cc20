"""Fleet mode: many scrapy-redis workers share proxy leases and lose no request.

- :class:`ReliableQueue` (``SCHEDULER_QUEUE_CLASS``) — scrapy-redis requests are leased
  to a worker, acknowledged when done, re-delivered when their worker dies.
- :mod:`.leases` — a Redis backend for :class:`~scrapy_antideadlock.primitives.LeasePool`
  (ANTIDEADLOCK_FLEET_REDIS_URL): capacity, cooldown and expiry shared by the fleet.
- :class:`FleetExtension` — heartbeat with the worker's health, read by
  ``python -m scrapy_antideadlock.fleet status``.

Redis (redis-py) and scrapy-redis are needed only when fleet mode is on; importing this
package imports neither.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FleetExtension", "ReliableQueue"]

_WHERE = {"ReliableQueue": "queue", "FleetExtension": "worker"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
