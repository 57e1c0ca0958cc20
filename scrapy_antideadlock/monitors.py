"""Spidermon monitors for what the pack saw (the ``monitors`` extra).

One line in the project's settings runs them when the spider closes::

    SPIDERMON_SPIDER_CLOSE_MONITORS = ("scrapy_antideadlock.monitors.AntideadlockMonitorSuite",)

They read the ``antideadlock/*`` stats, plus the crawler's pool registry for leases:
at ``spider_closed`` every request is done, so a unit still held is a leak. A monitor
whose part of the pack is off skips (the PostgreSQL one without ``ANTIDEADLOCK_PG_DSN``).
"""

from __future__ import annotations

from typing import Any

from spidermon import MonitorSuite, monitors
from spidermon.contrib.scrapy.monitors.base import BaseScrapyMonitor

from . import settings as ad_settings
from . import stats as ad_stats
from .context import context_for

__all__ = ["AntideadlockMonitorSuite", "ItemsAccountedForMonitor", "LeasesReturnedMonitor",
           "QuarantineMonitor", "StallsRecoveredMonitor"]

_STALL_CLOSE = "antideadlock_"  # close reasons antideadlock_<class>


def _stat(stats: Any, name: str) -> float:
    value = stats.get(name, 0)
    return value if isinstance(value, (int, float)) else 0


def _family_total(stats: Any, template: str) -> dict[str, float]:
    prefix = template.split("{", 1)[0]
    return {k: v for k, v in stats.items()
            if k.startswith(prefix) and isinstance(v, (int, float))}


@monitors.name("scrapy-antideadlock: stalls")
class StallsRecoveredMonitor(BaseScrapyMonitor):
    """Every stall the watchdog detected ended with progress resuming."""

    @monitors.name("no stall left unrecovered")
    def test_no_stall_left_unrecovered(self) -> None:
        stats = self.stats
        stalls = _stat(stats, ad_stats.WATCHDOG_STALLS)
        cleared = _stat(stats, ad_stats.WATCHDOG_CLEARED)
        closes = _family_total(stats, ad_stats.WATCHDOG_CLOSES)
        reason = str(stats.get("finish_reason") or "")
        self.assertFalse(
            closes or reason.startswith(_STALL_CLOSE),
            f"the pack closed the spider for a stall: finish_reason {reason!r}, {closes}")
        self.assertLessEqual(
            stalls, cleared, f"{stalls:g} stall(s) detected, {cleared:g} cleared; last class "
            f"{stats.get(ad_stats.WATCHDOG_LAST_CLASS)!r} (see the diagnosis block in the log)")


@monitors.name("scrapy-antideadlock: items")
class ItemsAccountedForMonitor(BaseScrapyMonitor):
    """Every item the PostgreSQL pipeline received is stored, superseded or dead-lettered."""

    @monitors.name("0 items lost")
    def test_no_item_lost(self) -> None:
        stats = self.stats
        if ad_stats.PG_ITEMS not in stats:
            self.skipTest("the PostgreSQL pipeline received no item (or is not enabled)")
        received = _stat(stats, ad_stats.PG_ITEMS)
        upserted = _stat(stats, ad_stats.PG_ROWS_UPSERTED)
        dedup = _stat(stats, ad_stats.PG_DEDUP_DROPS)
        parked = _stat(stats, ad_stats.PG_DEAD_LETTERED)
        unparked = _stat(stats, ad_stats.PG_DEADLETTER_ERRORS)
        self.assertEqual(unparked, 0, f"{unparked:g} item(s) failed to reach even the "
                                      "dead-letter store (their keys are in the log)")
        self.assertEqual(
            received, upserted + dedup + parked,
            f"pipeline received {received:g} items but rows_upserted {upserted:g} + "
            f"dedup_drops {dedup:g} + dead_lettered {parked:g} = "
            f"{upserted + dedup + parked:g}: {received - upserted - dedup - parked:g} "
            "unaccounted for (a batch still open at close?)")


@monitors.name("scrapy-antideadlock: leases")
class LeasesReturnedMonitor(BaseScrapyMonitor):
    """No proxy slot lease is still held when the spider closes (stats and registry)."""

    @monitors.name("no leases leaked at close")
    def test_no_lease_leaked(self) -> None:
        stats = self.stats
        held = _stat(stats, ad_stats.PROXY_HELD_AT_CLOSE)
        self.assertEqual(held, 0, f"{held:g} proxy lease(s) still held at close")
        acquired = stats.get(ad_stats.PROXY_ACQUIRED)
        released = stats.get(ad_stats.PROXY_RELEASED)
        if acquired is not None and released is not None:
            self.assertEqual(acquired, released, f"proxy leases: {acquired} acquired, "
                                                 f"{released} released")
        leaked = [f"{snap.name}: {snap.in_use} held by "
                  f"{', '.join(h.owner for h in snap.holders[:5]) or '?'}"
                  for snap in self._request_pools() if snap.in_use > 0]
        self.assertFalse(leaked, "units still held by finished requests: " + "; ".join(leaked))

    def _request_pools(self) -> list[Any]:
        crawler = getattr(self.data, "crawler", None)
        if crawler is None:
            return []
        # Browser pages and contexts outlive their request on purpose (the handler's own
        # spider_closed closes them); a proxy slot never does.
        return [snap for snap in context_for(crawler).registry.snapshot()
                if snap.kind == "proxy"]


@monitors.name("scrapy-antideadlock: quarantine")
class QuarantineMonitor(BaseScrapyMonitor):
    """Fewer requests quarantined than ANTIDEADLOCK_MONITOR_QUARANTINE_LIMIT."""

    @monitors.name("quarantine below the limit")
    def test_quarantine_below_limit(self) -> None:
        stats = self.stats
        crawler = getattr(self.data, "crawler", None)
        settings = crawler.settings if crawler is not None else None
        limit = ad_settings.get(settings, "ANTIDEADLOCK_MONITOR_QUARANTINE_LIMIT")
        quarantined = (_stat(stats, ad_stats.WATCHDOG_QUARANTINED)
                       + _stat(stats, ad_stats.FLEET_QUARANTINED))
        self.assertLess(quarantined, limit,
                        f"{quarantined:g} request(s) quarantined (limit "
                        f"ANTIDEADLOCK_MONITOR_QUARANTINE_LIMIT = {limit}); see "
                        "ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE")


class AntideadlockMonitorSuite(MonitorSuite):
    """All of the pack's monitors; run it at spider close."""

    monitors = [StallsRecoveredMonitor, ItemsAccountedForMonitor, LeasesReturnedMonitor,
                QuarantineMonitor]
