"""GET /metrics: Prometheus exposition from the off-loop health server.

A real crawl through a real proxy; a callback blocks the event loop and, while it is
blocked, fetches /metrics over real HTTP from the health server's own thread. The text
is read with prometheus_client's own parser.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from scrapy_antideadlock.health import health_for
from scrapy_antideadlock.metrics import metric_name
from scrapy_antideadlock.testing import SiteSpider, run_crawl


class BlockingSpider(SiteSpider):
    """On one item page: block the loop, then GET /metrics while still blocking it."""

    seen: dict[str, Any] = {}
    parsed = 0

    def parse_item(self, response: Any, **kwargs: Any) -> Any:
        BlockingSpider.parsed += 1
        if BlockingSpider.parsed == 15:
            time.sleep(1.5)  # the loop is blocked from here to the end of the GET
            port = health_for(self.crawler).http_port
            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                self.seen.update(body=r.read().decode(), ctype=r.headers["Content-Type"],
                                 took=time.monotonic() - started, status=r.status,
                                 stats=dict(self.crawler.stats.get_stats()))
        yield from super().parse_item(response, **kwargs)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest_twisted.ensureDeferred
async def test_metrics_answer_while_the_loop_is_blocked(make_fault_site, fault_proxy) -> None:
    BlockingSpider.seen, BlockingSpider.parsed = {}, 0
    site = make_fault_site(pages=2, items_per_page=10)
    settings = {"ADDONS": {"scrapy_antideadlock.Addon": 0},
                "ANTIDEADLOCK_HEALTH_HTTP_PORT": 0,  # the one setting: health and metrics
                "ANTIDEADLOCK_HEALTH_LOOP_BLOCKED_AFTER": 1.0,
                "ANTIDEADLOCK_PROXY_LIST": [fault_proxy.url], "ANTIDEADLOCK_PROXY_CAPACITY": 3}
    result = await run_crawl(BlockingSpider, settings, timeout=60, start_url=site.start_url)
    assert result.finished and sorted(result.keys()) == site.item_keys()
    seen = BlockingSpider.seen
    assert seen["status"] == 200 and seen["ctype"].startswith("text/plain")
    assert seen["took"] < 5.0  # answered from its own thread, the loop still blocked
    found = samples(seen["body"])

    # every antideadlock/* stat, with its value at that moment
    stats = {k: v for k, v in seen["stats"].items() if k.startswith("antideadlock/")}
    assert stats
    for stat, stat_value in stats.items():
        name, labels = metric_name(stat)
        if isinstance(stat_value, (int, float)):
            assert value(found, name, **labels) == stat_value, stat
        else:
            assert value(found, name, **labels, value=str(stat_value)) == 1, stat
    assert value(found, "antideadlock_deadline_set") == stats["antideadlock/deadline/set"]

    # the live gauges
    assert value(found, "antideadlock_loop_heartbeat_age_seconds") >= 1.0
    assert value(found, "antideadlock_healthy") == 0 and value(found, "antideadlock_stalled") == 1
    assert value(found, "antideadlock_stall_class", stall_class="blocked_loop") == 1
    assert value(found, "antideadlock_watchdog_state", state="stalled:blocked_loop") == 1
    assert value(found, "antideadlock_seconds_since_progress") >= 1.0
    assert value(found, "antideadlock_items_per_minute") > 0
    assert value(found, "antideadlock_pool_capacity", pool="proxy", kind="proxy") == 3
    assert ("antideadlock_pool_holders", (("kind", "proxy"), ("pool", "proxy"))) in found
    assert ("antideadlock_pool_waiters", (("kind", "proxy"), ("pool", "proxy"))) in found
    assert value(found, "antideadlock_inflight_requests") >= 0
    assert value(found, "antideadlock_lent_slots") == 0
    assert value(found, "antideadlock_slot_deadline_seconds", slot="127.0.0.1") > 0


def test_every_declared_stat_has_one_valid_metric_name() -> None:
    import re

    from scrapy_antideadlock import stats as ad_stats

    seen: dict[str, set[str]] = {}
    for template in ad_stats.STATS:
        stat = re.sub(r"\{([a-z_]+)\}", lambda m: f"x-{m.group(1)}", template)
        name, labels = metric_name(stat)
        assert re.fullmatch(r"antideadlock_[a-zA-Z0-9_]+", name), (template, name)
        assert set(labels) == set(re.findall(r"\{([a-z_]+)\}", template)), template
        if labels:
            assert name.endswith("_by_" + "_".join(labels)), (template, name)
        assert set(labels.values()) <= {f"x-{k}" for k in labels}
        seen.setdefault(name, set()).add(template)
    assert all(len(templates) == 1 for templates in seen.values()), seen
