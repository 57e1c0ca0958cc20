"""README and docs benchmark figures are generated from bench/results/results.json."""

from __future__ import annotations

import re

from bench import figures


def test_every_figure_block_agrees_with_the_results_file() -> None:
    assert figures.stale() == [], "run: python -m bench.figures --write"


def test_a_block_shows_what_the_file_says_and_nothing_else() -> None:
    results = {"commit": "abc1234", "machine": {"date (UTC)": "2026-11-30 12:00"},
               "figures": {"overhead.cpu_ratio": {"value": 1.021, "unit": "ratio",
                                                  "note": "add-on / plain", "bench": "overhead"}}}
    body = figures.render("headline", results)
    assert "| 1.02 | <= 1.03 | add-on / plain |" in body
    assert "commit abc1234" in body
    assert body.count("not measured") == len(figures.BLOCKS["headline"]) - 1


def test_docs_quote_no_hand_typed_benchmark_ratios() -> None:
    # A figure like "0.94" or "7.9×" next to plain/pack wording outside a generated block
    # would drift from the results; measured figures live only in generated blocks.
    pattern = re.compile(r"\b\d+\.\d+\s*×\s*(?:plain|fault-free|naive)|"
                         r"items/min\s+\d+\.\d+\s*[-–]\s*\d+\.\d+")
    for path in figures.FILES:
        text = figures._BEGIN.sub("", path.read_text())
        assert not pattern.search(text), f"{path.name}: {pattern.search(text)[0]!r}"
