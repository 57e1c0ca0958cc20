"""The scenario corpus: stalls in code the pack does not own, each a real spider.

Every scenario is a spider a project could have written (plain ``asyncio.Semaphore``,
``Event``, ``Queue``, Futures, Deferreds, a ``DeferredLock``, ``to_thread``, plain
psycopg, a Playwright callback), run with nothing but the ``ADDONS`` line (durations
shortened unless ``defaults``). :func:`.run.run_scenarios` runs them in child processes
side by side; ``tests/test_scenarios.py`` and ``python -m bench.diagnose`` use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCENARIOS", "SHORT_SETTINGS", "Scenario"]

#: Shortened durations (window, grace, close deadline, blocked-loop exit) for a lean corpus.
SHORT_SETTINGS: dict[str, Any] = {
    "ANTIDEADLOCK_WATCHDOG_WINDOW": 3.0,
    "ANTIDEADLOCK_WATCHDOG_BLOCKED_THRESHOLD": 2.0,
    "ANTIDEADLOCK_RECOVERY_GRACE": 3.0,
    "ANTIDEADLOCK_RECOVERY_CLOSE_DEADLINE": 5.0,
    "ANTIDEADLOCK_RECOVERY_BLOCKED_LOOP_EXIT_AFTER": 8.0,
}


@dataclass(frozen=True)
class Scenario:
    """One user-code stall: which spider, what the watchdog must call it, and whom it blames."""

    name: str
    spider: str  # "module:Class" under this package
    stall_class: str | None  # None: not a stall (the spider is idle on purpose)
    culprit: str  # the function the diagnosis must name
    story: str
    needs: tuple[str, ...] = ()  # "pg", "chromium", "proxy"
    site: dict[str, Any] = field(default_factory=lambda: {"pages": 2, "items_per_page": 10})
    settings: dict[str, Any] = field(default_factory=dict)
    defaults: bool = False  # run at the true default durations
    #: prepare(site, env) -> cleanup or None: faults on the site, an outside lock...
    prepare: Callable[[Any, dict[str, Any]], Callable[[], None] | None] | None = None


def _wall(site: Any, env: dict[str, Any]) -> None:
    from ..site import Fault
    from .livelock import wall_after

    site.add_fault(wall_after(8), Fault.status(200))


def _geo_hangs(site: Any, env: dict[str, Any]) -> None:
    from ..site import Fault

    site.add_fault("/geo/*", Fault.hang())
    env["settings"]["SCENARIO_SITE_URL"] = site.url("").rstrip("/")


def _row_locked(site: Any, env: dict[str, Any]) -> Callable[[], None]:
    from .blocking import lock_row

    holder = lock_row(env["pg_dsn"])
    env["settings"]["SCENARIO_PG_DSN"] = env["pg_dsn"]
    return holder.close


def _pools(site: Any, env: dict[str, Any]) -> None:
    env["settings"].update(SCENARIO_PG_DSN=env["pg_dsn"], SCENARIO_PROXY_URL=env["proxy_url"])


def _browser(site: Any, env: dict[str, Any]) -> None:
    from .browser import playwright_settings

    env["settings"].update(playwright_settings(env["chromium"]))


_M = __name__
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("semaphore_hold_and_wait", f"{_M}.locks:SemaphoreSpider", "deadlock",
             "process_item", "a pipeline holds a slot of the project's asyncio.Semaphore(2) "
             "while it downloads; a downloader middleware needs the same semaphore",
             defaults=True),
    Scenario("deferred_never_fires", f"{_M}.locks:DeferredSpider", "deadlock",
             "process_request", "a middleware's token refresh returns a Deferred that never "
             "fires, for every 10th request", site={"pages": 20, "items_per_page": 10}),
    Scenario("event_never_set", f"{_M}.locks:LoginSpider", "deadlock", "parse_item",
             "callbacks await an asyncio.Event set by the login callback; the login page "
             "answers 404"),
    Scenario("queue_join_dead_consumer", f"{_M}.locks:QueueSpider", "deadlock",
             "process_item", "a pipeline awaits asyncio.Queue.join() after its writer task "
             "died on a KeyError"),
    Scenario("future_from_later_callback", f"{_M}.locks:ReviewsSpider", "deadlock",
             "process_item", "a pipeline awaits a Future the reviews callback would set; the "
             "reviews request differs by #fragment only and is filtered as a duplicate"),
    Scenario("deferred_lock_twice", f"{_M}.locks:DeferredLockSpider", "deadlock",
             "refresh_session", "a middleware takes a Twisted DeferredLock, then takes it "
             "again in its session refresh"),
    Scenario("thread_pool_starved", f"{_M}.threads:GeocodeSpider", "starved", "geocode",
             "a pipeline geocodes with a blocking HTTP call without timeout in "
             "asyncio.to_thread; the geocoder never answers", prepare=_geo_hangs),
    Scenario("psycopg_row_lock", f"{_M}.blocking:PriceSpider", "blocked_loop",
             "process_item", "a pipeline runs a synchronous psycopg UPDATE on a row another "
             "session keeps locked", needs=("pg",), prepare=_row_locked),
    Scenario("consent_wall", f"{_M}.livelock:ConsentSpider", "livelock", "parse_item",
             "past the first products the site shows a consent wall; the callback re-requests "
             "the page with dont_filter for ever", defaults=True, prepare=_wall),
    Scenario("playwright_promise", f"{_M}.browser:PromiseSpider", "stalled_io", "parse_item",
             "a Playwright callback awaits a page promise that never resolves",
             needs=("chromium",), site={"pages": 1, "items_per_page": 4}, prepare=_browser,
             # the browser's start and first pages take seconds on a loaded machine
             settings={"ANTIDEADLOCK_WATCHDOG_WINDOW": 10.0}),
    Scenario("sticky_proxy_pg", f"{_M}.pools:StickySpider", "deadlock", "process_item",
             "sticky proxy sessions (registered pool, 2 slots) and a pipeline holding its "
             "one PostgreSQL connection across an enrichment download",
             needs=("pg", "proxy"), site={"pages": 1, "items_per_page": 6}, prepare=_pools),
    Scenario("idle_waiting_for_urls", f"{_M}.idle:WaitingForUrlsSpider", None, "",
             "not a stall: spider_idle raises DontCloseSpider while it waits for URLs",
             site={"pages": 1, "items_per_page": 2},
             settings={"SCENARIO_IDLE_FOR": 8.0, "ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL": 1.0}),
)}
