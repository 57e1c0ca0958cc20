"""A crawl in a child process: runs to completion, and a SIGKILL leaves a clean prefix."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from scrapy_antideadlock.testing import (
    FaultSite,
    Latency,
    SiteSpider,
    run_crawl_subprocess,
)
from scrapy_antideadlock.testing.spiders import SiteSpider as _SiteSpider


class SlowSiteSpider(_SiteSpider):
    """A spider defined in a test module: the child must be able to import it."""

    name = "slow_site"
    custom_settings = {"CONCURRENT_REQUESTS": 2}


def test_subprocess_crawl_to_completion(tmp_path: Path, make_fault_site) -> None:
    site = make_fault_site(pages=3, items_per_page=5)
    proc = run_crawl_subprocess("scrapy_antideadlock.testing.spiders:SiteSpider",
                                {"LOG_LEVEL": "INFO"}, items_path=tmp_path / "items.jl",
                                spider_kwargs={"start_url": site.start_url})
    assert proc.wait(60) == 0, proc.log_tail()
    assert sorted(i["key"] for i in proc.items()) == site.expected_keys()
    stats = proc.stats()
    assert stats is not None and stats["item_scraped_count"] == 15
    assert stats["_close_reason"] == "finished"
    assert SiteSpider is _SiteSpider


def test_subprocess_sigkill_mid_run_leaves_prefix(tmp_path: Path) -> None:
    with FaultSite(pages=10, items_per_page=10, latency=Latency.fixed(0.05)) as site:
        proc = run_crawl_subprocess(SlowSiteSpider, {},
                                    items_path=tmp_path / "items.jl",
                                    spider_kwargs={"start_url": site.start_url})
        deadline = time.monotonic() + 60
        while len(proc.items()) < 5 and time.monotonic() < deadline:
            assert proc.returncode is None, proc.log_tail()
            time.sleep(0.05)
        proc.kill(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    items = proc.items()
    keys = [item["key"] for item in items]
    assert 5 <= len(items) < 100
    assert len(set(keys)) == len(keys) and set(keys) <= set(site.item_keys())
    assert proc.stats() is None  # never closed: no stats file
