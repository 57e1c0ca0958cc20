"""Per-request timelines of one crawl: where the tail of a hang crawl comes from.

A downloader middleware at 345 (after DeadlineMiddleware stamps the deadline, before it
sees an exception) plus engine signals; every event of every request, by URL, is written
as JSON lines to ``BENCH_TRACE`` when the spider closes. ``python -m bench.tail --trace
FILE`` runs one add-on crawl of the 1 % hang site with it and prints the timelines of
the URLs that had a failed attempt.
"""

from __future__ import annotations

import json
import time
from typing import Any

from scrapy import signals

TRACE_MW = {"bench._trace.Trace": 345}


class Trace:
    """Records (seconds since open, url, event, detail) for every request and item."""

    def __init__(self, crawler: Any) -> None:
        self.path = crawler.settings.get("BENCH_TRACE")
        self.t0 = time.monotonic()
        # line-buffered: a crawl that never closes still leaves its timelines
        self.out = open(self.path, "w", buffering=1) if self.path else None  # noqa: SIM115
        s = crawler.signals
        s.connect(self.scheduled, signals.request_scheduled)
        s.connect(self.reached, signals.request_reached_downloader)
        s.connect(self.left, signals.request_left_downloader)
        s.connect(self.item, signals.item_scraped)
        s.connect(self.closed, signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Any) -> Trace:
        return cls(crawler)

    def _ev(self, url: str, what: str, detail: Any = None) -> None:
        if self.out is not None:
            event = (round(time.monotonic() - self.t0, 3), url, what, detail)
            self.out.write(json.dumps(event) + "\n")

    def scheduled(self, request: Any, spider: Any = None) -> None:
        self._ev(request.url, "scheduled", {"prio": request.priority,
                                            "retry": request.meta.get("retry_times", 0)})

    def reached(self, request: Any, spider: Any = None) -> None:
        self._ev(request.url, "reached")

    def left(self, request: Any, spider: Any = None) -> None:
        self._ev(request.url, "left")

    def item(self, item: Any, response: Any = None, spider: Any = None) -> None:
        self._ev(response.url if response is not None else "?", "item")

    def process_request(self, request: Any) -> None:
        deadline = request.meta.get("antideadlock_deadline")
        left = None if deadline is None else round(deadline - time.monotonic(), 3)
        self._ev(request.url, "deadline", left)

    def process_response(self, request: Any, response: Any) -> Any:
        self._ev(request.url, "response", response.status)
        return response

    def process_exception(self, request: Any, exception: Exception) -> None:
        self._ev(request.url, "exception",
                 f"{type(exception).__name__}: {str(exception)[:90]}")

    def closed(self, spider: Any = None, reason: str = "") -> None:
        self._ev("-", "closed", reason)
        if self.out is not None:
            self.out.close()
            self.out = None


def _slow(events: list) -> bool:
    """A transfer that took over a second (a hang a hedge answered, or a slow answer)."""
    sent = None
    for t, what, _ in events:
        if what == "deadline":
            sent = t
        elif what == "response" and sent is not None and t - sent > 1.0:
            return True
    return False


def timelines(path: str) -> str:
    """The timelines of every URL with an exception or a transfer over 1 s."""
    events = [json.loads(line) for line in open(path)]
    by_url: dict[str, list] = {}
    for t, url, what, detail in events:
        by_url.setdefault(url, []).append((t, what, detail))
    items = sorted(t for t, _, what, _ in events if what == "item") or [0.0]
    closed = next((t for t, url, what, _ in events if what == "closed"), None)
    out = [f"items {len(items)}, 95 % at {items[int(0.95 * len(items)) - 1]:.1f}s, "
           f"99 % at {items[int(0.99 * len(items)) - 1]:.1f}s, last at {items[-1]:.1f}s, "
           f"closed at {closed}s"]
    bad = [u for u, evs in by_url.items() if any(w == "exception" for _, w, _ in evs)
           or not any(w in ("item", "response") for _, w, _ in evs) or _slow(evs)]
    bad.sort(key=lambda u: max(t for t, _, _ in by_url[u]))
    for url in bad:
        out.append(url.rsplit("/", 1)[-1] + ": " + " | ".join(
            f"{t:.2f} {w}" + ("" if d is None else f" {d}") for t, w, d in by_url[url]
            if w not in ("reached", "left")))
    return "\n".join(out)
