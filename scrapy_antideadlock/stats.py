"""Every stat the pack emits, with a one-line meaning (the README stats table is checked
against this module by a test).

Names are ``antideadlock/<part>/<name>``. A ``{placeholder}`` stands for a family
(e.g. ``antideadlock/pg/retries/{sqlstate}``). Components should use these
constants rather than string literals so a typo cannot create a stat nobody reads.
"""

from __future__ import annotations

import re

STATS: dict[str, str] = {}


def _stat(name: str, meaning: str) -> str:
    full = f"antideadlock/{name}"
    if full in STATS:
        raise RuntimeError(f"stat {full} declared twice")
    STATS[full] = meaning
    return full


def family(template: str, **values: object) -> str:
    """Fill a declared ``{placeholder}`` stat name, e.g. family(PG_RETRIES, sqlstate="40P01")."""
    if template not in STATS:
        raise KeyError(f"undeclared stat family {template}")
    return template.format(**values)


def is_declared(name: str) -> bool:
    """True if ``name`` is a declared stat or an instance of a declared family."""
    if name in STATS:
        return True
    for template in STATS:
        if "{" in template:
            pattern = re.escape(template)
            pattern = re.sub(r"\\\{[a-z_]+\\\}", r"[^/]+", pattern)
            if re.fullmatch(pattern, name):
                return True
    return False


# ---- deadline ----------------------------------------------------------------------------
# (section owned by the downloader middleware)
DEADLINE_SET = _stat("deadline/set", "Requests given a deadline (each attempt counts).")
DEADLINE_USER = _stat("deadline/user_timeout",
                      "Requests with the user's own timeout (meta download_timeout, spider "
                      "attribute or a set DOWNLOAD_TIMEOUT) as their deadline's ceiling.")
DEADLINE_EXCEEDED = _stat("deadline/exceeded", "Requests failed with DeadlineExceeded.")
DEADLINE_EXCEEDED_STAGE = _stat("deadline/exceeded/{stage}",
                                "DeadlineExceeded by stage: queued, lease_wait or transfer.")
DEADLINE_RETRIES = _stat("deadline/retries",
                         "Retries scheduled after DeadlineExceeded or ProxyLeaseTimeout.")
DEADLINE_OWN_RETRIES = _stat("deadline/own_retries",
                             "Deadline retries that used no RETRY_TIMES: cut while queued, or "
                             "below the ceiling while most of the slot was cut or RETRY_TIMES "
                             "is Scrapy's default.")
DEADLINE_GAVE_UP = _stat("deadline/gave_up",
                         "Requests that hit their deadline/lease bound with no retry left.")
DEADLINE_CANCELS = _stat("deadline/cancels",
                         "Downloads cancelled through the guarded handler (any reason).")
DEADLINE_TIGHTENED = _stat("deadline/tightened",
                           "Deadlines given while the slot was cold (DEADLINE_INITIAL), cut to "
                           "the slot's T once it warmed up during the transfer.")
DEADLINE_LENT = _stat("deadline/lent", "Concurrency slots lent by overdue transfers.")
DEADLINE_LENT_MAX = _stat("deadline/lent_max", "Most concurrency slots lent at one time.")
DEADLINE_HEDGES = _stat("deadline/hedges",
                        "Overdue GET/HEAD transfers that got a second copy (DEADLINE_HEDGE).")
DEADLINE_HEDGE_WINS = _stat("deadline/hedge_wins",
                            "Hedged transfers where the second copy answered first.")
DEADLINE_SLOTS_EVICTED = _stat("deadline/slots_evicted",
                               "Slot latency histories dropped (least recently used) to keep "
                               "memory bounded; such a slot starts again from the shared prior.")
DEADLINE_P99 = _stat("deadline/p99/{slot}",
                     "p99 of successful transfer latency per downloader slot at close, s (the 20 busiest).")
DEADLINE_TIMEOUT = _stat("deadline/timeout/{slot}",
                         "Adaptive deadline per downloader slot at close, s (the 20 busiest).")

# ---- proxy -------------------------------------------------------------------------------
# (section owned by the downloader middleware)
PROXY_ACQUIRED = _stat("proxy/leases_acquired", "Proxy slot leases granted.")
PROXY_RELEASED = _stat("proxy/leases_released", "Proxy slot leases returned (any reason).")
PROXY_EXPIRED = _stat("proxy/leases_expired",
                      "Leases reclaimed at their TTL (their downloads cancelled).")
PROXY_WAIT_TIMEOUTS = _stat("proxy/lease_timeouts",
                            "Requests that waited for a proxy slot past the bound.")
PROXY_DOUBLE_RELEASES = _stat("proxy/double_releases_prevented",
                              "Second releases of a lease turned into a no-op.")
PROXY_COOLDOWNS = _stat("proxy/cooldowns", "Times a failing proxy was put in cooldown.")
PROXY_FAILURES = _stat("proxy/failures",
                       "Transfers through a leased proxy that failed or got a failure code.")
PROXY_SKIPPED = _stat("proxy/skipped",
                      "Requests left alone: own meta proxy or meta antideadlock_no_proxy.")
PROXY_MAX_WAIT = _stat("proxy/max_wait", "Longest wait for a proxy slot, s.")
PROXY_HELD_AT_CLOSE = _stat("proxy/held_at_close",
                            "Leases still held when the spider closed (released then).")

# ---- pg ----------------------------------------------------------------------------------
# (section owned by the PostgreSQL pipeline)
PG_ITEMS = _stat("pg/items",
                 "Items the PostgreSQL pipeline received. Exactly: items = rows_upserted + "
                 "dedup_drops + dead_lettered + deadletter_errors (once every batch settled).")
PG_ROWS_UPSERTED = _stat("pg/rows_upserted",
                         "Items committed as row upserts (a key written in two batches counts "
                         "twice; one superseded inside a batch counts as a dedup_drop).")
PG_BATCHES = _stat("pg/batches", "Batches (transactions) committed.")
PG_DEDUP_DROPS = _stat("pg/dedup_drops",
                       "Items superseded by a later item with the same key in one batch "
                       "(stored: the later item's row holds the key).")
PG_RETRIES = _stat("pg/retries", "Batch attempts retried after a transient failure.")
PG_RETRIES_BY = _stat("pg/retries/{sqlstate}",
                      "Retries by SQLSTATE or pool_timeout/pool_full/connection/client_timeout.")
PG_DEADLOCKS = _stat("pg/deadlocks", "Deadlocks (40P01) seen and retried.")
PG_LOCK_TIMEOUTS = _stat("pg/lock_timeouts", "lock_timeout expiries (55P03) seen and retried.")
PG_BATCH_SPLITS = _stat("pg/batch_splits", "Failed batches split in halves to isolate bad rows.")
PG_DEAD_LETTERED = _stat("pg/dead_lettered",
                         "Items written to the dead-letter store instead of the table (with "
                         "durability commit they are dropped: item_dropped_count).")
PG_DEAD_LETTERED_BY = _stat("pg/dead_lettered/{reason}", "Dead-lettered items by reason.")
PG_DEADLETTER_ERRORS = _stat("pg/deadletter_errors",
                             "Items the dead-letter store could not take (logged as errors).")
PG_BAD_ITEMS = _stat("pg/bad_items",
                     "Items rejected before writing: unknown type, missing key, bad value.")
PG_POOL_WAIT_MAX = _stat("pg/pool_wait_max", "Longest wait for a pooled connection (seconds).")
PG_FLUSH_LATENCY_P99 = _stat("pg/flush_latency_p99",
                             "p99 of batch flush time incl. retries (seconds).")

# ---- playwright ----------------------------------------------------------------------------
PW_PAGES_OPENED = _stat("playwright/pages/opened", "Browser pages opened by the handler.")
PW_PAGES_CLOSED = _stat("playwright/pages/closed", "Browser pages seen closed (any path).")
PW_PAGES_FORCE_CLOSED = _stat(
    "playwright/pages/force_closed/{reason}",
    "Pages the handler closed because nobody else did (after_callback, failure, cancelled, "
    "timeout, age, crash, shutdown).")
PW_CONTEXTS_OPENED = _stat("playwright/contexts/opened", "Browser contexts opened.")
PW_CONTEXTS_CLOSED = _stat("playwright/contexts/closed", "Browser contexts seen closed.")
PW_CONTEXTS_FORCE_CLOSED = _stat(
    "playwright/contexts/force_closed/{reason}",
    "Contexts the handler closed (idle, evicted, timeout, crash, shutdown).")
PW_CALL_TIMEOUTS = _stat("playwright/call_timeouts/{call}",
                         "Browser calls that overran their bound, by call (goto, evaluate, ...).")
PW_BROWSER_RESTARTS = _stat("playwright/browser_restarts",
                            "Browsers relaunched after the previous one died.")
PW_BROWSER_CRASHES = _stat("playwright/browser_crashes", "Browser disconnections seen mid-crawl.")
PW_CRASH_RETRIES = _stat("playwright/crash_retries",
                         "Downloads retried in the handler because the browser or page died.")
PW_BROWSER_KILLED = _stat("playwright/browser_killed",
                          "Browser processes killed because close overran its bound.")
PW_OPEN_PAGES_AT_CLOSE = _stat(
    "playwright/open_pages_at_close",
    "Pages still open in the browser after shutdown cleanup, counted by the browser (0).")
PW_OPEN_CONTEXTS_AT_CLOSE = _stat(
    "playwright/open_contexts_at_close",
    "Contexts still open in the browser after shutdown cleanup, counted by the browser (0).")

# ---- watchdog ----------------------------------------------------------------------------
WATCHDOG_STALLS = _stat("watchdog/stalls", "Stall episodes detected (any class).")
WATCHDOG_STALLS_BY_CLASS = _stat(
    "watchdog/stalls/{stall_class}",
    "Stall episodes of one class: blocked_loop, deadlock, livelock, stalled_io, unknown.")
WATCHDOG_LAST_CLASS = _stat("watchdog/last_class", "Class of the most recent stall episode.")
WATCHDOG_DETECT_SECONDS = _stat(
    "watchdog/detect_seconds",
    "Last episode: seconds from the last progress (or the loop's last heartbeat) to detection.")
WATCHDOG_DETECT_SECONDS_MAX = _stat("watchdog/detect_seconds_max",
                                    "Longest time to detect among the episodes.")
WATCHDOG_CLEARED = _stat("watchdog/cleared", "Stall episodes that ended with progress resuming.")
WATCHDOG_LOOP_LAG_MAX = _stat("watchdog/loop_lag_max",
                              "Largest event-loop lag seen by the heartbeat (seconds).")
WATCHDOG_LOOP_LAG_P99 = _stat("watchdog/loop_lag_p99",
                              "p99 event-loop lag over the recent heartbeats at close (seconds).")
WATCHDOG_BLOCKED_MAX = _stat("watchdog/blocked_seconds_max",
                             "Longest blocked-loop episode (seconds without a heartbeat).")
WATCHDOG_WINDOW = _stat("watchdog/window", "Stall window in use at close (seconds).")
WATCHDOG_NEW_REQUESTS = _stat(
    "watchdog/new_requests",
    "Requests scheduled that went through the duplicate filter (new fingerprints); progress "
    "for the watchdog by default, unlike dont_filter re-requests.")

# ---- journal / health ----------------------------------------------------------------------
# (section owned by the journal and liveness outputs)
JOURNAL_PENDING_AT_START = _stat("journal/pending_at_start",
                                 "Requests a previous run left not done in the journal.")
JOURNAL_REPLAYED = _stat("journal/replayed", "Pending requests re-enqueued at start.")
JOURNAL_UNREPLAYABLE = _stat("journal/unreplayable",
                             "Pending requests that could not be rebuilt at start (reported).")
JOURNAL_LEFT_TO_JOBDIR = _stat("journal/left_to_jobdir",
                               "Pending requests left for JOBDIR's queue to restore.")
JOURNAL_JOBDIR_RESET = _stat("journal/jobdir_reset",
                             "JOBDIR files moved aside because the previous run crashed.")
JOURNAL_SCHEDULED = _stat("journal/scheduled",
                          "Requests journaled as scheduled (written, or elided: see elided).")
JOURNAL_DONE = _stat("journal/done", "Requests marked done (callback and items finished).")
JOURNAL_ELIDED = _stat("journal/elided",
                       "Scheduled records never written: the request was done (or scheduled "
                       "again) within the flush window; its 'done' line is written.")
JOURNAL_KEPT_PENDING = _stat("journal/kept_pending",
                             "Requests that ended cancelled and stay pending for a resume.")
JOURNAL_UNSERIALISABLE = _stat("journal/unserialisable",
                               "Requests scheduled that Request.to_dict cannot serialise.")
JOURNAL_SKIPPED_SEEN = _stat("journal/skipped_seen",
                             "Requests dropped on resume: done or replayed in a previous run.")
JOURNAL_COMPACTIONS = _stat("journal/compactions", "Atomic rewrites of the journal file.")
JOURNAL_PENDING_AT_CLOSE = _stat("journal/pending_at_close",
                                 "Requests not done when the spider closed.")
HEALTH_STATE = _stat("health/state", "Last health state: healthy or the unhealthy reason.")
HEALTH_UNHEALTHY = _stat("health/unhealthy", "Transitions from healthy to unhealthy.")
HEALTH_SDNOTIFY_PINGS = _stat("health/sdnotify_pings", "WATCHDOG=1 pings sent to systemd.")
HEALTH_HTTP_REQUESTS = _stat("health/http_requests", "Requests served by /healthz.")
WATCHDOG_CANCELLED = _stat("watchdog/cancelled", "In-flight requests cancelled by recovery.")
WATCHDOG_REQUEUED = _stat("watchdog/requeued", "Cancelled requests requeued (dont_filter).")
WATCHDOG_QUARANTINED = _stat("watchdog/quarantined",
                             "Requests quarantined after the requeue bound.")
WATCHDOG_CLOSES = _stat("watchdog/closes/{stall_class}",
                        "Spider closes by recovery, by stall class.")
WATCHDOG_CLOSE_TIMEOUTS = _stat("watchdog/close_timeouts",
                                "Closes that did not finish within the close deadline.")
WATCHDOG_HARD_EXITS = _stat("watchdog/hard_exits/{reason}",
                            "Hard exits (os._exit) by reason: close_timeout, blocked_loop.")
LIFECYCLE_PREEMPTED = _stat("lifecycle/preempted/{stage}",
                            "Units of work preempted by recovery, by lifecycle stage.")
LIFECYCLE_DEAD_LETTERED = _stat("lifecycle/dead_lettered",
                                "Items preempted in a pipeline and written to the dead-letter "
                                "file with their reason.")
LIFECYCLE_VICTIMS = _stat("lifecycle/victims",
                          "Deadlock victims aborted so the rest could proceed.")

# ---- fleet -------------------------------------------------------------------------------
# (section owned by the fleet package)
FLEET_REDIS_CALLS = _stat("fleet/redis_calls",
                          "Redis round trips made by the pack (leases, queue, heartbeat).")
FLEET_REDIS_ERRORS = _stat("fleet/redis_errors", "Redis calls of the pack that failed.")
FLEET_DEGRADED = _stat("fleet/degraded",
                       "Times Redis became unreachable and the worker went local (leases, queue "
                       "writes buffered).")
FLEET_LOCAL_GRANTS = _stat("fleet/local_grants",
                           "Proxy leases granted from local counts while Redis was unreachable.")
FLEET_LATE_RELEASES = _stat("fleet/late_releases",
                            "Releases of a fleet lease that had already expired (a no-op).")
FLEET_RENEW_LOST = _stat("fleet/renew_lost", "Renewals refused: the fleet lease had expired.")
FLEET_DUPLICATES_DROPPED = _stat(
    "fleet/duplicates_dropped",
    "Requests the scrapy-redis dupefilter had seen, dropped by the fleet queue before the "
    "dupefilter's own Redis call (also counted in dupefilter/filtered).")
FLEET_PUSHED = _stat("fleet/pushed", "Requests pushed to the shared queue.")
FLEET_POPPED = _stat("fleet/popped", "Requests popped (leased to this worker).")
FLEET_ACKED = _stat("fleet/acked", "Leased requests acknowledged done (callback and items).")
FLEET_STALE_ACKS = _stat("fleet/stale_acks",
                         "Acks of requests already re-delivered elsewhere (removed anyway).")
FLEET_NACKED = _stat("fleet/nacked",
                     "Leased requests returned to the shared queue (cancelled, spider closed).")
FLEET_REDELIVERED = _stat("fleet/redelivered",
                          "Requests of dead workers this worker put back in the shared queue.")
FLEET_QUARANTINED = _stat("fleet/quarantined",
                          "Requests sent to the fleet-wide quarantine (deliveries or recovery).")
FLEET_BUFFERED = _stat("fleet/buffered", "Pushes buffered while Redis was unreachable.")
FLEET_NOT_ACKED = _stat("fleet/not_acked",
                        "Requests that finished while Redis was unreachable: left to be "
                        "re-delivered (what their callbacks yielded may not have been queued).")
FLEET_HEARTBEATS = _stat("fleet/heartbeats", "Heartbeats written.")
