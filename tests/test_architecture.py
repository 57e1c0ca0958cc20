"""The architecture rules a reader relies on, enforced (docs/internals.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scrapy_antideadlock"
MAX_LINES = 450  # "about 400"; settings.py and stats.py are declaration tables
_TABLES = {"settings.py", "stats.py"}

_PRIVATE = re.compile(
    r"\._slot\b|_process_queue|total_concurrency|scraper\.slot|\.nextcall\b|remove_request"
    r"|scrapy_playwright\._|\b_make_request_handler\b")


def _modules(*, include_testing: bool = False) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if include_testing or "testing" not in p.relative_to(PACKAGE).parts]


def _code_only(path: Path) -> str:
    """The module's source without docstrings and comments (they may name internals)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_private_scrapy_names_live_only_in_compat():
    """Reading or calling an internal happens in compat/ only. (The Playwright handler still
    overrides its parent's own methods, ``_download_request`` and friends: that is what a
    drop-in subclass is, and ``compat.playwright`` checks those names at start.)"""
    offenders = {}
    for path in _modules():
        if "compat" in path.relative_to(PACKAGE).parts:
            continue
        found = sorted(set(_PRIVATE.findall(_code_only(path))))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}


def test_no_module_level_per_crawler_state():
    """Per-crawler state lives in the crawler context, never in a module or class table."""
    offenders = []
    for path in _modules(include_testing=True):
        if path.name == "context.py":
            continue
        tree = ast.parse(path.read_text())
        scopes = [tree.body] + [n.body for n in tree.body if isinstance(n, ast.ClassDef)]
        for body in scopes:
            for node in body:
                if not isinstance(node, ast.Assign | ast.AnnAssign):
                    continue
                text = ast.unparse(node)
                if re.search(r"WeakKeyDictionary|WeakValueDictionary", text):
                    offenders.append(f"{path.relative_to(PACKAGE)}: {text[:80]}")
        # a table keyed by id(crawler) is the same thing with a shorter life
        offenders += [f"{path.relative_to(PACKAGE)}: id(crawler)" for _ in
                      re.findall(r"\bid\((?:self\.)?crawler\)", path.read_text())]
    assert offenders == []


def test_modules_stay_small():
    big = {str(p.relative_to(PACKAGE)): n for p in _modules()
           if p.name not in _TABLES and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_comments_point_only_into_the_repository():
    pattern = re.compile(r"FIELD-NOTES|DESIGN\.md|\bDESIGN\b|\bissue \d+|the seed'?s?\b")
    root = PACKAGE.parent
    hits = [f"{p.relative_to(root)}:{i}" for d in ("scrapy_antideadlock", "bench", "example_project")
            for p in sorted((root / d).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


_TIMERS = re.compile(r"\bcallLater\b|\bLoopingCall\b|\bcreate_looping_call\b|\bcall_later\b"
                     r"|\bthreading\.Timer\b|\bthreading\.Thread\(|\bTimer\(|\bThread\(")
#: Where a timer or a thread of its own is still allowed, and why.
_TIMER_HOMES = {
    "timers.py": "the one timer mechanism on the loop",
    "loopmonitor.py": "the one off-loop thread, and its heartbeat (it takes any asyncio loop)",
    "primitives": "asyncio primitives free of Scrapy and Twisted use loop.call_later",
    "downloader": "the guard's ticker: being reworked in the downloader, to move to timers.py",
    "testing": "the test bed's servers run on threads of their own",
}
#: Threads still outside the monitor, per module: the health HTTP server serves requests
#: (it watches nothing); the others are jobs still to move onto the monitor's thread.
_THREADS_LEFT = {
    "health.py": 1,  # the HTTP server's serve_forever: it serves requests, watches nothing
    "fleet/worker.py": 1,  # the fleet heartbeat: also runs where no asyncio loop (no monitor)
    "recovery/closing.py": 1,  # the exit deadline after the engine stopped (the monitor too)
}


def test_one_timer_mechanism_and_one_watching_thread():
    """Components schedule loop work through timers.py, and off-loop work on the loop
    monitor's thread; no module grows a timer or a thread of its own."""
    offenders = {}
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in _TIMER_HOMES:
            continue
        found = _TIMERS.findall(_code_only(path))
        if len(found) > _THREADS_LEFT.get(rel.as_posix(), 0) or (
                found and not all("Thread" in f or "Timer" in f for f in found)):
            offenders[rel.as_posix()] = found
    assert offenders == {}
