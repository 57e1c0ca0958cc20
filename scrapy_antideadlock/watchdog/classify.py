"""From evidence to a stall class: pure functions, testable without Scrapy or a loop.

The probe fills an :class:`Evidence`; :func:`classify` tries the classes in a fixed
order and returns a :class:`Verdict` (class, readable evidence lines, culprit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..primitives.waitgraph import WaitGraph
from . import classes
from .diagnosis import Culprit

__all__ = ["Evidence", "Thresholds", "Verdict", "classify"]


@dataclass(frozen=True)
class Thresholds:
    churn_min: float = 10
    cpu_busy: float = 0.5


@dataclass
class Evidence:
    """What the probe saw over the last window while no progress was made."""

    window: float
    churn: float = 0.0
    churn_by_name: dict[str, float] = field(default_factory=dict)
    cpu: float | None = None
    timeouts: float = 0.0
    requests_sent: float = 0.0
    graph: WaitGraph = field(default_factory=WaitGraph)
    inflight: list[dict[str, Any]] = field(default_factory=list)
    awaiting: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Verdict:
    stall_class: str
    evidence: list[str]
    culprit: Culprit | None = None


def classify(ev: Evidence, limits: Thresholds = Thresholds()) -> Verdict:
    """The stall class the evidence supports best, with the reasons."""
    window = ev.window
    cpu_text = "unknown" if ev.cpu is None else f"{ev.cpu:.0%} of a core"
    graph = ev.graph
    stuck = [e for e in ev.inflight
             if e["age"] >= window or (e["deadline_in"] is not None and e["deadline_in"] < 0)]
    lines: list[str] = []
    if graph.has_deadlock:
        stall_class = classes.DEADLOCK.name
        lines.append(f"{len(graph.deadlocked)} owners wait in a knot: each waits for a "
                     "pool whose every unit is held inside the knot")
        lines.append(f"loop alive, loop CPU {cpu_text}, churn {ev.churn:.0f} in window")
    elif ev.churn >= limits.churn_min and ev.timeouts * 2 >= ev.requests_sent > 0:
        # Busy, but what churns is requests timing out and being retried: a peer that
        # never answers, bounded by timeouts — the fix is the peer, not the retry loop.
        stall_class = classes.STALLED_IO.name
        lines.append(f"{ev.timeouts:.0f} downloads timed out in {window:.1f}s and were "
                     f"retried ({ev.requests_sent:.0f} requests sent), none answered")
        lines.append(f"loop alive, loop CPU {cpu_text}, churn {ev.churn:.0f}")
    elif ev.churn >= limits.churn_min or (ev.cpu is not None and ev.cpu >= limits.cpu_busy):
        stall_class = classes.LIVELOCK.name
        lines.append(f"loop alive and working: churn {ev.churn:.0f} events in {window:.1f}s "
                     f"(threshold {limits.churn_min:g}), loop CPU {cpu_text}, but no progress")
        lines.extend(f"{name} +{value:.0f}" for name, value in ev.churn_by_name.items()
                     if value > 0)
    elif graph.starved:
        stall_class = classes.DEADLOCK.name
        for starved in graph.starved:
            lines.append(f"pool {starved.pool!r} ({starved.kind}) exhausted "
                         f"({starved.capacity}), {len(starved.waiters)} waiting, and "
                         "every holder is itself waiting")
        lines.append(f"no cycle inside the registry: a wait outside it may close it; "
                     f"loop CPU {cpu_text}")
    elif stuck:
        stall_class = classes.STALLED_IO.name
        overdue = [e for e in stuck if e["deadline_in"] is not None and e["deadline_in"] < 0]
        lines.append(f"{len(stuck)} of {len(ev.inflight)} in-flight downloads got no answer "
                     f"within the window ({len(overdue)} past their deadline); "
                     "no wait-for cycle")
        lines.append(f"loop alive, loop CPU {cpu_text}, churn {ev.churn:.0f}")
    else:
        stall_class = classes.UNKNOWN.name
        lines.append("work is pending but nothing in the registry or the downloader "
                     "explains the wait (an un-instrumented await?)")
        lines.append(f"loop alive, loop CPU {cpu_text}, churn {ev.churn:.0f}")
    if stall_class == classes.UNKNOWN.name and ev.awaiting:
        top = ev.awaiting[0]
        lines.append(f"{top['count']} task(s) suspended in {top['at']}"
                     + (f": {top['code']}" if top["code"] else ""))
    return Verdict(stall_class, lines)
