"""Where the journal lives, and what it does to a JOBDIR beside it after a crash."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from scrapy.utils.project import data_path

from .. import settings as ad_settings

logger = logging.getLogger(__name__)

__all__ = ["is_default_dir", "jobdir_has_queue", "journal_dir", "set_jobdir_aside"]


def journal_dir(settings: Any, spider_name: str | None = None) -> Path:
    """The journal directory: the setting, else under JOBDIR, else per spider in the
    project's ``.scrapy/`` folder (where Scrapy keeps HTTPCACHE_DIR)."""
    conf = ad_settings.load(settings, "journal")
    if conf.dir:
        return Path(conf.dir)
    jobdir = settings.get("JOBDIR")
    if jobdir:
        return Path(jobdir) / "antideadlock-journal"
    return Path(data_path(f"antideadlock/{spider_name or 'default'}"))


def is_default_dir(settings: Any) -> bool:
    return not ad_settings.get(settings, "ANTIDEADLOCK_JOURNAL_DIR") and not settings.get("JOBDIR")


def jobdir_has_queue(jobdir: str) -> bool:
    return (Path(jobdir) / "requests.queue").is_dir()


def set_jobdir_aside(jobdir: str, pending: int) -> list[str]:
    """After a crash JOBDIR's queue can be unreadable (its pops fail for ever, so the
    crawl never ends) and its seen-set holds requests that were never crawled (they
    would be filtered): move both aside before the scheduler opens them; return where.
    The journal has every pending request and its own seen-set of done fingerprints."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for name in ("requests.queue", "requests.seen"):
        path = Path(jobdir) / name
        if path.exists():
            aside = path.with_name(f"{name}.crashed-{stamp}")
            path.rename(aside)
            moved.append(str(aside))
    if moved:
        logger.warning("antideadlock journal: the previous run did not close cleanly, so "
                       "JOBDIR's queue and seen-set are not reliable; moved aside (%s); "
                       "the journal replays its %d pending requests instead",
                       ", ".join(moved), pending)
    return moved
