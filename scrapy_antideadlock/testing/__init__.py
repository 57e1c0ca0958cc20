"""Test bed: real fault site, fault proxy, PostgreSQL, Chromium and crawl harnesses.

Used by this package's tests, benchmarks and example project, and by users testing
their own spiders (see README "Testing your own spiders"). Names are imported lazily,
so importing this package pulls in neither psycopg nor Scrapy until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Fault": "site", "FaultSite": "site", "Latency": "site",
    "FaultProxy": "proxy",
    "SiteSpider": "spiders",
    "CrawlProcess": "harness", "CrawlResult": "harness", "CrawlTimeout": "harness",
    "run_crawl": "harness", "run_crawl_subprocess": "harness", "wait_until": "harness",
    "PostgresServer": "postgres", "postgres_dsn": "postgres",
    "start_embedded_postgres": "postgres",
    "chromium_launch_options": "browser", "find_chromium": "browser",
    "RedisServer": "redis", "redis_url": "redis",
}

__all__ = [
    "CrawlProcess",
    "CrawlResult",
    "CrawlTimeout",
    "Fault",
    "FaultProxy",
    "FaultSite",
    "Latency",
    "PostgresServer",
    "RedisServer",
    "SiteSpider",
    "chromium_launch_options",
    "find_chromium",
    "postgres_dsn",
    "redis_url",
    "run_crawl",
    "run_crawl_subprocess",
    "start_embedded_postgres",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # pragma: no cover
    from scrapy_antideadlock.testing.browser import chromium_launch_options, find_chromium
    from scrapy_antideadlock.testing.harness import (
        CrawlProcess,
        CrawlResult,
        CrawlTimeout,
        run_crawl,
        run_crawl_subprocess,
        wait_until,
    )
    from scrapy_antideadlock.testing.postgres import (
        PostgresServer,
        postgres_dsn,
        start_embedded_postgres,
    )
    from scrapy_antideadlock.testing.proxy import FaultProxy
    from scrapy_antideadlock.testing.redis import RedisServer, redis_url
    from scrapy_antideadlock.testing.site import Fault, FaultSite, Latency
    from scrapy_antideadlock.testing.spiders import SiteSpider
