"""Crawl harness: run a real Scrapy crawl in a test with an outer time bound.

:func:`run_crawl` runs in the test's reactor (pytest-twisted, asyncio reactor) and
works whether the test coroutine is driven by asyncio (Scrapy's
``deferred_f_from_coro_f``) or by Twisted (``pytest_twisted.ensureDeferred``). A crawl
that does not finish in time is left to stop in the background, so the test fails
fast with diagnostics instead of hanging CI.

:func:`run_crawl_subprocess` runs a crawl in a child process (for SIGKILL and restart
tests); see :mod:`scrapy_antideadlock.testing.runcrawl`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scrapy import Spider, signals
from scrapy.crawler import Crawler
from scrapy.utils.test import get_crawler
from twisted.internet.defer import Deferred

__all__ = ["CrawlProcess", "CrawlResult", "CrawlTimeout", "run_crawl", "run_crawl_subprocess",
           "sleep", "wait_until"]

#: Defaults merged under the caller's settings for every test crawl.
TEST_DEFAULTS: dict[str, Any] = {
    "TELNETCONSOLE_ENABLED": False,
    "REMOTE_CONTROL_ENABLED": False,
    "LOG_LEVEL": "INFO",
    "ROBOTSTXT_OBEY": False,
}


class CrawlTimeout(AssertionError):
    """A crawl did not finish within the test's bound; the message says what was in flight."""

    def __init__(self, message: str, result: CrawlResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class CrawlResult:
    """What a crawl produced. ``finished`` is False when the bound ran out first."""

    items: list[Any] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)
    errors: list[tuple[Any, str]] = field(default_factory=list)  # (item, failure text)
    spider_errors: list[tuple[str, str]] = field(default_factory=list)  # (url, failure text)
    stats: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    reason: str | None = None
    elapsed: float = 0.0
    crawler: Crawler | None = None
    diagnostics: str = ""
    exception: BaseException | None = None

    def keys(self, field_name: str = "key") -> list[Any]:
        """The ``field_name`` of every scraped item (dict-like items)."""
        return [item[field_name] for item in self.items]


class _Bridge:
    """Await an asyncio future from a coroutine driven by asyncio *or* by Twisted.

    An asyncio Task accepts a yielded Future and resumes us with None; Twisted's
    coroutine driver does not know Futures and sends the yielded object straight back.
    That echo tells us which driver we are under, so we then wait on a Deferred instead.
    """

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def __await__(self) -> Generator[Any, Any, Any]:
        fut = self.future
        while not fut.done():
            fut._asyncio_future_blocking = True  # type: ignore[attr-defined]
            echoed = yield fut
            if echoed is fut:  # Twisted driver
                fut._asyncio_future_blocking = False  # type: ignore[attr-defined]
                return (yield from Deferred.fromFuture(fut).__await__())
        return fut.result()


def _describe_inflight(crawler: Crawler) -> str:
    """A short text of what the engine and downloader hold, for timeout messages."""
    lines: list[str] = []
    engine = getattr(crawler, "_engine", None) or getattr(crawler, "engine", None)
    if engine is None:
        return "engine not created"
    try:
        lines.append(f"engine running={engine.running} paused={engine.paused}")
        slot = getattr(engine, "_slot", None)
        if slot is not None:
            lines.append(f"engine slot inprogress={len(slot.inprogress)} "
                         f"closing={slot.closing is not None}")
        scraper_slot = getattr(getattr(engine, "scraper", None), "slot", None)
        if scraper_slot is not None:
            lines.append(f"scraper active={len(scraper_slot.active)} "
                         f"itemproc_size={scraper_slot.itemproc_size}")
        downloader = engine.downloader
        active = list(downloader.active)
        lines.append(f"downloader.active={len(active)}")
        for request in active[:10]:
            lines.append(f"  active: {request.method} {request.url}")
        for key, dslot in list(downloader.slots.items())[:10]:
            lines.append(f"  slot {key}: active={len(dslot.active)} queue={len(dslot.queue)} "
                         f"transferring={len(dslot.transferring)}")
    except Exception as exc:  # noqa: BLE001 - diagnostics must never mask the timeout
        lines.append(f"(diagnostics failed: {exc!r})")
    return "\n".join(lines)


def _isolated(settings: dict[str, Any], directory: str | os.PathLike[str] | None = None,
              *, in_process: bool = False) -> dict[str, Any]:
    """Give a test crawl its own journal directory unless it chose one (or JOBDIR).

    The journal is on by default in ``.scrapy/antideadlock/<spider>/`` of the working
    directory; test crawls of one spider class must not resume each other's work. A crawl
    in the test's own process must never exit it: unless the test chose a recovery level,
    it stops at "close" (a close that hangs then fails the test by its time bound).
    """
    if in_process and "ANTIDEADLOCK_RECOVERY_LEVEL" not in settings:
        settings = {**settings, "ANTIDEADLOCK_RECOVERY_LEVEL": "close"}
    if settings.get("ANTIDEADLOCK_JOURNAL_DIR") or settings.get("JOBDIR"):
        return settings
    if directory is None:
        directory = tempfile.mkdtemp(prefix="antideadlock-journal-")
    return {**settings, "ANTIDEADLOCK_JOURNAL_DIR": str(directory)}


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # mark as retrieved: a background stop may fail noisily


async def _run_crawl(spider_cls: type[Spider], settings: dict[str, Any] | None, timeout: float,
                     expect_hang: bool, spider_kwargs: dict[str, Any]) -> CrawlResult:
    crawler = get_crawler(spider_cls, _isolated({**TEST_DEFAULTS, **(settings or {})},
                                                in_process=True))
    result = CrawlResult(crawler=crawler)

    def on_item(item: Any, **kw: Any) -> None:
        result.items.append(item)

    def on_dropped(item: Any, **kw: Any) -> None:
        result.dropped.append(item)

    def on_error(item: Any, failure: Any = None, **kw: Any) -> None:
        text = failure.getTraceback() if hasattr(failure, "getTraceback") else repr(failure)
        result.errors.append((item, text))

    def on_spider_error(failure: Any, response: Any = None, **kw: Any) -> None:
        url = getattr(response, "url", "?")
        text = failure.getTraceback() if hasattr(failure, "getTraceback") else repr(failure)
        result.spider_errors.append((url, text))

    def on_closed(reason: str = "", **kw: Any) -> None:
        result.reason = reason
        if crawler.stats is not None:
            result.stats = dict(crawler.stats.get_stats())

    # weak=False: these closures live only as long as the crawl.
    crawler.signals.connect(on_item, signals.item_scraped, weak=False)
    crawler.signals.connect(on_dropped, signals.item_dropped, weak=False)
    crawler.signals.connect(on_error, signals.item_error, weak=False)
    crawler.signals.connect(on_spider_error, signals.spider_error, weak=False)
    crawler.signals.connect(on_closed, signals.spider_closed, weak=False)

    start = time.monotonic()
    if hasattr(crawler, "crawl_async"):
        crawl = crawler.crawl_async(**spider_kwargs)
    else:  # Scrapy < 2.14
        from scrapy.utils.defer import maybe_deferred_to_future

        crawl = maybe_deferred_to_future(crawler.crawl(**spider_kwargs))
    task = asyncio.ensure_future(crawl)
    task.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    result.elapsed = time.monotonic() - start
    if task in done:
        result.finished = True
        if crawler.stats is not None:
            final = dict(crawler.stats.get_stats())
            if final:
                result.stats = {**result.stats, **final}
        exc = task.exception()
        if exc is not None:
            raise exc
        return result

    result.diagnostics = _describe_inflight(crawler)
    result.stats = dict(crawler.stats.get_stats()) if crawler.stats is not None else {}
    stopping = (crawler.stop_async() if hasattr(crawler, "stop_async")
                else crawler.stop())  # best effort; never awaited
    stop = asyncio.ensure_future(stopping)
    stop.add_done_callback(_retrieve)
    if expect_hang:
        return result
    raise CrawlTimeout(
        f"crawl of {spider_cls.__name__} not finished after {timeout:.1f} s "
        f"({len(result.items)} items so far); in flight:\n{result.diagnostics}", result)


async def run_crawl(spider_cls: type[Spider], settings: dict[str, Any] | None = None, *,
                    timeout: float, expect_hang: bool = False,
                    **spider_kwargs: Any) -> CrawlResult:
    """Run one crawl of ``spider_cls`` bounded by ``timeout`` seconds.

    Returns the :class:`CrawlResult`. If the crawl is not finished in time, a stop is
    started in the background and :class:`CrawlTimeout` is raised with what was in
    flight — or, with ``expect_hang=True``, a result with ``finished=False`` is returned.
    """
    if timeout <= 0:
        raise ValueError("run_crawl: timeout must be > 0")
    future = asyncio.ensure_future(
        _run_crawl(spider_cls, settings, timeout, expect_hang, spider_kwargs))
    return await _Bridge(future)


async def sleep(seconds: float) -> None:
    """``asyncio.sleep`` that also works in a Twisted-driven test coroutine."""
    await _Bridge(asyncio.ensure_future(asyncio.sleep(seconds)))


async def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
                     message: str = "") -> Any:
    """Poll ``predicate`` without blocking the reactor; return its first truthy value.

    Raises ``AssertionError`` (with ``message``) if it stays falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        await sleep(interval)


# --------------------------------------------------------------------------- subprocess


class CrawlProcess:
    """A crawl running in a child process (``python -m scrapy_antideadlock.testing.runcrawl``)."""

    def __init__(self, popen: subprocess.Popen[bytes], items_path: Path,
                 log_path: Path | None) -> None:
        self.popen = popen
        self.items_path = items_path
        self.stats_path = Path(str(items_path) + ".stats.json")
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; on timeout kill it (SIGKILL) and raise ``TimeoutError`` with the log tail."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            raise TimeoutError(f"crawl subprocess {self.pid} still running after {timeout} s; "
                               f"log tail:\n{self.log_tail()}") from None

    def items(self) -> list[Any]:
        """Items written so far (a torn last line, from a kill mid-write, is skipped)."""
        if not self.items_path.exists():
            return []
        out = []
        for line in self.items_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stats(self) -> dict[str, Any] | None:
        """Final stats written at spider close, or None if the process never got there."""
        if not self.stats_path.exists():
            return None
        return json.loads(self.stats_path.read_text())

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> CrawlProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def run_crawl_subprocess(spider: str | type[Spider], settings: dict[str, Any] | None = None, *,
                         items_path: str | os.PathLike[str], log_path: str | os.PathLike[str]
                         | None = None, spider_kwargs: dict[str, Any] | None = None,
                         env: dict[str, str] | None = None,
                         pythonpath: list[str] | None = None,
                         cwd: str | os.PathLike[str] | None = None) -> CrawlProcess:
    """Start a crawl of ``spider`` ("module:Class" or the class) in a child process; return at once.

    Items are appended as JSON lines to ``items_path`` (flushed and fsynced per item);
    final stats go to ``<items_path>.stats.json``. The child's PYTHONPATH gets the
    current working directory, ``tests/`` next to it, this package's root and
    ``pythonpath``, so spiders defined in test modules import. ``cwd``: the child's working
    directory (where Scrapy's project data folder ``.scrapy/`` goes).
    """
    if not isinstance(spider, str):
        spider = f"{spider.__module__}:{spider.__qualname__}"
    items = Path(items_path)
    log = Path(log_path) if log_path is not None else Path(str(items) + ".log")
    child_env = dict(os.environ if env is None else env)
    package_root = str(Path(__file__).resolve().parents[2])
    extra = [*(pythonpath or []), os.getcwd(), str(Path(os.getcwd()) / "tests"), package_root]
    old = child_env.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")
    child_env["PYTHONPATH"] = os.pathsep.join([*extra, *([old] if old else [])])
    cmd = [sys.executable, "-m", "scrapy_antideadlock.testing.runcrawl", "--spider", spider,
           "--items", str(items),
           # a crawl in its own working directory keeps the journal's true default there
           "--settings", json.dumps(settings or {} if cwd is not None
                                    else _isolated(settings or {},
                                                   items.with_name(items.name + ".journal"))),
           "--spider-kwargs", json.dumps(spider_kwargs or {})]
    with open(log, "ab") as log_file:
        popen = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                 env=child_env, start_new_session=True,
                                 cwd=None if cwd is None else str(cwd))
    return CrawlProcess(popen, items, log)
