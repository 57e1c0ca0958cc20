"""Where the pack's CPU goes: py-spy over whole fault-free crawls, plain vs add-on.

Each side crawls the same local fault site (``--pages`` listings x 100 items, 16
concurrent) in a child process sampled by py-spy (all threads, idle samples dropped).
Every sample is attributed to the innermost frame from ``scrapy_antideadlock`` on its
stack (the component that caused the work), or to "scrapy/twisted/asyncio" when no
frame of the pack is on it. Off-loop threads are reported separately.

    python -m bench._profile [--pages 50] [--rate 250] [--side addon|plain|both]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from .broad import BROAD
from .common import ADDON_PACK, ROOT, SiteProcess

#: Frames of the crawl's own spider: work below them is the user's, not the pack's.
_USER_CODE = ("testing/spiders.py", "bench/common.py")
BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}


def _component(frames: list[str]) -> str:
    """The innermost pack module on a collapsed stack (outermost first), else 'other'."""
    for frame in reversed(frames):
        if any(u in frame for u in _USER_CODE):
            return "other"
        if "scrapy_antideadlock/" in frame and "/testing/" not in frame:
            path = frame.split("(", 1)[1].split(":", 1)[0] if "(" in frame else frame
            mod = path.split("scrapy_antideadlock/", 1)[1].removesuffix(".py")
            func = frame.split(" (", 1)[0]
            return f"{mod}:{func}"
    return "other"


def profile(start_url: str, settings: dict, rate: int, window: float) -> dict:
    out = tempfile.NamedTemporaryFile(suffix=".txt", delete=False).name
    spec = {"start_url": start_url, "settings": {**BASE, **settings}, "window": window}
    cmd = ["py-spy", "record", "--format", "raw", "--threads", "--rate", str(rate),
           "--nonblocking", "-o", out, "--", sys.executable, "-m", "bench.common",
           json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=window + 120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    by_comp: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    total = 0
    with open(out) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            n = int(count)
            total += n
            thread = frames[0]
            main = "MainThread" in thread or "process " in thread and len(frames) < 2
            comp = _component(frames[1:])
            if not main and "MainThread" not in thread:
                by_thread[thread.split("(", 1)[0].strip() + " " + comp.split(":")[0]] += n
            else:
                by_comp[comp] += n
    os.unlink(out)
    return {"report": report, "total": total, "by_comp": by_comp, "by_thread": by_thread}


def cprofile(start_url: str, settings: dict, window: float, **extra: Any) -> Any:
    """pstats of one crawl (main thread only; call counts are exact, times inflated)."""
    import pstats

    out = tempfile.NamedTemporaryFile(suffix=".prof", delete=False).name
    base = BROAD if extra.get("broad") else BASE
    spec = {"start_url": start_url, "settings": {**base, **settings}, "window": window,
            **extra}
    subprocess.run([sys.executable, "-m", "bench.common", json.dumps(spec)], cwd=ROOT,
                   capture_output=True, text=True, timeout=window + 120,
                   env={**os.environ, "BENCH_CPROFILE": out})
    stats = pstats.Stats(out)
    os.unlink(out)
    return stats.stats  # type: ignore[attr-defined]


def _area(filename: str) -> str:
    if "scrapy_antideadlock/" in filename:
        return "pack:" + filename.split("scrapy_antideadlock/", 1)[1].removesuffix(".py")
    for name in ("asyncio", "twisted", "scrapy", "parsel", "lxml", "w3lib", "logging"):
        if f"/{name}/" in filename:
            return name
    return "other"


def compare(plain: dict, pack: dict, top: int) -> None:
    """Call-count and self-time differences, pack - plain, by area and by function."""
    def by_area(stats: dict) -> collections.Counter[str]:
        c: collections.Counter[str] = collections.Counter()
        for (filename, _, _), (_, _, tt, _, _) in stats.items():
            c[_area(filename)] += tt
        return c

    a, b = by_area(plain), by_area(pack)
    print("self time by area (cProfile, inflated), plain -> addon:")
    for area in sorted(set(a) | set(b), key=lambda k: -(b[k] - a[k])):
        if abs(b[area] - a[area]) > 0.01:
            print(f"  {area:36s} {a[area]:7.2f}s -> {b[area]:7.2f}s  ({b[area] - a[area]:+.2f}s)")
    rows = []
    for key in set(plain) | set(pack):
        ncalls_a = plain.get(key, (0, 0, 0.0))[1]
        ncalls_b = pack.get(key, (0, 0, 0.0))[1]
        tt_a = plain.get(key, (0, 0, 0.0, 0, 0))[2]
        tt_b = pack.get(key, (0, 0, 0.0, 0, 0))[2]
        rows.append((tt_b - tt_a, ncalls_b - ncalls_a, key))
    print(f"top {top} functions by added self time (ncalls added):")
    for dt, dn, (filename, line, func) in sorted(rows, reverse=True)[:top]:
        short = "/".join(filename.split("/")[-2:])
        print(f"  {dt:+7.3f}s {dn:+8d}  {short}:{line} {func}")


#: One component off at a time (the rest of the add-on at its defaults).
ABLATIONS: dict[str, dict] = {
    "no deadline": {"ANTIDEADLOCK_DEADLINE_ENABLED": False},
    "no watchdog": {"ANTIDEADLOCK_WATCHDOG_ENABLED": False},
    "no journal": {"ANTIDEADLOCK_JOURNAL_ENABLED": False},
    "no recovery": {"ANTIDEADLOCK_RECOVERY_LEVEL": "off"},
    "no lifecycle": {"ANTIDEADLOCK_LIFECYCLE_ENABLED": False},
}


def ablate(start_url: str, requests: int) -> None:
    """Function calls per request (exact under cProfile, so load cannot blur them) of the
    full add-on, and what switching one component off saves."""
    def calls(settings: dict) -> int:
        stats = cprofile(start_url, settings, 600)
        return sum(v[1] for v in stats.values())

    plain = calls({})
    full = calls(dict(ADDON_PACK))
    print(f"function calls per request: plain {plain / requests:.0f}, add-on "
          f"{full / requests:.0f} (+{(full - plain) / requests:.0f}, "
          f"{full / plain - 1:+.1%})")
    for name, extra in ABLATIONS.items():
        n = calls({**ADDON_PACK, **extra})
        print(f"  {name:14s} {n / requests:.0f} per request: the component costs "
              f"{(full - n) / requests:+.0f} calls per request ({(full - n) / plain:+.1%} "
              "of plain Scrapy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--side", choices=("addon", "plain", "both"), default="both")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--settings", default="{}", help="extra settings (JSON) for the pack")
    parser.add_argument("--broad", action="store_true",
                        help="with --cprofile: the broad crawl (pages x 100 hosts)")
    parser.add_argument("--ablate", action="store_true",
                        help="function calls per request, with one component off at a time")
    parser.add_argument("--cprofile", action="store_true",
                        help="cProfile both sides and diff calls and self time instead")
    args = parser.parse_args()
    if args.ablate:
        with SiteProcess("--pages", str(args.pages), "--items-per-page", "100") as site:
            ablate(site.start_url, args.pages * 101)
        return
    if args.cprofile:
        host = ("--host", "0.0.0.0") if args.broad else ()
        with SiteProcess(*host, "--pages", str(args.pages), "--items-per-page", "100") as site:
            extra = {}
            if args.broad:
                port = int(site.start_url.split(":")[2].split("/")[0])
                extra = {"broad": {"n": args.pages * 100, "port": port}}
            plain = cprofile(site.start_url, {}, 600, **extra)
            pack = cprofile(site.start_url, {**ADDON_PACK, **json.loads(args.settings)}, 600,
                            **extra)
        compare(plain, pack, args.top)
        return
    sides = {"plain": {}, "addon": {**ADDON_PACK, **json.loads(args.settings)}}
    if args.side != "both":
        sides = {args.side: sides[args.side]}
    with SiteProcess("--pages", str(args.pages), "--items-per-page", "100") as site:
        for name, settings in sides.items():
            res = profile(site.start_url, settings, args.rate, 300)
            rep = res["report"]
            total = res["total"] or 1
            print(f"== {name}: {rep.get('items')} items, wall {rep.get('elapsed', 0):.2f}s, "
                  f"cpu {rep.get('cpu', 0):.2f}s, {total} samples")
            for comp, n in res["by_comp"].most_common(args.top):
                print(f"  {n / total:6.1%}  {comp}")
            for thread, n in res["by_thread"].most_common(10):
                print(f"  {n / total:6.1%}  [thread] {thread}")


if __name__ == "__main__":
    main()
