"""Wait-for graph over registry snapshots: who waits for what, held by whom (no Scrapy).

Owners are request ids. Owner A *waits for* owner B when A is a waiter of pool P,
P (or the member A asked for) has no free unit, and B holds a unit of it. Pools
hand out any free unit, so a cycle alone does not prove a deadlock (another holder
of P may still finish). The proof is a *knot*: a set of waiting owners in which
every owner waits for a pool whose units are all held inside the set — nobody in
it can ever be served. :func:`analyse` finds that set, renders one cycle inside it
as a readable path naming every pool on the way, and lists *starved* pools
(exhausted, with waiters, every holder itself waiting somewhere) as weaker evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .registry import PoolSnapshot

# (owner, the pool it holds a unit of) -> text, e.g. "item of request r2 (GET url)"
Label = Callable[[str, "PoolSnapshot | None"], str]

MAX_CYCLES = 8  # cycles rendered per analysis: enough to show the shape, bounded work


@dataclass(frozen=True)
class Edge:
    """``waiter`` waits for ``pool`` (``member`` if it asked for one) held by ``holder``."""

    waiter: str
    pool: str
    member: str
    holder: str
    holder_member: str


@dataclass
class Cycle:
    """Owners ``o0 -> o1 -> ... -> o0``; ``edges[i]`` is why ``owners[i]`` waits for the next."""

    owners: list[str]
    edges: list[Edge]
    text: str = ""

    @property
    def pools(self) -> list[str]:
        seen: list[str] = []
        for edge in self.edges:
            if edge.pool not in seen:
                seen.append(edge.pool)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {"owners": self.owners, "pools": self.pools, "text": self.text,
                "edges": [edge.__dict__ for edge in self.edges]}


@dataclass
class StarvedPool:
    """An exhausted pool with waiters whose every holder is itself waiting."""

    pool: str
    kind: str
    capacity: int
    waiters: list[str]
    holders: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WaitGraph:
    """Result of :func:`analyse`."""

    edges: list[Edge] = field(default_factory=list)
    deadlocked: list[str] = field(default_factory=list)  # owners in a knot
    cycles: list[Cycle] = field(default_factory=list)
    starved: list[StarvedPool] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # every owner waiting anywhere

    @property
    def has_deadlock(self) -> bool:
        return bool(self.deadlocked)

    def to_dict(self) -> dict[str, Any]:
        return {"deadlocked": self.deadlocked, "cycles": [c.to_dict() for c in self.cycles],
                "starved": [s.to_dict() for s in self.starved], "waiting": self.waiting,
                "edges": len(self.edges)}


def _free_units(snap: PoolSnapshot, member: str) -> int:
    """Free units of ``member`` (or of the whole pool); cooling-down members count as busy."""
    members = snap.extra.get("members") if isinstance(snap.extra, dict) else None
    if member and isinstance(members, dict) and member in members:
        info = members[member]
        if info.get("cooldown", 0) > 0:
            return 0
        return int(info.get("capacity", 0)) - int(info.get("in_use", 0))
    if isinstance(members, dict) and members and not member:
        free = 0
        for info in members.values():
            if info.get("cooldown", 0) <= 0:
                free += max(0, int(info.get("capacity", 0)) - int(info.get("in_use", 0)))
        return free
    return snap.capacity - snap.in_use


def build_edges(snapshots: Iterable[PoolSnapshot]) -> list[Edge]:
    """One edge per (waiter, holder) of every pool that cannot serve that waiter now."""
    edges: list[Edge] = []
    for snap in snapshots:
        if not snap.waiters or snap.capacity <= 0:
            continue
        for waiter in snap.waiters:
            if _free_units(snap, waiter.member) > 0:
                continue  # a unit is free: the waiter is about to be served
            for holder in snap.holders:
                if waiter.member and holder.member != waiter.member:
                    continue
                edges.append(Edge(waiter.owner, snap.name, waiter.member, holder.owner,
                                  holder.member))
    return edges


def _knot(snapshots: list[PoolSnapshot]) -> set[str]:
    """Greatest set S of waiting owners whose every wait is fully held inside S."""
    waits: dict[str, list[tuple[PoolSnapshot, str]]] = {}
    for snap in snapshots:
        for waiter in snap.waiters:
            waits.setdefault(waiter.owner, []).append((snap, waiter.member))
    deadlocked = set(waits)
    changed = True
    while changed:
        changed = False
        for owner in list(deadlocked):
            for snap, member in waits[owner]:
                holders = [h.owner for h in snap.holders
                           if not member or h.member == member]
                blocked = (snap.capacity > 0 and _free_units(snap, member) <= 0 and holders
                           and all(h in deadlocked for h in holders))
                if not blocked:
                    deadlocked.discard(owner)
                    changed = True
                    break
    return deadlocked


def _cycles(edges: list[Edge], within: set[str], limit: int) -> list[Cycle]:
    """Simple cycles among ``within`` (bounded DFS), most distinct pools first."""
    out_edges: dict[str, list[Edge]] = {}
    for edge in edges:
        if edge.waiter in within and edge.holder in within:
            out_edges.setdefault(edge.waiter, []).append(edge)
    found: list[Cycle] = []
    seen_keys: set[tuple[str, ...]] = set()
    budget = [5000]  # DFS steps: the graph of a crawl is small, but never explode

    def dfs(start: str, node: str, path: list[str], path_edges: list[Edge]) -> None:
        for edge in out_edges.get(node, ()):
            budget[0] -= 1
            if budget[0] <= 0 or len(found) >= limit * 4:
                return
            if edge.holder == start:
                owners = list(path)
                key = _rotation_key(owners, [e.pool for e in path_edges + [edge]])
                if key not in seen_keys:
                    seen_keys.add(key)
                    found.append(Cycle(owners, path_edges + [edge]))
            elif edge.holder not in path and edge.holder > start:
                path.append(edge.holder)
                path_edges.append(edge)
                dfs(start, edge.holder, path, path_edges)
                path.pop()
                path_edges.pop()

    for start in sorted(out_edges):
        dfs(start, start, [start], [])
    found.sort(key=lambda c: (-len(set(c.pools)), len(c.owners)))
    return found[:limit]


def _rotation_key(owners: list[str], pools: list[str]) -> tuple[str, ...]:
    pairs = list(zip(owners, pools, strict=True))
    best = min(range(len(pairs)), key=lambda i: pairs[i:] + pairs[:i])
    rotated = pairs[best:] + pairs[:best]
    return tuple(x for pair in rotated for x in pair)


def pool_label(snap: PoolSnapshot | None, name: str, member: str = "") -> str:
    kind = snap.kind if snap is not None else "pool"
    text = f"{kind} {name!r}" if kind != name else f"{kind} pool"
    if member:
        text += f" [{member}]"
    return text


def _default_label(owner: str, pool: PoolSnapshot | None) -> str:
    return f"request {owner}"


def render_cycle(cycle: Cycle, snapshots: dict[str, PoolSnapshot],
                 label: Label = _default_label) -> str:
    """``request A holds proxy p1 → waits for pg 'db' → held by request B → waits for ...``."""
    last = cycle.edges[-1]  # the last owner waits for what the first one holds
    held = snapshots.get(last.pool)
    first_holds = pool_label(held, last.pool, last.holder_member)
    parts = [f"{label(cycle.owners[0], held)} holds {first_holds}"]
    for i, edge in enumerate(cycle.edges):
        wanted = pool_label(snapshots.get(edge.pool), edge.pool, edge.member)
        parts.append(f"waits for {wanted}")
        nxt = label(cycle.owners[(i + 1) % len(cycle.owners)], snapshots.get(edge.pool))
        parts.append(f"held by {nxt}" + ("" if i + 1 < len(cycle.edges) else " (cycle)"))
    return " → ".join(parts)


def analyse(snapshots: Iterable[PoolSnapshot], label: Label = _default_label,
            max_cycles: int = MAX_CYCLES) -> WaitGraph:
    """Build the wait-for graph of ``snapshots`` and find knots, cycles and starved pools."""
    snaps = [s for s in snapshots if s.capacity > 0]
    by_name = {s.name: s for s in snaps}
    edges = build_edges(snaps)
    waiting = sorted({w.owner for s in snaps for w in s.waiters})
    knot = _knot(snaps)
    cycles = _cycles(edges, knot, max_cycles) if knot else []
    for cycle in cycles:
        cycle.text = render_cycle(cycle, by_name, label)
    waiting_set = set(waiting)
    starved = []
    for snap in snaps:
        if not snap.waiters or _free_units(snap, "") > 0 or not snap.holders:
            continue
        holders = sorted({h.owner for h in snap.holders})
        if all(h in waiting_set for h in holders):
            starved.append(StarvedPool(snap.name, snap.kind, snap.capacity,
                                       sorted({w.owner for w in snap.waiters}), holders))
    return WaitGraph(edges, sorted(knot), cycles, starved, waiting)
