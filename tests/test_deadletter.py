"""The JSONL dead-letter store: atomic appends from many processes, timed lock, torn lines."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
from decimal import Decimal

import pytest

from scrapy_antideadlock.primitives.deadletter import (
    DeadLetterLockTimeout,
    DeadLetterStore,
    read_dead_letters,
    to_jsonable,
)


def _writer(path: str, writer: int, count: int) -> None:
    store = DeadLetterStore(path, lock_timeout=30)
    for i in range(count):
        # Large records, several per append: interleaving would corrupt lines.
        store.append([{"writer": writer, "i": i, "part": p, "pad": "x" * 5000}
                      for p in range(3)])


def test_concurrent_processes_never_interleave(tmp_path):
    path = str(tmp_path / "dl.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "dl.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 40 * 3
    records = [json.loads(line) for line in lines]  # every line parses: no interleaving
    seen = {(r["writer"], r["i"], r["part"]) for r in records}
    assert len(seen) == 480
    # One append's lines stay together and in order.
    for a, b, c in zip(records[0::3], records[1::3], records[2::3], strict=True):
        assert (a["writer"], a["i"]) == (b["writer"], b["i"]) == (c["writer"], c["i"])
        assert [a["part"], b["part"], c["part"]] == [0, 1, 2]


def test_lock_held_elsewhere_times_out(tmp_path):
    path = tmp_path / "dl.jsonl"
    path.write_text("")
    holder = os.open(path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        store = DeadLetterStore(path, lock_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(DeadLetterLockTimeout, match="still locked"):
            store.append([{"a": 1}])
        assert 0.25 <= time.monotonic() - start < 2.0
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert read_dead_letters(path) == []  # nothing half-written
    DeadLetterStore(path, lock_timeout=0.3).append([{"a": 2}])
    assert [r["a"] for r in read_dead_letters(path)] == [2]


def test_torn_last_line_is_skipped_and_next_append_starts_fresh(tmp_path):
    path = tmp_path / "dl.jsonl"
    path.write_text('{"ok": 1}\n{"torn": ')  # a writer crashed mid-line
    store = DeadLetterStore(path)
    store.append([{"ok": 2}])
    records = read_dead_letters(path)
    assert [r["ok"] for r in records] == [1, 2]
    assert "ts" in records[1]


def test_unserialisable_values_become_text():
    value = {"when": __import__("datetime").date(2024, 1, 2), "n": Decimal("1.5"),
             "obj": object(), "nan": float("nan"), "nested": [{1, 2}]}
    out = to_jsonable(value)
    json.dumps(out, allow_nan=False)
    assert out["when"] == "2024-01-02"
    assert out["obj"].startswith("<object object")
    assert out["nan"] == "nan"


def test_missing_file_reads_empty(tmp_path):
    assert read_dead_letters(tmp_path / "none.jsonl") == []
