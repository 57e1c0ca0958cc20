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


#: Measured-looking figures: "7.9× plain", "items/min 0.14-0.33", "400 of 600 items",
#: "145 pages/min" (not Scrapy's own "(at 0 pages/min)" log line), "(ratio 0.98)", "load
#: averages of 16".
HAND_TYPED = re.compile(r"\b\d+\.\d+\s*×\s*(?:plain|fault-free|naive)|"
                        r"items/min\s+\d+\.\d+\s*[-–]\s*\d+\.\d+|"
                        r"\b\d[\d,]*\s+of\s+\d[\d,]*\s+(?:items|pages|requests)\b|"
                        r"(?<!at )\b\d[\d,.]*\s*(?:pages|items|rows)/(?:min|s)\b|"
                        r"\(ratio\s+\d+\.\d+\)|"
                        r"load averages? of \d")


def test_docs_quote_no_hand_typed_benchmark_figures() -> None:
    # A measured figure outside a generated block would drift from the results; measured
    # figures live only in generated blocks.
    for path in figures.FILES:
        text = figures._BEGIN.sub("", path.read_text())
        assert not HAND_TYPED.search(text), f"{path.name}: {HAND_TYPED.search(text)[0]!r}"


def test_the_hand_typed_check_catches_what_the_docs_once_said() -> None:
    for typed in ("with load averages of 16–17 from other jobs", "(ratio 0.98)",
                  "(in our benchmark: 400 of 600 items)", "| 145 pages/min |",
                  "7.9× naive", "items/min 0.14–0.33"):
        assert HAND_TYPED.search(typed), typed
    assert not HAND_TYPED.search("Crawled 85 pages (at 0 pages/min)")


def test_every_block_is_placed_and_asks_for_figures_its_bench_prints() -> None:
    """A block nobody shows, or a row whose bench ran at the results' commit but printed
    no such figure (a renamed figure), is drift too."""
    text = "".join(p.read_text() for p in figures.FILES)
    placed = {m["name"] for m in figures._BEGIN.finditer(text)}
    assert placed == set(figures.BLOCKS), set(figures.BLOCKS) ^ placed
    results = figures.load()
    ran = {bench for bench, run in results.get("benches", {}).items()
           if str(run.get("status", "")).startswith("ok")}
    renamed = [key for rows in figures.BLOCKS.values() for _, key, _ in rows
               if key.split(".", 1)[0] in ran and key not in results["figures"]]
    assert not renamed, renamed
