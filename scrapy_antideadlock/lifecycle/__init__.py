"""Lifecycle: where each request is in its life, preemption there, and deadlock victims."""

from .components import (
                         LifecycleDownloader,
                         LifecycleItemProcessor,
                         LifecycleSpiderMiddleware,
                         tracker_for,
)
from .tracker import STAGES, LifecycleTracker, Unit

__all__ = ["STAGES", "LifecycleDownloader", "LifecycleItemProcessor",
           "LifecycleSpiderMiddleware", "LifecycleTracker", "Unit", "tracker_for"]
