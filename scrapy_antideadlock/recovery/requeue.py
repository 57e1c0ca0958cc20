"""What becomes of preempted work: requeued (bounded), quarantined, kept, dead-lettered.

A preempted request is requeued as a copy with ``dont_filter=True`` and a counter in
``meta``; past ``RECOVERY_MAX_REQUEUES`` it is quarantined instead (a JSONL line with the
URL, the reason, the attempts and the stall class), so a poison URL cannot loop for ever.
While the spider closes, a preempted request is neither: it stays pending in the journal
for the next run. A preempted item is dead-lettered with its reason (never dropped).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scrapy import Request
from scrapy.crawler import Crawler

from .. import metakeys
from .. import stats as ad_stats
from ..context import context_for
from ..identity import request_id, strip_credentials
from ..journal import journal_dir, keep_pending
from ..primitives.deadletter import DeadLetterStore

logger = logging.getLogger(__name__)

__all__ = ["Requeuer", "state_dir"]


def state_dir(crawler: Crawler) -> Path:
    """Where this spider's pending work lives: the journal directory (used even when the
    journal is off, so quarantine and dead letters are always next to each other)."""
    journal = context_for(crawler).get("journal")
    if journal is not None:
        return Path(journal.directory)
    return journal_dir(crawler.settings, getattr(crawler.spidercls, "name", None))


class Requeuer:
    """Requeue or quarantine preempted requests; the stores for what cannot be requeued."""

    def __init__(self, crawler: Crawler, conf: Any) -> None:
        self.crawler = crawler
        self.conf = conf
        self.stats = crawler.stats
        self.closing = False
        self.quarantined: list[dict[str, Any]] = []
        self.evidence: list[str] = []  # of the current episode, for quarantine records
        self._quarantine: DeadLetterStore | None = None
        self._dead_letters: DeadLetterStore | None = None

    def resolve(self, request: Request, reason: str) -> Request | None:
        """The lifecycle tracker's resolver: the copy to requeue, or None."""
        stall_class = reason.split(":", 1)[0].strip() or "unknown"
        return self.requeue_or_quarantine(request, stall_class)

    def requeue_or_quarantine(self, request: Request, stall_class: str) -> Request | None:
        """The copy to requeue, or None after quarantining ``request`` (past the bound),
        or None with the request kept pending in the journal while the spider closes."""
        meta = request.meta
        meta.pop(metakeys.RECOVERY_CANCEL, None)
        if self.closing:
            keep_pending(request)
            return None
        attempts = int(meta.get(metakeys.REQUEUES, 0))
        if attempts >= self.conf.max_requeues:
            self.quarantine(request, stall_class, attempts + 1)
            return None
        new = request.replace(dont_filter=True)
        new.meta[metakeys.REQUEUES] = attempts + 1
        new.meta.pop(metakeys.DEADLINE, None)
        self.stats.inc_value(ad_stats.WATCHDOG_REQUEUED)
        logger.info("antideadlock recovery: requeued %s (%d/%d)",
                    strip_credentials(request.url), attempts + 1, self.conf.max_requeues)
        return new

    def quarantine(self, request: Request, stall_class: str, attempts: int) -> None:
        request.meta[metakeys.QUARANTINED] = True
        record = {"url": strip_credentials(request.url), "method": request.method,
                  "request_id": request_id(request),
                  "reason": f"cancelled by recovery {attempts} times without an answer",
                  "attempts": attempts, "class": stall_class, "diagnosis": self.evidence[:3],
                  "spider": getattr(self.crawler.spider, "name", None)}
        self.quarantined.append(record)
        self.stats.inc_value(ad_stats.WATCHDOG_QUARANTINED)
        logger.error("antideadlock recovery: quarantined %s after %d attempts (%s)",
                     record["url"], attempts, stall_class)
        try:
            self.quarantine_store().append([record])
        except Exception as exc:  # a full disk must not stop the crawl; the log has it
            logger.error("antideadlock recovery: cannot write quarantine file: %s", exc)
        journal = context_for(self.crawler).get("journal")
        if journal is not None:
            journal.mark_done(request)

    def quarantine_store(self) -> DeadLetterStore:
        if self._quarantine is None:
            path = self.conf.quarantine_file or state_dir(self.crawler) / "quarantine.jsonl"
            self._quarantine = DeadLetterStore(path)
        return self._quarantine

    def dead_letter_store(self) -> DeadLetterStore:
        if self._dead_letters is None:
            path = self.conf.dead_letter_file or state_dir(self.crawler) / "deadletter.jsonl"
            self._dead_letters = DeadLetterStore(path)
        return self._dead_letters
