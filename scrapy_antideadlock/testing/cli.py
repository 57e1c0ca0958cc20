"""``antideadlock-fault-site``: serve a fault site (and optionally a fault proxy) for manual chaos.

Example::

    antideadlock-fault-site --port 8000 --pages 50 --hang-rate 0.01 --latency 0.2
    scrapy crawl myspider -a start_url=http://127.0.0.1:8000/list/0
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from scrapy_antideadlock.testing.proxy import MODES, FaultProxy
from scrapy_antideadlock.testing.site import Fault, FaultSite, Latency


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="antideadlock-fault-site",
                                description="Serve a deterministic fault site on 127.0.0.1.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--pages", type=int, default=20, help="number of listing pages")
    p.add_argument("--items-per-page", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0,
                   help="median delay before headers, seconds (log-normal if --sigma > 0)")
    p.add_argument("--sigma", type=float, default=0.0, help="log-normal sigma (0 = fixed)")
    p.add_argument("--latency-cap", type=float, default=None)
    p.add_argument("--per", choices=("url", "request"), default="url",
                   help="faults stick to URLs (default) or are drawn per request")
    p.add_argument("--match", default="/item/*", help="fnmatch pattern faults apply to")
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0, help="answer --error-status")
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--slow-rate", type=float, default=0.0, help="slow headers")
    p.add_argument("--slow-seconds", type=float, default=5.0)
    p.add_argument("--drip-rate", type=float, default=0.0, help="slow-drip body")
    p.add_argument("--drip-seconds", type=float, default=5.0)
    p.add_argument("--proxy-port", type=int, default=None,
                   help="also serve a FaultProxy on this port")
    p.add_argument("--proxy-mode", choices=MODES, default="healthy")
    p.add_argument("--proxy-slow-delay", type=float, default=2.0)
    p.add_argument("--stats-every", type=float, default=10.0,
                   help="print counters every N seconds (0 = never)")
    return p


def make_site(args: argparse.Namespace) -> FaultSite:
    if args.sigma > 0 and args.latency > 0:
        latency = Latency.lognormal(args.latency, args.sigma, args.latency_cap)
    else:
        latency = Latency.fixed(args.latency)
    site = FaultSite(pages=args.pages, items_per_page=args.items_per_page, seed=args.seed,
                     latency=latency, host=args.host, port=args.port)
    # Disjoint shares of the URL space, so the rates add up instead of shadowing each other.
    faults = [(args.hang_rate, Fault.hang()), (args.reset_rate, Fault.reset()),
              (args.error_rate, Fault.status(args.error_status)),
              (args.slow_rate, Fault.slow_headers(args.slow_seconds)),
              (args.drip_rate, Fault.drip(args.drip_seconds))]
    remaining = 1.0
    for rate, fault in faults:
        if rate > 0:
            if rate > remaining + 1e-9:
                raise SystemExit("fault rates add up to more than 1")
            site.add_fault(args.match, fault, rate=min(1.0, rate / remaining), per=args.per)
            remaining -= rate
    return site


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()  # handlers first: a SIGTERM right after the banner must stop cleanly
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    site = make_site(args).start()
    proxy = None
    if args.proxy_port is not None:
        proxy = FaultProxy(mode=args.proxy_mode, slow_delay=args.proxy_slow_delay,
                           host=args.host, port=args.proxy_port).start()
    print(f"fault site: {site.start_url}  ({len(site.item_keys())} items, "
          f"{len(site.expected_keys())} reachable)", flush=True)
    if proxy is not None:
        print(f"fault proxy: {proxy.url} mode={proxy.mode}", flush=True)
    # Never an endless wait: the kernel may hand SIGTERM to a server thread, and then the
    # Python handler runs only when the main thread next runs (it once never did).
    tick = min(args.stats_every, 0.5) if args.stats_every else 0.5
    next_stats = time.monotonic() + args.stats_every if args.stats_every else None
    try:
        while not stop.wait(tick):
            if next_stats is None or time.monotonic() < next_stats:
                continue
            next_stats += args.stats_every
            print(f"requests={site.total_requests} open={site.open_connections} "
                  f"hanging={site.hanging} faults={dict(site.faults_served)}", flush=True)
    finally:
        site.stop()
        if proxy is not None:
            proxy.stop()
    print(f"stopped after {site.total_requests} requests", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
