"""How a diagnosis is shown: the log block, the health line, the JSON file, the stats."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from .. import stats as ad_stats
from ..primitives.registry import PoolSnapshot
from ..primitives.waitgraph import WaitGraph
from . import classes
from .diagnosis import Culprit, Diagnosis, StuckUnit

logger = logging.getLogger("scrapy_antideadlock.watchdog")

__all__ = ["count", "diagnosis", "health_numbers", "inflight_table", "pool_tables", "render", "render_health", "write_file"]


def pool_tables(snapshots: list[Any]) -> dict[str, Any]:
    """The registry's pools and their oldest holders, for the diagnosis."""
    holders = sorted(
        ({"pool": s.name, "kind": s.kind, "owner": h.owner, "member": h.member,
          "age": round(h.age, 3),
          "expires_in": None if h.expires_in is None else round(h.expires_in, 3)}
         for s in snapshots for h in s.holders), key=lambda h: -h["age"])[:10]
    pools = [{"name": s.name, "kind": s.kind, "capacity": s.capacity, "in_use": s.in_use,
              "waiters": len(s.waiters),
              "oldest_wait": round(max((w.waited for w in s.waiters), default=0.0), 3),
              **({"error": s.extra["error"]} if "error" in s.extra else {})}
             for s in snapshots]
    return {"oldest_holders": holders, "pools": pools}


def inflight_table(inflight: list[dict[str, Any]]) -> dict[str, Any]:
    return {"count": len(inflight), "oldest": [
        {**e, "age": round(e["age"], 3),
         "deadline_in": None if e["deadline_in"] is None else round(e["deadline_in"], 3)}
        for e in inflight[:10]]}


def render_health(h: dict[str, Any]) -> str:
    """One INFO line: state, progress, pending work, loop health, pools."""
    pools = ", ".join(f"{name} {used}/{cap}" + (f" w{waiting}" if waiting else "")
                      for name, used, cap, waiting in h["pools"]) or "none"
    beat = "n/a" if h["heartbeat_age"] is None else f"{h['heartbeat_age']:.2f}s"
    lag = "n/a" if h["lag_p99"] is None else f"{h['lag_p99'] * 1000:.0f}ms"
    return (f"antideadlock health: {h['state']} | items {h['items']} "
            f"(+{h['progress_in_window']:.0f} progress in {h['window']:.1f}s) | "
            f"in flight {h['in_flight']}/{h['concurrency']}, scheduled {h['scheduled']} | "
            f"heartbeat {beat}, lag p99 {lag} | pools: {pools} | "
            f"watchdog {'armed' if h['armed'] else 'off'} | interventions {h['interventions']}")


def render(d: Any) -> str:
    """The diagnosis (a :class:`Diagnosis` or its dict) as one multi-line log block."""
    if d["class"] == classes.BLOCKED_LOOP.name:
        head = f"event loop blocked (threshold {d['loop']['threshold']:.1f}s)" \
            if d.get("loop") and "threshold" in d["loop"] else "event loop blocked"
    else:
        head = f"no progress for {d['since_progress']:.1f}s (window {d['window']:.1f}s)"
    lines = [f"antideadlock watchdog: STALL #{d['episode']} class={d['class']} — {head}"]
    culprit = d.get("culprit")
    if culprit:
        code = f": {culprit['code']}" if culprit.get("code") else ""
        lines.append(f"  culprit: {culprit['qualname']} "
                     f"({os.path.basename(culprit['filename'])}:{culprit['lineno']}){code}")
    lines += [f"  evidence: {e}" for e in d["evidence"]]
    if d.get("cycle"):
        lines.append(f"  cycle: {d['cycle']}")
    graph = d.get("graph") or {}
    others = [c for c in (graph.get("cycles") or [])[1:] if len(c["owners"]) > 1]
    for extra in others[:2]:
        lines.append(f"  also:  {extra['text']}")
    if d.get("stack"):
        lines.append(f"  blocking call: {d.get('where')}")
        lines.append("  loop thread stack (innermost last):")
        lines += ["    " + line for line in d["stack"].rstrip().splitlines()[-24:]]
    lines += _holders(d.get("oldest_holders") or [])
    lines += _pools(d.get("pools") or [])
    flight = d.get("in_flight") or {"count": 0}
    if flight["count"]:
        oldest = flight["oldest"][0]
        lines.append(f"  in flight: {flight['count']} (oldest {oldest['age']:.1f}s "
                     f"[{oldest['stage']}]: {oldest['request']})")
    if d.get("awaiting") and not d.get("units"):  # the units' groups are in the evidence
        lines.append("  suspended tasks (where pending work awaits, innermost last):")
        for group in d["awaiting"][:4]:
            code = f"  | {group['code']}" if group["code"] else ""
            lines.append(f"    {group['count']}x {' → '.join(group['chain'])}{code}")
    if d.get("in_callbacks"):
        lines.append(f"  in callbacks/pipelines: {', '.join(d['in_callbacks'][:3])}"
                     + (" ..." if len(d["in_callbacks"]) > 3 else ""))
    pending = d.get("pending") or {}
    lines.append(f"  pending: {pending.get('in_progress', 0)} in progress, "
                 f"{pending.get('scheduled', 0)} scheduled, {pending.get('scraping', 0)} "
                 "in callbacks/pipelines")
    loop = d.get("loop")
    if loop:
        cpu = "n/a" if loop["cpu"] is None else f"{loop['cpu']:.0%}"
        lines.append(f"  loop: heartbeat {loop['heartbeat_age']:.2f}s ago, lag p99 "
                     f"{loop['lag_p99'] * 1000:.0f}ms, max {loop['lag_max'] * 1000:.0f}ms, "
                     f"loop CPU {cpu}")
    return "\n".join(lines)


def _holders(holders: list[dict[str, Any]]) -> list[str]:
    if not holders:
        return []
    lines = ["  oldest holders:"]
    for h in holders[:5]:
        member = f" [{h['member']}]" if h["member"] else ""
        expiry = "no expiry" if h["expires_in"] is None else f"expires in {h['expires_in']}s"
        lines.append(f"    {h['owner']} holds {h['kind']} {h['pool']!r}{member} for "
                     f"{h['age']:.1f}s ({expiry})")
    return lines


def _pools(pools: list[dict[str, Any]]) -> list[str]:
    if not pools:
        return []
    lines = ["  pools:  name                kind      cap  used  waiting  oldest_wait"]
    for p in pools:
        lines.append(f"          {p['name'][:18]:<18}  {p['kind'][:8]:<8}  {p['capacity']:>3}"
                     f"  {p['in_use']:>4}  {p['waiters']:>7}  {p['oldest_wait']:>10.1f}s")
    return lines


def count(stats: Any, diagnosis: Any, time_to_detect: float) -> None:
    """The stall's stats (one family per class)."""
    stall_class = diagnosis["class"]
    stats.inc_value(ad_stats.WATCHDOG_STALLS)
    stats.inc_value(ad_stats.family(ad_stats.WATCHDOG_STALLS_BY_CLASS, stall_class=stall_class))
    stats.set_value(ad_stats.WATCHDOG_LAST_CLASS, stall_class)
    stats.set_value(ad_stats.WATCHDOG_DETECT_SECONDS, round(time_to_detect, 3))
    stats.max_value(ad_stats.WATCHDOG_DETECT_SECONDS_MAX, round(time_to_detect, 3))
    if diagnosis.get("loop"):
        stats.max_value(ad_stats.WATCHDOG_LOOP_LAG_MAX, round(diagnosis["loop"]["lag_max"], 4))


def write_file(path: str | None, diagnoses: Iterable[Any]) -> None:
    """Every kept diagnosis as one JSON list, replaced atomically."""
    if not path:
        return
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        data = json.dumps([dict(d) for d in diagnoses], indent=1, default=str)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diagnosis-")
        with os.fdopen(fd, "w") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        logger.error("antideadlock watchdog: cannot write %s: %s", path, exc)


def diagnosis(wd: Any, stall_class: str, evidence: list[str], *, now: float, since: float,
              window: float, snapshots: list[PoolSnapshot], graph: WaitGraph | None,
              inflight: list[dict[str, Any]], pending: dict[str, Any],
              cpu: float | None, churn: float | None,
              block: dict[str, Any] | None = None,
              awaiting: list[dict[str, Any]] | None = None,
              culprit: Culprit | None = None,
              units: list[StuckUnit] | None = None,
              extra: dict[str, Any] | None = None) -> Diagnosis:
    """The :class:`Diagnosis` of one episode: the verdict plus every table behind it."""
    monitor = wd.monitor
    lag = monitor.lag_stats() if wd._monitor_started else None
    try:
        spider = getattr(wd.crawler, "spider", None)
    except RuntimeError:
        spider = None
    details = {
        "spider": getattr(spider, "name", None),
        "detected_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "monotonic": round(now, 3),  # time.monotonic() at detection (same-process timing)
        "graph": graph.to_dict() if graph is not None else None,
        "stack": block.get("stack") if block else None,
        "where": block.get("where") if block else None,
        "frames": block.get("frames") if block else None,
        **pool_tables(snapshots),
        "in_flight": inflight_table(inflight),
        "pending": pending,
        "in_callbacks": wd.probe.in_callbacks(),
        "awaiting": awaiting or [],
        "progress": {k.split(":", 1)[1]: v
                     for k, v in wd.meter.window_report(window, now).items()
                     if k.startswith("progress:")},
        "churn": churn,
        "loop": None if lag is None else {
            "heartbeat_age": round(monitor.heartbeat_age(), 3),
            "lag_p99": round(lag["p99"], 4), "lag_max": round(lag["max"], 4),
            "cpu": None if cpu is None else round(cpu, 3),
            "threshold": monitor.threshold},
        "concurrency": wd.concurrency,
        **(extra or {}),
    }
    cycle = graph.cycles[0].text if graph is not None and graph.cycles else None
    return Diagnosis(stall_class, wd.episodes + 1, window, since, evidence,
                     culprit=culprit, units=units or [], cycle=cycle, details=details)


def health_numbers(wd: Any) -> dict[str, Any]:
    """The numbers behind the watchdog's health line (also for /healthz)."""
    now = time.monotonic()
    pending = wd.pending()
    monitor = wd.monitor if wd._monitor_started else None
    lag = monitor.lag_stats() if monitor is not None else None
    return {
        "state": wd.state,
        "items": wd.stats.get_value("item_scraped_count", 0),
        "progress_in_window": wd.meter.progress_in(wd.window(), now),
        "in_flight": pending["downloading"], "concurrency": wd.concurrency,
        "scheduled": pending["scheduled"],
        "heartbeat_age": None if monitor is None else monitor.heartbeat_age(),
        "lag_p99": None if lag is None else lag["p99"],
        "pools": [(s.name, s.in_use, s.capacity, len(s.waiters))
                  for s in wd.registry.snapshot()],
        "window": wd.window(), "armed": monitor is not None and monitor.running,
        "interventions": wd.interventions,
    }
