"""Deadlock victim selection (pure): youngest holder, then hold-and-wait, then least loss."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scrapy import Request

from scrapy_antideadlock.lifecycle.tracker import Unit
from scrapy_antideadlock.lifecycle.victims import choose_victim


def unit(stage: str, age: float, url: str = "http://x/", **kw: Any) -> Unit:
    return Unit(Request(url), stage, f"proj.{stage}", time.monotonic() - age,
                cancel_fn=lambda u: True, task=object(), **kw)


@dataclass
class Seen:  # what the watchdog's diagnosis says about a unit
    task: Any
    holds: list[str] = field(default_factory=list)
    request: Any = None


def test_youngest_holder_is_the_victim() -> None:
    old, young, waiter = unit("pipeline", 9), unit("pipeline", 2), unit(
        "middleware:process_request", 1)
    stuck = [Seen(old.task, ["asyncio.Semaphore@1"]), Seen(young.task, ["asyncio.Semaphore@1"]),
             Seen(waiter.task)]
    victim = choose_victim([old, young, waiter], stuck)
    assert victim is not None and victim.unit is young and victim.kind == "holder"
    assert "youngest holder" in victim.why and "asyncio.Semaphore@1" in victim.why


def test_hold_and_wait_without_holder_evidence() -> None:
    plain = unit("middleware:process_request", 1)
    nested_old = unit("pipeline", 8, waits_on_download=True)
    nested_young = unit("pipeline", 3, waits_on_download=True)
    victim = choose_victim([plain, nested_old, nested_young])
    assert victim is not None and victim.unit is nested_young and victim.kind == "hold_and_wait"


def test_least_work_lost_when_nobody_holds_anything() -> None:
    item, callback, request = unit("pipeline", 1), unit("callback", 1), unit(
        "middleware:process_request", 5)
    victim = choose_victim([item, callback, request])
    assert victim is not None and victim.unit is request and victim.kind == "least_loss"


def test_nothing_preemptible() -> None:
    done = unit("pipeline", 5)
    done.preempted = "already"
    assert choose_victim([done, unit("download", 5)]) is None
