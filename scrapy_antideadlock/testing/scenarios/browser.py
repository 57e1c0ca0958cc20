"""A Playwright callback awaiting a page promise that never resolves (real Chromium)."""

from __future__ import annotations

from typing import Any

from ..spiders import SiteSpider


class PromiseSpider(SiteSpider):
    name = "playwright_promise"

    def request_meta(self, kind: str) -> dict[str, Any]:
        if kind != "item":
            return {}
        return {"playwright": True, "playwright_include_page": True}

    async def parse_item(self, response: Any, **kwargs: Any) -> Any:
        page = response.meta["playwright_page"]
        try:
            # waits for a "reviews loaded" event the page never sends
            await page.evaluate("() => new Promise(resolve => "
                                "document.addEventListener('reviews-loaded', resolve))")
        finally:
            await page.close()
        for item in super().parse_item(response, **kwargs):
            yield item


def playwright_settings(executable: str) -> dict[str, Any]:
    return {
        "DOWNLOAD_HANDLERS": {
            "http": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
            "https": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"},
        "PLAYWRIGHT_LAUNCH_OPTIONS": {"executable_path": executable, "headless": True},
        "PLAYWRIGHT_BROWSER_TYPE": "chromium",
    }


__all__ = ["PromiseSpider", "playwright_settings"]
