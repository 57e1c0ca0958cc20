"""Tail benchmark: time to finish and items/s with hung requests, against careful baselines.

A local fault site (log-normal latency, median ``--latency`` s, sigma 0.5), ``--pages``
listings x 100 detail pages, 16 concurrent. Hangs are drawn per request on detail pages
(so a retry usually succeeds), 1 % for the tail and 10 % for the storm. Sides, each
under the same time limit (``--window``), in alternating order per round:

- the full add-on at its defaults (ADDONS line only), fault-free and with hangs;
- plain Scrapy as a careful user runs it: DOWNLOAD_TIMEOUT 3 s, DOWNLOAD_TIMEOUT 10 s,
  and defaults plus CLOSESPIDER_TIMEOUT_NO_ITEM.

Figures (medians over rounds): time to finish / fault-free time to finish, items/s until
95 % of the items / fault-free, and items lost (reachable items not stored).

    python -m bench.tail [--rounds 2] [--pages 20] [--window 120] [--full]
    python -m bench.tail --sides addon --variant hedge:ANTIDEADLOCK_DEADLINE_HEDGE=true
    python -m bench.tail --trace /tmp/trace.jsonl   # timelines of the hung URLs, one crawl

``--variant NAME:KEY=VALUE[,KEY=VALUE]`` adds a side "addon NAME" (the add-on plus those
settings) to the hang and storm runs, alternating with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from ._trace import TRACE_MW, timelines
from .common import ADDON_PACK, SiteProcess, load_line, run_child

BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}
SIDES: dict[str, dict] = {
    "addon": ADDON_PACK,
    "plain T=3s": {"DOWNLOAD_TIMEOUT": 3},
    "plain T=10s": {"DOWNLOAD_TIMEOUT": 10},
    "plain no-item 10s": {"CLOSESPIDER_TIMEOUT_NO_ITEM": 10},
}


def finish_time(report: dict, window: float) -> float:
    """Seconds until the crawl finished; the window when it did not."""
    return report["elapsed"] if report["finished"] else window


def rate_until_95(report: dict, expected: int) -> float:
    """Items per second until 95 % of the expected items were stored."""
    times = sorted(report["times"])
    k = int(0.95 * expected)
    if len(times) < k or k == 0:
        return len(times) / max(times[-1], 1e-9) if times else 0.0
    return k / times[k - 1]


def variant(spec: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE,...`` -> ("addon NAME", add-on settings plus those)."""
    name, _, pairs = spec.partition(":")
    settings: dict = dict(ADDON_PACK)
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return f"addon {name}", settings


def trace(site_args: list[str], hang: list[str], path: str, window: float) -> None:
    """One add-on crawl of the 1 % hang site with per-request timelines (bench._trace)."""
    with SiteProcess(*site_args, *hang, "0.01") as site:
        report = run_child(site.start_url, {**BASE, **ADDON_PACK, "BENCH_TRACE": path,
                                            "DOWNLOADER_MIDDLEWARES": TRACE_MW},
                           window=window)
    print(load_line(), f"finished={report['finished']} t={report['elapsed']:.1f}s")
    print(timelines(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pages", type=int, default=20, help="listings of 100 items")
    parser.add_argument("--full", action="store_true", help="40 listings (4 000 items)")
    parser.add_argument("--window", type=float, default=120.0)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--storm", type=float, default=0.10)
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma-separated subset of: " + ", ".join(SIDES))
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:KEY=VALUE,... an add-on side with those settings")
    parser.add_argument("--trace", metavar="FILE",
                        help="one traced add-on crawl of the 1 %% hang site, then exit")
    args = parser.parse_args()
    pages = 40 if args.full else args.pages
    if os.environ.get("BENCH_REPORT"):
        args.rounds = min(args.rounds, 2)
    expected = pages * 100
    site_args = ["--pages", str(pages), "--items-per-page", "100", "--latency",
                 str(args.latency), "--sigma", "0.5"]
    hang = ["--per", "request", "--match", "/item/*", "--hang-rate"]
    if args.trace:
        trace(site_args, hang, args.trace, args.window)
        return
    sides = {name: SIDES[name] for name in args.sides.split(",")}
    variants = dict(variant(spec) for spec in args.variant)
    sides.update(variants)
    storms = ["addon", *variants]
    runs = ([(name, "clean") for name in storms] + [(name, "hang") for name in sides]
            + [(name, "storm") for name in storms])
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    began = time.monotonic()
    print(load_line(), "(start)")
    with SiteProcess(*site_args) as clean, SiteProcess(*site_args, *hang, "0.01") as hung, \
            SiteProcess(*site_args, *hang, str(args.storm)) as storm:
        sites = {"clean": clean, "hang": hung, "storm": storm}
        for rnd in range(args.rounds):
            for name, fault in runs if rnd % 2 == 0 else list(reversed(runs)):
                report = run_child(sites[fault].start_url, {**BASE, **sides[name]},
                                   window=args.window)
                results[(name, fault)].append(report)
                print(f"round {rnd + 1} {name:18s} {fault:5s} "
                      f"{'finished' if report['finished'] else 'cut':8s} "
                      f"t={finish_time(report, args.window):6.1f}s items {report['items']:5d}"
                      f" rate95 {rate_until_95(report, expected):6.1f}/s "
                      f"cpu {report['cpu']:5.1f}s", flush=True)
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    clean_t = statistics.median(finish_time(r, args.window) for r in results[("addon", "clean")])
    clean_rate = statistics.median(rate_until_95(r, expected)
                                   for r in results[("addon", "clean")])
    for (name, fault), reports in results.items():
        if fault == "clean" and name == "addon":
            continue
        t = statistics.median(finish_time(r, args.window) for r in reports)
        rate = statistics.median(rate_until_95(r, expected) for r in reports)
        lost = statistics.median(expected - r["items"] for r in reports)
        tag = name.replace("plain ", "plain_").replace("=", "").replace(" ", "_").replace(
            "-", "_").lower()
        what = {"clean": "fault-free", "hang": "1 % hangs"}.get(
            fault, f"{args.storm:.0%} hangs (storm)")
        print(f"RESULT tail.{fault}_{tag}_finish_ratio {t / clean_t:.3f} ratio # {name}, "
              f"{what}: time to finish / add-on fault-free ({clean_t:.1f}s); "
              f"limit {args.window:.0f}s for every side")
        print(f"RESULT tail.{fault}_{tag}_rate_ratio {rate / clean_rate:.3f} ratio # {name}, "
              f"{what}: items/s until 95 % / add-on fault-free")
        print(f"RESULT tail.{fault}_{tag}_lost {lost:.0f} count # {name}, {what}: "
              f"of {expected} items, not stored within the limit")


if __name__ == "__main__":
    main()
