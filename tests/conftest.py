"""Shared test configuration: the test bed fixtures (fault site, proxy, PostgreSQL, Chromium)."""

import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

# Let `pytest` from a source checkout import the package without installing it first.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["scrapy_antideadlock.testing.pytest_plugin"]


def _loop_monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "antideadlock-loopmonitor"]


@pytest.fixture
def new_monitor_threads() -> Callable[[], list[threading.Thread]]:
    """Monitor threads started by this test and still alive: those alive before it
    (another test's in this xdist worker, say) are not its leaks."""
    earlier = set(_loop_monitor_threads())
    return lambda: [t for t in _loop_monitor_threads() if t not in earlier]
