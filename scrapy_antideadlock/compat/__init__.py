"""Every private Scrapy / scrapy-playwright name the pack uses, behind small named functions.

Nothing outside this package touches an underscore name of Scrapy or scrapy-playwright
(``tests/test_architecture.py`` enforces it). Each module here declares what it relies on with
:func:`require`; :func:`check` verifies all of it once at start (the add-on calls it), so a
Scrapy upgrade that moved an internal fails at start with a message naming it, instead of an
``AttributeError`` in the middle of a crawl. ``docs/internals.md`` lists each internal and why.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CompatError", "Requirement", "check", "require", "requirements"]

# compat modules whose requirements are checked at start (optional ones only when importable)
_MODULES = ("scrapy", "downloader", "engine", "lifecycle", "playwright")


class CompatError(RuntimeError):
    """An internal of Scrapy or scrapy-playwright the pack relies on has moved."""


@dataclass(frozen=True)
class Requirement:
    """One private name the pack relies on, and how to tell it is still there."""

    name: str  # e.g. "scrapy.core.engine._Slot.inprogress"
    used_for: str  # what breaks without it, in a user's words
    present: Callable[[], bool]
    optional_module: str | None = None  # checked only when this module is importable


_REQUIREMENTS: list[Requirement] = []


def require(name: str, used_for: str, present: Callable[[], bool],
            optional_module: str | None = None) -> None:
    """Declare an internal (called at import time by the compat modules)."""
    if all(r.name != name for r in _REQUIREMENTS):
        _REQUIREMENTS.append(Requirement(name, used_for, present, optional_module))


def requirements() -> list[Requirement]:
    """Every declared internal (imports every compat module first)."""
    for module in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise
    return list(_REQUIREMENTS)


def check() -> None:
    """Raise :class:`CompatError` naming every internal that is missing."""
    missing = []
    for req in requirements():
        if req.optional_module and req.optional_module not in sys.modules:
            # An optional dependency nobody imported (not configured): the component that
            # uses it checks its own internals when it is created (the Playwright handler
            # does). Importing it here would cost every crawl its memory and start-up time.
            continue
        try:
            ok = req.present()
        except Exception:  # a probe that cannot even run means the name moved
            ok = False
        if not ok:
            missing.append(f"{req.name} ({req.used_for})")
    if missing:
        raise CompatError(
            "scrapy-antideadlock: these Scrapy/scrapy-playwright internals moved in the "
            "installed versions: " + "; ".join(missing)
            + ". Install a supported version (see the package's requirements) or upgrade "
              "scrapy-antideadlock.")
