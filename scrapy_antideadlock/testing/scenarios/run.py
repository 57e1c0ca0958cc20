"""Run scenarios in child processes side by side and collect what each left behind.

Each scenario gets its own fault site, working directory (so the journal, quarantine and
dead letters go to its own ``.scrapy/``), diagnosis file and items file. A child that does
not end within ``timeout`` is killed; the run still reports what it saw.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..harness import CrawlProcess, run_crawl_subprocess
from ..site import FaultSite
from . import SCENARIOS, SHORT_SETTINGS, Scenario

__all__ = ["Accounting", "ScenarioRun", "account", "run_scenarios"]

ADDONS = {"scrapy_antideadlock.Addon": 0}


@dataclass
class ScenarioRun:
    scenario: Scenario
    workdir: Path
    site: FaultSite
    started: float  # wall clock
    ended: float | None = None  # wall clock at exit (None: killed at the timeout)
    returncode: int | None = None
    process: CrawlProcess | None = None
    cleanup: Any = None

    @property
    def diagnoses(self) -> list[dict[str, Any]]:
        path = self.workdir / "diagnosis.json"
        return json.loads(path.read_text()) if path.exists() else []

    @property
    def first(self) -> dict[str, Any] | None:
        found = self.diagnoses
        return found[0] if found else None

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.process.items() if self.process is not None else []

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.process.stats() if self.process is not None else None

    @property
    def log(self) -> str:
        path = self.workdir / "items.jsonl.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def detected_at(self) -> float | None:
        """Wall clock of the last diagnosis (a recovered crawl may stall again)."""
        found = self.diagnoses
        if not found:
            return None
        return datetime.fromisoformat(found[-1]["detected_at"]).timestamp()

    @property
    def time_to_end(self) -> float | None:
        """Seconds from the last diagnosis to the process exit."""
        if self.ended is None or self.detected_at is None:
            return None
        return self.ended - self.detected_at


@dataclass
class Accounting:
    """Where every expected item went: stored, dead-lettered, or still pending on disk."""

    expected: int
    stored: set[str] = field(default_factory=set)
    dead_lettered: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)  # its request (or its listing) is on disk
    lost: list[str] = field(default_factory=list)


def _env(scenario: Scenario, workdir: Path, pg_dsn: str | None, chromium: str | None,
         proxy_url: str | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"ADDONS": ADDONS, "LOG_LEVEL": "INFO",
                                "ANTIDEADLOCK_WATCHDOG_DIAGNOSIS_FILE":
                                    str(workdir / "diagnosis.json")}
    if not scenario.defaults:
        settings.update(SHORT_SETTINGS)
    settings.update(scenario.settings)
    return {"settings": settings, "pg_dsn": pg_dsn, "chromium": chromium,
            "proxy_url": proxy_url, "workdir": workdir}


def start(scenario: Scenario, root: Path, *, pg_dsn: str | None = None,
          chromium: str | None = None, proxy_url: str | None = None) -> ScenarioRun:
    workdir = root / scenario.name
    workdir.mkdir(parents=True, exist_ok=True)
    site = FaultSite(**scenario.site).start()
    env = _env(scenario, workdir, pg_dsn, chromium, proxy_url)
    cleanup = scenario.prepare(site, env) if scenario.prepare is not None else None
    run = ScenarioRun(scenario, workdir, site, time.time(), cleanup=cleanup)
    run.process = run_crawl_subprocess(
        scenario.spider, env["settings"], items_path=workdir / "items.jsonl",
        spider_kwargs={"start_url": site.start_url}, cwd=workdir)
    return run


def run_scenarios(names: list[str], root: str | os.PathLike[str], *, timeout: float = 240,
                  pg_dsn: str | None = None, chromium: str | None = None,
                  proxy_url: str | None = None) -> list[ScenarioRun]:
    """Start every named scenario at once, wait for all (killing what outlives ``timeout``)."""
    runs = [start(SCENARIOS[name], Path(root), pg_dsn=pg_dsn, chromium=chromium,
                  proxy_url=proxy_url) for name in names]
    deadline = time.monotonic() + timeout
    try:
        while any(r.ended is None for r in runs) and time.monotonic() < deadline:
            for run in runs:
                if run.ended is None and run.process is not None \
                        and run.process.returncode is not None:
                    run.ended = time.time()
                    run.returncode = run.process.returncode
            time.sleep(0.1)
    finally:
        for run in runs:
            if run.process is not None and run.ended is None:
                _kill_group(run.process)
            if run.cleanup is not None:
                run.cleanup()
            run.site.stop()
    return runs


def account(run: ScenarioRun) -> Accounting:
    """Every key the site offers is stored, dead-lettered, or its request is pending on disk
    (journal, quarantine or exit file) — else it is lost."""
    from ...primitives.deadletter import read_dead_letters
    from ...primitives.journal import iter_urls, read_pending

    site = run.site
    keys = site.item_keys()
    out = Accounting(expected=len(keys))
    out.stored = {str(i.get("key")) for i in run.items}
    urls: set[str] = set()
    folders = {p.parent for name in ("journal.jsonl", "quarantine.jsonl", "deadletter.jsonl",
                                     "exit-pending.jsonl") for p in run.workdir.rglob(name)}
    for folder in folders:  # the journal's folder (by default under .scrapy/) and its files
        urls |= set(iter_urls(_safe(read_pending, folder)))
        for name in ("quarantine.jsonl", "exit-pending.jsonl"):
            urls |= {str(r.get("url") or r.get("u") or "")
                     for r in _safe(read_dead_letters, folder / name)}
        for record in _safe(read_dead_letters, folder / "deadletter.jsonl"):
            item = record.get("item") or {}
            out.dead_lettered.add(str(item.get("key") if isinstance(item, dict) else ""))
    paths = {u.split("://", 1)[-1].split("/", 1)[-1].split("#")[0].split("?")[0] for u in urls}
    pending_pages = sorted(int(p.rsplit("/", 1)[1]) for p in paths
                           if p.startswith("list/") and p.rsplit("/", 1)[1].isdigit())
    for key in keys:
        if f"item/{key}" in paths:
            out.pending.add(key)
    if pending_pages:  # a pending listing re-crawls its items and every later listing
        for n in range(pending_pages[0], site.pages):
            out.pending.update(site.keys_of_page(n))
    out.lost = [k for k in keys if k not in out.stored | out.dead_lettered | out.pending]
    return out


def _kill_group(process: CrawlProcess) -> None:
    """The child and what it started (a browser) share its session: end them all."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.popen.wait(5)


def _safe(fn: Any, path: Path) -> list[dict[str, Any]]:
    try:
        return list(fn(path))
    except (OSError, ValueError):
        return []
