"""The machine and the code a benchmark run measured: versions, commit, load average.

Kept apart from bench/report.py (which runs the benchmarks and writes the report) so each
stays short; a leading underscore keeps it out of the benchmarks ``bench.report`` runs.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRTY = " + uncommitted changes"



def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _postgres_version() -> str:
    try:
        import psycopg

        from scrapy_antideadlock.testing.postgres import resolve_dsn

        dsn, cleanup = resolve_dsn(os.environ.get("ANTIDEADLOCK_TEST_PG_DSN") or None)
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                return str(row[0]) if row else "unknown"
        finally:
            cleanup()
    except Exception as exc:  # noqa: BLE001 - a description, never a failure
        return f"unknown ({type(exc).__name__})"


def _chromium_version() -> str:
    try:
        from scrapy_antideadlock.testing import find_chromium

        path = find_chromium()
        if path is None:
            return "not found"
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        return (out.stdout.strip() or out.stderr.strip().splitlines()[-1]) + f" ({path})"
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def git_commit() -> str:
    """The commit measured; changes to bench/results (this report's own output) don't count."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (DIRTY if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine(load_start: str, load_end: str, commit: str) -> list[tuple[str, str]]:
    return [
        ("date (UTC)", now()),
        ("CPU", f"{os.cpu_count()} × {_cpu_model()} (nproc {len(os.sched_getaffinity(0))})"),
        ("memory", _memory()),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", platform.python_version()),
        ("Scrapy", _version("scrapy")),
        ("Twisted", _version("twisted")),
        ("scrapy-playwright / playwright",
         f"{_version('scrapy-playwright')} / {_version('playwright')}"),
        ("psycopg / psycopg-pool", f"{_version('psycopg')} / {_version('psycopg-pool')}"),
        ("PostgreSQL server", _postgres_version()),
        ("Chromium", _chromium_version()),
        ("scrapy-antideadlock", f"{_version('scrapy-antideadlock')} (git {commit})"),
        ("load average (1/5/15 min) at start / end", f"{load_start} — {load_end}"),
    ]


def dirty(commit: str) -> bool:
    """Whether ``commit`` (as :func:`git_commit` wrote it) is a tree with uncommitted changes."""
    return commit.endswith(DIRTY)



#: What a results commit changes without changing the code measured: the results and
#: the Markdown blocks generated from them.
NOT_CODE = [":(exclude)bench/results", ":(exclude)*.md"]


@functools.cache
def same_code(a: str, b: str) -> bool:
    """Whether commits ``a`` and ``b`` hold the same code: equal, or differing only in
    bench results and Markdown (so committing a report does not orphan its logs). A tree
    with uncommitted changes is only ever itself."""
    if a == b:
        return True
    if dirty(a) or dirty(b) or "unknown" in (a, b):
        return False
    try:
        out = subprocess.run(["git", "diff", "--quiet", a, b, "--", ".", *NOT_CODE], cwd=ROOT,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0
