"""Hang-rate benchmark: items/min with 1 % of requests hanging, as a share of fault-free.

Fault site in its own process: log-normal latency (median 100 ms, sigma 0.5), 1 % of
detail-page requests hang for ever (drawn per request). CONCURRENT_REQUESTS = 16 (and
16 per domain, the site is one host). Plain Scrapy as a careful user runs it
(``DOWNLOAD_TIMEOUT`` tuned to 3 s and to 10 s: its default of 180 s would never fire
inside the window) vs Scrapy with the full add-on at its defaults (ADDONS line only;
``--pack downloader``: its downloader components only). Every side crawls for the same
window, in alternating order per round (A B C, C B A, ...), in one invocation; the rate
is measured between WARMUP and WINDOW seconds of each crawl; figures are medians.

    python -m bench.hang_rate [--window 20] [--rounds 2] [--pack downloader|addon]
                              [--latency 0.1] [--parallel]

On a loaded machine the 100 ms default can become CPU-bound (then hung requests cost
little and every ratio drifts towards 1); ``--latency 1.0 --window 40 --rounds 1``
needs ~10x less CPU per second and stays concurrency-bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

from .common import (
    ADDON_PACK,
    DOWNLOADER_PACK,
    SiteProcess,
    child_report,
    load_line,
    rate,
    run_child,
    start_child,
)

WARMUP = 2.0
BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}
T3, T10 = {"DOWNLOAD_TIMEOUT": 3}, {"DOWNLOAD_TIMEOUT": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=20.0, help="seconds per crawl")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hang-rate", type=float, default=0.01)
    parser.add_argument("--latency", type=float, default=0.1,
                        help="median latency, s (a larger one needs less CPU per second: "
                             "use it on a loaded machine, with a longer --window)")
    parser.add_argument("--pack", choices=("downloader", "addon"), default="addon")
    parser.add_argument("--no-lend-too", action="store_true",
                        help="also run the pack with ANTIDEADLOCK_DEADLINE_LEND=False")
    parser.add_argument("--parallel", action="store_true",
                        help="run the four configurations at the same time (same load), "
                             "each against its own site process, instead of alternating")
    args = parser.parse_args()
    pack = DOWNLOADER_PACK if args.pack == "downloader" else ADDON_PACK
    site_args = ["--pages", "200", "--items-per-page", "100", "--latency", str(args.latency),
                 "--sigma", "0.5"]
    # A fault-free crawl never times out: its plain side's DOWNLOAD_TIMEOUT does not matter.
    configs = {"clean/plain": (False, T3), "hang/plain T=3s": (True, T3),
               "hang/plain T=10s": (True, T10), "hang/pack": (True, pack),
               "clean/pack": (False, pack)}
    if args.no_lend_too:
        configs["hang/no-lend"] = (True, {**pack, "ANTIDEADLOCK_DEADLINE_LEND": False})
    rates: dict[str, list[float]] = {name: [] for name in configs}
    began = time.monotonic()
    print(load_line(), "(start)")
    def report_line(rnd: int, name: str, report: dict) -> None:
        r = rate(report["times"], WARMUP, args.window)
        rates[name].append(r)
        st = report["stats"]
        print(f"round {rnd + 1} {name:16s} {r:8.0f} items/min  cpu {report['cpu']:5.1f}s  "
              f"exceeded {st.get('antideadlock/deadline/exceeded', 0)}  lent "
              f"{st.get('antideadlock/deadline/lent', 0)}", flush=True)

    hang_args = ["--hang-rate", str(args.hang_rate), "--per", "request", "--match", "/item/*"]
    if args.parallel:
        sites = {name: SiteProcess(*site_args, *(hang_args if hangs else []))
                 for name, (hangs, _) in configs.items()}
        try:
            for rnd in range(args.rounds):
                procs = {name: start_child(sites[name].start_url, {**BASE, **extra},
                                           args.window)
                         for name, (_, extra) in configs.items()}
                for name, proc in procs.items():
                    report_line(rnd, name, child_report(proc, args.window + 60))
        finally:
            for site in sites.values():
                site.stop()
    else:
        with SiteProcess(*site_args) as clean, SiteProcess(*site_args, *hang_args) as faulty:
            for rnd in range(args.rounds):
                names = list(configs) if rnd % 2 == 0 else list(reversed(configs))
                for name in names:
                    hangs, extra = configs[name]
                    site = faulty if hangs else clean
                    report_line(rnd, name, run_child(site.start_url, {**BASE, **extra},
                                                     args.window))
    # Medians only (never best-of): the machine is shared, and the rounds alternate order.
    med = {name: statistics.median(r) for name, r in rates.items()}
    clean_plain, clean_pack = med["clean/plain"], med["clean/pack"]
    print(f"[median] fault-free: plain {clean_plain:.0f}/min, pack {clean_pack:.0f}/min; with "
          f"{args.hang_rate:.0%} hangs: plain T=3s {med['hang/plain T=3s'] / clean_plain:.3f}, "
          f"plain T=10s {med['hang/plain T=10s'] / clean_plain:.3f}, pack "
          f"{med['hang/pack'] / clean_plain:.3f} of plain fault-free "
          f"({med['hang/pack'] / clean_pack:.3f} of pack fault-free)")
    if args.no_lend_too:
        print(f"pack without lending: {med['hang/no-lend'] / clean_plain:.3f} "
              "of plain fault-free")
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    what = (f"{args.hang_rate:.0%} hangs, items/min vs plain fault-free, {args.window:g} s "
            f"window each, median of {args.rounds} alternating rounds")
    for timeout in (3, 10):
        name = f"hang/plain T={timeout}s"
        print(f"RESULT hang_rate.retained_plain_t{timeout}s {med[name] / clean_plain:.3f} ratio "
              f"# plain Scrapy, DOWNLOAD_TIMEOUT={timeout}, {what}")
    print(f"RESULT hang_rate.retained_pack {med['hang/pack'] / clean_plain:.3f} ratio "
          f"# full add-on at its defaults, {what}; target >= 0.95")
    print(f"RESULT hang_rate.retained_pack_own {med['hang/pack'] / clean_pack:.3f} ratio "
          f"# full add-on, {args.hang_rate:.0%} hangs, items/min vs its own fault-free")


if __name__ == "__main__":
    main()
