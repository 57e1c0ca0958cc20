"""RequestJournal extension: resume a crawl after SIGKILL or a hard exit without a loss.

On by default (docs/recovery.md: it is where recovery leaves pending work), per spider
under the project's ``.scrapy/`` folder unless ANTIDEADLOCK_JOURNAL_DIR or JOBDIR says
otherwise. JOBDIR survives only a clean close (after a SIGKILL a resumed run finds
nothing to do).
This extension writes every request to a write-ahead journal
(:mod:`scrapy_antideadlock.primitives.journal`) when it is scheduled, and marks it
done only when its callback finished and its items passed the pipelines (seen by
:mod:`scrapy_antideadlock.origin`). When the spider opens on an existing journal,
every request not done is re-enqueued with ``dont_filter=True``.

Beside JOBDIR: after a clean close JOBDIR's queue restores what it holds, so the
journal replays only what JOBDIR cannot have (requests in flight at the close);
after a crash it replays everything pending (duplicates cost a re-crawl, never a
loss). Requests ``Request.to_dict`` cannot serialise (callbacks that are not spider
methods) are journaled by URL and reported at the next start, not silently lost.
"""

from __future__ import annotations

import logging
import os
import secrets
from itertools import count
from typing import Any

from scrapy import Request, signals
from scrapy.crawler import Crawler
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.utils.request import request_from_dict

from .. import metakeys
from .. import settings as ad_settings
from .. import stats as ad_stats
from ..context import connect_shared, context_for
from ..identity import strip_credentials
from ..origin import JOURNAL_KEY, origins_for
from ..primitives.deadletter import DeadLetterStore
from ..primitives.journal import Journal, JournalLocked
from ..reactor import require_asyncio_reactor
from ..timers import Timer, every, later
from .codec import decode_payload, pickle_unjsonable, snapshot
from .location import is_default_dir, jobdir_has_queue, journal_dir, set_jobdir_aside

logger = logging.getLogger(__name__)

__all__ = ["RequestJournal", "journal_dir", "journal_for", "JOURNAL_KEY", "KEEP_PENDING"]

OWNER = metakeys.JOURNAL_OWNER
KEEP_PENDING = metakeys.JOURNAL_KEEP  # the request ended cancelled and must stay pending
QUARANTINED = metakeys.QUARANTINED  # the request was quarantined; its end is final (done)
#: Records buffered past which a flush window ends early (bounds the buffer's memory).
FLUSH_RECORDS = 1000



def journal_for(crawler: Crawler) -> RequestJournal | None:
    """The crawler's journal extension, or None when the journal is off."""
    return context_for(crawler).get("journal")


class RequestJournal:
    """Write-ahead request journal, replayed when the spider opens."""

    def __init__(self, crawler: Crawler) -> None:
        conf = ad_settings.load(crawler.settings, "journal")
        if not conf.enabled or not ad_settings.get(crawler.settings, "ANTIDEADLOCK_ENABLED"):
            raise NotConfigured("ANTIDEADLOCK_JOURNAL_ENABLED is off")
        if crawler.settings.get("ANTIDEADLOCK_JOURNAL_ENABLED") is None and ad_settings.get(
                crawler.settings, "ANTIDEADLOCK_FLEET_REDIS_URL"):
            raise NotConfigured("fleet mode: the shared queue keeps pending work (set "
                                "ANTIDEADLOCK_JOURNAL_ENABLED to have a journal too)")
        require_asyncio_reactor("RequestJournal", crawler.settings)
        self.crawler = crawler
        self.conf = conf
        default_dir = is_default_dir(crawler.settings)
        self.directory = journal_dir(crawler.settings, getattr(crawler.spidercls, "name", None))
        self.jobdir = crawler.settings.get("JOBDIR")
        self.journal = Journal(self.directory, fsync=conf.fsync,
                               fsync_interval=conf.fsync_interval,
                               # the default directory is shared by every run of the spider:
                               # a second concurrent run goes on without a journal, at once
                               lock_timeout=min(conf.lock_timeout, 1.0) if default_dir
                               else conf.lock_timeout,
                               compact_min_bytes=conf.compact_min_bytes, autoflush=False,
                               repair=self._repair)
        self.stats = crawler.stats
        self._run = secrets.token_hex(3)
        self._seq = count(1)
        # key -> the token (in meta[OWNER]) of its latest scheduling: an int, not a weak
        # reference to the request, so a long queue adds nothing for the GC to walk
        self._owner: dict[str, int] = {}
        self._reached: set[str] = set()  # keys whose current request reached the downloader
        self._prev_seen: set[str] = set()
        self._warned_unserialisable = False
        self._ticker: Any = None
        self._compactions = 0
        self._checked_origin = False
        self._method_names: dict[Any, Any] = {}  # spider function -> method name (codec)
        self._flush_timer: Timer | None = None  # ends the current flush window
        self._fingerprint: Any = None  # the crawler's fingerprinter's method
        self._fsync_job: Any = None  # the periodic fsync on the loop monitor's thread
        # Counted here and added to the stats once a tick and at the close: a stats call
        # per request costs more than the count itself.
        self._scheduled_count = 0
        self._done_count = 0
        self._elided = 0  # the journal's count already added to the stats
        self.unreplayable: list[str] = []
        # Lock and read now, so a locked or unreadable journal stops the crawl at start
        # with a named error (JournalLocked) instead of crawling without a journal.
        try:
            self._state = self.journal.open()
        except JournalLocked as exc:
            if not default_dir:
                raise
            logger.warning("antideadlock journal: %s (another run of this spider?); this run "
                           "goes on without a journal. Set ANTIDEADLOCK_JOURNAL_DIR per run.", exc)
            raise NotConfigured("journal directory locked by another run") from None
        last = self._state.markers[-1] if self._state.markers else {}
        #: The previous run on this journal ended without a clean close (kill, hard exit).
        self.previous_crashed = self._state.records > 0 and not last.get("clean")
        self.jobdir_reset: list[str] = []
        if self.previous_crashed and self.jobdir:
            self.jobdir_reset = set_jobdir_aside(self.jobdir, len(self._state.pending))
        context_for(crawler).put("journal", self)
        origins_for(crawler).on_request_finished(self._finished)
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)
        connect_shared(crawler, self.request_scheduled, signals.request_scheduled)
        crawler.signals.connect(self.request_dropped, signal=signals.request_dropped)
        if self.jobdir:  # which pending requests JOBDIR's queue holds at a clean close
            connect_shared(crawler, self.request_reached, signals.request_reached_downloader)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RequestJournal:
        return cls(crawler)

    # ------------------------------------------------------------------ open / replay

    def spider_opened(self, spider: Any) -> None:
        state = self._state
        pending = state.pending
        self.stats.set_value(ad_stats.JOURNAL_PENDING_AT_START, len(pending))
        if self.conf.skip_seen:
            self._prev_seen = set(state.seen)
        last = state.markers[-1] if state.markers else {}
        left_to_jobdir: set[str] = set()
        if self.jobdir and last.get("jobdir") and last.get("clean") \
                and jobdir_has_queue(self.jobdir):
            left_to_jobdir = set(last.get("queued", ()))
        replayed = 0
        unreplayable: list[dict[str, Any]] = []
        if self.conf.replay:
            for key, record in pending.items():
                if key in left_to_jobdir:
                    continue
                request = self._rebuild(record, spider)
                if request is None:
                    unreplayable.append(record)
                    continue
                if record.get("fp"):
                    self._prev_seen.add(record["fp"])
                self.crawler.engine.crawl(request)
                replayed += 1
        self.stats.set_value(ad_stats.JOURNAL_REPLAYED, replayed)
        self.stats.set_value(ad_stats.JOURNAL_LEFT_TO_JOBDIR, len(left_to_jobdir & set(pending)))
        if self.jobdir_reset:
            self.stats.set_value(ad_stats.JOURNAL_JOBDIR_RESET, len(self.jobdir_reset))
        if unreplayable:
            self._report_unreplayable(unreplayable)
        if pending:
            logger.info("antideadlock journal %s: %d pending from a previous run, %d replayed, "
                        "%d left to JOBDIR, %d not replayable", self.directory, len(pending),
                        replayed, len(left_to_jobdir), len(unreplayable))
        self._ticker = every(min(self.conf.fsync_interval, 1.0), self._tick)
        monitor = context_for(self.crawler).get("loopmonitor")
        if self.conf.fsync == "interval" and monitor is not None:
            # The periodic fsync blocks for the disk (ms): on the monitor's thread, not the loop.
            self._fsync_job = monitor.add_periodic(self.conf.fsync_interval,
                                                   self.journal.sync_written)

    def _rebuild(self, record: dict[str, Any], spider: Any) -> Request | None:
        payload = record.get("r")
        if payload is None:
            return None
        try:
            request = request_from_dict(decode_payload(payload), spider=spider)
        except Exception as exc:  # a renamed callback, a class that moved, ...
            record["e"] = f"{type(exc).__name__}: {exc}"
            return None
        request.meta[JOURNAL_KEY] = record["k"]
        return request.replace(dont_filter=True)

    def _report_unreplayable(self, records: list[dict[str, Any]]) -> None:
        self.stats.set_value(ad_stats.JOURNAL_UNREPLAYABLE, len(records))
        urls = [record.get("u") or (record.get("r") or {}).get("url", "?") for record in records]
        self.unreplayable = urls
        logger.warning("antideadlock journal: %d pending requests cannot be replayed (callbacks "
                       "that are not spider methods, or changed code); listed in %s. First: %s",
                       len(records), self.directory / "unreplayable.jsonl", urls[:5])
        DeadLetterStore(self.directory / "unreplayable.jsonl",
                        lock_timeout=self.conf.lock_timeout).append(
            {"url": url, "error": record.get("e", ""), "key": record["k"]}
            for url, record in zip(urls, records, strict=True))
        for record in records:  # reported and parked: do not report again next start
            self.journal.done(record["k"], record.get("fp", ""))

    # ------------------------------------------------------------------ signals (plain functions)

    def request_scheduled(self, request: Request, **kwargs: Any) -> None:
        if not self.journal.is_open:
            return
        meta = request.meta
        meta.pop(KEEP_PENDING, None)
        key = meta.get(JOURNAL_KEY)
        fingerprint = self._fingerprint
        if fingerprint is None:
            fingerprint = self._fingerprint = self.crawler.request_fingerprinter.fingerprint
        fp = fingerprint(request).hex()
        if key is None:
            if self._prev_seen and not request.dont_filter and fp in self._prev_seen:
                self.stats.inc_value(ad_stats.JOURNAL_SKIPPED_SEEN)
                raise IgnoreRequest("done or replayed in a previous run (journal)")
            key = meta[JOURNAL_KEY] = f"{self._run}.{next(self._seq)}"
        token = meta[OWNER] = next(self._seq)
        self._owner[key] = token
        self._reached.discard(key)
        try:  # a snapshot: JSON-encoded at the flush, after middlewares changed the request
            payload, url, error = snapshot(
                request, self.crawler.spider, self._method_names), "", ""
        except Exception as exc:
            payload, url, error = None, self._unserialisable(request.url, exc), _error(exc)
        self.journal.scheduled(key, fp, payload, url=url, error=error)
        self._scheduled_count += 1
        self._flush_soon()

    def _repair(self, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
        """The journal's hook for a payload JSON could not encode (at the flush): its meta
        and cb_kwargs values JSON cannot hold pickled, else the URL alone."""
        try:
            return pickle_unjsonable(payload), "", ""
        except Exception as exc:
            return None, self._unserialisable(str(payload.get("url", "")), exc), _error(exc)

    def _unserialisable(self, url: str, exc: Exception) -> str:
        """Count and warn (once) about a request journaled by URL only; its URL without
        credentials (the only form that reaches the journal or the log)."""
        url = strip_credentials(url)
        self.stats.inc_value(ad_stats.JOURNAL_UNSERIALISABLE)
        if not self._warned_unserialisable:
            self._warned_unserialisable = True
            logger.warning("antideadlock journal: %s cannot be serialised (%s); it is "
                           "journaled by URL only and will be reported at a resume", url, exc)
        return url

    def request_dropped(self, request: Request, spider: Any = None) -> None:
        self._finish(request, dropped=True)

    def request_reached(self, request: Request, **kwargs: Any) -> None:
        key = request.meta.get(JOURNAL_KEY)
        if key is not None and self._is_owner(key, request):
            self._reached.add(key)

    def _finished(self, request: Request) -> None:
        self._finish(request)

    def _finish(self, request: Request, dropped: bool = False) -> None:
        if not self.journal.is_open:
            return
        meta = request.meta
        key = meta.get(JOURNAL_KEY)
        if key is None or not self._is_owner(key, request):
            return  # superseded by a retry/redirect/requeue copy, or not journaled
        self._owner.pop(key, None)
        self._reached.discard(key)
        if meta.get(KEEP_PENDING) and not meta.get(QUARANTINED) and not dropped:
            self.stats.inc_value(ad_stats.JOURNAL_KEPT_PENDING)
            return
        if self.journal.done(key):
            self._done_count += 1
            self._flush_soon()

    def _publish_counts(self) -> None:
        if self._scheduled_count:
            self.stats.inc_value(ad_stats.JOURNAL_SCHEDULED, self._scheduled_count)
            self._scheduled_count = 0
        if self._done_count:
            self.stats.inc_value(ad_stats.JOURNAL_DONE, self._done_count)
            self._done_count = 0
        elided = self.journal.counters["elided"]
        if elided != self._elided:
            self.stats.inc_value(ad_stats.JOURNAL_ELIDED, elided - self._elided)
            self._elided = elided

    def _flush_soon(self) -> None:
        """One ``write`` per flush window (FLUSH_INTERVAL, or FLUSH_RECORDS records) for
        everything journaled in it; a request scheduled and done within one window costs
        its "done" line only. A crash loses at most the window: a re-crawl of its work."""
        if self._flush_timer is None:
            self._flush_timer = later(self.conf.flush_interval, self._flush)
        elif self.journal.buffered >= FLUSH_RECORDS:
            self._flush()

    def _flush(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()  # a full buffer ended the window early
        if self.journal.is_open:
            self.journal.flush()

    def _is_owner(self, key: str, request: Request) -> bool:
        """Whether ``request`` is its key's latest scheduling (or a copy of it not scheduled
        itself, e.g. a redirect the duplicate filter dropped): an earlier one, superseded
        by a retry or requeue copy, must not mark the key done."""
        token = self._owner.get(key)
        return token is None or request.meta.get(OWNER) == token

    def mark_done(self, request: Request) -> None:
        """Mark ``request`` finished for good (e.g. quarantined) whatever its owner state."""
        key = request.meta.get(JOURNAL_KEY)
        if key is not None and self.journal.is_open and self.journal.done(key):
            self._done_count += 1
            self._flush_soon()

    # ------------------------------------------------------------------ durability

    def _tick(self) -> None:
        self._publish_counts()
        if self._fsync_job is None:
            self.journal.tick()
        if not self._checked_origin:
            self._checked_origin = True
            if not origins_for(self.crawler).hooked:
                logger.error("antideadlock journal: ItemOriginMiddleware is not enabled, so no "
                             "request is ever marked done and a resume re-crawls everything; "
                             "add it to SPIDER_MIDDLEWARES (the add-on does)")
        compactions = self.journal.counters["compactions"]
        if compactions != self._compactions:
            self.stats.set_value(ad_stats.JOURNAL_COMPACTIONS, compactions)
            self._compactions = compactions

    def save(self) -> int:
        """fsync now (before a close or a hard exit); return how many requests are pending."""
        if self.journal.is_open:
            self.journal.sync()
        return len(self.journal.pending_keys())

    def pending_count(self) -> int:
        """How many requests are pending (scheduled, not done)."""
        return len(self.journal.pending_keys())

    def save_from_thread(self) -> None:
        """Write the current flush window's records and fsync, from another thread (a hard
        exit, the loop possibly blocked). Never raises."""
        try:
            self.journal.write_buffered()
        except Exception:  # noqa: BLE001 - exiting anyway; the earlier windows are written
            logger.exception("antideadlock journal: writing the last records at exit failed")
        fd = self.journal._fd
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError:
                pass

    def spider_closed(self, spider: Any, reason: str = "") -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._fsync_job is not None:
            self._fsync_job.cancel()  # waits for a run in progress (close fsyncs below)
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # the marker and the close below flush
            self._flush_timer = None
        self._publish_counts()
        if not self.journal.is_open:
            return
        pending = self.journal.pending_keys()
        self.stats.set_value(ad_stats.JOURNAL_PENDING_AT_CLOSE, len(pending))
        self.stats.set_value(ad_stats.JOURNAL_COMPACTIONS, self.journal.counters["compactions"])
        if reason == "finished" and not pending:
            self.journal._seen.clear()  # a finished job: the next run starts afresh
            self.journal.compact()
            self.journal.marker(clean=True, reason=reason, jobdir=bool(self.jobdir), queued=[])
        else:
            queued = [key for key in pending if key not in self._reached] if self.jobdir else []
            self.journal.marker(clean=True, reason=reason, jobdir=bool(self.jobdir),
                                queued=queued)
        self.journal.close()


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def keep_pending(request: Request) -> None:
    """Mark ``request`` so that its (cancelled) end leaves it pending in the journal."""
    request.meta[KEEP_PENDING] = True
