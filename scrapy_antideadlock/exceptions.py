"""Named exceptions of scrapy-antideadlock.

They reach downloader-middleware ``process_exception`` and request errbacks like
any download error. None of them subclasses an exception in Scrapy's default
``RETRY_EXCEPTIONS``: the deadline middleware retries the retryable ones itself,
later and at a lower priority (see the README), so that RetryMiddleware does not
retry them at once with the same deadline.
"""

from __future__ import annotations


class AntiDeadlockError(Exception):
    """Base of the pack's exceptions."""


class DownloadCancelled(AntiDeadlockError):
    """The download was cancelled through the guarded handler (``cancel(request, reason)``).

    ``retry`` says whether the deadline middleware should retry the request; a
    cancel from the watchdog leaves that to the watchdog (default False).
    """

    def __init__(self, reason: str = "cancelled", *, stage: str = "", retry: bool = False) -> None:
        self.reason = reason
        self.stage = stage
        self.retry = retry
        where = f" while {stage}" if stage else ""
        super().__init__(f"download cancelled{where}: {reason}")


class DeadlineExceeded(DownloadCancelled):
    """The request's deadline (lease wait + slot queue + transfer) ran out. Retryable."""

    def __init__(self, timeout: float | None, elapsed: float, stage: str,
                 reason: str = "deadline exceeded", key: str | None = None,
                 budget: float | None = None) -> None:
        self.timeout = timeout
        self.elapsed = elapsed
        self.key = key  # the latency key (downloader slot) the deadline came from
        self.budget = budget  # seconds the transfer itself was given, if it started
        limit = "none" if timeout is None else f"{timeout:.2f}s"
        super().__init__(f"{reason} after {elapsed:.2f}s (deadline {limit})", stage=stage,
                         retry=True)


class ProxyLeaseTimeout(AntiDeadlockError):
    """No proxy slot became free within the bound (lease timeout or the deadline). Retryable."""

    def __init__(self, waited: float, pool: str = "proxy", owner: str = "") -> None:
        self.waited = waited
        self.pool = pool
        self.owner = owner
        super().__init__(f"no free slot in pool {pool!r} for {owner or 'request'} "
                         f"after {waited:.2f}s")


class Preempted(AntiDeadlockError):
    """Recovery preempted this unit of work where it waited (a middleware, callback or
    pipeline past its lifecycle deadline during a stall, or a deadlock's victim).

    An item preempted in a pipeline ends with this error after it was dead-lettered.
    """

    def __init__(self, reason: str, *, stage: str = "") -> None:
        self.reason = reason
        self.stage = stage
        where = f" in {stage}" if stage else ""
        super().__init__(f"preempted{where}: {reason}")


RETRYABLE = (DeadlineExceeded, ProxyLeaseTimeout)
