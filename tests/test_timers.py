"""timers.py: the one timer mechanism on the loop (later, every, soon)."""

from __future__ import annotations

import asyncio

from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.timers import every, later, soon


async def wait_for(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@deferred_f_from_coro_f
async def test_later_runs_once_and_cancel_stops_it(caplog) -> None:
    calls: list[str] = []
    timer = later(0.05, calls.append, "ran")
    cancelled = later(0.05, calls.append, "cancelled")
    cancelled.cancel()
    assert timer.active and not cancelled.active
    await wait_for(lambda: calls)
    await asyncio.sleep(0.1)
    assert calls == ["ran"] and not timer.active
    timer.cancel()  # safe after it ran

    ticks: list[int] = []
    repeating = every(0.02, lambda: ticks.append(1), now=True)
    assert ticks == [1]
    await wait_for(lambda: len(ticks) >= 3)
    repeating.stop()
    stopped_at = len(ticks)
    await asyncio.sleep(0.1)
    assert len(ticks) == stopped_at and not repeating.running

    def broken() -> None:
        ticks.append(1)
        raise RuntimeError("tick failed")

    failing = every(0.02, broken)
    await wait_for(lambda: not failing.running)  # logged, and stopped like LoopingCall
    assert "tick failed" in caplog.text and len(ticks) == stopped_at + 1


@deferred_f_from_coro_f
async def test_soon_runs_on_the_next_loop_turn_not_now() -> None:
    calls: list[int] = []
    soon(calls.append, 1)
    assert calls == []  # not synchronously
    await asyncio.sleep(0)  # one turn of the asyncio loop, no Twisted timer involved
    assert calls == [1]
