"""Scrapy add-on: ``ADDONS = {"scrapy_antideadlock.Addon": 0}`` enables the whole pack.

Each component has its own on/off setting and is added at its documented priority
only if its optional dependency is installed (e.g. the pipeline needs psycopg) and
its switch is on. Settings are validated here first, so a bad value fails at start
naming the setting.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scrapy.utils.misc import load_object

from . import compat
from . import settings as ad_settings
from .reactor import (
    ASYNCIO_REACTOR,
    asyncio_reactor_configured,
    reactor_name,
    requirement_text,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Component:
    """One component the add-on can enable."""

    setting: str  # Scrapy dict setting it goes into, e.g. "DOWNLOADER_MIDDLEWARES"
    path: str  # import path of the class
    priority: int
    switch: str  # ANTIDEADLOCK_* boolean that turns it on/off
    requires: tuple[str, ...] = ()  # importable modules it needs
    when: Callable[[Any], bool] | None = None  # extra condition on the settings
    # ANTIDEADLOCK_* settings that, set by the user, mean "I want this component";
    # () = the component does not need the asyncio reactor.
    asyncio_for: tuple[str, ...] = ()


# Components register themselves here (one line each, kept in priority order per setting).
COMPONENTS: list[Component] = [
    # ---- downloader (deadline + proxy leases) ----
    # Before DownloadTimeoutMiddleware (350): it must see the user's own download_timeout.
    Component("DOWNLOADER_MIDDLEWARES", "scrapy_antideadlock.downloader.DeadlineMiddleware", 340,
              "ANTIDEADLOCK_ENABLED", (),
              lambda s: bool(ad_settings.get(s, "ANTIDEADLOCK_DEADLINE_ENABLED")
                             or ad_settings.get(s, "ANTIDEADLOCK_PROXY_LIST")),
              ("ANTIDEADLOCK_DEADLINE_ENABLED", "ANTIDEADLOCK_PROXY_LIST")),
    # ---- pipeline ----
    Component("ITEM_PIPELINES", "scrapy_antideadlock.pipeline.PostgresUpsertPipeline", 800,
              "ANTIDEADLOCK_PG_ENABLED", ("psycopg", "psycopg_pool"),
              lambda s: bool(ad_settings.get(s, "ANTIDEADLOCK_PG_DSN")),
              ("ANTIDEADLOCK_PG_DSN",)),
    # ---- watchdog ----
    Component("EXTENSIONS", "scrapy_antideadlock.watchdog.Watchdog", 100,
              "ANTIDEADLOCK_WATCHDOG_ENABLED", asyncio_for=("ANTIDEADLOCK_WATCHDOG_ENABLED",)),
    # ---- journal / health / recovery (watchdog part 2) ----
    Component("SPIDER_MIDDLEWARES", "scrapy_antideadlock.origin.ItemOriginMiddleware", 10,
              "ANTIDEADLOCK_ENABLED"),
    Component("EXTENSIONS", "scrapy_antideadlock.journal.RequestJournal", 110,
              "ANTIDEADLOCK_JOURNAL_ENABLED", asyncio_for=("ANTIDEADLOCK_JOURNAL_ENABLED",)),
    Component("EXTENSIONS", "scrapy_antideadlock.recovery.Recovery", 120,
              "ANTIDEADLOCK_ENABLED",
              when=lambda s: ad_settings.get(s, "ANTIDEADLOCK_RECOVERY_LEVEL") != "off",
              asyncio_for=("ANTIDEADLOCK_RECOVERY_LEVEL",)),
    # Below DeadlineMiddleware (340): process_exception reaches it after the deadline's.
    Component("DOWNLOADER_MIDDLEWARES", "scrapy_antideadlock.recovery.RecoveryMiddleware", 330,
              "ANTIDEADLOCK_ENABLED",
              when=lambda s: ad_settings.get(s, "ANTIDEADLOCK_RECOVERY_LEVEL") != "off",
              asyncio_for=("ANTIDEADLOCK_RECOVERY_LEVEL",)),
    Component("EXTENSIONS", "scrapy_antideadlock.health.HealthExtension", 130,
              "ANTIDEADLOCK_ENABLED",
              asyncio_for=("ANTIDEADLOCK_HEALTH_HTTP_PORT", "ANTIDEADLOCK_HEALTH_HEARTBEAT_FILE")),
    # ---- fleet ----
    Component("EXTENSIONS", "scrapy_antideadlock.fleet.worker.FleetExtension", 140,
              "ANTIDEADLOCK_ENABLED", ("redis",),
              lambda s: bool(ad_settings.get(s, "ANTIDEADLOCK_FLEET_REDIS_URL")),
              ("ANTIDEADLOCK_FLEET_REDIS_URL",)),
    # ---- lifecycle (preemption anywhere) ----
    # Closest to the engine (lowest number): its output wrapper sees every element last,
    # and its process_spider_exception is the last one asked.
    Component("SPIDER_MIDDLEWARES", "scrapy_antideadlock.lifecycle.LifecycleSpiderMiddleware",
              5, "ANTIDEADLOCK_LIFECYCLE_ENABLED",
              asyncio_for=("ANTIDEADLOCK_LIFECYCLE_ENABLED",)),
]

def _use_safe_playwright(settings: Any) -> None:
    """Swap scrapy-playwright's stock handler for the safe subclass, where configured."""
    if importlib.util.find_spec("scrapy_playwright") is None:
        return  # optional dependency not installed: nothing to swap
    if not any(_names_playwright(path) for path in settings["DOWNLOAD_HANDLERS"].values()):
        return  # no Playwright handler configured: importing Playwright would only cost
    from .playwright import configure_download_handlers

    configure_download_handlers(settings)


def _names_playwright(path: Any) -> bool:
    """Whether a DOWNLOAD_HANDLERS value is (or may be) scrapy-playwright's handler."""
    if path is None:
        return False
    name = path if isinstance(path, str) else getattr(path, "__module__", "")
    return name.startswith("scrapy_playwright")


def _wrap_download_handlers(settings: Any) -> None:
    """Put the guard (deadline + cancel) in front of every http/https handler."""
    from .downloader import configure_download_handlers

    configure_download_handlers(settings)


def _use_lifecycle_seams(settings: Any) -> None:
    """Track and preempt requests in middlewares and items in pipelines, unless the
    project has its own DOWNLOADER / ITEM_PROCESSOR (theirs win; logged)."""
    if not ad_settings.get(settings, "ANTIDEADLOCK_LIFECYCLE_ENABLED"):
        return
    from scrapy.settings import SETTINGS_PRIORITIES

    seams = {"DOWNLOADER": "scrapy_antideadlock.lifecycle.LifecycleDownloader",
             "ITEM_PROCESSOR": "scrapy_antideadlock.lifecycle.LifecycleItemProcessor"}
    for name, path in seams.items():
        if (settings.getpriority(name) or 0) > SETTINGS_PRIORITIES["default"]:
            logger.info("scrapy-antideadlock: %s is the project's own (%s); work stuck there "
                        "cannot be preempted", name, settings.get(name))
            continue
        settings.set(name, path, priority="addon")


# Functions that adjust settings beyond a dict entry. Order matters: the Playwright swap
# runs first, so the guard then wraps the safe handler.
CONFIGURERS: list[Callable[[Any], None]] = [_use_safe_playwright, _wrap_download_handlers,
                                            _use_lifecycle_seams]


class Addon:
    """Enables every installed, switched-on component of scrapy-antideadlock."""

    def update_settings(self, settings: Any) -> None:
        ad_settings.validate_all(settings)
        if not ad_settings.get(settings, "ANTIDEADLOCK_ENABLED"):
            logger.info("scrapy-antideadlock add-on disabled by ANTIDEADLOCK_ENABLED")
            return
        compat.check()  # an internal that moved fails here, naming it, not mid-crawl
        on_asyncio = asyncio_reactor_configured(settings)
        left_out = []
        for component in COMPONENTS:
            if not _wanted(component, settings):
                continue
            if component.asyncio_for and not on_asyncio:
                _refuse_if_asked(component, settings)
                left_out.append(component.path.rsplit(".", 1)[1])
                continue
            # The user's own entry (same class, any priority or None) wins.
            settings.setdefault_in_component_priority_dict(
                component.setting, load_object(component.path), component.priority)
        if not on_asyncio:
            # Without the deadline middleware nothing may wrap the download handlers.
            logger.warning("scrapy-antideadlock: left out %s, the crawl runs as plain Scrapy "
                           "would: %s", ", ".join(left_out) or "nothing",
                           requirement_text("they", settings))
            return
        for configure in CONFIGURERS:
            configure(settings)


def _refuse_if_asked(component: Component, settings: Any) -> None:
    """Fail at start when the user switched on a component that cannot run here."""
    for name in component.asyncio_for:
        if settings.get(name) is None:
            continue  # our default, not the user's choice
        value = ad_settings.get(settings, name)
        if value is not False and value not in ("off", {}, [], None):  # port 0 counts
            raise ad_settings.SettingError(
                "TWISTED_REACTOR", f'"{ASYNCIO_REACTOR}"', reactor_name(settings),
                f"{name} switches on {component.path}, which needs it")


def _wanted(component: Component, settings: Any) -> bool:
    if not ad_settings.get(settings, component.switch):
        return False
    missing = [m for m in component.requires if importlib.util.find_spec(m) is None]
    if missing:
        logger.info("scrapy-antideadlock: %s not enabled (missing %s)", component.path,
                    ", ".join(missing))
        return False
    return component.when is None or bool(component.when(settings))
