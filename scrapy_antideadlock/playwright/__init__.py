"""A drop-in subclass of scrapy-playwright's download handler that cannot leak or hang.

``DOWNLOAD_HANDLERS = {"http": "scrapy_antideadlock.playwright.SafePlaywrightDownloadHandler",
"https": ...}`` (or the add-on, which swaps the stock class): same settings, ``meta`` keys,
responses, stats, log messages and exception types as ``ScrapyPlaywrightDownloadHandler``
0.0.48, plus:

* every page is closed on every path: included pages (``playwright_include_page``) once the
  request's callback or errback finished, whatever it did; other pages on every failure,
  ``CancelledError`` included; an age limit as a last resort;
* every browser call ends by min(call cap, the request's deadline), failing with
  :class:`PlaywrightCallTimeout` (a Playwright ``TimeoutError``) and closing what it opened;
* page and context limits are leases in the crawler's registry: released exactly once,
  acquired with a timeout, and waiting for a *new* context never blocks requests for
  contexts that already exist;
* contexts stay open as upstream keeps them (cookies survive), except that the least
  recently used idle one is closed for a request waiting at ``PLAYWRIGHT_MAX_CONTEXTS``;
  at close everything is closed within a bound and a browser that does not close in time
  is killed;
* a dead browser fails its pending calls at once (:class:`BrowserCrashed`, a Playwright
  ``TargetClosedError``) and scrapy-playwright's retry relaunches it;
* http and https share one driver and browser (``ANTIDEADLOCK_PLAYWRIGHT_SHARE_BROWSER``).
"""

from .configure import SAFE_PATH, STOCK_PATH, configure_download_handlers
from .errors import BrowserCrashed, PlaywrightCallTimeout, PlaywrightSlotTimeout
from .handler import SafePlaywrightDownloadHandler

__all__ = ["SAFE_PATH", "STOCK_PATH", "BrowserCrashed", "PlaywrightCallTimeout",
           "PlaywrightSlotTimeout", "SafePlaywrightDownloadHandler",
           "configure_download_handlers"]
