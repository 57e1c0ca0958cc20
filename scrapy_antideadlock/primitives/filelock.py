"""A timed exclusive ``flock``: file access shared between crawls never waits for ever."""

from __future__ import annotations

import fcntl
import time


def lock_exclusive(fd: int, timeout: float, *, max_pause: float = 0.1) -> bool:
    """Take ``flock(LOCK_EX)`` on ``fd``, retrying with backoff; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, max_pause)
