"""Settings of the demo project: a normal Scrapy project plus the scrapy-antideadlock add-on.

Everything the pack needs is the ADDONS line; the ANTIDEADLOCK_* lines below only make
the demo short (a deadline of 5 s instead of 30 s for the first requests, no doubling of
it on retries, a health line every 5 s) and say where items go. Run the same crawl without the pack with
``scrapy crawl demo -s ANTIDEADLOCK_ENABLED=0``.
"""

import os

BOT_NAME = "antideadlock_demo"
SPIDER_MODULES = ["antideadlock_demo.spiders"]
NEWSPIDER_MODULE = "antideadlock_demo.spiders"

ROBOTSTXT_OBEY = False  # the fault site has no robots.txt
TELNETCONSOLE_ENABLED = False
LOGSTATS_INTERVAL = 5.0  # "Crawled N pages (at X pages/min)" every 5 s, to see a freeze
LOG_LEVEL = "INFO"  # the demo is about the INFO lines: progress, health, stats

# ---- scrapy-antideadlock -----------------------------------------------------------------
ADDONS = {"scrapy_antideadlock.Addon": 0}

# Deadline of a request before 20 latencies of its slot were seen (then: p99 x 3 + 1 s).
ANTIDEADLOCK_DEADLINE_INITIAL = 5.0
# Retry a request that hit its deadline with the same deadline (default: x2 per attempt).
ANTIDEADLOCK_DEADLINE_RETRY_BACKOFF = 1.0
# The watchdog's one-line health summary, every 5 s instead of every minute.
ANTIDEADLOCK_WATCHDOG_HEALTH_INTERVAL = 5.0

# PostgreSQL: your database if ANTIDEADLOCK_PG_DSN is set in the environment, else the demo
# starts a throwaway embedded server (see antideadlock_demo/testbed.py).
ANTIDEADLOCK_PG_DSN = os.environ.get("ANTIDEADLOCK_PG_DSN") or None
ANTIDEADLOCK_PG_TABLES = {
    "dict": {"table": "demo_items", "key": "key",
             "types": {"name": "text", "price": "numeric", "url": "text"}},
}
ANTIDEADLOCK_PG_CREATE_TABLES = True  # development convenience: create demo_items if missing

# Files the pack appends to (shared by concurrent crawls of this project, under a file lock).
ANTIDEADLOCK_PG_DEADLETTER_PATH = ".state/pg-deadletter.jsonl"
ANTIDEADLOCK_RECOVERY_QUARANTINE_FILE = ".state/quarantine.jsonl"

# ---- demo only (not pack settings) ---------------------------------------------------------
# Outer bounds. A plain crawl (ANTIDEADLOCK_ENABLED=0) gets CLOSESPIDER_TIMEOUT, then a hard
# exit (status 3) when the graceful close hangs. A protected crawl gets only a generous hard
# bound as a safety net (it finishes by itself).
DEMO_PLAIN_CLOSESPIDER_TIMEOUT = 20
DEMO_PLAIN_HARD_TIMEOUT = 35.0
DEMO_PROTECTED_HARD_TIMEOUT = 150.0
