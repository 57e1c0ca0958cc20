"""Closing everything at the end, within one bound; a browser that does not close is killed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from .. import stats as ad_stats
from .books import Books

__all__ = ["browser_counts", "browser_pid", "shutdown"]

logger = logging.getLogger("scrapy-playwright")  # upstream's "Closing browser" line
own_logger = logging.getLogger(__package__)


async def browser_pid(browser: Any) -> int | None:
    """The browser's process id (to kill it if it hangs in close); None if unknown."""
    try:
        session = await asyncio.wait_for(browser.new_browser_cdp_session(), 5.0)
        info = await asyncio.wait_for(session.send("SystemInfo.getProcessInfo"), 5.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.detach(), 2.0)
    except (Exception, asyncio.TimeoutError):  # not Chromium, or already gone
        return None
    for proc in info.get("processInfo", []):
        if proc.get("type") == "browser":
            return int(proc["id"])
    return None


async def browser_counts(browser: Any, deadline: float) -> tuple[int, int]:
    """(open pages, open non-default contexts) as the browser itself reports them."""
    timeout = max(min(deadline - time.monotonic(), 5.0), 0.5)
    try:
        session = await asyncio.wait_for(browser.new_browser_cdp_session(), timeout)
        targets = await asyncio.wait_for(session.send("Target.getTargets"), timeout)
        contexts = await asyncio.wait_for(session.send("Target.getBrowserContexts"), timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.detach(), 2.0)
    except (Exception, asyncio.TimeoutError):
        return -1, -1
    pages = sum(1 for t in targets["targetInfos"] if t.get("type") == "page")
    return pages, len(contexts.get("browserContextIds", []))


async def _wait(tasks: list[asyncio.Future], deadline: float) -> None:
    if tasks:
        await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.1))


async def shutdown(handler: Any, books: Books, timeout: float, pending: set) -> None:
    """Close every page and context, then the browser and the driver, within ``timeout``."""
    deadline = time.monotonic() + timeout
    books.closing = True
    await _wait([books.spawn(books.close_page(e, "shutdown")) for e in list(books.pages.values())],
                deadline)
    contexts = list(books.contexts.values())
    for ctx in contexts:
        books.start_closing_context(ctx, "shutdown")
    await _wait([books.spawn(c.done.wait()) for c in contexts], deadline)
    stats = handler.stats
    browser = getattr(handler, "browser", None)
    if browser is not None and browser.is_connected():
        # a browser reached over Playwright's protocol (CONNECT_URL) has no CDP to ask
        pages, open_contexts = (len(books.pages), len(books.contexts)) \
            if handler.config.connect_url else await browser_counts(browser, deadline)
        stats.set_value(ad_stats.PW_OPEN_PAGES_AT_CLOSE, pages)
        stats.set_value(ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE, open_contexts)
        logger.info("Closing browser")
        try:
            await asyncio.wait_for(browser.close(), max(deadline - time.monotonic(), 0.5))
        except (Exception, asyncio.TimeoutError) as exc:
            own_logger.warning("Browser did not close in time (%r); killing it", exc)
            _kill(handler.browser_pid, stats)
    else:  # nothing to ask (none launched, or persistent contexts only)
        stats.set_value(ad_stats.PW_OPEN_PAGES_AT_CLOSE, len(books.pages))
        stats.set_value(ad_stats.PW_OPEN_CONTEXTS_AT_CLOSE, len(books.contexts))
    for task in [*books.tasks, *pending]:
        task.cancel()
    books.close_pools()
    provider = getattr(handler, "browser_provider", None)
    if provider is not None:
        try:
            await asyncio.wait_for(provider.close(), max(deadline - time.monotonic(), 1.0))
        except (Exception, asyncio.TimeoutError) as exc:
            own_logger.warning("Playwright driver did not stop in time: %r", exc)


def _kill(pid: int | None, stats: Any) -> None:
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        stats.inc_value(ad_stats.PW_BROWSER_KILLED)
