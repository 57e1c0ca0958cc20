"""Find a Chromium to drive with Playwright: the system browser first, then Playwright's."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_ARGS", "chromium_launch_options", "find_chromium"]

#: Flags that make Chromium start reliably as root, headless, in a container, offline.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

_SYSTEM = ["/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser",
           "/snap/bin/chromium"]


def _executable(path: str | None) -> str | None:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


def find_chromium() -> str | None:
    """Path of a usable Chromium, or None.

    Order: ``ANTIDEADLOCK_TEST_CHROMIUM`` env, the system browser (Debian's real binary
    before its wrapper script), ``chromium``/``chromium-browser`` on PATH, then a
    browser installed by ``playwright install``.
    """
    for candidate in (os.environ.get("ANTIDEADLOCK_TEST_CHROMIUM"), *_SYSTEM,
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        found = _executable(candidate)
        if found:
            return found
    base = os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or str(Path.home() / ".cache/ms-playwright")
    patterns = ["chromium-*/chrome-linux*/chrome", "chromium_headless_shell-*/chrome-*/chrome*",
                "chromium-*/chrome-mac*/Chromium.app/Contents/MacOS/Chromium"]
    for pattern in patterns:
        for candidate in sorted(glob.glob(os.path.join(base, pattern)), reverse=True):
            found = _executable(candidate)
            if found:
                return found
    return None


def chromium_launch_options(headless: bool = True, **extra: Any) -> dict[str, Any]:
    """A ``PLAYWRIGHT_LAUNCH_OPTIONS`` dict for the Chromium :func:`find_chromium` found.

    Raises ``RuntimeError`` when there is none (install the ``chromium`` package).
    """
    path = find_chromium()
    if path is None:
        raise RuntimeError("no Chromium found: install the system 'chromium' package or run "
                           "'playwright install chromium', or set ANTIDEADLOCK_TEST_CHROMIUM")
    options: dict[str, Any] = {"executable_path": path, "headless": headless,
                               "args": list(CHROMIUM_ARGS)}
    options.update(extra)
    return options
