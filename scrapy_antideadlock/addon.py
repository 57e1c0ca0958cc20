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

from . import settings as ad_settings

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


# Components register themselves here (one line each, kept in priority order per setting).
COMPONENTS: list[Component] = [
    # ---- downloader (deadline + proxy leases) ----
    # ---- pipeline ----
    # ---- watchdog ----
]

# Functions that adjust settings beyond a dict entry (e.g. wrapping DOWNLOAD_HANDLERS).
CONFIGURERS: list[Callable[[Any], None]] = []


class Addon:
    """Enables every installed, switched-on component of scrapy-antideadlock."""

    def update_settings(self, settings: Any) -> None:
        ad_settings.validate_all(settings)
        if not ad_settings.get(settings, "ANTIDEADLOCK_ENABLED"):
            logger.info("scrapy-antideadlock add-on disabled by ANTIDEADLOCK_ENABLED")
            return
        for component in COMPONENTS:
            if not _wanted(component, settings):
                continue
            # The user's own entry (same class, any priority or None) wins.
            settings.setdefault_in_component_priority_dict(
                component.setting, load_object(component.path), component.priority)
        for configure in CONFIGURERS:
            configure(settings)


def _wanted(component: Component, settings: Any) -> bool:
    if not ad_settings.get(settings, component.switch):
        return False
    missing = [m for m in component.requires if importlib.util.find_spec(m) is None]
    if missing:
        logger.info("scrapy-antideadlock: %s not enabled (missing %s)", component.path,
                    ", ".join(missing))
        return False
    return component.when is None or bool(component.when(settings))
