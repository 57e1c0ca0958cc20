"""Shared test configuration: the test bed fixtures (fault site, proxy, PostgreSQL, Chromium)."""

import sys
from pathlib import Path

# Let `pytest` from a source checkout import the package without installing it first.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["scrapy_antideadlock.testing.pytest_plugin"]
