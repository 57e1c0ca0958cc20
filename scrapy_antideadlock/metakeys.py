"""Every ``request.meta`` key the pack reads or writes, in one place (like ``stats.py``).

The keys are part of the pack's contract with users and between its own components: a
user may set :data:`NO_PROXY` or read :data:`DEADLINE`; the journal drops the ones that
must not survive a restart (:data:`PROCESS_LOCAL`).
"""

from __future__ import annotations

#: Stable owner id of a request (leases, wait-for graph, journal); set on first sight.
REQUEST_ID = "antideadlock_id"
#: Absolute ``time.monotonic()`` by which the request must be done with its download.
DEADLINE = "antideadlock_deadline"
#: The user's own ``download_timeout`` for this request (or None): their ceiling.
USER_TIMEOUT = "antideadlock_user_timeout"
#: How many times a deadline-hit request was retried.
DEADLINE_RETRIES = "antideadlock_deadline_retries"
#: How many times a request was retried after a proxy lease timeout.
LEASE_RETRIES = "antideadlock_lease_retries"
#: Member name of the proxy the pack put in ``meta["proxy"]``.
PROXY_MARK = "antideadlock_proxy"
#: Set True by a user to skip proxy leasing for one request.
NO_PROXY = "antideadlock_no_proxy"
#: How many times recovery requeued this request.
REQUEUES = "antideadlock_requeues"
#: Why recovery cancelled this request (its stall class).
RECOVERY_CANCEL = "antideadlock_recovery_cancel"
#: The journal key of a request (its fingerprint-based identity across runs).
JOURNAL_KEY = "antideadlock_journal_key"
#: Which scheduling of its journal key a request is (a retry or redirect copy carries its
#: original's until it is scheduled itself): only the latest one's end marks the key done.
JOURNAL_OWNER = "antideadlock_journal_owner"
#: Set True by a user to keep a request pending in the journal after it finished.
JOURNAL_KEEP = "antideadlock_journal_keep"
#: Set on a request that recovery quarantined.
QUARANTINED = "antideadlock_quarantined"

#: Keys whose values mean nothing in another process (dropped when a request is persisted).
PROCESS_LOCAL = (DEADLINE, REQUEST_ID, RECOVERY_CANCEL, JOURNAL_KEEP, JOURNAL_OWNER)

ALL = (REQUEST_ID, DEADLINE, USER_TIMEOUT, DEADLINE_RETRIES, LEASE_RETRIES, PROXY_MARK,
       NO_PROXY, REQUEUES, RECOVERY_CANCEL, JOURNAL_KEY, JOURNAL_OWNER, JOURNAL_KEEP,
       QUARANTINED)
