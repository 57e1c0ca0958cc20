"""The last step: persist what can be persisted, say why, and exit with a documented code.

Used when the spider close did not finish by its deadline, or when the event loop stayed
blocked (then this runs on the loop monitor's thread: it must not touch Scrapy objects
beyond reading stats and fsyncing the journal's file). A supervisor (systemd
``Restart=on-failure``, Kubernetes, a shell loop) restarts the job, which resumes from the
journal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from scrapy.crawler import Crawler

from .. import stats as ad_stats
from ..context import context_for

logger = logging.getLogger(__name__)

__all__ = ["EXIT_BLOCKED_LOOP", "EXIT_CLOSE_TIMEOUT", "EXIT_CODES", "hard_exit"]

#: The spider close did not finish within RECOVERY_CLOSE_DEADLINE (75 = EX_TEMPFAIL,
#: "try again"; systemd ``Restart=on-failure`` restarts it).
EXIT_CLOSE_TIMEOUT = 75
#: The event loop stayed blocked past RECOVERY_BLOCKED_LOOP_EXIT_AFTER.
EXIT_BLOCKED_LOOP = 76
#: Every exit code of the pack, what it means and what to do (the README table).
EXIT_CODES: dict[int, tuple[str, str]] = {
    EXIT_CLOSE_TIMEOUT: ("a stall was detected, its work preempted, and the spider close "
                         "still did not finish within RECOVERY_CLOSE_DEADLINE (or the process "
                         "could not exit that long after it)",
                         "restart: the journal resumes the crawl"),
    EXIT_BLOCKED_LOOP: ("the event loop stayed blocked past RECOVERY_BLOCKED_LOOP_EXIT_AFTER",
                        "restart; read the logged stack (a blocking call in a callback or "
                        "pipeline)"),
}


def hard_exit(crawler: Crawler, code: int, what: str, why: str, *, stack: str | None = None,
              diagnosis: Any = None) -> None:
    """fsync the journal, write ``last-exit.json`` beside it, log, and ``os._exit(code)``."""
    stats = crawler.stats
    ctx = context_for(crawler)
    stats.inc_value(ad_stats.family(ad_stats.WATCHDOG_HARD_EXITS, reason=what))
    journal = ctx.get("journal")
    pending = None
    if journal is not None:
        journal.save_from_thread()  # records are written as they happen; fsync them
        pending = journal.pending_count()
    fleet = ctx.get("fleet_queue")
    if fleet is not None:  # fleet mode: leased requests go back to the shared queue now
        fleet.give_back_all()
    if diagnosis is not None and hasattr(diagnosis, "to_dict"):
        diagnosis = diagnosis.to_dict()
    report = {"exit_code": code, "reason": what, "detail": why, "pid": os.getpid(),
              "journal_pending": pending, "diagnosis": diagnosis,
              "stats": {k: v for k, v in dict(stats.get_stats()).items()
                        if isinstance(v, (int, float, str))}}
    logger.critical("antideadlock recovery: %s; exiting with code %d so the supervisor "
                    "restarts the job%s\n%s", why, code,
                    "" if pending is None else f" ({pending} requests pending in the journal)",
                    stack or "")
    if journal is not None:
        _write_report(journal.directory, report)
    notifier = ctx.get("notifier")
    if notifier is not None:
        try:
            notifier.notify(f"STOPPING=1\nSTATUS=hard exit {code}: {why}")
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stderr.flush()
    os._exit(code)


def _write_report(directory: Any, report: dict[str, Any]) -> None:
    try:
        path = directory / "last-exit.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, default=str, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
