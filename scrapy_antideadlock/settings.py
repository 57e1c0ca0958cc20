"""Every ``ANTIDEADLOCK_*`` setting in one place: default, accepted form, validation.

Components never call ``settings.get("ANTIDEADLOCK_...")`` themselves; they call
:func:`get` (one value) or :func:`load` (all values of one part), so a bad value
fails at start with a message naming the setting and the accepted form, and the
README table can be checked against :data:`SETTINGS` by a test.

This module imports nothing from Scrapy: it reads any mapping with ``.get``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

PREFIX = "ANTIDEADLOCK_"


class SettingError(ValueError):
    """A setting has a value outside its accepted form; the message names both."""

    def __init__(self, name: str, accepted: str, value: Any, detail: str = "") -> None:
        self.name = name
        self.accepted = accepted
        self.value = value
        shown = "<hidden>" if _looks_secret(name) else repr(value)
        msg = f"{name}: expected {accepted}, got {shown}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def _looks_secret(name: str) -> bool:
    return any(word in name for word in ("DSN", "PASSWORD", "PROXIES", "PROXY_LIST"))


# --------------------------------------------------------------------------- parsers
# Each parser takes the raw value (possibly a string from ``scrapy crawl -s``) and
# returns the typed value, or raises ValueError/TypeError with a short detail.


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError("not a boolean")


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    return float(value)


def positive_float(value: Any) -> float:
    number = _number(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("must be > 0 and finite")
    return number


def non_negative_float(value: Any) -> float:
    number = _number(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be >= 0 and finite")
    return number


def optional_positive_float(value: Any) -> float | None:
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "none"):
        return None
    return positive_float(value)


def fraction(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return text(value)


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return value.strip().lower()

    return parse


def json_or_mapping(value: Any) -> dict:
    """A dict, or a JSON object given as a string (``-s NAME='{"a": 1}'``)."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError("not a mapping")
    return dict(value)


def string_list(value: Any) -> list[str]:
    """A list of strings, or one comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            value = json.loads(stripped)
        else:
            return [part.strip() for part in stripped.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError("not a list of strings")
    return list(value)


def proxy_capacities(value: Any) -> dict[str, int | None]:
    """Proxies as a list (capacity from the default) or a mapping proxy URL -> capacity.

    ``None`` as a capacity means "use ANTIDEADLOCK_PROXY_CAPACITY".
    """
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, str):
        stripped = value.strip()
        value = json.loads(stripped) if stripped[:1] in "[{" else string_list(stripped)
    if isinstance(value, Mapping):
        out: dict[str, int | None] = {}
        for proxy, capacity in value.items():
            if not isinstance(proxy, str) or "://" not in proxy:
                raise ValueError("each proxy must be a URL like http://host:port")
            out[proxy] = None if capacity is None else positive_int(capacity)
        return out
    if isinstance(value, (list, tuple)):
        for proxy in value:
            if not isinstance(proxy, str) or "://" not in proxy:
                raise ValueError("each proxy must be a URL like http://host:port")
        return {proxy: None for proxy in value}
    raise TypeError("not a list or mapping of proxy URLs")


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    accepted: str
    doc: str
    part: str


SETTINGS: dict[str, Setting] = {}


def _define(part: str, name: str, default: Any, parse: Callable[[Any], Any], accepted: str,
            doc: str) -> None:
    full = PREFIX + name
    if full in SETTINGS:
        raise RuntimeError(f"setting {full} defined twice")
    SETTINGS[full] = Setting(full, default, parse, accepted, doc, part)


# ---- core ---------------------------------------------------------------------------
_define("core", "ENABLED", True, as_bool, "a boolean",
        "Master switch: False disables every component the add-on would enable.")
_define("core", "STRICT_SETTINGS", True, as_bool, "a boolean",
        "Fail at start on an unknown ANTIDEADLOCK_* name (a typo), suggesting the closest.")

# ---- deadline (downloader middleware) --------------------------------------------------
_define("deadline", "DEADLINE_ENABLED", True, as_bool, "a boolean",
        "Give every request a deadline covering lease wait, slot queue and transfer.")
_define("deadline", "DEADLINE_MULTIPLIER", 3.0, positive_float, "a positive number",
        "T = clamp(p99 x MULTIPLIER + BUFFER, MIN, MAX).")
_define("deadline", "DEADLINE_BUFFER", 1.0, non_negative_float, "seconds >= 0",
        "Added to p99 x MULTIPLIER.")
_define("deadline", "DEADLINE_MIN", 2.0, positive_float, "seconds > 0",
        "Lower clamp of the adaptive deadline.")
_define("deadline", "DEADLINE_MAX", 60.0, positive_float, "seconds > 0",
        "Upper clamp of the adaptive deadline.")
_define("deadline", "DEADLINE_INITIAL", 30.0, positive_float, "seconds > 0",
        "Deadline used until MIN_SAMPLES latencies were observed for a slot.")
_define("deadline", "DEADLINE_MIN_SAMPLES", 20, positive_int, "an integer >= 1",
        "Successful responses per slot before the adaptive deadline is used.")
_define("deadline", "DEADLINE_WINDOW", 2000, positive_int, "an integer >= 1",
        "Samples per histogram generation: p99 reflects the last 1-2 windows.")

# ---- proxy (downloader middleware) ------------------------------------------------------
# (section owned by the downloader middleware)

# ---- pg (item pipeline) ---------------------------------------------------------------------
# (section owned by the PostgreSQL pipeline)

# ---- playwright (download handler) --------------------------------------------------------
# (section owned by the Playwright handler)

# ---- watchdog (extension) -------------------------------------------------------------------
# (section owned by the watchdog)

# ---- journal / health (watchdog part 2) -----------------------------------------------------
# (section owned by the journal and liveness outputs)


# --------------------------------------------------------------------------- reading


def get(settings: Any, name: str) -> Any:
    """Read and validate one setting; raise :class:`SettingError` naming it."""
    spec = SETTINGS[name]
    raw = settings.get(name) if settings is not None else None
    if raw is None:
        return spec.default
    try:
        return spec.parse(raw)
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SettingError(name, spec.accepted, raw, str(exc)) from None


def load(settings: Any, part: str) -> SimpleNamespace:
    """All settings of one part as attributes named in lower case without prefix/part.

    ``load(s, "deadline").multiplier`` reads ``ANTIDEADLOCK_DEADLINE_MULTIPLIER``.
    """
    values: dict[str, Any] = {}
    part_prefix = f"{PREFIX}{part.upper()}_"
    for name, spec in SETTINGS.items():
        if spec.part != part:
            continue
        short = name[len(part_prefix):] if name.startswith(part_prefix) else name[len(PREFIX):]
        values[short.lower()] = get(settings, name)
    return SimpleNamespace(**values)


def check_names(settings: Any) -> None:
    """Fail on an ANTIDEADLOCK_* name nobody defines (a typo would otherwise be ignored)."""
    names = _names_in(settings)
    unknown = sorted(n for n in names if n.startswith(PREFIX) and n not in SETTINGS
                     and not n.startswith(PREFIX + "TEST_"))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, SETTINGS, n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise SettingError(unknown[0], "a known ANTIDEADLOCK_* setting (see README)", "set",
                       "unknown: " + ", ".join(hints))


def validate_all(settings: Any) -> None:
    """Validate every setting at once, so the first crawl step already names a bad value."""
    if get(settings, PREFIX + "STRICT_SETTINGS"):
        check_names(settings)
    for name in SETTINGS:
        get(settings, name)


def _names_in(settings: Any) -> list[str]:
    if hasattr(settings, "attributes"):  # scrapy.settings.BaseSettings
        return list(settings.attributes)
    if isinstance(settings, Mapping):
        return list(settings)
    return []
