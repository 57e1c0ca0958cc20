"""Items/min over time, plain Scrapy vs the pack, when 1 % of item URLs hang for ever.

The fault site runs in its own process: log-normal latency (median 100 ms, sigma 0.5),
1 % of ``/item/*`` URLs never answer (the same URLs on every retry).
CONCURRENT_REQUESTS = 16 (16 per domain: the site is one host). Each crawl runs in a
fresh child process for ``--window`` seconds: plain Scrapy with its defaults, then the
same crawl with ``ADDONS = {"scrapy_antideadlock.Addon": 0}``. Writes
``bench/results/hang_rate.png`` and ``bench/results/timeline.csv``.

    python -m bench.timeline [--window 60] [--hang-rate 0.01]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import ADDON_PACK, SiteProcess, load_line, rate, run_child
from .pngplot import BLUE, RED, line_plot

RESULTS = Path(__file__).resolve().parent / "results"
BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}
SMOOTH = 5.0  # seconds of the sliding window items/min is computed over


def per_minute(times: list[float], window: float, step: float = 1.0) -> list[tuple[float, float]]:
    """``(t, items/min over [t - SMOOTH, t))`` for t = SMOOTH, SMOOTH + step, ... window."""
    points = []
    t = SMOOTH
    while t <= window + 1e-9:
        points.append((t, rate(times, t - SMOOTH, t)))
        t += step
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per crawl")
    parser.add_argument("--hang-rate", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=RESULTS / "hang_rate.png")
    args = parser.parse_args()
    site_args = ["--pages", "400", "--items-per-page", "100", "--latency", "0.1",
                 "--sigma", "0.5", "--hang-rate", str(args.hang_rate), "--per", "url",
                 "--match", "/item/*"]
    print(load_line(), "(start)", flush=True)
    runs: dict[str, dict] = {}
    for name, extra in (("plain", {}), ("pack", ADDON_PACK)):
        began = time.monotonic()
        with SiteProcess(*site_args) as site:
            runs[name] = run_child(site.start_url, {**BASE, **extra}, args.window)
        print(f"{name:5s}: {runs[name]['items']} items in {args.window:.0f} s "
              f"(run {time.monotonic() - began:.0f} s)", flush=True)
    print(load_line(), "(end)", flush=True)

    series = {name: per_minute(run["times"], args.window) for name, run in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pct = f"{args.hang_rate * 100:g}%"
    png = line_plot(
        [("plain scrapy", series["plain"], RED),
         ("scrapy-antideadlock (addon)", series["pack"], BLUE)],
        title=f"items/min when {pct} of item urls hang for ever (16 concurrent requests)",
        xlabel="seconds since crawl start", ylabel=f"items/min ({SMOOTH:g} s window)")
    args.out.write_bytes(png)
    csv = args.out.with_name("timeline.csv")
    with csv.open("w") as f:
        f.write("t_seconds,plain_items_per_min,pack_items_per_min\n")
        for (t, plain), (_, pack) in zip(series["plain"], series["pack"], strict=True):
            f.write(f"{t:g},{plain:.0f},{pack:.0f}\n")
    print(f"wrote {args.out} and {csv}")

    half = args.window / 2
    late = {name: rate(run["times"], half, args.window) for name, run in runs.items()}
    early = {name: rate(run["times"], 2.0, half) for name, run in runs.items()}
    for name in ("plain", "pack"):
        print(f"RESULT timeline.items_{name} {runs[name]['items']} count "
              f"# items in {args.window:g} s, {pct} of item URLs hang")
        print(f"RESULT timeline.rate_late_{name} {late[name]:.0f} items/min "
              f"# second half of the window")
    if early["plain"] > 0:
        print(f"RESULT timeline.late_vs_early_plain {late['plain'] / early['plain']:.3f} ratio "
              "# plain: items/min in the second half / first half")
    if early["pack"] > 0:
        print(f"RESULT timeline.late_vs_early_pack {late['pack'] / early['pack']:.3f} ratio "
              "# pack: items/min in the second half / first half")


if __name__ == "__main__":
    main()
