"""``python -m scrapy_antideadlock.fleet status``: the fleet as Redis sees it, right now.

Reads only: the workers' heartbeat keys (health JSON), the lease sets of every pool and
member, and the reliable queues (pending, leased per worker, deliveries, quarantine).
A worker whose heartbeat key expired is shown as ``gone`` with the age of its last beat:
its leases and requests return within their TTL / visibility timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import redis

__all__ = ["collect", "main", "render"]


def _now_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def collect(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-able dict."""
    now = _now_ms(client)
    wall = time.time()
    workers: dict[str, dict[str, Any]] = {}
    for name, beat in client.zrange(f"{prefix}:workers", 0, -1, withscores=True):
        worker = _text(name)
        raw = client.get(f"{prefix}:worker:{worker}")
        health = json.loads(raw) if raw else None
        stats = (health or {}).get("stats", {})
        workers[worker] = {
            "state": (health or {}).get("state", "gone") if health else "gone",
            "healthy": (health or {}).get("healthy") if health else None,
            "last_beat_age": round(wall - beat / 1000, 1),
            "pid": (health or {}).get("pid"),
            "items": stats.get("item_scraped_count", (health or {}).get("items")),
            "stalls": stats.get("antideadlock/watchdog/stalls", 0),
            "leases": 0, "inflight": 0,
        }
    pools: dict[str, dict[str, Any]] = {}
    bases = {_text(key).rsplit(":", 1)[0] for pattern in ("h", "cool")
             for key in client.scan_iter(f"{prefix}:lease:*:{pattern}")}
    for base in sorted(bases):
        pool, _, member = base[len(prefix) + len(":lease:"):].partition(":")
        key = f"{base}:h"
        live = client.zrangebyscore(key, now, "+inf")
        owners = client.hmget(f"{base}:o", live) if live else []
        by_worker = Counter(_text(o).split(" ", 1)[0] for o in owners if o)
        for worker, count in by_worker.items():
            workers.setdefault(worker, {"state": "unknown", "leases": 0, "inflight": 0})
            workers[worker]["leases"] += count
        cool = client.pttl(f"{base}:cool")
        pools.setdefault(pool, {})[member] = {
            "held": len(live), "by_worker": dict(by_worker),
            "expired_unpurged": client.zcard(key) - len(live),
            "cooldown": round(cool / 1000, 1) if cool and cool > 0 else 0.0}
    queues: dict[str, dict[str, Any]] = {}
    for name in sorted(_text(q) for q in client.smembers(f"{prefix}:queues")):
        owners = Counter(_text(o) for o in client.hvals(f"{name}:owner"))
        for worker, count in owners.items():
            workers.setdefault(worker, {"state": "unknown", "leases": 0, "inflight": 0})
            workers[worker]["inflight"] += count
        deliveries = Counter(int(_text(n)) for n in client.hvals(f"{name}:deliveries"))
        overdue = client.zcount(f"{name}:processing", "-inf", now)
        quarantine = [json.loads(r) for r in client.hvals(f"{name}:quarantine")]
        queues[name] = {
            "pending": client.zcard(f"{name}:pending"),
            "leased": client.zcard(f"{name}:processing"),
            "overdue": overdue,  # leased past the visibility deadline: re-delivered next pop
            "leased_by_worker": dict(owners),
            "deliveries": {str(k): v for k, v in sorted(deliveries.items())},
            "quarantined": len(quarantine),
            "quarantine_reasons": dict(Counter(r.get("reason", "?") for r in quarantine)),
        }
    return {"prefix": prefix, "workers": workers, "leases": pools, "queues": queues}


def render(data: dict[str, Any]) -> str:
    """A few plain tables for a terminal."""
    lines = [f"fleet {data['prefix']}", "", "WORKERS"]
    lines.append(f"  {'worker':<34} {'state':<24} {'beat':>6} {'items':>7} {'inflight':>8} "
                 f"{'leases':>6} {'stalls':>6}")
    for name, w in sorted(data["workers"].items()):
        age = w.get("last_beat_age")
        lines.append(f"  {name:<34} {str(w.get('state')):<24} "
                     f"{'' if age is None else f'{age:.1f}s':>6} {str(w.get('items') or 0):>7} "
                     f"{w.get('inflight', 0):>8} {w.get('leases', 0):>6} "
                     f"{w.get('stalls', 0):>6}")
    if not data["workers"]:
        lines.append("  (none)")
    lines += ["", "LEASES"]
    for pool, members in sorted(data["leases"].items()):
        for member, m in sorted(members.items()):
            who = ", ".join(f"{k}={v}" for k, v in sorted(m["by_worker"].items())) or "-"
            cool = f"  cooldown {m['cooldown']:.1f}s" if m["cooldown"] else ""
            lines.append(f"  {pool}/{member}: {m['held']} held ({who}){cool}")
    if not data["leases"]:
        lines.append("  (none)")
    lines += ["", "QUEUES"]
    for name, q in sorted(data["queues"].items()):
        lines.append(f"  {name}: {q['pending']} pending, {q['leased']} leased "
                     f"({q['overdue']} overdue), {q['quarantined']} quarantined")
        if q["deliveries"]:
            lines.append("    deliveries: " + ", ".join(
                f"{k}x={v}" for k, v in q["deliveries"].items()))
        if q["quarantine_reasons"]:
            lines.append("    quarantine: " + ", ".join(
                f"{k}={v}" for k, v in q["quarantine_reasons"].items()))
    if not data["queues"]:
        lines.append("  (none)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scrapy_antideadlock.fleet",
                                     description="Show the fleet's workers, leases and queues.")
    parser.add_argument("command", choices=["status"])
    parser.add_argument("--url", default=os.environ.get("ANTIDEADLOCK_FLEET_REDIS_URL",
                                                        "redis://127.0.0.1:6379/0"),
                        help="Redis URL (default: $ANTIDEADLOCK_FLEET_REDIS_URL or local)")
    parser.add_argument("--prefix", default=os.environ.get("ANTIDEADLOCK_FLEET_KEY_PREFIX",
                                                           "antideadlock"),
                        help="ANTIDEADLOCK_FLEET_KEY_PREFIX of the fleet")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        data = collect(client, args.prefix)
    except redis.RedisError as exc:
        print(f"cannot read the fleet from Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else render(data))
    return 0
