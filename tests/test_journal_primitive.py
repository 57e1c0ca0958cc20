"""The request journal primitive: replay = scheduled - done, crash safety, compaction, lock."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from scrapy_antideadlock.primitives.journal import Journal, JournalLocked, read_pending
from scrapy_antideadlock.primitives.journal_format import read_state


def _payload(n: int) -> dict:
    return {"url": f"http://x/{n}", "callback": "parse"}


def test_done_records_of_any_key_read_back(tmp_path):
    """The "done" line is written without a dict walk: keys and fingerprints JSON must
    escape (quotes, backslashes, newlines, non-ASCII) still read back as done."""
    keys = ['plain.1', 'q"uote', 'back\\slash', 'new\nline', 'é✓\u2028', '']
    journal = Journal(tmp_path)
    journal.open()
    for n, key in enumerate(keys):
        journal.scheduled(key, f'fp"{n}\n', _payload(n))
        journal.scheduled(f"keep{n}", f"keepfp{n}", _payload(n))
    for key in keys:
        assert journal.done(key)
    journal.close()
    again = Journal(tmp_path)
    state = again.open()
    again.close()
    assert sorted(state.pending) == sorted(f"keep{n}" for n in range(len(keys)))
    assert state.torn == 0 and state.seen == {f'fp"{n}\n' for n in range(len(keys))}


def test_sync_written_from_another_thread(tmp_path):
    """The periodic fsync runs off the event loop: it covers what was flushed, once."""
    import threading

    journal = Journal(tmp_path, autoflush=False)
    journal.open()
    results: list[bool] = []

    def sync() -> None:
        results.append(journal.sync_written())

    for _ in range(2):
        journal.scheduled("k1", "fp1", _payload(1))
        journal.flush()
        for _ in range(2):  # the second finds nothing new written
            thread = threading.Thread(target=sync)
            thread.start()
            thread.join(5)
    journal.close()
    assert results == [True, False, True, False]
    assert journal.counters["fsyncs"] >= 2
    assert not journal.sync_written()  # closed: nothing to do, no error


def test_replay_is_scheduled_minus_done(tmp_path):
    journal = Journal(tmp_path)
    assert journal.open().pending == {}
    for n in range(10):
        journal.scheduled(f"k{n}", f"fp{n}", _payload(n))
    for n in range(0, 10, 2):
        assert journal.done(f"k{n}")
    assert not journal.done("unknown")
    journal.scheduled("k3", "fp3", {"url": "http://x/3-redirected"})  # latest payload wins
    journal.close()

    again = Journal(tmp_path)
    state = again.open()
    assert sorted(state.pending) == ["k1", "k3", "k5", "k7", "k9"]
    assert state.pending["k3"]["r"]["url"] == "http://x/3-redirected"
    assert state.seen == {f"fp{n}" for n in range(0, 10, 2)}
    # a key scheduled again after "done" is pending again (append order decides)
    again.scheduled("k0", "fp0", _payload(0))
    again.close()
    assert "k0" in {r["k"] for r in read_pending(tmp_path)}


def test_torn_tail_is_skipped(tmp_path):
    journal = Journal(tmp_path)
    journal.open()
    journal.scheduled("a", "fa", _payload(1))
    journal.scheduled("b", "fb", _payload(2))
    journal.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"t":"d","k":"a","f')  # a crash mid-write
    state = Journal(tmp_path).open()
    assert sorted(state.pending) == ["a", "b"]  # the torn "done" counts as not written
    assert state.torn == 1


def test_compaction_bounds_growth_and_keeps_pending(tmp_path):
    journal = Journal(tmp_path, compact_min_bytes=20_000, compact_ratio=2.0, fsync="never")
    journal.open()
    for n in range(5000):
        journal.scheduled(f"k{n}", f"fp{n}", _payload(n))
        if n % 50:
            journal.done(f"k{n}")
    size = (tmp_path / "journal.jsonl").stat().st_size
    assert journal.counters["compactions"] >= 2
    assert size < 1_000_000
    pending = set(journal.pending_keys())
    journal.close()
    state = Journal(tmp_path).open()
    assert set(state.pending) == pending and len(pending) == 100
    assert len(state.seen) == 4900
    assert not (tmp_path / "journal.jsonl.tmp").exists()


def test_lock_times_out_with_named_error(tmp_path):
    first = Journal(tmp_path)
    first.open()
    second = Journal(tmp_path, lock_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(JournalLocked, match=f"pid {os.getpid()}"):
        second.open()
    assert 0.25 < time.monotonic() - started < 3
    first.close()
    second.open()  # free once the holder closed
    second.close()


def test_sigkill_mid_stream_loses_nothing_written(tmp_path):
    """A writer killed with SIGKILL: every record whose write returned is replayed."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from scrapy_antideadlock.primitives.journal import Journal
        j = Journal({str(tmp_path)!r}, fsync="never")
        j.open()
        n = 0
        while True:
            j.scheduled(f"k{{n}}", f"fp{{n}}", {{"url": f"http://x/{{n}}"}})
            if n % 3 == 0:
                j.done(f"k{{n}}")
            print(n, flush=True)
            n += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    acked = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acked = int(line)
        if acked >= 3000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    state = Journal(tmp_path, lock_timeout=5).open()  # the kernel dropped the dead lock
    expected = {f"k{n}" for n in range(acked + 1) if n % 3}
    assert expected <= set(state.pending)
    assert all(int(k[1:]) % 3 or int(k[1:]) > acked for k in state.pending)


def test_crash_during_compaction_leaves_a_complete_journal(tmp_path):
    journal = Journal(tmp_path)
    journal.open()
    journal.scheduled("a", "fa", _payload(1))
    journal.scheduled("b", "fb", _payload(2))
    journal.done("a")
    journal.close()
    # a compaction killed before its rename leaves only a temp file behind
    (tmp_path / "journal.jsonl.tmp").write_bytes(b'{"t":"s","k":"zz","fp":"x","r":null}\n{"t')
    state = Journal(tmp_path).open()
    assert list(state.pending) == ["b"] and state.seen == {"fa"}


# ---------------------------------------------------------------- batches (autoflush=False)

def _lines(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "journal.jsonl").read_bytes().splitlines()]


def test_scheduled_and_done_in_one_window_writes_only_the_done_line(tmp_path):
    journal = Journal(tmp_path, autoflush=False)
    journal.open()
    journal.scheduled("a", "fa", _payload(1))
    journal.scheduled("b", "fb", _payload(2))
    journal.scheduled("b", "fb", {"url": "http://x/2-retried"})  # the first "b" is elided
    assert journal.done("a")
    journal.flush()
    assert _lines(tmp_path) == [
        {"t": "b", "n": 2},
        {"t": "s", "k": "b", "fp": "fb", "r": {"url": "http://x/2-retried"}},
        {"t": "d", "k": "a", "fp": "fa"}]
    assert journal.counters["elided"] == 2 and journal.counters["scheduled"] == 3
    journal.close()
    state = Journal(tmp_path).open()
    assert list(state.pending) == ["b"] and state.seen == {"fa"}  # a's fp survives a resume


def test_a_record_flushed_before_done_is_kept_and_the_done_follows(tmp_path):
    journal = Journal(tmp_path, autoflush=False)
    journal.open()
    journal.scheduled("a", "fa", _payload(1))
    journal.flush()
    assert journal._live > 0
    assert journal.done("a")
    journal.flush()
    assert [r["t"] for r in _lines(tmp_path)] == ["s", "d"]  # no elision: no header
    assert journal.counters["elided"] == 0 and journal._live == 0
    for n in range(5):  # the compaction trigger counts written pending lines only
        journal.scheduled(f"k{n}", f"f{n}", _payload(n))
    assert journal._live == 0
    journal.flush()
    assert journal._live == sum(len(json.dumps(r, separators=(",", ":"))) + 1
                                for r in _lines(tmp_path)[2:])
    journal.close()


def _simulated_crawl(journal: Journal, seed: int) -> dict[str, list[str]]:
    """A crawl of a random request tree with random flushes: a child is scheduled while its
    parent's callback runs, i.e. before the parent's done; returns parent -> children."""
    rng = random.Random(seed)
    children: dict[str, list[str]] = {"r": []}
    journal.scheduled("r", "f-r", _payload(0))
    running: list[str] = ["r"]
    made = 1
    while running:
        key = running.pop(rng.randrange(len(running)))
        fanout = 10 if key == "r" else rng.choice((0, 1, 2, 3))
        for _ in range(fanout if made < 200 else 0):
            child = f"k{made}"
            made += 1
            children[key].append(child)
            children[child] = []
            journal.scheduled(child, f"f-{child}", _payload(made))
            running.append(child)
        assert journal.done(key)
        if rng.random() < 0.15:
            journal.flush()
    return children


@pytest.mark.parametrize("seed", range(6))
def test_any_prefix_of_the_file_replays_consistently(tmp_path, seed):
    """A crash can leave any prefix of what was written (a write cut short included): the
    replay must never hold a request done whose child is neither pending nor done, while
    batches elide records and write a child's only line (its done) after its parent's."""
    journal = Journal(tmp_path / "j", autoflush=False)
    journal.open()
    children = _simulated_crawl(journal, seed)
    journal.flush()
    assert journal.counters["elided"] > 20
    data = (tmp_path / "j" / "journal.jsonl").read_bytes()
    journal.close()
    cuts = {0, len(data)}
    for end in (i + 1 for i, byte in enumerate(data) if byte == ord("\n")):
        cuts |= {end, end - 7}
    probe = tmp_path / "probe.jsonl"
    for cut in sorted(cuts):
        probe.write_bytes(data[:cut])
        state = read_state(probe)
        done = {key for key in children if f"f-{key}" in state.seen} - set(state.pending)
        for key in done:
            lost = [c for c in children[key] if c not in state.pending and c not in done]
            assert not lost, f"cut at {cut}: {key} done, its children {lost} lost"
        if cut == len(data):
            assert not state.pending and done == set(children)


def test_a_crash_loses_only_the_unflushed_window(tmp_path):
    journal = Journal(tmp_path, autoflush=False)
    journal.open()
    journal.scheduled("a", "fa", _payload(1))
    journal.scheduled("b", "fb", _payload(2))
    journal.flush()
    journal.done("a")
    journal.scheduled("c", "fc", _payload(3))  # buffered only: lost with the process
    os.close(journal._fd)  # a crash: no flush, no close
    os.close(journal._lock_fd)
    state = Journal(tmp_path).open()
    assert list(state.pending) == ["a", "b"] and state.seen == set()  # a is re-crawled


def test_a_hard_exit_writes_the_window_from_another_thread(tmp_path):
    # The loop that owns the buffer is blocked (a hard exit's case): the monitor's thread
    # writes the window as flush() would, elided records included, and the state it
    # leaves replays what the window held.
    import threading

    journal = Journal(tmp_path, autoflush=False)
    journal.open()
    journal.scheduled("a", "fa", _payload(1))
    journal.flush()
    journal.scheduled("b", "fb", _payload(2))  # the window: b (done in it), c, a done
    journal.scheduled("c", "fc", _payload(3))
    journal.done("b")
    journal.done("a")
    thread = threading.Thread(target=journal.write_buffered)
    thread.start()
    thread.join()
    assert journal.buffered == 4  # the loop's state is left alone
    os.close(journal._fd)  # then the process dies
    os.close(journal._lock_fd)
    state = Journal(tmp_path).open()
    assert list(state.pending) == ["c"] and state.seen == {"fa", "fb"}


def _repair_meta(payload: dict) -> tuple[dict | None, str, str]:
    return {**payload, "meta": {"x": sorted(payload["meta"]["x"])}}, "", ""


def _give_up(payload: dict) -> tuple[dict | None, str, str]:
    return None, "http://x/clean", "TypeError: no"


def _raise(payload: dict) -> tuple[dict | None, str, str]:
    raise RuntimeError("hook failed")


@pytest.mark.parametrize("autoflush", [False, True])
def test_unencodable_payload_is_repaired_when_written(tmp_path, autoflush):
    bad = {"url": "http://user:pw@x/1", "meta": {"x": {3, 1, 2}}}  # a set: not JSON
    records = {}
    for name, repair in (("fixed", _repair_meta), ("gave_up", _give_up), ("raised", _raise),
                         ("no_hook", None)):
        journal = Journal(tmp_path / name, autoflush=autoflush, repair=repair)
        journal.open()
        journal.scheduled("k", "fp", {**bad, "meta": dict(bad["meta"])})
        journal.flush()  # never raises
        journal.close()
        records[name] = read_state(tmp_path / name / "journal.jsonl").pending["k"]
    assert records["fixed"]["r"] == {"url": "http://user:pw@x/1", "meta": {"x": [1, 2, 3]}}
    assert records["gave_up"] == {"t": "s", "k": "k", "fp": "fp", "r": None,
                                  "u": "http://x/clean", "e": "TypeError: no"}
    assert records["raised"]["r"] is None and "hook failed" in records["raised"]["e"]
    assert records["no_hook"]["r"] is None and "set" in records["no_hook"]["e"]
    assert "u" not in records["no_hook"]  # the primitive never writes a URL it was not given


def test_compaction_writes_pending_records_not_encoded_yet(tmp_path):
    journal = Journal(tmp_path, autoflush=False, compact_min_bytes=1, compact_ratio=1e9)
    journal.open()
    for n in range(20):
        journal.scheduled(f"k{n}", f"f{n}", _payload(n))
    journal.flush()
    for n in range(20, 40):  # buffered, not encoded
        journal.scheduled(f"k{n}", f"f{n}", _payload(n))
    for n in range(0, 40, 2):
        journal.done(f"k{n}")
    journal.compact()
    assert journal.buffered == 0
    journal.scheduled("k40", "f40", _payload(40))
    journal.done("k39")
    journal.flush()
    expected = [f"k{n}" for n in range(39) if n % 2] + ["k40"]
    assert journal.pending_keys() == expected
    assert journal._live == sum(len(line) + 1 for line in (tmp_path / "journal.jsonl")
                                .read_bytes().splitlines()
                                if json.loads(line).get("k") in expected)  # k39's: done
    journal.close()
    state = Journal(tmp_path).open()
    assert list(state.pending) == expected
    assert state.pending["k21"]["r"] == _payload(21)
    assert state.seen == {f"f{n}" for n in range(0, 40, 2)} | {"f39"}


def test_a_cyclic_payload_does_not_break_the_flush(tmp_path):
    meta: dict = {}
    meta["self"] = meta
    journal = Journal(tmp_path, autoflush=False)
    journal.open()
    journal.scheduled("cycle", "fc", {"url": "http://x/c", "meta": meta})
    journal.scheduled("fine", "ff", _payload(1))
    journal.flush()
    journal.close()
    state = read_state(tmp_path / "journal.jsonl")
    assert state.pending["cycle"]["r"] is None and state.pending["cycle"]["e"]
    assert state.pending["fine"]["r"] == _payload(1) and state.torn == 0
