"""A JSONL dead-letter store: what could not be stored goes here, with the reason.

Several processes (crawlers of one job, a supervisor) may append to the same file, so
each append takes an exclusive ``flock`` with a *timeout* (a crashed holder cannot
block us for ever: the kernel drops its lock, and a live one that hangs makes us
fail loudly instead of waiting) and writes all its lines with one ``write`` on an
``O_APPEND`` descriptor, then ``fsync``s. A crash can therefore leave at most one
torn last line; the next append starts on a fresh line and :func:`read_dead_letters`
skips a torn line instead of failing.

No Scrapy import: usable by any part that must park records it cannot deliver.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .filelock import lock_exclusive

__all__ = ["DeadLetterLockTimeout", "DeadLetterStore", "read_dead_letters", "to_jsonable"]


class DeadLetterLockTimeout(TimeoutError):
    """The file lock was not obtained within the lock timeout."""


def to_jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: unknown objects become their ``repr`` (never an error)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        pass
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, float):  # nan / inf
        return repr(value)
    return repr(value)


class DeadLetterStore:
    """Append-only JSONL file of records that could not be delivered."""

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 10.0,
                 fsync: bool = True) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.fsync = fsync
        self.appended = 0
        self._thread_lock = threading.Lock()  # flock is per open file, not per thread

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append ``records`` (one line each) atomically; return how many were written.

        Raises :class:`DeadLetterLockTimeout` if the lock is not free within
        ``lock_timeout`` seconds; nothing is written then.
        """
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        lines = []
        for record in records:
            record = dict(record)
            record.setdefault("ts", now)
            lines.append(json.dumps(to_jsonable(record), ensure_ascii=False,
                                    separators=(",", ":")))
        if not lines:
            return 0
        data = ("\n".join(lines) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
                try:
                    if _ends_torn(fd):
                        data = b"\n" + data
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self.appended += len(lines)
        return len(lines)

    def _lock(self, fd: int) -> None:
        if not lock_exclusive(fd, self.lock_timeout):
            raise DeadLetterLockTimeout(
                f"dead-letter file {self.path} still locked after {self.lock_timeout:.1f}s")

    def read(self) -> list[dict[str, Any]]:
        return read_dead_letters(self.path)


def _ends_torn(fd: int) -> bool:
    """True if the file's last byte is not a newline (a crashed writer's torn line)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_dead_letters(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record in ``path`` (a torn line from a crash is skipped)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
