"""Watchdog: sees the flatline, classifies it from evidence and names the cause.

A deadlocked crawl raises nothing: items/min drops to zero and the CPU goes idle.
The watchdog measures progress over a sliding window; when nothing moved for a
window while work is pending, it classifies the episode (:mod:`.classes`) and emits
one :class:`Diagnosis` (log block, JSON file, stats, ``stall_detected``).

- :mod:`.probe`: what the engine, the downloader and the loop say;
- :mod:`.classify`: pure functions from evidence to a class;
- :mod:`.report`: the log block, the health line, the JSON file, the stats;
- :mod:`.extension`: the Scrapy extension (timers, episodes, signals).

Escalation (cancel, requeue, close, exit) is recovery's job; it listens to the signals.
"""

from __future__ import annotations

from .classes import CLASSES as STALL_CLASS_REGISTRY
from .classes import STALL_CLASSES, StallClass
from .diagnosis import Culprit, Diagnosis, StuckUnit
from .extension import Watchdog, watchdog_for
from .report import render, render_health
from .tasks import suspended_tasks

#: Names of the stall classes (``idle`` is not one).
CLASSES = STALL_CLASSES

__all__ = ["CLASSES", "STALL_CLASS_REGISTRY", "Culprit", "Diagnosis", "StallClass", "StuckUnit",
           "Watchdog", "render", "render_health", "suspended_tasks", "watchdog_for"]
