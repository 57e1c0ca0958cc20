"""The README's settings and stats tables are generated from the code and must match it."""

from __future__ import annotations

import ast
import pathlib
import re

import scrapy_antideadlock
from scrapy_antideadlock import docs
from scrapy_antideadlock.settings import SETTINGS
from scrapy_antideadlock.stats import STATS, is_declared

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(scrapy_antideadlock.__file__).resolve().parent


def test_readme_tables_match_the_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert docs.render_readme(readme) == readme, (
        "README tables are stale: run `python -m scrapy_antideadlock.docs --write`")


def test_every_setting_named_in_code_is_defined():
    used = set()
    for path in PACKAGE.rglob("*.py"):
        used |= set(re.findall(r"ANTIDEADLOCK_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")))
    used = {name for name in used if not name.startswith("ANTIDEADLOCK_TEST_")}
    undefined = sorted(used - set(SETTINGS))
    assert not undefined, f"settings used in code but not defined in settings.py: {undefined}"


def test_every_stat_literal_in_code_is_declared():
    literals = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "stats.py":
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"antideadlock/[a-z_]+/[A-Za-z0-9_/{}.-]+", node.value):
                literals.add(node.value)
    undeclared = sorted(name for name in literals if not is_declared(name) and name not in STATS)
    assert not undeclared, f"stats used in code but not declared in stats.py: {undeclared}"


def test_every_setting_named_in_the_docs_exists():
    """A renamed setting must not live on in README.md or docs/ (users copy from there)."""
    stale = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names = set(re.findall(r"ANTIDEADLOCK_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")))
        bad = sorted(n for n in names if n not in SETTINGS
                     and not n.startswith("ANTIDEADLOCK_TEST_")
                     and n not in ("ANTIDEADLOCK_DEADLINE", "ANTIDEADLOCK_PROXY", "ANTIDEADLOCK_PG",
                                   "ANTIDEADLOCK_WATCHDOG", "ANTIDEADLOCK_RECOVERY",
                                   "ANTIDEADLOCK_JOURNAL", "ANTIDEADLOCK_HEALTH",
                                   "ANTIDEADLOCK_PLAYWRIGHT"))
        if bad:
            stale[path.name] = bad
    assert not stale, f"unknown settings named in docs: {stale}"
