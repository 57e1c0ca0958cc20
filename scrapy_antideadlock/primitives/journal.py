"""A crash-safe request journal: write-ahead, at-least-once (docs/recovery.md, "Durability").

Each request is recorded when it is *scheduled* and marked *done* only after its
callback finished and its items were stored. The file is append-only JSONL, written
with one ``os.write`` per batch on an ``O_APPEND`` descriptor (``autoflush``: per
record; else the caller flushes, e.g. once per flush window), so a crash (SIGKILL,
``os._exit``, power loss) can only lose a suffix of the records: a child request is
always appended before its parent's "done", so losing a suffix re-crawls, never loses.
Replay = scheduled - done, in append order (a key scheduled again after "done" is
pending again).

Batches (``autoflush=False``) are cheap for short-lived requests: a "scheduled" record
is JSON-encoded only when the batch is written, and not written at all if its request
was done (or scheduled again) before that; only the "done" line is. Such a batch no
longer holds each request's lines in append order, so it starts with a header giving
its line count, and a batch cut short by a crash has its "done" lines ignored on
reading: its requests stay pending (a re-crawl), none goes missing.

Records (one JSON object per line, field ``t`` is the type)::

    {"t": "s", "k": key, "fp": fingerprint, "r": {request dict} | null, "u": url, "e": error}
    {"t": "d", "k": key, "fp": fingerprint}
    {"t": "seen", "fps": [fingerprint, ...]}     # done fingerprints kept by compaction
    {"t": "m", ...}                              # markers (e.g. clean close beside JOBDIR)
    {"t": "b", "n": lines}                       # a batch that elided records follows

Growth is bounded by compaction: the pending records and the done fingerprints are
rewritten to a temporary file, fsynced and renamed over the journal (then the
directory is fsynced), so a crash during compaction leaves either the old or the new
file, both complete. One process at a time: an exclusive ``flock`` on ``lock``, taken
with a timeout that ends in :class:`JournalLocked` naming the holder.

No Scrapy import: payloads are plain dicts (``Request.to_dict()`` on the Scrapy side).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .filelock import lock_exclusive
from .journal_format import (
    Record,
    Repair,
    ReplayState,
    batch_header,
    done_line,
    encode,
    read_state,
    record_line,
)

__all__ = ["Journal", "JournalError", "JournalLocked", "ReplayState", "FSYNC_POLICIES"]

FSYNC_POLICIES = ("always", "interval", "never")
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"


class JournalError(Exception):
    """The journal directory cannot be used."""


class JournalLocked(JournalError):
    """Another process holds the journal's lock past the lock timeout."""

    def __init__(self, path: Path, timeout: float, holder: str) -> None:
        self.path, self.timeout, self.holder = path, timeout, holder
        super().__init__(f"journal {path} is locked by {holder or 'another process'} "
                         f"(waited {timeout:.1f}s); is another crawl using this directory?")


class Journal:
    """An append-only request journal in ``directory`` (created if missing).

    Use from one thread (the event loop); :meth:`stats` may be read from any thread.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: str = "interval",
                 fsync_interval: float = 1.0, lock_timeout: float = 10.0,
                 compact_min_bytes: int = 4 << 20, compact_ratio: float = 4.0,
                 keep_seen: bool = True, autoflush: bool = True,
                 repair: Repair | None = None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_FILE
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.lock_timeout = lock_timeout
        self.compact_min_bytes = compact_min_bytes
        self.compact_ratio = compact_ratio
        self.keep_seen = keep_seen
        # autoflush=False: records wait in memory until flush() (the caller flushes once per
        # window). Losing that buffer in a crash loses a suffix: a re-crawl only.
        self.autoflush = autoflush or fsync == "always"
        self.repair = repair  # for a payload JSON cannot hold (journal_format.record_line)
        self._buffer: list[bytes | Record] = []
        self._fd: int | None = None
        self._lock_fd: int | None = None
        # key -> latest "s" record: a Record while it waits in the buffer, then its line
        # (bytes, which the garbage collector does not track: a long queue costs it nothing)
        self._pending: dict[str, Record | bytes] = {}
        self._pending_fp: dict[str, str] = {}
        self._live = 0  # bytes of the written pending lines (compaction trigger, incremental)
        self._seen: set[str] = set()
        self._size = 0
        self._unsynced = False
        self._last_sync = time.monotonic()
        self.counters = {"scheduled": 0, "done": 0, "elided": 0, "compactions": 0,
                         "fsyncs": 0}

    # ------------------------------------------------------------------ open / close

    def open(self) -> ReplayState:
        """Lock the directory, read what a previous run left, compact it, and return it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            state = self._read()
            for key, record in state.pending.items():
                self._pending[key] = Record.from_dict(record)
                self._pending_fp[key] = record.get("fp", "")
            self._seen = set(state.seen) if self.keep_seen else set()
            # Markers speak to the next start only (e.g. "JOBDIR holds these"): once read,
            # they are dropped, so a crash of this run cannot make the next one trust them.
            self._rewrite([])
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._release_lock()
            raise
        return state

    def close(self) -> None:
        """Flush, fsync and release the lock (safe to call twice)."""
        if self._fd is not None:
            self.flush()
            self.sync()
            os.close(self._fd)
            self._fd = None
        self._release_lock()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    # ------------------------------------------------------------------ writing

    def scheduled(self, key: str, fp: str, payload: dict[str, Any] | None, *,
                  url: str = "", error: str = "") -> None:
        """Record that ``key`` was scheduled; ``payload`` None = cannot be replayed.

        Without autoflush, ``payload`` is encoded at the next flush: it must not change
        until then (the caller passes a copy of anything the request still mutates).
        """
        record = Record(key, fp, payload, url, error)
        old = self._pending.pop(key, None)
        if old is not None:
            self._drop(old)
        self._pending_fp[key] = fp
        self.counters["scheduled"] += 1
        if self.autoflush:
            self._append(self._encode(record))
        else:
            self._pending[key] = record
            self._buffer.append(record)

    def done(self, key: str, fp: str = "") -> bool:
        """Record that ``key`` finished; False (nothing written) if it was not pending."""
        pending = self._pending.pop(key, None)
        if pending is None:
            return False
        stored_fp = self._pending_fp.pop(key, "")
        fp = fp or stored_fp
        self._drop(pending)
        # written even when the "s" line never was: a resume's seen-set needs the fp
        self._append(done_line(key, fp))
        if fp and self.keep_seen:
            self._seen.add(fp)
        self.counters["done"] += 1
        self.maybe_compact()
        return True

    def _drop(self, pending: Record | bytes) -> None:
        """A pending record is done or replaced: elide it if it was not written yet."""
        if isinstance(pending, bytes):
            self._live -= len(pending)
        else:
            pending.elided = True
            self.counters["elided"] += 1

    def _encode(self, record: Record) -> bytes:
        """``record``'s line, which stands for it in ``_pending`` from now on."""
        line = self._pending[record.key] = record_line(record, self.repair)
        self._live += len(line)
        return line

    def marker(self, **fields: Any) -> None:
        """Append a marker record (e.g. ``clean_close``) and fsync it."""
        self._append(encode({"t": "m", **fields}))
        self.sync()

    def flush(self) -> None:
        """Encode the buffered records that are still pending and write the batch with one
        ``write`` (headed by its line count if it elided records)."""
        if not self._buffer or self._fd is None:
            return
        data = _batch(self._buffer, self._encode)
        self._buffer.clear()
        self._size += len(data)
        _write_all(self._fd, data)
        self._unsynced = True

    def write_buffered(self) -> None:
        """Write the buffered records from another thread, just before a hard exit: the
        loop that owns the buffer may be blocked, so its flush would never come and the
        window's records (possibly every record so far) would be lost. The in-memory
        state is left alone; a batch the loop writes as well is written twice, which can
        only leave a request pending (a re-crawl)."""
        fd, items = self._fd, list(self._buffer)  # one copy: the loop may append meanwhile
        if fd is not None and items:  # encoded as flush() does, without touching _pending
            _write_all(fd, _batch(items, lambda record: record_line(record, self.repair)))
            self._unsynced = True

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def sync(self) -> None:
        """Flush, then fsync if anything was written since the last fsync."""
        self.flush()
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False
            self.counters["fsyncs"] += 1
        self._last_sync = time.monotonic()

    def sync_written(self) -> bool:
        """fsync what earlier flushes wrote, from any thread (the buffer is the loop's).

        Only power loss needs it (the kernel keeps written bytes through a SIGKILL), so a
        caller may run it off the event loop: it blocks for the disk. A descriptor closed
        meanwhile (compaction, close) only makes it a no-op: those fsync themselves.
        """
        fd = self._fd
        if fd is None or not self._unsynced:
            return False
        self._unsynced = False  # a write after this is covered by the fsync below or the next
        try:
            os.fsync(fd)
        except OSError:
            return False
        self.counters["fsyncs"] += 1
        self._last_sync = time.monotonic()
        return True

    def tick(self) -> None:
        """Call periodically: fsync under the "interval" policy."""
        if self.fsync_policy == "interval" and \
                time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            raise JournalError(f"journal {self.path} is not open")
        if not self.autoflush:
            self._buffer.append(line)
            return
        self._size += len(line)
        _write_all(self._fd, line)
        self._unsynced = True
        if self.fsync_policy == "always":
            self.sync()

    # ------------------------------------------------------------------ compaction

    def maybe_compact(self) -> bool:
        """Compact when the file is over ``compact_min_bytes`` and ``compact_ratio`` x live."""
        if self._size < self.compact_min_bytes:
            return False
        live = self._live + 48 * len(self._seen)
        if self._size < self.compact_ratio * max(live, 1):
            return False
        self.compact()
        return True

    def compact(self) -> None:
        """Rewrite pending records and done fingerprints atomically (temp, fsync, rename)."""
        # everything buffered is in the in-memory state rewritten below (pending records
        # not written yet are encoded there)
        self._buffer.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._rewrite([])
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.counters["compactions"] += 1

    def _rewrite(self, markers: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        chunks: list[bytes] = []
        seen = sorted(self._seen)
        for start in range(0, len(seen), 1000):
            chunks.append(encode({"t": "seen", "fps": seen[start:start + 1000]}))
        chunks.extend(line if isinstance(line, bytes) else self._encode(line)
                      for line in list(self._pending.values()))
        chunks.extend(encode(m) for m in markers)
        data = b"".join(chunks)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)
        self._size = len(data)
        self._unsynced = False

    # ------------------------------------------------------------------ reading

    def _read(self) -> ReplayState:
        return read_state(self.path)

    # ------------------------------------------------------------------ introspection

    def pending_keys(self) -> list[str]:
        return list(self._pending)

    def is_pending(self, key: str) -> bool:
        return key in self._pending

    def seen(self) -> set[str]:
        return self._seen

    def stats(self) -> dict[str, int]:
        return {**self.counters, "pending": len(self._pending), "bytes": self._size}

    # ------------------------------------------------------------------ lock

    def _acquire_lock(self) -> int:
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not lock_exclusive(fd, self.lock_timeout, max_pause=0.2):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise JournalLocked(path, self.lock_timeout, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None


def _batch(items: list[bytes | Record], encode_record: Callable[[Record], bytes]) -> bytes:
    """One write's bytes: the lines, records not elided encoded, headed by the line count
    if any was elided."""
    chunks: list[bytes] = [b""]  # the header's place
    elided = False
    for item in items:
        if isinstance(item, bytes):
            chunks.append(item)
        elif item.elided:
            elided = True
        else:
            chunks.append(encode_record(item))
    if elided:
        chunks[0] = batch_header(len(chunks) - 1)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pending(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The pending records of a journal directory, without locking it (for tools/tests)."""
    journal = Journal(directory)
    return list(journal._read().pending.values())


def iter_urls(records: Iterable[dict[str, Any]]) -> list[str]:
    """URL of each record (from the request dict, else the ``u`` field)."""
    return [(r.get("r") or {}).get("url") or r.get("u", "") for r in records]
