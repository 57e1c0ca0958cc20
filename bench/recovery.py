"""Recovery benchmark: hang storm, SIGKILL/resume, journal overhead — pack vs plain Scrapy.

    python -m bench.recovery            # ~3-4 min on 2 cores
    python -m bench.recovery --reps 1   # quicker overhead figure

Every crawl runs in its own process (``run_crawl_subprocess``) against a FaultSite on
127.0.0.1 and is bounded in wall time (killed past the bound, as a supervisor would).

1. Journal overhead, fault-free: crawl time (Scrapy's ``elapsed_time_seconds``) of the
   pack through the add-on with and without the journal (and plain Scrapy for scale).
2. Hang storm: 10 % of the item pages never answer. The pack (add-on defaults + journal)
   vs plain Scrapy with ``CLOSESPIDER_TIMEOUT_NO_ITEM`` + ``JOBDIR``. Reported: wall time,
   reachable items lost, items/min vs the same configuration fault-free.
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
    try:
        while proc.returncode is None:
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
    return {"wall": time.monotonic() - started, "items": proc.items(), "code": code,
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


def per_min(run: dict[str, Any]) -> float:
    elapsed = run["crawl_time"] or run["wall"]
    return len(run["items"]) / elapsed * 60 if elapsed else float("nan")


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
            for label, settings in (("plain", {}), ("addon", dict(ADDON)),
                                    ("addon+journal", journal(workdir, f"ovh{rep}"))):
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


def storm(workdir: Path) -> dict[str, float]:
    print("== 2. hang storm: 10 % of 300 item pages never answer")
    out: dict[str, float] = {}
    with FaultSite(pages=30, items_per_page=10, latency=Latency.fixed(0.01), seed=7) as site:
        ok = {"pack": crawl(journal(workdir, "storm-ok"), site.start_url, workdir,
                            "storm-ok-pack", 120),
              "plain": crawl({"JOBDIR": str(workdir / "jobdir-storm-ok")}, site.start_url,
                             workdir, "storm-ok-plain", 120)}
        site.add_fault("/item/*", Fault.hang(), rate=0.1, per="url")
        reachable = set(site.expected_keys())
        print(f"  reachable items: {len(reachable)} of 300")
        pack = crawl(journal(workdir, "storm"), site.start_url, workdir, "storm-pack", 240)
        plain_settings = {"JOBDIR": str(workdir / "jobdir-storm"),
                          "CLOSESPIDER_TIMEOUT_NO_ITEM": 10}
        plain = crawl(plain_settings, site.start_url, workdir, "storm-plain", 90)
        plain_resume = crawl(plain_settings, site.start_url, workdir, "storm-plain-resume", 60)
    for label, run, extra in (("pack", pack, ()), ("plain", plain, (plain_resume,))):
        lost = len(reachable - keys(run, *extra))
        fault_free = per_min(ok[label])
        retained = per_min(run) / fault_free if fault_free else float("nan")
        ended = "killed at the bound" if run["killed"] else \
            f"exit {run['code']} ({run['stats'].get('_close_reason', '?')})"
        print(f"  {label:6s} wall {run['wall']:6.1f}s, {ended}; items {len(keys(run))}"
              f"{' + resume ' + str(len(keys(*extra) - keys(run))) if extra else ''}; "
              f"reachable lost {lost}; items/min {per_min(run):.0f} vs fault-free "
              f"{fault_free:.0f} (x{retained:.2f})")
        out[f"storm_lost_{label}"] = lost
        out[f"storm_wall_{label}"] = run["wall"]
        out[f"storm_retained_{label}"] = retained
    stats = pack["stats"]
    print("  pack actions: " + ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in stats.items()
                                        if k.startswith(("antideadlock/watchdog/",
                                                         "antideadlock/deadline/"))
                                        and isinstance(v, int)))
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
            results.update(storm(workdir))
        if "sigkill" in only:
            results.update(sigkill(workdir))
    notes = {
        "journal_overhead": ("ratio", "crawl time, add-on + journal / add-on, fault-free"),
        "journal_cpu_overhead": ("ratio", "process CPU, add-on + journal / add-on, fault-free"),
        "journal_us_per_request": ("us", "journal CPU per request (serialise+append+done)"),
        "addon_vs_plain": ("ratio", "crawl time, add-on / plain Scrapy, fault-free"),
        "storm_lost_pack": ("count", "reachable items lost, 10 % hang storm, pack"),
        "storm_lost_plain": ("count", "reachable items lost, 10 % hang storm, plain "
                                      "(CLOSESPIDER_TIMEOUT_NO_ITEM + JOBDIR, + a resume)"),
        "storm_wall_pack": ("s", "wall time, 10 % hang storm, pack"),
        "storm_wall_plain": ("s", "wall time, 10 % hang storm, plain (bounded at 90 s)"),
        "storm_retained_pack": ("ratio", "items/min in the storm / fault-free, pack"),
        "storm_retained_plain": ("ratio", "items/min in the storm / fault-free, plain"),
        "sigkill_lost_pack": ("count", "items lost after SIGKILL + resume, pack + journal"),
        "sigkill_lost_plain": ("count", "items lost after SIGKILL + resume, plain JOBDIR"),
        "sigkill_duplicates_pack": ("count", "items stored twice after SIGKILL + resume, pack"),
        "sigkill_duplicates_plain": ("count", "items stored twice, plain JOBDIR"),
    }
    for name, value in results.items():
        unit, text = notes[name]
        print(f"RESULT recovery.{name} {value:.4g} {unit} # {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
