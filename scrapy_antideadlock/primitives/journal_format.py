"""The journal's file format: records, how they become lines and how a file is read
back (see :mod:`.journal`).

A scheduled request is kept as a :class:`Record` until its line is written: JSON-encoding
it costs more than the rest of the journal's work per request, and a request done before
the next flush is never written at all (only its cheap "done" line is).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Record", "Repair", "ReplayState", "batch_header", "done_line", "encode",
           "read_state", "record_line"]

#: Called at flush time with the payload of a record JSON could not encode; returns
#: (payload to write instead, or None; a credential-free URL for a None payload; error).
Repair = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, str, str]]

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # made once
_string = json.encoder.encode_basestring  # how _ENCODER writes a str (ensure_ascii=False)


def _c_encoder() -> Any:
    """The C encoder ``_ENCODER.encode`` makes on every call, made once, without the check
    for circular references (a cycle ends in RecursionError: unencodable, as a TypeError
    is): a third less per record. None where json has no C accelerator, or one this call
    does not fit (it is the json module's own, not a documented API): then ``_ENCODER``
    does the work."""
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        return make and make(None, _ENCODER.default, _string, None, ":", ",", False, False,
                             True)
    except TypeError:
        return None


_C_ENCODE = _c_encoder()
_UNENCODABLE = (TypeError, ValueError, RecursionError)  # ValueError: a lone surrogate


class Record:
    """A scheduled request waiting for the flush that encodes it; ``elided`` when it was
    done (or scheduled again) before that, so that it is never written."""

    __slots__ = ("key", "fp", "payload", "url", "error", "elided")

    def __init__(self, key: str, fp: str, payload: dict[str, Any] | None, url: str = "",
                 error: str = "") -> None:
        self.key, self.fp, self.payload, self.url, self.error = key, fp, payload, url, error
        self.elided = False

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Record:
        """A record read back from a journal file."""
        return cls(record["k"], record.get("fp", ""), record.get("r"), record.get("u", ""),
                   record.get("e", ""))

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"t": "s", "k": self.key, "fp": self.fp, "r": self.payload}
        if self.url:
            record["u"] = self.url
        if self.error:
            record["e"] = self.error
        return record


def encode(record: dict[str, Any]) -> bytes:
    if _C_ENCODE is None:
        return (_ENCODER.encode(record) + "\n").encode()
    return ("".join(_C_ENCODE(record, 0)) + "\n").encode()


def record_line(record: Record, repair: Repair | None) -> bytes:
    """``record``'s line; never raises. A payload JSON cannot hold goes through ``repair``;
    if that fails too, the record is written without it (a URL, if ``repair`` gave one,
    and the error), so that a resume reports it instead of losing it."""
    try:
        return encode(record.as_dict())
    except _UNENCODABLE as exc:
        error = f"{type(exc).__name__}: {exc}"
    url = record.url
    if repair is not None and record.payload is not None:
        try:
            payload, url, error = repair(record.payload)
        except Exception as exc:
            payload, error = None, f"{type(exc).__name__}: {exc}"
        if payload is not None:
            record.payload = payload
            try:
                return encode(record.as_dict())
            except _UNENCODABLE as exc:
                error = f"{type(exc).__name__}: {exc}"
    record.payload, record.url, record.error = None, url, error
    # ASCII escapes: whatever strings it holds, this line can be encoded and read back
    return (json.dumps(record.as_dict(), separators=(",", ":")) + "\n").encode()


def done_line(key: str, fp: str) -> bytes:
    """The bytes ``encode`` writes for ``{"t": "d", "k": key, "fp": fp}``, without its
    dict walk (once per request)."""
    return f'{{"t":"d","k":{_string(key)},"fp":{_string(fp)}}}\n'.encode()


def batch_header(lines: int) -> bytes:
    """Opens a batch that elided records: the reader applies its "done" lines only if all
    ``lines`` lines after the header were written (see :func:`read_state`)."""
    return b'{"t":"b","n":%d}\n' % lines


@dataclass
class ReplayState:
    """What a previous run left: pending records (in first-scheduled order) and markers."""

    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # fingerprints of done requests
    markers: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    torn: int = 0  # unreadable lines skipped, batches cut short (a torn tail after a crash)


def read_state(path: Path) -> ReplayState:
    """What the journal file at ``path`` holds (an empty state if there is none)."""
    state = ReplayState()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return state
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" if the file ends with a newline, else a torn record
    if tail:
        state.torn += 1
    apply_done = True
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["t"]
        except (ValueError, KeyError, TypeError):
            state.torn += 1
            continue
        if kind == "b":
            # A batch that elided records, cut short by a crash (it can only be the
            # last): a "done" in it may precede the only line of an elided child
            # (the child's "done"), so none counts; its requests stay pending.
            if index + int(record.get("n", 0)) >= len(lines):
                apply_done = False
                state.torn += 1
            continue
        state.records += 1
        if kind == "s":
            key = record["k"]
            state.pending.pop(key, None)  # re-scheduled: latest payload, moved last
            state.pending[key] = record
        elif not apply_done:
            continue
        elif kind == "d":
            state.pending.pop(record["k"], None)
            if record.get("fp"):
                state.seen.add(record["fp"])
        elif kind == "seen":
            state.seen.update(record.get("fps", ()))
        elif kind == "m":
            state.markers.append(record)
    return state
