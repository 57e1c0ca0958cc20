"""Prometheus metrics for ``GET /metrics`` on the health server (off-loop).

Built with ``prometheus_client`` (the ``metrics`` extra): a collector reads, at scrape
time, every ``antideadlock/*`` stat and the live gauges operators chart, and
``prometheus_client.generate_latest`` writes the exposition. Everything runs on the
health server's thread and reads only thread-safe state — the stats dict (copied),
the registry's pool snapshots, the in-flight tracker's size, the latency tracker
(locked), the loop monitor — so a scrape answers while the event loop is blocked.

Names: a stat ``antideadlock/pg/rows_upserted`` is the gauge
``antideadlock_pg_rows_upserted``; an instance of a declared family, e.g.
``antideadlock/deadline/exceeded/transfer`` of ``deadline/exceeded/{stage}``, is
``antideadlock_deadline_exceeded_by_stage{stage="transfer"}``. A text stat (e.g.
``watchdog/last_class``) is a gauge of 1 with the text as its ``value`` label.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import stats as ad_stats
from .context import context_for

__all__ = ["CONTENT_TYPE_LATEST", "MetricsCollector", "metric_name", "render"]

_PREFIX = "antideadlock/"
_RATE_WINDOW = 60.0  # items/min over the last minute
_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def _family_patterns() -> list[tuple[re.Pattern[str], str, list[str]]]:
    """(pattern, metric name, label names) for every declared ``{placeholder}`` family."""
    out = []
    for template in ad_stats.STATS:
        labels = _PLACEHOLDER.findall(template)
        if not labels:
            continue
        pattern = re.compile("".join(
            "([^/]+)" if i % 2 else re.escape(part)
            for i, part in enumerate(_PLACEHOLDER.split(template))) + "$")
        base = _PLACEHOLDER.sub("", template).replace("//", "/").rstrip("/")
        out.append((pattern, f"{_clean(base)}_by_{'_'.join(labels)}", labels))
    # longest template first: "a/b/{x}/c" before "a/b/{x}"
    out.sort(key=lambda entry: -len(entry[0].pattern))
    return out


def _clean(name: str) -> str:
    return _INVALID.sub("_", name.replace("/", "_"))


def metric_name(stat: str) -> tuple[str, dict[str, str]]:
    """The metric name and labels of stat ``stat`` (``antideadlock/...``)."""
    if stat not in ad_stats.STATS:
        for pattern, name, labels in _FAMILIES:
            match = pattern.match(stat)
            if match:
                return name, dict(zip(labels, match.groups(), strict=True))
    return _clean(stat), {}


class MetricsCollector:
    """A ``prometheus_client`` collector for one crawler; ``collect()`` runs per scrape."""

    def __init__(self, crawler: Any, health: Any = None) -> None:
        self.crawler = crawler
        self.health = health
        self._items: deque[tuple[float, float]] = deque()
        self._progress: tuple[float, float] | None = None  # (value, since) without a watchdog
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ------------------------------------------------------------------ sampling
    def sample(self, now: float | None = None) -> None:
        """Record the item count now (the health thread calls this every tick)."""
        now = time.monotonic() if now is None else now
        values = self._stats()
        items = float(values.get("item_scraped_count", 0) or 0)
        progress = items + float(values.get("item_dropped_count", 0) or 0)
        with self._lock:
            self._items.append((now, items))
            while len(self._items) > 2 and self._items[1][0] <= now - _RATE_WINDOW:
                self._items.popleft()
            if self._progress is None or progress != self._progress[0]:
                self._progress = (progress, now)

    def items_per_minute(self) -> float:
        with self._lock:
            if len(self._items) < 2:
                return 0.0
            (t0, i0), (t1, i1) = self._items[0], self._items[-1]
        return 0.0 if t1 <= t0 else (i1 - i0) / (t1 - t0) * 60.0

    def seconds_since_progress(self, now: float) -> float:
        watchdog = context_for(self.crawler).get("watchdog")
        meter = getattr(watchdog, "meter", None)
        if meter is not None:
            return max(0.0, float(meter.since_progress(now)))
        with self._lock:
            return 0.0 if self._progress is None else now - self._progress[1]

    # ------------------------------------------------------------------ collect
    def _stats(self) -> dict[str, Any]:
        stats = getattr(self.crawler, "stats", None)
        if stats is None:
            return {}
        for _ in range(5):  # the loop may add a key while we copy
            try:
                return dict(stats.get_stats())
            except RuntimeError:
                continue
        return {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        self.sample(now)
        yield from self._stat_metrics(self._stats())
        yield from self._live_metrics(now)

    def _stat_metrics(self, values: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
        families: dict[str, tuple[GaugeMetricFamily, list[str]]] = {}
        for stat, value in sorted(values.items()):
            if not stat.startswith(_PREFIX):
                continue
            name, labels = metric_name(stat)
            number = _number(value)
            if number is None:  # a text stat: 1, with the text as a label
                labels = {**labels, "value": str(value)}
                number = 1.0
            entry = families.get(name)
            if entry is None:
                help_text = ad_stats.STATS.get(stat) or f"scrapy stat {stat}"
                entry = families[name] = (
                    GaugeMetricFamily(name, help_text, labels=sorted(labels)), sorted(labels))
            family, names = entry
            if sorted(labels) != names:
                continue  # a family must keep one label set
            family.add_metric([labels[n] for n in names], number)
        for family, _ in families.values():
            yield family

    def _live_metrics(self, now: float) -> Iterator[GaugeMetricFamily]:
        ctx = context_for(self.crawler)
        guard = ctx.get("guard")
        yield _gauge("antideadlock_inflight_requests",
                     "Requests between the deadline middleware and the end of their transfer.",
                     len(guard.inflight) if guard is not None else 0)
        yield _gauge("antideadlock_lent_slots",
                     "Concurrency slots currently lent by overdue transfers.",
                     getattr(guard, "lent", 0) if guard is not None else 0)
        yield from self._pool_metrics(ctx)
        if guard is not None:
            deadline = GaugeMetricFamily("antideadlock_slot_deadline_seconds",
                                         "Current adaptive deadline per latency key (slot), "
                                         "before the user's ceiling and the queue allowance.",
                                         labels=["slot"])
            tracker, policy = guard.latency, guard.policy
            for key in list(tracker.keys())[:50]:
                deadline.add_metric([str(key)], policy.timeout(tracker, key))
            yield deadline
        yield _gauge("antideadlock_items_per_minute", "Items scraped per minute, last minute.",
                     self.items_per_minute())
        yield _gauge("antideadlock_seconds_since_progress",
                     "Seconds since the last progress (items, responses, rows).",
                     self.seconds_since_progress(now))
        yield from self._state_metrics(ctx)

    def _pool_metrics(self, ctx: Any) -> Iterator[GaugeMetricFamily]:
        help_texts = {"capacity": "Units of the pool.", "in_use": "Units held.",
                      "holders": "Leases held (one per holder).",
                      "waiters": "Owners waiting for a unit."}
        families = {what: GaugeMetricFamily(f"antideadlock_pool_{what}", text,
                                            labels=["pool", "kind"])
                    for what, text in help_texts.items()}
        for snap in ctx.registry.snapshot():
            labels = [snap.name, snap.kind]
            families["capacity"].add_metric(labels, snap.capacity)
            families["in_use"].add_metric(labels, snap.in_use)
            families["holders"].add_metric(labels, len(snap.holders))
            families["waiters"].add_metric(labels, len(snap.waiters))
        yield from families.values()

    def _state_metrics(self, ctx: Any) -> Iterator[GaugeMetricFamily]:
        health = self.health or ctx.get("health")
        watchdog = ctx.get("watchdog")
        if health is not None:
            status = health.status()
            state, healthy = str(status.get("state", "")), bool(status.get("healthy"))
            age = float(status.get("loop_heartbeat_age") or 0.0)
        else:
            state = str(getattr(watchdog, "state", "") or "off")
            healthy, age = not state.startswith("stalled"), 0.0
        stalled = state.startswith("stalled:")
        yield _gauge("antideadlock_healthy", "1 while the crawl is healthy (the /healthz view).",
                     1.0 if healthy else 0.0)
        yield _gauge("antideadlock_stalled", "1 while a stall (any class) is in progress.",
                     1.0 if stalled else 0.0)
        yield _gauge("antideadlock_loop_heartbeat_age_seconds",
                     "Seconds since the event loop last ran (large while it is blocked).", age)
        family = GaugeMetricFamily("antideadlock_watchdog_state",
                                   "1 for the current watchdog state (flowing, slow, idle, "
                                   "stalled:<class>, closing, ...).", labels=["state"])
        family.add_metric([state or "running"], 1.0)
        yield family
        stall = GaugeMetricFamily("antideadlock_stall_class",
                                  "1 for the class of the stall in progress (none when not "
                                  "stalled).", labels=["stall_class"])
        stall.add_metric([state[len("stalled:"):] if stalled else "none"], 1.0)
        yield stall


def render(collector: MetricsCollector) -> bytes:
    """The text exposition of one scrape."""
    return generate_latest(collector.registry)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


_FAMILIES = _family_patterns()
