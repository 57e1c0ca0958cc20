"""Primitives that know nothing of Scrapy, so they test in milliseconds."""

from .deadline import PRIOR, LatencyHistogram, LatencyTracker, TimeoutPolicy
from .lease import (
    BackendUnavailable,
    Lease,
    LeaseBackend,
    LeaseError,
    LeasePool,
    LeaseTimeout,
    PoolClosed,
    TooManyWaiters,
)
from .registry import HolderInfo, Pool, PoolSnapshot, Registry, WaiterInfo

__all__ = [
    "PRIOR", "BackendUnavailable", "HolderInfo", "LeaseBackend", "LatencyHistogram", "LatencyTracker", "Lease", "LeaseError", "LeasePool",
    "LeaseTimeout", "Pool", "PoolClosed", "PoolSnapshot", "Registry", "TimeoutPolicy",
    "TooManyWaiters", "WaiterInfo",
]
