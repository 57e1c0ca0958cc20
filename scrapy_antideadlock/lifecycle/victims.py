"""Pick the one unit to abort when a diagnosis shows a deadlock, as a database does.

PostgreSQL's deadlock detector aborts one transaction of the cycle so the others go on.
Here the candidates are the units of work the lifecycle tracker can preempt, joined with
what the watchdog saw them hold (``holds``) and wait on. The rule, in order:

1. a unit that holds something others wait for, the youngest first (it has done the least
   work, and releasing what it holds is what unblocks the rest);
2. a component call that awaits a download inside itself (``engine.download_async`` in a
   pipeline or middleware): whatever it holds, it holds while waiting for crawl I/O,
   the classic hold-and-wait; the youngest first;
3. otherwise, the unit whose abort loses least: a request still in a downloader
   middleware (requeued, nothing lost) before a callback (its response is fetched again)
   before a pipeline item (dead-lettered); the youngest within a kind.

Pure functions: no Scrapy, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .tracker import Unit

__all__ = ["Victim", "choose_victim"]

_LOSS = {"middleware:process_request": 0, "middleware:process_response": 1,
         "middleware:process_exception": 1, "callback": 2, "pipeline": 3}


@dataclass(frozen=True)
class Victim:
    unit: Unit
    why: str
    #: "holder" or "hold_and_wait": aborting it frees what others wait for; "least_loss":
    #: nobody is known to hold anything (independent waits, not a cycle)
    kind: str = "holder"


def _holds_by_unit(units: Sequence[Unit], stuck: Iterable[Any]) -> dict[int, list[str]]:
    """What each of our units holds, from the diagnosis' units (matched by task or request)."""
    by_task = {id(unit.task): unit for unit in units if unit.task is not None}
    by_request: dict[int, list[Unit]] = {}
    for unit in units:
        if unit.request is not None:
            by_request.setdefault(id(unit.request), []).append(unit)
    holds: dict[int, list[str]] = {}
    for seen in stuck:
        held = list(getattr(seen, "holds", None) or [])
        if not held:
            continue
        task = getattr(seen, "task", None)
        matches = [by_task[id(task)]] if task is not None and id(task) in by_task else \
            by_request.get(id(getattr(seen, "request", None)), [])
        for unit in matches:
            holds.setdefault(id(unit), []).extend(held)
    return holds


def choose_victim(units: Sequence[Unit], stuck: Iterable[Any] = ()) -> Victim | None:
    """The unit to abort, and why (for the log); None if nothing can be preempted."""
    candidates = [u for u in units if u.preempted is None and u.cancel_fn is not None
                  and u.stage in _LOSS]
    if not candidates:
        return None
    holds = _holds_by_unit(candidates, stuck)
    holders = [u for u in candidates if id(u) in holds]
    if holders:
        unit = max(holders, key=lambda u: u.started)
        what = ", ".join(dict.fromkeys(holds[id(unit)]))
        others = len(holders) - 1
        return Victim(unit, f"youngest holder ({unit.age:.1f}s old) of {what}"
                      + (f"; {others} older holder(s) kept" if others else ""))
    waiting = [u for u in candidates if u.waits_on_download]
    if waiting:
        unit = max(waiting, key=lambda u: u.started)
        return Victim(unit, f"youngest of {len(waiting)} component call(s) that await a "
                      f"download inside {unit.component} (hold and wait)", "hold_and_wait")
    unit = min(candidates, key=lambda u: (_LOSS[u.stage], -u.started))
    return Victim(unit, f"no holder known; least work lost ({unit.stage}, "
                  f"youngest of {len(candidates)})", "least_loss")
