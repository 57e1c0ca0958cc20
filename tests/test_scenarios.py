"""The scenario corpus: stalls in code the pack does not own, each a real spider run with
nothing but the ADDONS line (durations shortened; ``consent_wall`` and
``semaphore_hold_and_wait`` at the true defaults).

All scenarios run once, side by side in child processes (module fixture); each test then
checks one promise for every scenario: the class, the culprit, the bounded end, and that
nothing pending was lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scrapy_antideadlock.testing.scenarios import SCENARIOS, SHORT_SETTINGS
from scrapy_antideadlock.testing.scenarios.run import ScenarioRun, account, run_scenarios

NAMES = sorted(SCENARIOS)
STALLS = [n for n in NAMES if SCENARIOS[n].stall_class is not None]
# Default durations (settings.py) for the scenario run at the true defaults.
DEFAULT_GRACE, DEFAULT_CLOSE_DEADLINE = 30.0, 30.0
SLACK = 15.0  # process start, the ticks between steps, a loaded CI machine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: Any, pg_dsn: str, chromium: str) -> dict[str, ScenarioRun]:
    from scrapy_antideadlock.testing import FaultProxy

    proxy = FaultProxy().start()
    try:
        runs = run_scenarios(NAMES, tmp_path_factory.mktemp("corpus"), timeout=170,
                             pg_dsn=pg_dsn, chromium=chromium, proxy_url=proxy.url)
    finally:
        proxy.stop()
    return {run.scenario.name: run for run in runs}


def _explain(run: ScenarioRun) -> str:
    return f"{run.scenario.name}: rc={run.returncode}\n" + "\n".join(run.log.splitlines()[-40:])


@pytest.mark.parametrize("name", STALLS)
def test_class_and_culprit_are_named(corpus: dict[str, ScenarioRun], name: str) -> None:
    run = corpus[name]
    scenario = run.scenario
    first = run.first
    assert first is not None, _explain(run)
    assert first["class"] == scenario.stall_class, (first["evidence"], _explain(run))
    culprit = first["culprit"]
    assert culprit is not None and culprit["function"] == scenario.culprit, first["evidence"]
    assert Path(culprit["filename"]).name.endswith(".py") and culprit["lineno"] > 0
    assert culprit["code"], culprit
    assert f"culprit: {culprit['qualname']}" in run.log, "the log block names the culprit"
    if scenario.stall_class == "blocked_loop":
        assert first["since_progress"] >= 0 and first["loop"]["threshold"] == 2.0
    else:  # detected one window after the last progress (plus a tick on a loaded machine)
        assert first["window"] <= first["since_progress"] <= first["window"] + 5.0, first


def test_deadlocks_name_the_primitive(corpus: dict[str, ScenarioRun]) -> None:
    words = {"semaphore_hold_and_wait": "asyncio.Semaphore", "event_never_set": "asyncio.Event",
             "queue_join_dead_consumer": "asyncio.Queue", "future_from_later_callback": "Future",
             "deferred_lock_twice": "DeferredLock", "deferred_never_fires": "Deferred",
             "sticky_proxy_pg": "knot"}
    for name, word in words.items():
        evidence = " ".join(corpus[name].first["evidence"])
        assert word in evidence, (name, evidence)
    semaphore = corpus["semaphore_hold_and_wait"].first
    assert any(line.startswith("hold and wait: ") and "EnrichPipeline.process_item holds "
               "asyncio.Semaphore" in line for line in semaphore["evidence"])
    assert {u["stage"] for u in semaphore["units"]} >= {"pipeline",
                                                        "middleware:process_request"}


def test_true_defaults_use_the_adaptive_window(corpus: dict[str, ScenarioRun]) -> None:
    for name in ("consent_wall", "semaphore_hold_and_wait"):
        # the adaptive window, never configured: requests stuck in a middleware with a long
        # download deadline must not stretch it
        assert corpus[name].first["window"] < 30.0, (name, corpus[name].first["window"])
    first = corpus["consent_wall"].first
    assert any("dont_filter=True" in line for line in first["evidence"]), first["evidence"]


def test_idle_spider_is_not_a_stall(corpus: dict[str, ScenarioRun]) -> None:
    run = corpus["idle_waiting_for_urls"]
    assert run.returncode == 0 and run.first is None, _explain(run)
    assert "antideadlock health: idle" in run.log
    assert run.stats["_close_reason"] == "finished"
    assert len(run.items) == 2


@pytest.mark.parametrize("name", STALLS)
def test_the_crawl_ends_within_the_bound(corpus: dict[str, ScenarioRun], name: str) -> None:
    run = corpus[name]
    assert run.returncode is not None, f"still running at the timeout\n{_explain(run)}"
    if run.scenario.defaults:
        bound = DEFAULT_GRACE + DEFAULT_CLOSE_DEADLINE
    elif run.scenario.stall_class == "blocked_loop":
        bound = SHORT_SETTINGS["ANTIDEADLOCK_RECOVERY_BLOCKED_LOOP_EXIT_AFTER"]
    else:
        bound = (SHORT_SETTINGS["ANTIDEADLOCK_RECOVERY_GRACE"]
                 + SHORT_SETTINGS["ANTIDEADLOCK_RECOVERY_CLOSE_DEADLINE"])
    assert run.time_to_end is not None and run.time_to_end <= bound + SLACK, _explain(run)


@pytest.mark.parametrize("name", STALLS)
def test_nothing_pending_is_lost(corpus: dict[str, ScenarioRun], name: str) -> None:
    books = account(corpus[name])
    assert books.expected > 0
    assert not books.lost, (books, _explain(corpus[name]))
