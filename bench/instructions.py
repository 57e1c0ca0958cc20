"""CPU work counted in instructions: plain Scrapy vs the full add-on, and each component.

Timing cannot resolve a few percent of overhead on this VM (the same crawl's CPU time
drifts by a fifth between runs). The number of instructions a crawl executes barely
depends on the machine's speed or load, so this bench counts them: each crawl runs under
valgrind's cachegrind with the cache simulation off (about 5x slower, user-space
instructions only). A crawl of ``--pages`` listings x 100 detail pages and one of a
single listing give, by difference, the instructions per request with start-up taken out.

Valgrind slows the crawl about 5x, so periodic work (timers, the loop monitor's
thread) runs about 5x as often per request as in a real crawl, and more still when the
machine is busy. So each side's periodic work is measured alone (an idle crawl waiting
on one slow page: ``instructions.idle_mips``, millions of instructions per second) and
taken out of its per-request figure (``instructions.ratio``); ``instructions.ratio_all``
keeps it in (an upper bound). Crawls run one at a time.

Needs ``valgrind`` (``apt-get install -y valgrind``); without it the bench says so and
reports nothing.

Plain Scrapy and the full add-on run in rounds (plain, add-on, plain, add-on...): a
side's count moves by about half a percent between runs, so the ratio is the median of
the rounds' ratios, and every round's is printed. Each round also runs the add-on with
one component off, right after that round's add-on run, and the component's share is
the difference between the two: compared with an add-on run from another round, the
drift between runs would count as the component's cost. So there are at least as many
rounds as components (``--repeats`` only raises that).

    python -m bench.instructions [--pages 10] [--repeats 5] [--no-components]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import ADDON_PACK, ROOT, SiteProcess, compile_pack, load_line

BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}
#: One component off at a time (the rest of the add-on at its defaults).
COMPONENTS: dict[str, dict[str, Any]] = {
    "deadline": {"ANTIDEADLOCK_DEADLINE_ENABLED": False},
    "journal": {"ANTIDEADLOCK_JOURNAL_ENABLED": False},
    "lifecycle": {"ANTIDEADLOCK_LIFECYCLE_ENABLED": False},
    "watchdog": {"ANTIDEADLOCK_WATCHDOG_ENABLED": False},
    "recovery": {"ANTIDEADLOCK_RECOVERY_LEVEL": "off"},
}
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def count(start_url: str, settings: dict[str, Any], window: float = 1800) -> tuple[int, dict]:
    """Instructions one crawl executes (whole process, start-up included), and its report."""
    out = tempfile.NamedTemporaryFile(suffix=".cg", delete=False).name
    spec = {"start_url": start_url, "settings": {**BASE, **settings}, "window": window}
    try:
        proc = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no",
             f"--cachegrind-out-file={out}", sys.executable, "-m", "bench.common",
             json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
            timeout=window + 120)
    finally:
        os.unlink(out)
    found = _IREFS.search(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if found is None or not lines:
        raise RuntimeError(f"crawl under valgrind failed:\n{proc.stderr[-3000:]}")
    return int(found.group(1).replace(",", "")), json.loads(lines[-1])


def per_request(sides: dict[str, dict[str, Any]], small_url: str, big_url: str,
                requests: int, idle: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Instructions per request of each side, as (all of them, without periodic work).

    All: (big crawl - small crawl) / request difference. Without periodic work: the same
    less ``idle[side]`` (instructions per second while only waiting) times the difference
    in crawl time, so a crawl slowed by the machine does not count its timers again.
    One crawl at a time: two at once would slow both, and their timers would count more.
    """
    out = {}
    for name, settings in sides.items():
        ir_small, small = count(small_url, settings)
        ir_big, big = count(big_url, settings)
        if not big["finished"]:
            raise SystemExit(f"{name}: the crawl did not finish under valgrind")
        total = (ir_big - ir_small) / requests
        periodic = idle.get(name, idle["addon"]) * (big["elapsed"] - small["elapsed"])
        out[name] = (total, total - periodic / requests)
        print(f"{name:14s} {total / 1e3:9.1f} k instructions per request, "
              f"{out[name][1] / 1e3:9.1f} k without periodic work (start-up "
              f"{ir_small / 1e9:.3f} G; crawl {big['elapsed']:.0f} s)", flush=True)
    return out


def idle_rate(settings: dict[str, Any], fast_url: str, slow_url: str) -> float:
    """Instructions per second of wall time while the crawl only waits (one slow page)."""
    ir_fast, fast = count(fast_url, settings)
    ir_slow, slow = count(slow_url, settings)
    return (ir_slow - ir_fast) / max(slow["elapsed"] - fast["elapsed"], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=10, help="listings of 100 items")
    parser.add_argument("--repeats", type=int, default=len(COMPONENTS),
                        help="rounds of plain and the full add-on (at least one per "
                             "component unless --no-components)")
    parser.add_argument("--no-components", action="store_true",
                        help="only plain vs the full add-on")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install -y valgrind): nothing measured")
        return
    compile_pack()
    began = time.monotonic()
    print(load_line(), "(start)")
    components = [] if args.no_components else list(COMPONENTS)
    rounds = max(1, args.repeats, len(components))
    requests = (args.pages - 1) * 101
    with SiteProcess("--pages", "1", "--items-per-page", "1") as fast, \
            SiteProcess("--pages", "1", "--items-per-page", "1", "--latency", "8",
                        "--match", "*") as slow:
        idle = {name: idle_rate(settings, fast.start_url, slow.start_url)
                for name, settings in (("plain", {}), ("addon", dict(ADDON_PACK)))}
    print(f"periodic work while idle: plain {idle['plain'] / 1e6:.2f}, add-on "
          f"{idle['addon'] / 1e6:.2f} M instructions/s", flush=True)
    shares: dict[str, float] = {}
    with SiteProcess("--pages", "1", "--items-per-page", "100") as small, \
            SiteProcess("--pages", str(args.pages), "--items-per-page", "100") as big:
        pairs = []
        for rnd in range(rounds):
            print(f"round {rnd + 1}:", flush=True)
            sides: dict[str, dict[str, Any]] = {"plain": {}, "addon": dict(ADDON_PACK)}
            component = components[rnd] if rnd < len(components) else None
            if component is not None:
                sides[f"no {component}"] = {**ADDON_PACK, **COMPONENTS[component]}
            got = per_request(sides, small.start_url, big.start_url, requests, idle)
            pairs.append(got)
            if component is not None:
                shares[component] = (got["addon"][1] - got[f"no {component}"][1]) \
                    / got["plain"][1]
    print(load_line(), f"(end, {time.monotonic() - began:.0f}s)")
    ratios = [p["addon"][1] / p["plain"][1] for p in pairs]
    ratios_all = [p["addon"][0] / p["plain"][0] for p in pairs]
    print("round ratios:", ", ".join(f"{r:.3f}" for r in ratios))
    print(f"RESULT instructions.ratio {statistics.median(ratios):.3f} ratio # instructions "
          f"per request, full add-on / plain, {requests} local pages under valgrind, "
          f"periodic work (timers, the monitor thread) taken out, median of {len(pairs)} "
          f"alternating rounds ({min(ratios):.3f}-{max(ratios):.3f}); target <= 1.03")
    print(f"RESULT instructions.ratio_all {statistics.median(ratios_all):.3f} ratio # the "
          "same with periodic work in, at valgrind's ~5x slower pace (an upper bound)")
    for name, share in shares.items():
        print(f"RESULT instructions.{name}_share {share * 100:.2f} % # instructions per "
              f"request the {name} adds (the add-on minus the add-on without it, run "
              "right after it in the same round, periodic work out), share of plain "
              "Scrapy's (one round: +-0.5 % between runs)")
    print(f"RESULT instructions.idle_mips {(idle['addon'] - idle['plain']) / 1e6:.2f} "
          "Minstr/s # periodic work the add-on adds while a crawl only waits (plain "
          f"Scrapy's own: {idle['plain'] / 1e6:.2f})")


if __name__ == "__main__":
    main()
