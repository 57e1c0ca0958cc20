"""Render the README's settings and stats tables from the code (``python -m scrapy_antideadlock.docs``).

``tests/test_docs.py`` fails when README.md and these tables disagree, so the tables stay true.
"""

from __future__ import annotations

import sys

from .settings import SETTINGS
from .stats import STATS

SETTINGS_BEGIN = "<!-- settings-table:begin -->"
SETTINGS_END = "<!-- settings-table:end -->"
STATS_BEGIN = "<!-- stats-table:begin -->"
STATS_END = "<!-- stats-table:end -->"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    rows = ["| Setting | Default | Accepted | Meaning |", "|---|---|---|---|"]
    for spec in SETTINGS.values():
        default = "" if spec.default is None else repr(spec.default)
        rows.append(f"| `{spec.name}` | `{_cell(default)}` | {_cell(spec.accepted)} "
                    f"| {_cell(spec.doc)} |")
    return "\n".join(rows)


def stats_table() -> str:
    rows = ["| Stat | Meaning |", "|---|---|"]
    for name, meaning in STATS.items():
        rows.append(f"| `{name}` | {_cell(meaning)} |")
    return "\n".join(rows)


def _replace_between(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def render_readme(text: str) -> str:
    """README text with both tables regenerated in place between their markers."""
    text = _replace_between(text, SETTINGS_BEGIN, SETTINGS_END, settings_table())
    return _replace_between(text, STATS_BEGIN, STATS_END, stats_table())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--write"]:
        path = argv[1] if len(argv) > 1 else "README.md"
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_readme(text))
        return 0
    print(settings_table())
    print()
    print(stats_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
