"""scrapy-playwright's own behaviour is the spec: each test runs against the stock
``ScrapyPlaywrightDownloadHandler`` and against ``SafePlaywrightDownloadHandler`` (the
``handler_cls`` fixture), with real Chromium and a real HTTP server.

The behaviours are those upstream's test suite (scrapy-plugins/scrapy-playwright, ``tests/``)
checks: attributes and private paths, startup and persistent contexts, page methods, event
handlers, downloads, stats names, log messages, exception types and browser restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import scrapy
from playwright.async_api import Browser, Page
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from scrapy.exceptions import DownloadFailedError, DownloadTimeoutError
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler
from scrapy_playwright.handler import ScrapyPlaywrightDownloadHandler
from scrapy_playwright.page import PageMethod

from scrapy_antideadlock import compat
from scrapy_antideadlock.compat import playwright as pw_compat
from scrapy_antideadlock.playwright import PlaywrightCallTimeout, SafePlaywrightDownloadHandler
from scrapy_antideadlock.testing import chromium_launch_options
from scrapy_antideadlock.testing.playwright_faults import browser_pid, req

pytestmark = pytest.mark.browser

UPSTREAM_LOGGER = "scrapy-playwright"
PDF = b"%PDF-1.5\n" + b"0" * 2000 + b"\n%%EOF\n"


# --------------------------------------------------------------------------- a small site


class _Pages(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/html",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/file.pdf":
            self._send(200, PDF, "application/pdf",
                       {"Content-Disposition": 'attachment; filename="file.pdf"'})
        elif path == "/redirect":
            self._send(302, b"", headers={"Location": "/page?redirected"})
        elif path == "/slow":
            threading.Event().wait(1.5)
            self._send(200, b"<html><body>slow</body></html>")
        else:
            self._send(200, b"<html><head><title>t</title></head><body>"
                            b"<a href='/a'>A</a><a href='/b'>B</a></body></html>")


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- handlers


@pytest.fixture(params=[ScrapyPlaywrightDownloadHandler, SafePlaywrightDownloadHandler],
                ids=["stock", "safe"])
def handler_cls(request: Any, chromium: str) -> type:
    """The class under test: every behaviour below must hold for both."""
    return request.param


def settings(**extra: Any) -> dict[str, Any]:
    return {"TELNETCONSOLE_ENABLED": False, "PLAYWRIGHT_BROWSER_TYPE": "chromium",
            "PLAYWRIGHT_LAUNCH_OPTIONS": chromium_launch_options(), **extra}


@contextlib.asynccontextmanager
async def launched(cls: type, **extra: Any) -> AsyncIterator[Any]:
    """A handler created and launched the way scrapy-playwright's suite does it."""
    handler = cls(crawler=get_crawler(settings_dict=settings(**extra)))
    await asyncio.wait_for(handler._maybe_launch_in_thread(), 30)
    try:
        yield handler
    finally:
        await asyncio.wait_for(handler.close(), 30)


def logged(caplog: Any, level: int, message: str) -> bool:
    return (UPSTREAM_LOGGER, level, message) in caplog.record_tuples


async def fetch(handler: Any, request: scrapy.Request, spider: Any = None) -> Any:
    return await asyncio.wait_for(handler._download_request(request, spider or
                                                            scrapy.Spider("s")), 30)


# --------------------------------------------------------------------------- attributes


@deferred_f_from_coro_f
async def test_attributes_and_private_paths(handler_cls: type, site: str) -> None:
    """browser_provider, browser, context_wrappers, context_semaphore and the private
    methods a subclass or plugin calls keep their meaning."""
    async with launched(handler_cls, PLAYWRIGHT_MAX_CONTEXTS=3,
                        PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=4) as handler:
        assert handler.browser_provider is not None
        assert handler.context_wrappers == {}
        assert handler.context_semaphore._value == 3
        spider = scrapy.Spider("s")
        page = await asyncio.wait_for(handler._create_page(req(site + "/page"), spider), 30)
        assert isinstance(page, Page) and isinstance(handler.browser, Browser)
        wrapper = handler.context_wrappers["default"]
        assert not wrapper.persistent and page in wrapper.context.pages
        assert wrapper.semaphore._value == 3 and handler.context_semaphore._value == 2
        await page.close()
        await asyncio.sleep(0)  # the close event releases the page slot
        assert wrapper.semaphore._value == 4
        other = await asyncio.wait_for(handler._create_browser_context(
            name="other", context_kwargs={}, spider=spider), 30)
        assert handler.context_wrappers["other"] is other
        assert handler.context_semaphore._value == 1
        browser = handler.browser
        await handler._maybe_launch_browser()
        assert handler.browser is browser  # launched once
        await other.context.close()
        await asyncio.sleep(0)
        assert "other" not in handler.context_wrappers
        assert handler.context_semaphore._value == 2
        response = await fetch(handler, req(site + "/page"))
        assert response.status == 200 and "playwright" in response.flags
        assert response.css("a::text").getall() == ["A", "B"]


@deferred_f_from_coro_f
async def test_no_context_limit_means_no_context_semaphore(handler_cls: type) -> None:
    handler = handler_cls(crawler=get_crawler(settings_dict=settings()))
    assert not hasattr(handler, "context_semaphore")
    await handler.close()


@deferred_f_from_coro_f
async def test_non_playwright_requests_go_to_the_parent_handler(handler_cls: type,
                                                                site: str) -> None:
    """The fallback for requests without meta["playwright"] goes up the MRO (super())."""
    assert handler_cls.download_request is ScrapyPlaywrightDownloadHandler.download_request
    handler = handler_cls(crawler=get_crawler(settings_dict=settings()))
    try:
        response = await asyncio.wait_for(handler.download_request(
            scrapy.Request(site + "/page")), 30)
        assert response.status == 200 and "playwright" not in response.flags
        assert not hasattr(handler, "browser")  # no browser for a plain request
    finally:
        await handler.close()


# --------------------------------------------------------------------------- contexts


@deferred_f_from_coro_f
async def test_startup_and_persistent_contexts(handler_cls: type, site: str,
                                               tmp_path: Path) -> None:
    """PLAYWRIGHT_CONTEXTS (persistent or not) appear in context_wrappers at launch."""
    profile = tmp_path / "profile"
    contexts = {"persistent": {"user_data_dir": str(profile), **chromium_launch_options()},
                "plain": {"java_script_enabled": False}}
    async with launched(handler_cls, PLAYWRIGHT_CONTEXTS=contexts) as handler:
        assert set(handler.context_wrappers) == {"persistent", "plain"}
        assert handler.context_wrappers["persistent"].persistent and profile.is_dir()
        assert not handler.context_wrappers["plain"].persistent
        assert isinstance(handler.browser, Browser)
        for name in ("persistent", "plain"):
            response = await fetch(handler, req(site + "/page", playwright_context=name))
            assert response.status == 200
        stats = handler.stats.get_stats()
        assert stats["playwright/context_count/persistent/True"] == 1
        assert stats["playwright/context_count/persistent/False"] == 1
        assert stats["playwright/context_count/max_concurrent"] == 2


@deferred_f_from_coro_f
async def test_persistent_context_only_launches_no_browser(handler_cls: type,
                                                           tmp_path: Path) -> None:
    contexts = {"p": {"user_data_dir": str(tmp_path / "p"), **chromium_launch_options()}}
    async with launched(handler_cls, PLAYWRIGHT_CONTEXTS=contexts) as handler:
        assert list(handler.context_wrappers) == ["p"]
        assert not hasattr(handler, "browser")


@deferred_f_from_coro_f
async def test_dynamic_context_and_max_concurrent_stats(handler_cls: type, site: str) -> None:
    """Contexts created from meta; upstream's max_concurrent stats over pages and contexts."""
    async with launched(handler_cls, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=1) as handler:
        requests = [req(site + f"/page?{name}{i}", playwright_context=name)
                    for name in ("a", "b") for i in range(3)]
        responses = await asyncio.gather(*[fetch(handler, r) for r in requests])
        assert [r.status for r in responses] == [200] * 6
        assert set(handler.context_wrappers) == {"a", "b"}
        stats = handler.stats.get_stats()
        assert stats["playwright/page_count/max_concurrent"] == 2
        assert stats["playwright/context_count/max_concurrent"] == 2
        assert stats["playwright/page_count"] == stats["playwright/page_count/closed"] == 6
        assert stats["playwright/context_count"] == 2
        assert stats["playwright/browser_count"] == 1
        assert stats["playwright/request_count/resource_type/document"] == 6
        assert stats["playwright/response_count/method/GET"] >= 6


# --------------------------------------------------------------------------- pages


class DialogSpider(scrapy.Spider):
    name = "dialog"
    message = None

    async def on_dialog(self, dialog: Any) -> None:
        self.message = dialog.message
        await dialog.dismiss()


@deferred_f_from_coro_f
async def test_page_methods_event_handlers_and_reuse(handler_cls: type, site: str,
                                                     caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, UPSTREAM_LOGGER)
    spider = DialogSpider()
    async with launched(handler_cls) as handler:
        methods = [PageMethod("evaluate", "() => 40 + 2"), "not-a-page-method",
                   PageMethod(lambda page: page.title())]
        request = req(site + "/page", playwright_page_methods=methods)
        await fetch(handler, request)
        assert methods[0].result == 42 and methods[2].result == "t"
        assert logged(caplog, logging.WARNING,
                      "Ignoring 'not-a-page-method': expected PageMethod, got <class 'str'>")
        for on_dialog in (spider.on_dialog, "on_dialog"):
            spider.message = None
            await fetch(handler, req(site + "/page", playwright_page_event_handlers={
                "dialog": on_dialog}, playwright_page_methods=[
                PageMethod("evaluate", "alert('hello')")]), spider)
            assert spider.message == "hello"
        await fetch(handler, req(site + "/page", playwright_page_event_handlers={
            "popup": "missing"}), spider)
        assert logged(caplog, logging.WARNING, "Spider 'dialog' does not have a 'missing' "
                                               "attribute, ignoring handler for event 'popup'")
        first = await fetch(handler, req(site + "/page", playwright_include_page=True))
        page = first.meta["playwright_page"]
        second = await fetch(handler, req(site + "/redirect", playwright_page=page,
                                          playwright_include_page=True))
        assert second.meta["playwright_page"] is page and not page.is_closed()
        assert second.url == site + "/page?redirected"
        assert second.meta["redirect_times"] == 1 and second.meta["redirect_reasons"] == [302]
        await page.close()


@deferred_f_from_coro_f
async def test_download(handler_cls: type, site: str) -> None:
    async with launched(handler_cls) as handler:
        response = await fetch(handler, req(site + "/file.pdf"))
        assert response.body == PDF
        assert response.meta["playwright_suggested_filename"] == "file.pdf"
        assert response.headers["Content-Type"] == b"application/pdf"
        assert handler.stats.get_value("playwright/download_count") == 1


# --------------------------------------------------------------------------- logs, errors


@deferred_f_from_coro_f
async def test_log_messages_and_timeout_type(handler_cls: type, site: str,
                                             caplog: Any) -> None:
    """Upstream's messages on upstream's logger; a navigation timeout stays Playwright's."""
    caplog.set_level(logging.DEBUG, UPSTREAM_LOGGER)
    async with launched(handler_cls, PLAYWRIGHT_DEFAULT_NAVIGATION_TIMEOUT=300) as handler:
        request = req(site + "/slow")
        with pytest.raises(PlaywrightTimeoutError) as info:
            await fetch(handler, request)
        assert logged(caplog, logging.WARNING,
                      f"Closing page due to failed request: {request}"
                      f" exc_type={type(info.value)} exc_msg={info.value}")
        # its own goto timeout: only the slow page above is meant to hit the 300 ms default
        blank = req("about:blank", playwright_page_goto_kwargs={"timeout": 30_000})
        response = await fetch(handler, blank)
        assert response.status == 200 and not response.headers
        assert logged(caplog, logging.WARNING, f"Navigating to {blank!r} returned None, the "
                                               "response will have empty headers and status 200")
        assert logged(caplog, logging.DEBUG,
                      "Browser context started: 'default' (persistent=False, remote=False)")
        assert logged(caplog, logging.INFO, "Launching browser chromium")
        assert any(m.startswith("[Context=default] New page created, page count is")
                   for _, _, m in caplog.record_tuples)
    assert logged(caplog, logging.INFO, "Closing browser")
    assert logged(caplog, logging.INFO, "Closing download handler")


async def kill_browser(browser: Browser) -> None:
    """SIGKILL the browser process of ``browser`` (asked over CDP; nothing else is touched)."""
    os.kill(await browser_pid(browser), signal.SIGKILL)


async def until(condition: Any, timeout: float = 10) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), timeout)


@deferred_f_from_coro_f
async def test_browser_crash_restarts(handler_cls: type, site: str, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, UPSTREAM_LOGGER)
    async with launched(handler_cls) as handler:
        await fetch(handler, req(site + "/page"))
        browser = handler.browser
        await kill_browser(browser)
        await until(lambda: not browser.is_connected())
        response = await fetch(handler, req(site + "/page?after"))
        assert response.status == 200 and handler.browser is not browser
        assert logged(caplog, logging.DEBUG, "Browser disconnected")
        assert logged(caplog, logging.INFO, "Launching browser chromium")
        assert handler.stats.get_value("playwright/browser_count") == 2  # launched again


@deferred_f_from_coro_f
async def test_browser_crash_without_restart_raises_target_closed(handler_cls: type,
                                                                  site: str) -> None:
    from playwright._impl._errors import TargetClosedError

    async with launched(handler_cls, PLAYWRIGHT_RESTART_DISCONNECTED_BROWSER=False) as handler:
        await fetch(handler, req(site + "/page"))
        browser = handler.browser
        await kill_browser(browser)
        await until(lambda: not browser.is_connected())
        with pytest.raises(TargetClosedError) as info:
            await fetch(handler, req(site + "/page?after"))
        assert handler.browser is browser  # not relaunched
    if handler_cls is SafePlaywrightDownloadHandler:  # ours adds: retryable, and why
        assert isinstance(info.value, DownloadFailedError)
        assert info.value.antideadlock["attempts"] == 4  # upstream's 3 retries + the first


@deferred_f_from_coro_f
async def test_failed_new_page_keeps_the_slot(handler_cls: type, site: str) -> None:
    """A new_page that fails returns its page slot (the context stays usable)."""
    from unittest.mock import AsyncMock, patch

    async with launched(handler_cls, PLAYWRIGHT_MAX_PAGES_PER_CONTEXT=1) as handler:
        await fetch(handler, req(site + "/page"))
        wrapper = handler.context_wrappers["default"]
        with patch.object(wrapper.context, "new_page", new_callable=AsyncMock,
                          side_effect=PlaywrightError("simulated")), \
                pytest.raises(PlaywrightError):
            await handler._create_page(req(site + "/page"), scrapy.Spider("s"))
        assert wrapper.semaphore._value == 1
        assert (await fetch(handler, req(site + "/page"))).status == 200


# --------------------------------------------------------------------------- version check


def test_supported_version_check_names_what_moved(monkeypatch: Any) -> None:
    """Ours only: a scrapy-playwright outside the range, or a moved private name, fails at
    start naming it (the stock handler has nothing to check)."""
    pw_compat.check()
    assert any("scrapy_playwright" in r.name for r in compat.requirements())
    monkeypatch.setattr(pw_compat, "installed_version", lambda: (0, 0, 99))
    with pytest.raises(compat.CompatError, match=r"scrapy-playwright 0\.0\.99 is outside"):
        SafePlaywrightDownloadHandler(crawler=get_crawler(settings_dict=settings()))
    monkeypatch.undo()
    monkeypatch.delattr(ScrapyPlaywrightDownloadHandler, "_create_page")
    with pytest.raises(compat.CompatError, match=r"ScrapyPlaywrightDownloadHandler\._create_page"):
        SafePlaywrightDownloadHandler(crawler=get_crawler(settings_dict=settings()))


def test_our_timeouts_keep_playwrights_type() -> None:
    """Ours only: a call that overran is still a Playwright TimeoutError for errbacks."""
    exc = PlaywrightCallTimeout("evaluate", 3.0, "http://example.com/")
    assert isinstance(exc, PlaywrightTimeoutError) and isinstance(exc, DownloadTimeoutError)
    assert exc.call == "evaluate" and "evaluate did not finish within 3.00s" in exc.message
