"""From evidence to a stall class: pure functions, testable without Scrapy or a loop.

The probe fills an :class:`Evidence`; :func:`classify` tries the classes in a fixed
order and returns a :class:`Verdict` (class, readable evidence lines, culprit):

1. a knot in the pools' wait-for graph: ``deadlock``;
2. requests time out and are retried, none answered: ``stalled_io``;
3. a thread pool full of calls that do not return, with work waiting for it: ``starved``;
4. every pending unit asleep on an in-process primitive, nothing on the network: ``deadlock``
   (pages already scheduled may still be downloading before that: their churn is no livelock);
5. churn (requests, retries, lease grants) or a busy loop without progress: ``livelock``;
6. an exhausted pool whose every holder waits: ``deadlock``;
7. requests in the download handler past the window or their deadline: ``stalled_io``;
8. anything else: ``unknown``, with the same evidence.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..primitives.waitgraph import WaitGraph
from . import classes
from .diagnosis import Culprit, StuckUnit
from .threadpools import PoolState

__all__ = ["Evidence", "Thresholds", "Verdict", "classify"]

IN_PROCESS = ("primitive", "future", "deferred", "crawl")
NOT_ASLEEP = ("io", "thread", "library", "unknown")


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
    units: list[StuckUnit] = field(default_factory=list)
    transferring: int = 0
    pools: list[PoolState] = field(default_factory=list)
    # callbacks of the requests scheduled in the window: (culprit, requests, dont_filter ones)
    requesters: list[tuple[Culprit, int, int]] = field(default_factory=list)


@dataclass
class Verdict:
    stall_class: str
    evidence: list[str]
    culprit: Culprit | None = None


def classify(ev: Evidence, limits: Thresholds = Thresholds()) -> Verdict:
    """The stall class the evidence supports best, with the reasons."""
    for rule in (_knot, _timeouts, _starved, _asleep, _churn, _starved_pool, _stuck_io):
        verdict = rule(ev, limits)
        if verdict is not None:
            return verdict
    lines = ["work is pending but neither the pools, the network, the thread pools nor the "
             "suspended tasks explain the wait", _loop_line(ev)]
    lines += _group_lines(ev.units)
    if ev.awaiting and not ev.units:
        top = ev.awaiting[0]
        lines.append(f"{top['count']} task(s) suspended in {top['at']}"
                     + (f": {top['code']}" if top["code"] else ""))
    return Verdict(classes.UNKNOWN.name, lines, _main_culprit(ev.units))


# ---------------------------------------------------------------------- rules


def _knot(ev: Evidence, limits: Thresholds) -> Verdict | None:
    if not ev.graph.has_deadlock:
        return None
    lines = [f"{len(ev.graph.deadlocked)} owners wait in a knot: each waits for a pool whose "
             "every unit is held inside the knot", _loop_line(ev)]
    waits_for_crawl = [u for u in ev.units if u.wait_kind == "crawl"]
    return Verdict(classes.DEADLOCK.name, lines, _holder_culprit(ev.units)
                   or _main_culprit(waits_for_crawl) or _main_culprit(ev.units))


def _timeouts(ev: Evidence, limits: Thresholds) -> Verdict | None:
    # Busy, but what churns is requests timing out and being retried: a peer that never
    # answers, bounded by timeouts — the fix is the peer, not the retry loop.
    if not (ev.churn >= limits.churn_min and ev.timeouts * 2 >= ev.requests_sent > 0):
        return None
    lines = [f"{ev.timeouts:.0f} downloads timed out in {ev.window:.1f}s and were retried "
             f"({ev.requests_sent:.0f} requests sent), none answered", _loop_line(ev)]
    return Verdict(classes.STALLED_IO.name, lines)


def _churn(ev: Evidence, limits: Thresholds) -> Verdict | None:
    busy = ev.cpu is not None and ev.cpu >= limits.cpu_busy
    if ev.churn < limits.churn_min and not busy:
        return None
    lines = [f"loop alive and working: churn {ev.churn:.0f} events in {ev.window:.1f}s "
             f"(threshold {limits.churn_min:g}), loop CPU {_cpu(ev)}, but no items and no "
             "new distinct requests"]
    lines += [f"{name} +{value:.0f}" for name, value in ev.churn_by_name.items() if value > 0]
    culprit = None
    if ev.requesters:
        culprit, count, repeats = max(ev.requesters, key=lambda r: r[1])
        lines.append(f"{count} requests in the window came from {culprit.qualname} "
                     f"({repeats} with dont_filter=True): it re-requests pages without "
                     "yielding items")
    return Verdict(classes.LIVELOCK.name, lines, culprit)


def _starved(ev: Evidence, limits: Thresholds) -> Verdict | None:
    full = [p for p in ev.pools if p.full]
    waiting = [u for u in ev.units if u.wait_kind == "thread"]
    if not full or not (waiting or any(p.queued for p in full)):
        return None
    lines = []
    for pool in full:
        calls = Counter(str(c) for c in pool.calls)
        top = ", ".join(f"{n}x {call}" for call, n in calls.most_common(2))
        lines.append(f"{pool.name}: all {pool.size} workers busy, {pool.queued} call(s) "
                     f"queued behind them; busy in: {top or '?'}")
    lines.append(f"{len(waiting)} pending unit(s) wait for a thread-pool call; "
                 f"{ev.transferring} request(s) on the network")
    lines += _group_lines(waiting)
    culprit = next((p.calls[0] for p in full if p.calls), None) or _main_culprit(waiting)
    return Verdict(classes.STARVED.name, lines, culprit)


def _asleep(ev: Evidence, limits: Thresholds) -> Verdict | None:
    asleep = [u for u in ev.units if u.wait_kind in IN_PROCESS]
    awake = [u for u in ev.units if u.wait_kind in NOT_ASLEEP]
    if not asleep or awake or ev.transferring:
        return None
    lines = [f"all {len(asleep)} pending unit(s) are asleep on in-process primitives and no "
             "request is on the network (nothing can wake them)"]
    lines += _group_lines(asleep)
    holder = _holder_culprit(asleep)
    if holder is not None:
        held = next(u for u in asleep if u.culprit == holder)
        lines.append(f"hold and wait: {held.component} holds {', '.join(held.holds[:2])} "
                     f"while it waits for {held.waiting_on}")
    lines.append(_loop_line(ev))
    return Verdict(classes.DEADLOCK.name, lines, holder or _main_culprit(asleep))


def _starved_pool(ev: Evidence, limits: Thresholds) -> Verdict | None:
    if not ev.graph.starved:
        return None
    lines = [f"pool {s.pool!r} ({s.kind}) exhausted ({s.capacity}), {len(s.waiters)} waiting, "
             "and every holder is itself waiting" for s in ev.graph.starved]
    lines.append(f"no cycle inside the registry: a wait outside it may close it; "
                 f"loop CPU {_cpu(ev)}")
    return Verdict(classes.DEADLOCK.name, lines, _holder_culprit(ev.units))


def _stuck_io(ev: Evidence, limits: Thresholds) -> Verdict | None:
    stuck = [e for e in ev.inflight if e["stage"] == "transfer" and (
        e["age"] >= ev.window or (e["deadline_in"] is not None and e["deadline_in"] < 0))]
    io_units = [u for u in ev.units if u.wait_kind == "io"]
    if not stuck and not io_units:
        return None
    if stuck:
        overdue = [e for e in stuck if e["deadline_in"] is not None and e["deadline_in"] < 0]
        lines = [f"{len(stuck)} request(s) in the download handler got no answer within the "
                 f"window ({len(overdue)} past their deadline); no wait-for cycle"]
    else:
        lines = [f"{len(io_units)} unit(s) wait on I/O (a peer that does not answer) and nothing "
                 "progressed for the window"]
    lines += _group_lines([u for u in ev.units if u.wait_kind == "io"])
    lines.append(_loop_line(ev))
    return Verdict(classes.STALLED_IO.name, lines,
                   _main_culprit([u for u in ev.units if u.wait_kind == "io"]))


# ---------------------------------------------------------------------- helpers


def _cpu(ev: Evidence) -> str:
    return "unknown" if ev.cpu is None else f"{ev.cpu:.0%} of a core"


def _loop_line(ev: Evidence) -> str:
    return f"loop alive, loop CPU {_cpu(ev)}, churn {ev.churn:.0f} in window"


def _group_lines(units: list[StuckUnit], limit: int = 4) -> list[str]:
    groups = Counter((u.stage, u.component, u.waiting_on or "?") for u in units)
    return [f"{n}x [{stage}] {component} waits for {waiting}"
            for (stage, component, waiting), n in groups.most_common(limit)]


def _main_culprit(units: list[StuckUnit]) -> Culprit | None:
    """The innermost project frame shared by most units."""
    counts = Counter(u.culprit for u in units if u.culprit is not None)
    return counts.most_common(1)[0][0] if counts else None


def _holder_culprit(units: list[StuckUnit]) -> Culprit | None:
    """A unit that holds a primitive another unit waits on: the hold-and-wait side."""
    for unit in sorted(units[:200], key=lambda u: u.age):
        if unit.culprit is None or not unit.holds:
            continue
        waited = " ".join(u.waiting_on or "" for u in units[:200] if u is not unit)
        if any(h.split(" ", 1)[0] in waited for h in unit.holds):
            return unit.culprit
    return None
