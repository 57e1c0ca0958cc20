"""LoopMonitor: sees a blocked loop from its own thread, while the loop is still blocked."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.loopmonitor import LoopMonitor


def blocking_function_under_test(seconds: float) -> None:
    time.sleep(seconds)


@deferred_f_from_coro_f
async def test_blocked_loop_seen_while_blocked_with_the_blocking_stack(
        new_monitor_threads: Any) -> None:
    monitor = LoopMonitor(asyncio.get_running_loop(), interval=0.05, threshold=0.5)
    events: list[tuple[str, dict[str, Any], bool, float]] = []
    blocking = threading.Event()

    def on_blocked(info: dict[str, Any]) -> None:
        events.append(("blocked", info, blocking.is_set(), time.monotonic()))

    def on_unblocked(info: dict[str, Any]) -> None:
        events.append(("unblocked", info, blocking.is_set(), time.monotonic()))

    monitor.add_blocked_callback(on_blocked)
    monitor.add_unblocked_callback(on_unblocked)
    monitor.start()
    try:
        await asyncio.sleep(0.3)
        assert monitor.heartbeat_age() < 0.5 and not monitor.blocked
        blocking.set()
        started = time.monotonic()
        blocking_function_under_test(1.5)
        blocking.clear()
        await asyncio.sleep(0.4)
    finally:
        monitor.stop()
    kinds = [e[0] for e in events]
    assert kinds == ["blocked", "unblocked"], kinds
    _, info, during_block, at = events[0]
    assert during_block  # reported on the monitor thread while the loop was still blocked
    assert 0.5 - 0.05 <= at - started <= 0.5 + 0.5  # age counts from the last beat
    assert "blocking_function_under_test" in info["stack"]
    assert info["where"].startswith("blocking_function_under_test")
    assert info["frames"][-1]["function"] == "blocking_function_under_test"
    assert events[1][1]["blocked_for"] >= 1.2
    assert monitor.lag_stats()["max"] >= 1.2
    assert monitor.episodes == 1
    assert not new_monitor_threads()


@deferred_f_from_coro_f
async def test_one_report_per_episode_and_lag_stats() -> None:
    monitor = LoopMonitor(asyncio.get_running_loop(), interval=0.02, threshold=0.3)
    calls: list[float] = []
    monitor.add_blocked_callback(lambda info: calls.append(info["blocked_for"]))
    monitor.start()
    try:
        await asyncio.sleep(0.3)
        healthy = monitor.lag_stats()
        assert healthy["samples"] >= 5 and healthy["p99"] < 0.25
        blocking_function_under_test(1.0)  # one episode: one report, not one per poll
        await asyncio.sleep(0.2)
        blocking_function_under_test(0.5)  # a second episode
        await asyncio.sleep(0.2)
    finally:
        monitor.stop()
    assert len(calls) == 2 and monitor.episodes == 2
    assert monitor.longest_block >= 0.8


@deferred_f_from_coro_f
async def test_loop_thread_cpu_busy_versus_idle() -> None:
    monitor = LoopMonitor(asyncio.get_running_loop(), interval=0.05, threshold=1.0)
    monitor.start()
    try:
        await asyncio.sleep(0.8)
        idle = monitor.cpu_fraction(0.7)
        # Spin, yielding often (a busy but alive loop), until the loop thread really used
        # CPU: on a loaded 2-core box a runnable thread may get only a few % of a core, so
        # the spin lasts as long as it takes and its share is measured from this thread.
        wall0, cpu0 = time.monotonic(), time.thread_time()
        while (time.monotonic() - wall0 < 1.2 or time.thread_time() - cpu0 < 0.1) \
                and time.monotonic() - wall0 < 30:
            sum(range(2000))
            await asyncio.sleep(0)
        spun = time.monotonic() - wall0
        own = (time.thread_time() - cpu0) / spun  # the share the monitor should report
        await asyncio.sleep(0.06)
        busy = monitor.cpu_fraction(spun)
    finally:
        monitor.stop()
    assert idle is not None and busy is not None
    # The monitor's reading follows the thread's own CPU clock (its window may take in up
    # to two idle sampling periods around the spin), and tells busy from idle whatever
    # share of a core the machine gave the thread.
    assert 0.6 * own <= busy <= 1.2 * own + 0.02, (busy, own, spun)
    assert idle < 0.2 and busy > 5 * idle, (idle, busy, own)


def test_bad_arguments_and_stop_is_idempotent() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            LoopMonitor(loop, interval=1.0, threshold=0.5)
        monitor = LoopMonitor(loop, interval=0.1, threshold=1.0)
        monitor.stop()
        monitor.stop()
        assert not monitor.running and monitor.heartbeat_age() >= 0
    finally:
        loop.close()


@deferred_f_from_coro_f
async def test_jobs_run_on_the_monitor_thread_while_the_loop_is_blocked(
        caplog: Any, new_monitor_threads: Any) -> None:
    monitor = LoopMonitor(asyncio.get_running_loop(), interval=0.05, threshold=5.0)
    ticks: list[float] = []
    fired: list[float] = []
    failures: list[int] = []

    def broken() -> None:
        failures.append(1)
        raise RuntimeError("job failed")

    monitor.start()
    try:
        started = time.monotonic()
        monitor.add_periodic(0.1, lambda: ticks.append(time.monotonic()))
        monitor.add_periodic(0.1, broken, now=True)
        monitor.add_deadline(started + 0.5, fired.append, "deadline")
        monitor.add_deadline(started + 0.5, fired.append, "cancelled").cancel()
        blocking_function_under_test(1.5)  # the jobs go on while the loop is blocked
        blocked_ticks = [t for t in ticks if t < started + 1.5]
        assert fired == ["deadline"] and len(blocked_ticks) >= 3, (fired, ticks)
        assert len(failures) >= 3  # logged, and the job kept its schedule
        assert not monitor.blocked  # shorter than the threshold: no episode
    finally:
        monitor.stop()
    assert "job failed" in caplog.text
    assert not new_monitor_threads()
