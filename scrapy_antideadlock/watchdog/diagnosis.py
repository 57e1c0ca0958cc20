"""The typed diagnosis the watchdog sends with ``stall_detected`` and writes to its file.

A :class:`Diagnosis` names the class (from :mod:`.classes`), the evidence as readable
lines, the innermost frame of the project's own code that explains the stall
(:class:`Culprit`) and every pending unit of work the probe saw (:class:`StuckUnit`).
:meth:`Diagnosis.to_dict` is the JSON form used by the log, the diagnosis file, the
health endpoint and stats. The object also reads like that dict (``d["class"]``,
``d.get("window")``), so handlers written against the dict keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..identity import describe

__all__ = ["Culprit", "Diagnosis", "StuckUnit"]


@dataclass(frozen=True)
class Culprit:
    """A frame of the project's code: the line to read first."""

    function: str
    filename: str
    lineno: int
    code: str = ""
    qualname: str = ""

    def __str__(self) -> str:
        name = self.qualname or self.function
        text = f"{name} ({os.path.basename(self.filename)}:{self.lineno})"
        return f"{text}: {self.code}" if self.code else text

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.function, "qualname": self.qualname or self.function,
                "filename": self.filename, "lineno": self.lineno, "code": self.code}


@dataclass(frozen=True)
class StuckUnit:
    """One pending unit of work: a request (or its item) at a stage of its life.

    ``task`` is the asyncio task suspended for it, when one was found (not serialised):
    recovery may cancel it.
    """

    request: Any
    stage: str
    component: str
    age: float
    waiting_on: str | None
    holds: list[str] = field(default_factory=list)
    culprit: Culprit | None = None
    task: Any = field(default=None, repr=False, compare=False)
    #: primitive | future | deferred | crawl (in-process); thread | io | library | unknown
    wait_kind: str = "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {"request": describe(self.request) if self.request is not None else None,
                "stage": self.stage, "component": self.component, "age": round(self.age, 3),
                "waiting_on": self.waiting_on, "wait_kind": self.wait_kind,
                "holds": list(self.holds),
                "culprit": self.culprit.to_dict() if self.culprit else None}


@dataclass(frozen=True, eq=False)
class Diagnosis(dict):  # type: ignore[type-arg]
    """One stall episode, as evidence; ``details`` carries the secondary tables.

    The instance is also the dict :meth:`to_dict` returns (filled once, at creation), so
    ``json.dumps(diagnosis)`` and handlers reading ``diagnosis["class"]`` work as they are.
    """

    stall_class: str
    episode: int
    window: float
    since_progress: float
    evidence: list[str]
    culprit: Culprit | None = None
    units: list[StuckUnit] = field(default_factory=list)
    cycle: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dict.update(self, {
            "class": self.stall_class, "episode": self.episode,
            "window": round(self.window, 3), "since_progress": round(self.since_progress, 3),
            "evidence": list(self.evidence),
            "culprit": self.culprit.to_dict() if self.culprit else None,
            "units": [unit.to_dict() for unit in self.units[:50]],
            "cycle": self.cycle, **self.details})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (a plain copy)."""
        return dict(self)

    def __repr__(self) -> str:
        return (f"Diagnosis({self.stall_class!r}, episode={self.episode}, "
                f"culprit={str(self.culprit) if self.culprit else None!r})")
