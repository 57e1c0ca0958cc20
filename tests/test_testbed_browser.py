"""Chromium is found, and the fault site's JS pages really need a browser to show items."""

from __future__ import annotations

import os

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.testing import (
    SiteSpider,
    chromium_launch_options,
    find_chromium,
    run_crawl,
)

pytestmark = pytest.mark.browser


def test_find_chromium_returns_an_executable(chromium: str) -> None:
    path = find_chromium()
    assert path == chromium
    assert os.path.isfile(path) and os.access(path, os.X_OK)
    options = chromium_launch_options()
    assert options["executable_path"] == path and options["headless"] is True
    assert "--no-sandbox" in options["args"]


def test_env_override(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ANTIDEADLOCK_TEST_CHROMIUM", str(fake))
    assert find_chromium() == str(fake)


@deferred_f_from_coro_f
async def test_js_pages_render_only_in_a_browser(chromium: str, make_fault_site) -> None:
    site = make_fault_site(pages=2, items_per_page=3)
    plain = await run_crawl(SiteSpider, {"LOG_LEVEL": "WARNING"}, timeout=30,
                            start_url=site.js_start_url)
    assert plain.finished and plain.items == []  # without JS the page is empty
    handler = "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"
    settings = {
        "LOG_LEVEL": "WARNING",
        "DOWNLOAD_HANDLERS": {"http": handler, "https": handler},
        "PLAYWRIGHT_LAUNCH_OPTIONS": chromium_launch_options(),
        "PLAYWRIGHT_BROWSER_TYPE": "chromium",
    }
    result = await run_crawl(SiteSpider, settings, timeout=60, start_url=site.start_url, js=True)
    assert result.finished
    assert sorted(result.keys()) == site.expected_keys()
    assert all("/js/item/" in item["url"] for item in result.items)
