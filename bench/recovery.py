"""Recovery benchmark: hang storm, SIGKILL/resume, journal overhead — pack vs plain Scrapy.

    python -m bench.recovery            # ~12 min on 2 cores (3 reps)
    python -m bench.recovery --reps 1   # ~5 min (what bench.report runs)
    python -m bench.recovery --only storm --storm-limit 60

Every crawl runs in its own process (``run_crawl_subprocess``) against a FaultSite on
127.0.0.1 and is bounded in wall time (killed past the bound, as a supervisor would).

1. Journal overhead, fault-free: crawl time (Scrapy's ``elapsed_time_seconds``) of the
   pack through the add-on with and without the journal (and plain Scrapy for scale).
2. Hang storm: 10 % of the item pages never answer. The pack (add-on defaults + journal)
   vs plain Scrapy as a careful user runs it, each with a ``JOBDIR``: ``DOWNLOAD_TIMEOUT``
   3 s, ``DOWNLOAD_TIMEOUT`` 10 s, and the defaults plus ``CLOSESPIDER_TIMEOUT_NO_ITEM``.
   Every side gets the same wall-time limit (``--storm-limit``); a plain run that closes
   early is resumed from its JOBDIR, as a supervisor would, inside that same limit. Sides
   alternate order per rep; figures are medians. Reported: wall time, reachable items
   lost, reachable items/min vs the same configuration fault-free.
3. SIGKILL at 1/3 of the crawl, then a resume: pack + journal vs plain ``JOBDIR``.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from scrapy_antideadlock.testing import Fault, FaultSite, Latency, run_crawl_subprocess

SPIDER = "scrapy_antideadlock.testing.spiders:SiteSpider"
ADDON: dict[str, Any] = {"ADDONS": {"scrapy_antideadlock.Addon": 0}}
BASE: dict[str, Any] = {"CONCURRENT_REQUESTS": 8, "LOG_LEVEL": "INFO"}


def crawl(settings: dict[str, Any], start_url: str, workdir: Path, name: str,
          bound: float, kill_at_items: int | None = None) -> dict[str, Any]:
    """One bounded crawl in a child process; returns wall time, items, exit, stats."""
    items_path = workdir / f"{name}.jsonl"
    cpu_before = _children_cpu()
    started = time.monotonic()
    proc = run_crawl_subprocess(SPIDER, {**BASE, **settings}, items_path=items_path,
                                spider_kwargs={"start_url": start_url})
    killed = False
    times: list[float] = []  # seconds from start at which each item was seen stored
    try:
        while proc.returncode is None:
            seen = len(proc.items())
            times += [time.monotonic() - started] * (seen - len(times))
            if time.monotonic() - started > bound:
                proc.kill(signal.SIGKILL)
                killed = True
                break
            if kill_at_items is not None and len(proc.items()) >= kill_at_items:
                proc.kill(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
        code = proc.wait(15)
    finally:
        proc.kill(signal.SIGKILL)
    stats = proc.stats() or {}
    items = proc.items()
    times += [time.monotonic() - started] * (len(items) - len(times))
    return {"wall": time.monotonic() - started, "items": items, "times": times, "code": code,
            "killed": killed, "stats": stats, "crawl_time": crawl_time(proc, stats),
            "cpu": _children_cpu() - cpu_before}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def crawl_time(proc: Any, stats: dict[str, Any]) -> float | None:
    """Spider open -> spider close: start_time stat to the stats file written at close."""
    if not stats.get("start_time"):
        return None
    opened = datetime.fromisoformat(str(stats["start_time"]))
    return proc.stats_path.stat().st_mtime - opened.timestamp()


def keys(*runs: dict[str, Any]) -> set[str]:
    return {item["key"] for run in runs for item in run["items"]}


def journal(workdir: Path, name: str) -> dict[str, Any]:
    return {**ADDON, "ANTIDEADLOCK_JOURNAL_ENABLED": True,
            "ANTIDEADLOCK_JOURNAL_DIR": str(workdir / f"journal-{name}")}


def overhead(workdir: Path, reps: int) -> dict[str, float]:
    print("== 1. journal overhead, fault-free (100 listings x 10 items, 10 ms latency)")
    labels = ("plain", "addon", "addon+journal")
    times: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    with FaultSite(pages=100, items_per_page=10, latency=Latency.fixed(0.01)) as site:
        for rep in range(reps):
            sides = [("plain", {}), ("addon", dict(ADDON)),
                     ("addon+journal", journal(workdir, f"ovh{rep}"))]
            for label, settings in sides if rep % 2 == 0 else sides[::-1]:
                run = crawl(settings, site.start_url, workdir, f"ovh-{label}-{rep}", 180)
                assert len(run["items"]) == 1000, (label, len(run["items"]))
                times[label].append(run["crawl_time"])
                cpu[label].append(run["cpu"])
    med = {label: statistics.median(values) for label, values in times.items()}
    med_cpu = {label: statistics.median(values) for label, values in cpu.items()}
    for label in labels:
        print(f"  {label:14s} median crawl time {med[label]:6.2f}s (runs: "
              f"{', '.join(f'{v:.2f}' for v in times[label])}); median process CPU "
              f"{med_cpu[label]:.2f}s")
    micro = journal_micro()
    per_request_cpu = med_cpu["addon"] / 1100
    print(f"  journal cost in-process: {micro * 1e6:.0f} us CPU per request (to_dict + "
          f"scheduled + done records); the add-on crawl spends {per_request_cpu * 1e6:.0f} us "
          f"CPU per request incl. start-up -> +{micro / per_request_cpu:.1%}")
    return {"journal_overhead": med["addon+journal"] / med["addon"],
            "journal_cpu_overhead": med_cpu["addon+journal"] / med_cpu["addon"],
            "journal_us_per_request": micro * 1e6,
            "addon_vs_plain": med["addon"] / med["plain"]}


def journal_micro(n: int = 5000) -> float:
    """CPU seconds per request of the journal's own work: serialise, append, mark done."""
    import scrapy
    from scrapy.utils.test import get_crawler

    from scrapy_antideadlock.journal import _encode_payload, _to_dict
    from scrapy_antideadlock.primitives.journal import Journal

    class Spider(scrapy.Spider):
        name = "micro"

        def parse(self, response: Any) -> None:
            pass

    crawler = get_crawler(Spider)
    spider = Spider()
    fingerprint = crawler.request_fingerprinter.fingerprint
    with tempfile.TemporaryDirectory() as tmp:
        store = Journal(tmp, fsync="interval")
        store.open()
        requests = [scrapy.Request(f"http://127.0.0.1:1/item/k{i:05d}", callback=spider.parse,
                                   meta={"antideadlock_id": f"r1-{i}", "depth": 2})
                    for i in range(n)]
        names: dict[Any, str] = {}
        started = time.process_time()
        for i, request in enumerate(requests):
            payload = _encode_payload(_to_dict(request, spider, names))
            store.scheduled(f"k{i}", fingerprint(request).hex(), payload, url=request.url)
            store.done(f"k{i}")
            store.tick()
        elapsed = time.process_time() - started
        store.close()
    return elapsed / n


#: The storm's sides, each under the same time limit. Plain Scrapy as a careful user runs
#: it: a tuned DOWNLOAD_TIMEOUT, or the defaults plus CLOSESPIDER_TIMEOUT_NO_ITEM; each
#: with a JOBDIR, resumed (as a supervisor would) while the limit lasts.
STORM_SIDES: dict[str, dict[str, Any]] = {
    "pack": {},
    "plain_t3s": {"DOWNLOAD_TIMEOUT": 3},
    "plain_t10s": {"DOWNLOAD_TIMEOUT": 10},
    "plain_no_item_10s": {"CLOSESPIDER_TIMEOUT_NO_ITEM": 10},
}
STORM_WHAT = {"pack": "add-on + journal", "plain_t3s": "plain DOWNLOAD_TIMEOUT=3 + JOBDIR",
              "plain_t10s": "plain DOWNLOAD_TIMEOUT=10 + JOBDIR",
              "plain_no_item_10s": "plain CLOSESPIDER_TIMEOUT_NO_ITEM=10 + JOBDIR"}


def storm_side(side: str, start_url: str, workdir: Path, name: str,
               limit: float) -> dict[str, Any]:
    """One side of the storm under ``limit`` s of wall time in all: the pack runs once;
    a plain side is resumed from its JOBDIR after each early close while time is left."""
    if side == "pack":
        settings = journal(workdir, name)
    else:
        settings = {**STORM_SIDES[side], "JOBDIR": str(workdir / f"jobdir-{name}")}
    runs: list[dict[str, Any]] = []
    began = time.monotonic()
    while True:
        left = limit - (time.monotonic() - began)
        if left < 1:
            break
        offset = time.monotonic() - began
        run = crawl(settings, start_url, workdir, f"{name}-{len(runs)}", left)
        run["times"] = [offset + t for t in run["times"]]
        runs.append(run)
        if side == "pack" or run["killed"] or run["stats"].get("_close_reason") == "finished":
            break
    last = runs[-1]
    return {"runs": runs, "wall": time.monotonic() - began, "killed": last["killed"],
            "finished": not last["killed"] and last["stats"].get("_close_reason") == "finished"}


def rate95(runs: list[dict[str, Any]], wanted: set[str], limit: float) -> float:
    """Wanted items per minute until 95 % of them were stored (the items stored per minute
    of the limit when 95 % never were): the same measure as bench.tail's."""
    seen: set[str] = set()
    at: list[float] = []
    for run in runs:
        for item, t in zip(run["items"], run["times"], strict=False):
            if item["key"] in wanted and item["key"] not in seen:
                seen.add(item["key"])
                at.append(t)
    k = int(0.95 * len(wanted))
    at.sort()
    if k and len(at) >= k:
        return k / max(at[k - 1], 1e-9) * 60
    return len(at) / limit * 60


def storm(workdir: Path, limit: float, reps: int) -> dict[str, float]:
    print(f"== 2. hang storm: 10 % of 300 item pages never answer; every side gets {limit:.0f} s "
          "(plain sides resumed from their JOBDIR while time is left)")
    out: dict[str, float] = {}
    walls: dict[str, list[float]] = {side: [] for side in STORM_SIDES}
    lost: dict[str, list[int]] = {side: [] for side in STORM_SIDES}
    rates: dict[str, list[float]] = {side: [] for side in STORM_SIDES}
    with FaultSite(pages=30, items_per_page=10, latency=Latency.fixed(0.01), seed=7) as site:
        clean: dict[str, list[float]] = {"pack": [], "plain": []}
        for rep in range(reps):  # fault-free references, alternating
            for label in ("pack", "plain") if rep % 2 == 0 else ("plain", "pack"):
                settings = (journal(workdir, f"storm-ok{rep}") if label == "pack" else
                            {"DOWNLOAD_TIMEOUT": 3,
                             "JOBDIR": str(workdir / f"jobdir-storm-ok{rep}")})
                run = crawl(settings, site.start_url, workdir, f"storm-ok-{label}-{rep}",
                            limit)
                clean[label].append(rate95([run], set(site.expected_keys()), limit))
        site.add_fault("/item/*", Fault.hang(), rate=0.1, per="url")
        reachable = set(site.expected_keys())
        print(f"  reachable items: {len(reachable)} of 300; fault-free items/min until 95 % "
              f"(median): pack {statistics.median(clean['pack']):.0f}, plain "
              f"{statistics.median(clean['plain']):.0f}")
        sides = list(STORM_SIDES)
        for rep in range(reps):
            for side in sides if rep % 2 == 0 else list(reversed(sides)):
                result = storm_side(side, site.start_url, workdir, f"storm-{side}-{rep}",
                                    limit)
                got = keys(*result["runs"])
                missing = len(reachable - got)
                walls[side].append(result["wall"])
                lost[side].append(missing)
                rates[side].append(rate95(result["runs"], reachable, limit))
                ends = ", ".join("killed at the limit" if r["killed"] else
                                 f"{r['stats'].get('_close_reason', '?')} {r['wall']:.0f}s"
                                 for r in result["runs"])
                print(f"  {side:18s} {result['wall']:6.1f}s ({len(result['runs'])} run(s): "
                      f"{ends}); reachable stored {len(got & reachable)}, lost {missing}; "
                      f"items/min until 95 % {rates[side][-1]:.0f}", flush=True)
                stats = result["runs"][-1]["stats"]
                if side == "pack" and rep == 0 and stats:  # none when killed at the limit
                    print("  pack actions: " + ", ".join(
                        f"{k.split('/', 1)[1]}={v}" for k, v in stats.items()
                        if k.startswith(("antideadlock/watchdog/", "antideadlock/deadline/"))
                        and isinstance(v, int)))
    for side in sides:
        reference = statistics.median(clean["pack" if side == "pack" else "plain"])
        out[f"storm_lost_{side}"] = statistics.median(lost[side])
        out[f"storm_wall_{side}"] = statistics.median(walls[side])
        out[f"storm_retained_{side}"] = statistics.median(rates[side]) / reference
    return out


def sigkill(workdir: Path) -> dict[str, float]:
    print("== 3. SIGKILL at 200 of 600 items, then resume")
    out: dict[str, float] = {}
    with FaultSite(pages=30, items_per_page=20, latency=Latency.fixed(0.05)) as site:
        expected = set(site.expected_keys())
        for label, settings in (("pack", journal(workdir, "kill")),
                                ("plain", {"JOBDIR": str(workdir / "jobdir-kill")})):
            first = crawl(settings, site.start_url, workdir, f"kill-{label}-1", 120,
                          kill_at_items=200)
            second = crawl(settings, site.start_url, workdir, f"kill-{label}-2", 120)
            lost = len(expected - keys(first, second))
            dup = len(first["items"]) + len(second["items"]) - len(keys(first, second))
            print(f"  {label:6s} killed at {len(first['items'])} items; resume exit "
                  f"{second['code']} ({second['stats'].get('_close_reason', '?')}) with "
                  f"{len(second['items'])} items in {second['wall']:.1f}s; lost {lost}, "
                  f"stored twice {dup}; total wall {first['wall'] + second['wall']:.1f}s")
            out[f"sigkill_lost_{label}"] = lost
            out[f"sigkill_duplicates_{label}"] = dup
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1 if os.environ.get("BENCH_REPORT") else 3)
    parser.add_argument("--only", default="overhead,storm,sigkill")
    parser.add_argument("--storm-limit", type=float,
                        default=60.0 if os.environ.get("BENCH_REPORT") else 90.0,
                        help="seconds of wall time every storm side gets (resumes included)")
    args = parser.parse_args(argv)
    try:
        load = os.getloadavg()
        print(f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        workdir = Path(tmp)
        only = set(args.only.split(","))
        if "overhead" in only:
            results.update(overhead(workdir, args.reps))
        if "storm" in only:
            results.update(storm(workdir, args.storm_limit, args.reps))
        if "sigkill" in only:
            results.update(sigkill(workdir))
    notes = {
        "journal_overhead": ("ratio", "crawl time, add-on + journal / add-on, fault-free"),
        "journal_cpu_overhead": ("ratio", "process CPU, add-on + journal / add-on, fault-free"),
        "journal_us_per_request": ("us", "journal CPU per request (serialise+append+done)"),
        "addon_vs_plain": ("ratio", "crawl time, add-on / plain Scrapy, fault-free"),
        "sigkill_lost_pack": ("count", "items lost after SIGKILL + resume, pack + journal"),
        "sigkill_lost_plain": ("count", "items lost after SIGKILL + resume, plain JOBDIR"),
        "sigkill_duplicates_pack": ("count", "items stored twice after SIGKILL + resume, pack"),
        "sigkill_duplicates_plain": ("count", "items stored twice, plain JOBDIR"),
    }
    for side, what in STORM_WHAT.items():
        limit = f"limit {args.storm_limit:.0f} s for every side, median of {args.reps}"
        notes[f"storm_lost_{side}"] = ("count", f"reachable items not stored, 10 % hang "
                                                f"storm, {what}; {limit}")
        notes[f"storm_wall_{side}"] = ("s", f"wall time to finish (or the limit), 10 % hang "
                                            f"storm, {what}; {limit}")
        notes[f"storm_retained_{side}"] = ("ratio", f"reachable items/min until 95 % of "
                                                    f"them, storm / fault-free, {what}; {limit}")
    for name, value in results.items():
        unit, text = notes[name]
        print(f"RESULT recovery.{name} {value:.4g} {unit} # {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
