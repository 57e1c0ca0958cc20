"""Run one crawl in this process and record it durably: ``python -m ...testing.runcrawl``.

Used by :func:`scrapy_antideadlock.testing.run_crawl_subprocess` for tests that kill or
restart a crawl. Each scraped item is appended to ``--items`` as one JSON line, flushed
and fsynced before the next, so after a SIGKILL the file holds exactly a prefix (at most
a torn last line). Final stats go to ``<items>.stats.json`` at spider close and again
at engine stop, once every spider_closed handler has set its stats. Exit code
0 when the crawl finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from itemadapter import ItemAdapter
from scrapy import Spider, signals
from scrapy.crawler import AsyncCrawlerProcess, Crawler, CrawlerProcess

#: Settings applied under the caller's (telnet and remote control off).
RUNNER_DEFAULTS: dict[str, Any] = {
    "TELNETCONSOLE_ENABLED": False,
    "REMOTE_CONTROL_ENABLED": False,
    "LOG_LEVEL": "INFO",
    "ROBOTSTXT_OBEY": False,
}

_ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"


def load_spider(spec: str) -> type[Spider]:
    """``"package.module:ClassName"`` → the spider class."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"--spider must look like 'module:Class', got {spec!r}")
    spider_cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(spider_cls, type) and issubclass(spider_cls, Spider)):
        raise SystemExit(f"{spec} is not a scrapy.Spider subclass")
    return spider_cls


class ItemRecorder:
    """Appends items as JSON lines (fsync per item) and writes the final stats."""

    def __init__(self, crawler: Crawler, items_path: Path) -> None:
        self.crawler = crawler
        self.items_path = items_path
        self.stats_path = Path(str(items_path) + ".stats.json")
        self.reason: str | None = None
        self._file = open(items_path, "a", encoding="utf-8")  # noqa: SIM115 - closed at close
        crawler.signals.connect(self.item_scraped, signals.item_scraped)
        crawler.signals.connect(self.spider_closed, signals.spider_closed)
        crawler.signals.connect(self.engine_stopped, signals.engine_stopped)

    def item_scraped(self, item: Any, **kwargs: Any) -> None:
        self._file.write(json.dumps(ItemAdapter(item).asdict(), default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def spider_closed(self, reason: str, **kwargs: Any) -> None:
        self.reason = reason
        self._file.close()
        self._write_stats()

    def engine_stopped(self) -> None:
        """Again, now that every spider_closed handler has set its stats."""
        if self.reason is not None:
            self._write_stats()

    def _write_stats(self) -> None:
        reason = self.reason
        stats = dict(self.crawler.stats.get_stats()) if self.crawler.stats else {}
        stats["_close_reason"] = reason
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, default=str, indent=1, sort_keys=True))
        os.replace(tmp, self.stats_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spider", required=True, help="module:Class")
    parser.add_argument("--items", required=True, type=Path, help="JSON-lines output")
    parser.add_argument("--settings", default="{}", help="Scrapy settings as a JSON object")
    parser.add_argument("--spider-kwargs", default="{}", help="spider arguments, JSON object")
    args = parser.parse_args(argv)
    settings = {**RUNNER_DEFAULTS, **json.loads(args.settings)}
    spider_kwargs = json.loads(args.spider_kwargs)
    spider_cls = load_spider(args.spider)

    reactor = settings.get("TWISTED_REACTOR", _ASYNCIO_REACTOR)
    # AsyncCrawlerProcess needs the asyncio reactor; any other one runs under CrawlerProcess.
    process_cls = AsyncCrawlerProcess if reactor == _ASYNCIO_REACTOR else CrawlerProcess
    process = process_cls(settings)
    crawler = process.create_crawler(spider_cls)
    recorder = ItemRecorder(crawler, args.items)
    process.crawl(crawler, **spider_kwargs)
    process.start()
    if recorder.reason is None:
        return 2  # the spider never closed
    return 0 if recorder.reason == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
