"""The request journal primitive: replay = scheduled - done, crash safety, compaction, lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from scrapy_antideadlock.primitives.journal import Journal, JournalLocked, read_pending


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
