"""``scrapy crawl demo``: the packaged fault site, 3 % of its item pages hang for ever.

With the pack (the default) the crawl finishes in well under a minute: hanging requests
are cancelled at their deadline, retried, then given up; items are upserted into
PostgreSQL; the watchdog prints a health line; the stats dump ends with the
``antideadlock/*`` block. With ``-s ANTIDEADLOCK_ENABLED=0`` the same spider runs on plain
Scrapy: it scrapes what it can, then sits at "0 pages/min" holding the hanging
requests; ``CLOSESPIDER_TIMEOUT`` starts a graceful close that waits for them (Scrapy gives
up on each attempt only after DOWNLOAD_TIMEOUT, 180 s), and the demo's outer bound stops
the process first (exit status 3).
"""

from __future__ import annotations

from typing import Any

from scrapy.crawler import Crawler

from scrapy_antideadlock.testing import SiteSpider

from ..testbed import SiteSpec, attach


class BedSpider(SiteSpider):
    """A :class:`SiteSpider` whose fault site (and database) the project starts itself."""

    name = None  # type: ignore[assignment]  # a base class, not a spider of its own
    site_spec = SiteSpec()
    uses_postgres = True

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> BedSpider:
        bed = attach(crawler, cls.name, postgres=cls.uses_postgres)
        if kwargs.get("start_url") is None:  # -a start_url=... crawls an existing site
            kwargs["start_url"] = bed.start_site(cls.site_spec).start_url
        return super().from_crawler(crawler, *args, **kwargs)


class DemoSpider(BedSpider):
    """The README's first command."""

    name = "demo"
    site_spec = SiteSpec(pages=8, items_per_page=10, latency_median=0.1, hang_items=0.03)
