"""The scenario corpus as a table: class, culprit, time to diagnosis, time to the end, and
requests lost (must be 0), one row per stall in user code.

Every scenario runs in its own child process with nothing but the ADDONS line
(durations shortened; ``consent_wall`` at the true defaults), side by side.

    python -m bench.diagnose [--only semaphore_hold_and_wait,...] [--timeout 240]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from scrapy_antideadlock.testing.scenarios import SCENARIOS
from scrapy_antideadlock.testing.scenarios.run import ScenarioRun, account, run_scenarios


def row(run: ScenarioRun) -> dict[str, Any]:
    first = run.first
    books = account(run)
    culprit = (first or {}).get("culprit") or {}
    return {
        "scenario": run.scenario.name,
        "expected": run.scenario.stall_class or "(not a stall)",
        "class": first["class"] if first else "-",
        "culprit": culprit.get("qualname", "-"),
        "diagnosis_s": None if first is None else first.get("time_to_detect",
                                                             first["since_progress"]),
        "end_s": run.time_to_end,
        "exit": run.returncode,
        "lost": len(books.lost),
        "expected_items": books.expected,
    }


def render(rows: list[dict[str, Any]]) -> str:
    def num(value: Any, stall: bool = True) -> str:
        if value is None:
            return "never" if stall else "-"
        return f"{value:.1f}s"

    lines = [f"{'scenario':<28} {'expected':<14} {'class':<13} {'culprit':<40} "
             f"{'diagnosis':>9} {'end':>7} {'exit':>5} {'lost':>5}"]
    for r in rows:
        stall = not r["expected"].startswith("(")
        lines.append(f"{r['scenario']:<28} {r['expected']:<14} {r['class']:<13} "
                     f"{r['culprit'][:40]:<40} {num(r['diagnosis_s'], stall):>9} "
                     f"{num(r['end_s'], stall):>7} {str(r['exit']):>5} {r['lost']:>5}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args()
    from scrapy_antideadlock.testing import FaultProxy, find_chromium, postgres_dsn

    names = [n for n in args.only.split(",") if n]
    proxy = FaultProxy().start()
    load = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="diagnose-") as tmp:
            runs = run_scenarios(names, tmp, timeout=args.timeout, pg_dsn=postgres_dsn(),
                                 chromium=find_chromium(), proxy_url=proxy.url)
            rows = [row(run) for run in runs]
    finally:
        proxy.stop()
    out = [f"load avg {load[0]:.2f} on {os.cpu_count()} CPUs (start); timings are noisy",
           render(rows),
           "diagnosis: flatline until the diagnosis (blocked loop: the block until it); "
           "end: last diagnosis to process exit; lost: items neither stored, dead-lettered nor "
           "pending on disk (journal, quarantine, exit file); exit: 0 finished, 1 closed "
           "with antideadlock_<class>, 75/76 the pack's hard exits"]
    for r in rows:
        if r["expected"].startswith("("):
            continue  # not a stall
        end = -1 if r["end_s"] is None else round(r["end_s"], 1)
        out.append(f"RESULT diagnose.{r['scenario']}_end {end} s # class {r['class']} "
                   f"(expected {r['expected']}), diagnosis after {r['diagnosis_s']} s, "
                   f"lost {r['lost']}; -1 = never ended")
    out.append(f"RESULT diagnose.lost_total {sum(r['lost'] for r in rows)} count "
               "# items neither stored, dead-lettered nor pending on disk, all scenarios")
    out.append(f"RESULT diagnose.classified_right "
               f"{sum(r['class'] == r['expected'] for r in rows if r['expected'][0] != '(')} "
               f"count # of {sum(1 for r in rows if r['expected'][0] != '(')} stall scenarios")
    print("\n".join(out))


if __name__ == "__main__":
    main()
