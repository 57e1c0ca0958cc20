"""The add-on's swap: where DOWNLOAD_HANDLERS names scrapy-playwright's handler, use ours."""

from __future__ import annotations

from typing import Any

from scrapy.utils.misc import load_object

from .. import settings as ad_settings

__all__ = ["SAFE_PATH", "STOCK_PATH", "configure_download_handlers"]

SAFE_PATH = "scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler"
STOCK_PATH = "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"


def configure_download_handlers(settings: Any) -> None:
    """Add-on configurer: replace the exact stock class (a user's own subclass is left alone)."""
    if not ad_settings.get(settings, "ANTIDEADLOCK_PLAYWRIGHT_ENABLED"):
        return
    stock = load_object(STOCK_PATH)
    handlers = settings["DOWNLOAD_HANDLERS"]
    for scheme, path in list(handlers.items()):
        if path is None:
            continue
        try:
            cls = load_object(path) if isinstance(path, str) else path
        except (ImportError, NameError, ValueError):
            continue
        if cls is stock:
            handlers.set(scheme, SAFE_PATH, handlers.getpriority(scheme) or 0)
