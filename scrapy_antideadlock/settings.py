"""Every ``ANTIDEADLOCK_*`` setting in one place: default, accepted form, validation.

Components never call ``settings.get("ANTIDEADLOCK_...")`` themselves; they call
:func:`get` (one value) or :func:`load` (all values of one part), so a bad value
fails at start with a message naming the setting and the accepted form, and the
README table can be checked against :data:`SETTINGS` by a test.

This module imports nothing from Scrapy: it reads any mapping with ``.get``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

PREFIX = "ANTIDEADLOCK_"


class SettingError(ValueError):
    """A setting has a value outside its accepted form; the message names both."""

    def __init__(self, name: str, accepted: str, value: Any, detail: str = "") -> None:
        self.name = name
        self.accepted = accepted
        self.value = value
        shown = "<hidden>" if _looks_secret(name) else repr(value)
        msg = f"{name}: expected {accepted}, got {shown}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def _looks_secret(name: str) -> bool:
    return any(word in name for word in ("DSN", "PASSWORD", "PROXIES", "PROXY_LIST"))


# --------------------------------------------------------------------------- parsers
# Each parser takes the raw value (possibly a string from ``scrapy crawl -s``) and
# returns the typed value, or raises ValueError/TypeError with a short detail.


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError("not a boolean")


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    return float(value)


def positive_float(value: Any) -> float:
    number = _number(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("must be > 0 and finite")
    return number


def non_negative_float(value: Any) -> float:
    number = _number(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be >= 0 and finite")
    return number


def optional_positive_float(value: Any) -> float | None:
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "none"):
        return None
    return positive_float(value)


def fraction(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def optional_non_negative_int(value: Any) -> int | None:
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "none"):
        return None
    return non_negative_int(value)


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return text(value)


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return value.strip().lower()

    return parse


def json_or_mapping(value: Any) -> dict:
    """A dict, or a JSON object given as a string (``-s NAME='{"a": 1}'``)."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError("not a mapping")
    return dict(value)


def string_list(value: Any) -> list[str]:
    """A list of strings, or one comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            value = json.loads(stripped)
        else:
            return [part.strip() for part in stripped.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError("not a list of strings")
    return list(value)


def proxy_capacities(value: Any) -> dict[str, int | None]:
    """Proxies as a list (capacity from the default) or a mapping proxy URL -> capacity.

    ``None`` as a capacity means "use ANTIDEADLOCK_PROXY_CAPACITY".
    """
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, str):
        stripped = value.strip()
        value = json.loads(stripped) if stripped[:1] in "[{" else string_list(stripped)
    if isinstance(value, Mapping):
        out: dict[str, int | None] = {}
        for proxy, capacity in value.items():
            if not isinstance(proxy, str) or "://" not in proxy:
                raise ValueError("each proxy must be a URL like http://host:port")
            out[proxy] = None if capacity is None else positive_int(capacity)
        return out
    if isinstance(value, (list, tuple)):
        for proxy in value:
            if not isinstance(proxy, str) or "://" not in proxy:
                raise ValueError("each proxy must be a URL like http://host:port")
        return {proxy: None for proxy in value}
    raise TypeError("not a list or mapping of proxy URLs")


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    accepted: str
    doc: str
    part: str


SETTINGS: dict[str, Setting] = {}


def _define(part: str, name: str, default: Any, parse: Callable[[Any], Any], accepted: str,
            doc: str) -> None:
    full = PREFIX + name
    if full in SETTINGS:
        raise RuntimeError(f"setting {full} defined twice")
    SETTINGS[full] = Setting(full, default, parse, accepted, doc, part)


# ---- core ---------------------------------------------------------------------------
_define("core", "ENABLED", True, as_bool, "a boolean",
        "Master switch: False disables every component the add-on would enable.")
_define("core", "STRICT_SETTINGS", True, as_bool, "a boolean",
        "Fail at start on an unknown ANTIDEADLOCK_* name (a typo), suggesting the closest.")

# ---- deadline (downloader middleware) --------------------------------------------------
_define("deadline", "DEADLINE_ENABLED", True, as_bool, "a boolean",
        "Give every request a deadline covering lease wait, slot queue and transfer.")
_define("deadline", "DEADLINE_MULTIPLIER", 3.0, positive_float, "a positive number",
        "T = clamp(p99 x MULTIPLIER + BUFFER, MIN, MAX).")
_define("deadline", "DEADLINE_BUFFER", 1.0, non_negative_float, "seconds >= 0",
        "Added to p99 x MULTIPLIER.")
_define("deadline", "DEADLINE_MIN", 2.0, positive_float, "seconds > 0",
        "Lower clamp of the adaptive deadline.")
_define("deadline", "DEADLINE_MAX", 60.0, positive_float, "seconds > 0",
        "Ceiling of the adaptive deadline when the user set no timeout of their own (a "
        "meta/spider download_timeout or a set DOWNLOAD_TIMEOUT is the ceiling instead).")
_define("deadline", "DEADLINE_INITIAL", 30.0, positive_float, "seconds > 0",
        "Deadline used until MIN_SAMPLES latencies were observed for a slot (the user's "
        "own timeout instead, when set).")
_define("deadline", "DEADLINE_MIN_SAMPLES", 20, positive_int, "an integer >= 1",
        "Successful responses per slot before the adaptive deadline is used.")
_define("deadline", "DEADLINE_WINDOW", 2000, positive_int, "an integer >= 1",
        "Samples per histogram generation: p99 reflects the last 1-2 windows.")
_define("deadline", "DEADLINE_SLOT_HISTORIES", 1000, positive_int, "an integer >= 1",
        "Slots whose latency history is kept (least recently used out); a slot without one "
        "uses the crawl-wide history until it has MIN_SAMPLES of its own.")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError("not a whole number")
    return int(value)


def _min_one_float(value: Any) -> float:
    number = positive_float(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _int_list(value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [_integer(v) for v in value]
    return [int(v) for v in string_list(value)]


_define("deadline", "DEADLINE_RETRY_PRIORITY_ADJUST", -10, _integer, "an integer",
        "Priority change of a request retried after DeadlineExceeded/ProxyLeaseTimeout "
        "(negative: later, behind fresh work). A request's first deadline retry keeps its "
        "priority (no tail of hung requests at the end of the crawl).")
_define("deadline", "DEADLINE_RETRY_BACKOFF", 2.0, _min_one_float, "a number >= 1",
        "Each deadline retry gets the adaptive deadline x this (per attempt), still <= the "
        "ceiling.")
_define("deadline", "DEADLINE_LEND", True, as_bool, "a boolean",
        "Lend the concurrency slot of an overdue transfer to new work (bound: LEND_MAX_FACTOR).")
_define("deadline", "DEADLINE_HEDGE", True, as_bool, "a boolean",
        "Send a second copy of a GET/HEAD transfer overdue past LEND_AFTER (no leased proxy, "
        "no browser, no download delay); the first answer wins. Counted in the LEND_MAX_FACTOR "
        "bound with the lent slots.")
_define("deadline", "DEADLINE_LEND_AFTER", 1.25, positive_float, "a positive number",
        "A transfer is overdue after transfer-p99 of its slot x this (at least LEND_MIN).")
_define("deadline", "DEADLINE_LEND_MIN", 0.25, positive_float, "seconds > 0",
        "Lower bound of the overdue threshold (nothing is lent before MIN_SAMPLES transfers).")
_define("deadline", "DEADLINE_LEND_MAX_FACTOR", 2.0, _min_one_float, "a number >= 1",
        "Never more than CONCURRENT_REQUESTS x this requests in flight while lending.")
_define("deadline", "DEADLINE_TICK", 0.05, positive_float, "seconds > 0",
        "How often queued deadlines, lending and lease expiry are checked.")
_define("deadline", "DEADLINE_CANCEL_GRACE", 2.0, positive_float, "seconds > 0",
        "How long a cancelled download may take to unwind before it is abandoned.")
_define("deadline", "DEADLINE_WRAP_HANDLERS", True, as_bool, "a boolean",
        "The add-on puts the guarded (cancellable) handler in DOWNLOAD_HANDLERS for "
        "DEADLINE_SCHEMES, moving the configured handler to DEADLINE_WRAPPED_HANDLERS.")
_define("deadline", "DEADLINE_SCHEMES", ["http", "https"], string_list,
        "a list of URL schemes", "Schemes whose download handler the add-on wraps.")
_define("deadline", "DEADLINE_WRAPPED_HANDLERS", {}, json_or_mapping,
        "a mapping scheme -> handler class path",
        "Handler the guard wraps per scheme (missing scheme: Scrapy's default handler).")

# ---- proxy (downloader middleware) ------------------------------------------------------
# (section owned by the downloader middleware)
_define("proxy", "PROXY_ENABLED", True, as_bool, "a boolean",
        "Lease proxy slots from PROXY_LIST (no effect while PROXY_LIST is empty).")
_define("proxy", "PROXY_LIST", {}, proxy_capacities,
        "a list of proxy URLs or a mapping proxy URL -> capacity",
        "Proxies to lease; credentials in the URL go to Proxy-Authorization, never to logs.")
_define("proxy", "PROXY_CAPACITY", 4, positive_int, "an integer >= 1",
        "Concurrent requests per proxy when PROXY_LIST gives none.")
_define("proxy", "PROXY_LEASE_TIMEOUT", 30.0, positive_float, "seconds > 0",
        "Longest wait for a proxy slot (also bounded by the deadline) before ProxyLeaseTimeout.")
_define("proxy", "PROXY_LEASE_GRACE", 5.0, non_negative_float, "seconds >= 0",
        "Lease TTL = remaining deadline + GRACE; an expired lease is reclaimed, its download "
        "cancelled.")
_define("proxy", "PROXY_COOLDOWN_BASE", 1.0, positive_float, "seconds > 0",
        "First cooldown of a failing proxy; doubles per consecutive failure (50-100 % jitter).")
_define("proxy", "PROXY_COOLDOWN_MAX", 60.0, positive_float, "seconds > 0",
        "Longest proxy cooldown.")
_define("proxy", "PROXY_LEASE_RETRIES", 5, non_negative_int, "an integer >= 0",
        "Retries after ProxyLeaseTimeout, later and at lower priority; separate from "
        "RETRY_TIMES because the site was never asked.")
_define("proxy", "PROXY_FAILURE_CODES", [407, 502], _int_list,
        "a list of HTTP status codes", "Responses that count as a proxy failure (cooldown).")

# ---- pg (item pipeline) ---------------------------------------------------------------------
# (section owned by the PostgreSQL pipeline)
_define("pg", "PG_ENABLED", True, as_bool, "a boolean",
        "Enable the PostgreSQL pipeline (the add-on adds it only when PG_DSN is set).")
_define("pg", "PG_DSN", None, optional_text, "a libpq DSN or postgresql:// URL",
        "Database to write items to; the password never appears in logs or stats.")
_define("pg", "PG_TABLES", {}, json_or_mapping,
        "a mapping item type -> {table, key, columns, extra, conflict, types}",
        "Where each item type goes: table, key field(s), field->column mapping, jsonb extra.")
_define("pg", "PG_CREATE_TABLES", False, as_bool, "a boolean",
        "Create missing tables at start (development only).")
_define("pg", "PG_DURABILITY", "commit", one_of("commit", "buffered"), "commit or buffered",
        "commit: process_item returns after the item's batch committed; buffered: at once.")
_define("pg", "PG_BATCH_SIZE", 1000, positive_int, "an integer >= 1",
        "Rows per batch (one ordered upsert statement, or COPY + merge).")
_define("pg", "PG_MAX_DELAY", 0.1, positive_float, "seconds > 0",
        "Flush a batch when its oldest item waited this long (group commit window).")
_define("pg", "PG_BUFFER_CAPACITY", 10000, positive_int, "an integer >= 1",
        "Items buffered per table before producers wait (bounded).")
_define("pg", "PG_POOL_SIZE", 4, positive_int, "an integer >= 1",
        "Maximum connections in the pool.")
_define("pg", "PG_ACQUIRE_TIMEOUT", 5.0, positive_float, "seconds > 0",
        "Longest wait for a pooled connection before the attempt is retried.")
_define("pg", "PG_MAX_WAITING", 16, positive_int, "an integer >= 1",
        "Bound of the pool's waiting queue.")
_define("pg", "PG_LOCK_TIMEOUT", 2.0, positive_float, "seconds > 0",
        "lock_timeout of every pooled connection (each batch statement).")
_define("pg", "PG_STATEMENT_TIMEOUT", 30.0, positive_float, "seconds > 0",
        "statement_timeout of every pooled connection (each batch statement).")
_define("pg", "PG_IDLE_IN_TRANSACTION_TIMEOUT", 60.0, positive_float, "seconds > 0",
        "idle_in_transaction_session_timeout of every pooled connection.")
_define("pg", "PG_MAX_ATTEMPTS", 6, positive_int, "an integer >= 1",
        "Attempts per batch for transient errors (deadlock, lock timeout, connection loss).")
_define("pg", "PG_RETRY_BUDGET", 30.0, positive_float, "seconds > 0",
        "Longest time one batch may spend retrying before its rows are dead-lettered.")
_define("pg", "PG_CLOSE_TIMEOUT", 30.0, positive_float, "seconds > 0",
        "Deadline of the final flush at close; the rest goes to the dead-letter store.")
_define("pg", "PG_DEADLETTER_PATH", "antideadlock-pg-deadletter.jsonl", text, "a file path",
        "JSONL file receiving every item that could not be stored, with the reason.")
_define("pg", "PG_DEADLETTER_LOCK_TIMEOUT", 10.0, positive_float, "seconds > 0",
        "Longest wait for the dead-letter file lock.")

# ---- playwright (download handler) --------------------------------------------------------
_define("playwright", "PLAYWRIGHT_ENABLED", True, as_bool, "a boolean",
        "Add-on: replace scrapy-playwright's ScrapyPlaywrightDownloadHandler in "
        "DOWNLOAD_HANDLERS with SafePlaywrightDownloadHandler.")
_define("playwright", "PLAYWRIGHT_CALL_TIMEOUT", 30.0, positive_float, "seconds > 0",
        "Cap on each browser call (new_context, new_page, goto, page methods, content); the "
        "request's own deadline (antideadlock_deadline / download_timeout) may cut it shorter.")
_define("playwright", "PLAYWRIGHT_CLOSE_TIMEOUT", 5.0, positive_float, "seconds > 0",
        "Bound on closing one page or context; past it the page counts as force-closed.")
_define("playwright", "PLAYWRIGHT_SLOT_TIMEOUT", 30.0, positive_float, "seconds > 0",
        "Longest wait for a page or context slot (PLAYWRIGHT_MAX_PAGES_PER_CONTEXT / "
        "PLAYWRIGHT_MAX_CONTEXTS) before the request fails with LeaseTimeout.")
_define("playwright", "PLAYWRIGHT_PAGE_MAX_AGE", 300.0, optional_positive_float,
        "seconds > 0 or None",
        "Last resort: a page (playwright_include_page=True) older than this is closed. None: off.")
_define("playwright", "PLAYWRIGHT_CONTEXT_IDLE_TIMEOUT", None, optional_positive_float,
        "seconds > 0 or None",
        "Opt-in cleanup: a context without pages for this long is closed, and its cookies with "
        "it (startup contexts excepted). None (default): contexts stay open, as upstream; an "
        "idle one is closed only to make room for a request waiting at PLAYWRIGHT_MAX_CONTEXTS.")
_define("playwright", "PLAYWRIGHT_MAX_IDLE_CONTEXTS", None, optional_non_negative_int,
        "an integer >= 0 or None",
        "Opt-in cleanup: idle contexts (no pages) kept beyond this many are closed, least "
        "recently used first (startup contexts excepted). None (default): off, as upstream.")
_define("playwright", "PLAYWRIGHT_SHUTDOWN_TIMEOUT", 10.0, positive_float, "seconds > 0",
        "Bound on closing pages, contexts and the browser at spider close; past it the browser "
        "process is killed.")
_define("playwright", "PLAYWRIGHT_CHECK_INTERVAL", 0.25, positive_float, "seconds > 0",
        "How often included pages of finished requests and idle contexts are looked for.")
_define("playwright", "PLAYWRIGHT_SHARE_BROWSER", True, as_bool, "a boolean",
        "One driver, browser and set of page/context limits for the http and https handlers.")

# ---- watchdog (extension) -------------------------------------------------------------------
_define("watchdog", "WATCHDOG_ENABLED", True, as_bool, "a boolean",
        "Run the watchdog extension (progress meter, loop monitor, stall diagnosis).")
_define("watchdog", "WATCHDOG_INTERVAL", 0.5, positive_float, "seconds > 0",
        "How often the watchdog samples progress on the loop (sub-second works).")
_define("watchdog", "WATCHDOG_WINDOW", None, optional_positive_float, "seconds > 0 or None",
        "Fixed stall window: no progress this long while work is pending is a stall. "
        "None: adaptive, clamp(p99 x MULTIPLIER + BUFFER, MIN, MAX) of request durations.")
_define("watchdog", "WATCHDOG_WINDOW_MULTIPLIER", 3.0, positive_float, "a positive number",
        "Adaptive window: p99 request duration x MULTIPLIER + BUFFER.")
_define("watchdog", "WATCHDOG_WINDOW_BUFFER", 5.0, non_negative_float, "seconds >= 0",
        "Adaptive window: added to p99 x MULTIPLIER.")
_define("watchdog", "WATCHDOG_WINDOW_MIN", 10.0, positive_float, "seconds > 0",
        "Lower clamp of the adaptive window.")
_define("watchdog", "WATCHDOG_WINDOW_MAX", 300.0, positive_float, "seconds > 0",
        "Upper clamp of the adaptive window.")
_define("watchdog", "WATCHDOG_WINDOW_INITIAL", 60.0, positive_float, "seconds > 0",
        "Adaptive window used until WINDOW_MIN_SAMPLES request durations were seen.")
_define("watchdog", "WATCHDOG_WINDOW_MIN_SAMPLES", 10, positive_int, "an integer >= 1",
        "Request durations needed before the adaptive window is used.")
_define("watchdog", "WATCHDOG_HEARTBEAT", 0.1, positive_float, "seconds > 0",
        "How often the event loop posts a heartbeat to the off-loop monitor thread.")
_define("watchdog", "WATCHDOG_BLOCKED_THRESHOLD", 5.0, positive_float, "seconds > HEARTBEAT",
        "No heartbeat for this long = blocked loop: the loop thread's stack is captured.")
_define("watchdog", "WATCHDOG_CPU_BUSY", 0.5, fraction, "a fraction of one core, 0-1",
        "Loop-thread CPU share over the window at or above which a stall is busy (livelock).")
_define("watchdog", "WATCHDOG_CHURN_MIN", 10, positive_int, "an integer >= 1",
        "Churn events (requests sent, retries, lease grants) per window that make a "
        "stall a livelock.")
_define("watchdog", "WATCHDOG_HEALTH_INTERVAL", 60.0, non_negative_float, "seconds >= 0",
        "Log one INFO health line this often (0 disables it).")
_define("watchdog", "WATCHDOG_DIAGNOSIS_FILE", None, optional_text, "a file path or None",
        "Write the run's diagnoses (the last 100) to this file as a JSON list (rewritten "
        "atomically).")
_define("watchdog", "WATCHDOG_PROGRESS_STATS", ["item_scraped_count", "item_dropped_count",
        "antideadlock/pg/rows_upserted", "antideadlock/watchdog/new_requests"], string_list,
        "a list of stat names (a name also matches NAME/...)",
        "Counters whose growth is progress: items and new distinct requests. Responses alone "
        "are not (a callback that re-requests itself with dont_filter is a livelock); a spider "
        "that legitimately yields no items for long may add 'response_received_count'.")
_define("watchdog", "WATCHDOG_CHURN_STATS", ["downloader/request_count", "retry/count",
        "downloader/exception_count", "antideadlock/pg/retries"], string_list,
        "a list of stat names (a name also matches NAME/...)",
        "Counters whose growth without progress is churn (livelock evidence).")

# ---- journal / health (watchdog part 2) -----------------------------------------------------
# (section owned by the journal and liveness outputs)
_define("journal", "JOURNAL_ENABLED", True, as_bool, "a boolean",
        "Crash-safe request journal: resume after SIGKILL/os._exit/a stall without losing "
        "a request (on by default: it is where recovery leaves pending work).")
_define("journal", "JOURNAL_DIR", None, optional_text, "a directory path or None",
        "Journal directory; None = <JOBDIR>/antideadlock-journal, else the project's "
        ".scrapy/antideadlock/<spider name>/ (like HTTPCACHE_DIR).")
_define("journal", "JOURNAL_FSYNC", "interval", one_of("always", "interval", "never"),
        "always, interval or never",
        "When to fsync: every record, every FSYNC_INTERVAL, or never (process crashes are "
        "covered by all three; power loss only by fsync).")
_define("journal", "JOURNAL_FSYNC_INTERVAL", 1.0, positive_float, "seconds > 0",
        "fsync period under the 'interval' policy.")
_define("journal", "JOURNAL_FLUSH_INTERVAL", 0.25, positive_float, "seconds > 0",
        "Records are written once per window this long (or of 1000 records); a request "
        "scheduled and done within one costs its 'done' line only. A SIGKILL loses at most "
        "the last window's records: a re-crawl of that window's work, never a loss.")
_define("journal", "JOURNAL_LOCK_TIMEOUT", 10.0, positive_float, "seconds > 0",
        "How long to wait for the journal's file lock before failing with JournalLocked.")
_define("journal", "JOURNAL_COMPACT_MIN_BYTES", 4 << 20, positive_int, "an integer >= 1",
        "Compact (rewrite pending records atomically) once the file is this big and 4x live.")
_define("journal", "JOURNAL_REPLAY", True, as_bool, "a boolean",
        "Re-enqueue every request not done (dont_filter=True) when the spider opens.")
_define("journal", "JOURNAL_SKIP_SEEN", True, as_bool, "a boolean",
        "On resume, drop (filterable) requests whose fingerprint was done or replayed before.")
_define("health", "HEALTH_HEARTBEAT_FILE", None, optional_text, "a file path or None",
        "Heartbeat file touched with a small JSON status while healthy (None = off).")
_define("health", "HEALTH_INTERVAL", 5.0, positive_float, "seconds > 0",
        "Heartbeat file / health check period (sd_notify pings use WATCHDOG_USEC / 2).")
_define("health", "HEALTH_SDNOTIFY", True, as_bool, "a boolean",
        "Send READY=1 / WATCHDOG=1 / STOPPING=1 to systemd when NOTIFY_SOCKET is set.")
_define("health", "HEALTH_HTTP_PORT", None, optional_non_negative_int, "a port (0 = any) or None",
        "Serve GET /healthz and GET /metrics (Prometheus; the metrics extra) on "
        "127.0.0.1:PORT from an off-loop thread (None = off).")
_define("health", "HEALTH_LOOP_BLOCKED_AFTER", 5.0, positive_float, "seconds > 0",
        "Report unhealthy when the event loop has not run for this long.")
_define("recovery", "RECOVERY_LEVEL", "exit", one_of("off", "recover", "close", "exit"),
        "off, recover, close or exit",
        "How far the escalation ladder goes: preempt+requeue only, + close the spider, "
        "+ exit hard when the close hangs (and when the loop stays blocked). Only 'exit' "
        "bounds every stall.")
_define("recovery", "RECOVERY_MAX_REQUEUES", 2, non_negative_int, "an integer >= 0",
        "Requeues per request after a cancel; past this the request is quarantined.")
_define("recovery", "RECOVERY_GRACE", 30.0, positive_float, "seconds > 0",
        "After cancelling, how long progress may stay flat before the spider is closed.")
_define("recovery", "RECOVERY_CLOSE_DEADLINE", 30.0, positive_float, "seconds > 0",
        "How long the close may take before the process exits hard (level 'exit').")
_define("recovery", "RECOVERY_BLOCKED_LOOP_EXIT_AFTER", 60.0, positive_float, "seconds > 0",
        "Exit hard (level 'exit') when the event loop stays blocked this long.")
_define("recovery", "RECOVERY_QUARANTINE_FILE", None, optional_text, "a file path or None",
        "JSONL file of quarantined requests; None = quarantine.jsonl in the journal "
        "directory (or where it would be when the journal is off).")
_define("recovery", "RECOVERY_DEAD_LETTER_FILE", None, optional_text, "a file path or None",
        "JSONL file of items preempted in a pipeline (with the reason); None = "
        "deadletter.jsonl in the journal directory (or where it would be).")
_define("lifecycle", "LIFECYCLE_ENABLED", True, as_bool, "a boolean",
        "Track each request's stage (middlewares, queue, download, callback, pipelines) so "
        "recovery can preempt it wherever it waits (sets DOWNLOADER and ITEM_PROCESSOR when "
        "they are Scrapy's own).")
_define("lifecycle", "LIFECYCLE_DEADLINE", None, optional_positive_float,
        "seconds > 0 or None",
        "During a stall, work that stayed this long in one stage is preempted; None = the "
        "watchdog's stall window.")


# ---- fleet (Redis: shared proxy leases, reliable scrapy-redis queue) ----------------------
# (section owned by the fleet package)
_define("fleet", "FLEET_REDIS_URL", None, optional_text, "a redis:// URL or None",
        "Fleet mode: proxy leases kept in this Redis, shared by every worker (None = local).")
_define("fleet", "FLEET_KEY_PREFIX", "antideadlock", text, "a string",
        "Prefix of every Redis key the fleet writes (one per fleet/job).")
_define("fleet", "FLEET_REDIS_TIMEOUT", 0.5, positive_float, "seconds > 0",
        "Socket timeout of the pack's Redis calls (they run on the event loop: keep it short).")
_define("fleet", "FLEET_REQUIRE_REDIS", False, as_bool, "a boolean",
        "Redis unreachable is a hard error instead of degrading to local leases.")
_define("fleet", "FLEET_RETRY_AFTER", 2.0, positive_float, "seconds > 0",
        "After a Redis error, use local leases (and buffer queue writes) this long, then retry.")
_define("fleet", "FLEET_POLL_INTERVAL", 0.05, positive_float, "seconds > 0",
        "How often a waiter for a fleet lease, or a busy worker whose last pop found the "
        "shared queue empty, asks Redis again (other workers release and push).")
_define("fleet", "FLEET_LEASE_MAX_TTL", 300.0, positive_float, "seconds > 0",
        "Redis TTL of a lease taken without an expiry (a dead worker's slot returns after it).")
_define("fleet", "FLEET_WORKER_ID", None, optional_text, "a string or None",
        "This worker's name in the fleet (None = host:pid:random).")
_define("fleet", "FLEET_HEARTBEAT_INTERVAL", 1.0, positive_float, "seconds > 0",
        "How often a worker writes its heartbeat (health JSON) and renews its requests.")
_define("fleet", "FLEET_VISIBILITY_TIMEOUT", 10.0, positive_float, "seconds > HEARTBEAT_INTERVAL",
        "A popped request stays leased to its worker this long past its last heartbeat; "
        "then any worker re-delivers it.")
_define("fleet", "FLEET_MAX_DELIVERIES", 3, positive_int, "an integer >= 1",
        "Deliveries of one request (pops) before it goes to the fleet-wide quarantine.")


# ---- monitors (Spidermon) ----------------------------------------------------------------
_define("monitor", "MONITOR_QUARANTINE_LIMIT", 10, positive_int, "an integer >= 1",
        "scrapy_antideadlock.monitors: the quarantine monitor fails at this many quarantined "
        "requests (watchdog + fleet).")


# --------------------------------------------------------------------------- reading


def get(settings: Any, name: str) -> Any:
    """Read and validate one setting; raise :class:`SettingError` naming it."""
    spec = SETTINGS[name]
    raw = settings.get(name) if settings is not None else None
    if raw is None:
        return spec.default
    try:
        return spec.parse(raw)
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SettingError(name, spec.accepted, raw, str(exc)) from None


def load(settings: Any, part: str) -> SimpleNamespace:
    """All settings of one part as attributes named in lower case without prefix/part.

    ``load(s, "deadline").multiplier`` reads ``ANTIDEADLOCK_DEADLINE_MULTIPLIER``.
    """
    values: dict[str, Any] = {}
    part_prefix = f"{PREFIX}{part.upper()}_"
    for name, spec in SETTINGS.items():
        if spec.part != part:
            continue
        short = name[len(part_prefix):] if name.startswith(part_prefix) else name[len(PREFIX):]
        values[short.lower()] = get(settings, name)
    return SimpleNamespace(**values)


def check_names(settings: Any) -> None:
    """Fail on an ANTIDEADLOCK_* name nobody defines (a typo would otherwise be ignored)."""
    names = _names_in(settings)
    unknown = sorted(n for n in names if n.startswith(PREFIX) and n not in SETTINGS
                     and not n.startswith(PREFIX + "TEST_"))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, SETTINGS, n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise SettingError(unknown[0], "a known ANTIDEADLOCK_* setting (see README)", "set",
                       "unknown: " + ", ".join(hints))


def validate_all(settings: Any) -> None:
    """Validate every setting at once, so the first crawl step already names a bad value."""
    if get(settings, PREFIX + "STRICT_SETTINGS"):
        check_names(settings)
    for name in SETTINGS:
        get(settings, name)
    for low, high in _ORDERED:
        if get(settings, PREFIX + low) > get(settings, PREFIX + high):
            raise SettingError(PREFIX + low, f"a value <= {PREFIX + high} "
                               f"({get(settings, PREFIX + high)})", get(settings, PREFIX + low))


#: Pairs of settings whose values must stay in order (checked with every other setting).
_ORDERED = (("DEADLINE_MIN", "DEADLINE_MAX"),)


def _names_in(settings: Any) -> list[str]:
    if hasattr(settings, "attributes"):  # scrapy.settings.BaseSettings
        return list(settings.attributes)
    if isinstance(settings, Mapping):
        return list(settings)
    return []
