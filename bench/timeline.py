"""Items/min over time, plain Scrapy vs the pack, when 1 % of item URLs hang for ever.

The fault site runs in its own process: log-normal latency (median 100 ms, sigma 0.5),
1 % of ``/item/*`` URLs never answer (the same URLs on every retry).
CONCURRENT_REQUESTS = 16 (16 per domain: the site is one host). Each crawl runs in a
fresh child process for the same ``--window`` seconds: plain Scrapy as a careful user
runs it (``DOWNLOAD_TIMEOUT`` tuned to 3 s and to 10 s; the default 180 s would never fire
inside the window), and the same crawl with ``ADDONS = {"scrapy_antideadlock.Addon": 0}``,
in alternating order over ``--rounds`` (the plot shows the first round; the figures are
medians). Writes ``bench/results/hang_rate.png`` and ``bench/results/timeline.csv``.

    python -m bench.timeline [--window 60] [--hang-rate 0.01] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from .common import ADDON_PACK, SiteProcess, load_line, rate, run_child
from .pngplot import BLUE, ORANGE, RED, line_plot

RESULTS = Path(__file__).resolve().parent / "results"
BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}
SMOOTH = 5.0  # seconds of the sliding window items/min is computed over
#: side -> (settings, plot label, colour)
SIDES = {"plain_t3s": ({"DOWNLOAD_TIMEOUT": 3}, "plain scrapy, download timeout 3 s", RED),
         "plain_t10s": ({"DOWNLOAD_TIMEOUT": 10}, "plain scrapy, download timeout 10 s", ORANGE),
         "pack": (ADDON_PACK, "scrapy-antideadlock (addon, defaults)", BLUE)}


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
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "hang_rate.png")
    args = parser.parse_args()
    site_args = ["--pages", "400", "--items-per-page", "100", "--latency", "0.1",
                 "--sigma", "0.5", "--hang-rate", str(args.hang_rate), "--per", "url",
                 "--match", "/item/*"]
    print(load_line(), "(start)", flush=True)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with SiteProcess(*site_args) as site:  # per="url": the same URLs hang in every run
        for rnd in range(args.rounds):
            for side in SIDES if rnd % 2 == 0 else reversed(list(SIDES)):
                began = time.monotonic()
                runs[side].append(run_child(site.start_url, {**BASE, **SIDES[side][0]},
                                            args.window))
                print(f"round {rnd + 1} {side:10s}: {runs[side][-1]['items']} items in "
                      f"{args.window:.0f} s (run {time.monotonic() - began:.0f} s)", flush=True)
    print(load_line(), "(end)", flush=True)

    series = {side: per_minute(reports[0]["times"], args.window)
              for side, reports in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pct = f"{args.hang_rate * 100:g}%"
    png = line_plot(
        [(label, series[side], colour) for side, (_, label, colour) in SIDES.items()],
        title=f"items/min when {pct} of item urls hang for ever (16 concurrent requests)",
        xlabel="seconds since crawl start", ylabel=f"items/min ({SMOOTH:g} s window)")
    args.out.write_bytes(png)
    csv = args.out.with_name("timeline.csv")
    with csv.open("w") as f:
        f.write("t_seconds," + ",".join(f"{side}_items_per_min" for side in SIDES) + "\n")
        for i, (t, _) in enumerate(series["pack"]):
            f.write(f"{t:g}," + ",".join(f"{series[side][i][1]:.0f}" for side in SIDES)
                    + "\n")
    print(f"wrote {args.out} and {csv}")

    half = args.window / 2
    what = (f"{args.window:g} s window each, {pct} of item URLs hang, median of "
            f"{args.rounds} alternating round(s)")
    for side in SIDES:
        items = statistics.median(r["items"] for r in runs[side])
        late = statistics.median(rate(r["times"], half, args.window) for r in runs[side])
        early = statistics.median(rate(r["times"], 2.0, half) for r in runs[side])
        print(f"RESULT timeline.items_{side} {items:.0f} count # {SIDES[side][1]}; {what}")
        print(f"RESULT timeline.rate_late_{side} {late:.0f} items/min "
              f"# {SIDES[side][1]}, second half of the window; {what}")
        if early > 0:
            print(f"RESULT timeline.late_vs_early_{side} {late / early:.3f} ratio "
                  f"# {SIDES[side][1]}: items/min in the second half / first half")


if __name__ == "__main__":
    main()
