"""Which item type goes to which table, with which key, and how fields map to columns.

``ANTIDEADLOCK_PG_TABLES`` maps an item type (class name, dotted path, ``"dict"`` or
``"*"``) to a table spec::

    {"ProductItem": {"table": "products", "key": "sku"},
     "dict": {"table": "pages", "key": ["site", "url"], "extra": "data",
              "columns": {"title": "page_title"}, "conflict": "update"}}

No Scrapy import. DSN helpers redact the password so it never reaches logs or errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..settings import SettingError

TABLES_SETTING = "ANTIDEADLOCK_PG_TABLES"
_TABLES_FORM = ('a mapping item type -> {"table": name, "key": field or [fields], optional '
                '"columns": "auto" | [fields] | {field: column}, "extra": jsonb column, '
                '"conflict": "update" | "nothing" | [columns], "types": {column: SQL type}}')
_SPEC_KEYS = {"table", "key", "columns", "extra", "conflict", "types"}


@dataclass(frozen=True)
class TableSpec:
    """How items of one type are written."""

    item_type: str
    table: str  # "name" or "schema.name"
    key: tuple[str, ...]  # item fields forming the conflict key
    columns: str | dict[str, str] = "auto"  # "auto" (match by name) or field -> column
    extra: str | None = None  # jsonb column for fields without a column
    conflict: str | tuple[str, ...] = "update"  # "update" (all non-key), "nothing", columns
    types: dict[str, str] = field(default_factory=dict)  # column -> SQL type (create_tables)

    @property
    def table_parts(self) -> tuple[str, ...]:
        return tuple(self.table.split(".", 1))

    def column_of(self, field_name: str) -> str | None:
        """The column an item field is written to when mapped explicitly (else None)."""
        if isinstance(self.columns, dict):
            return self.columns.get(field_name)
        return None

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(self.column_of(k) or k for k in self.key)


def parse_tables(value: Any) -> dict[str, TableSpec]:
    """Validate the ``ANTIDEADLOCK_PG_TABLES`` mapping; errors name the setting."""
    if not isinstance(value, Mapping):
        raise SettingError(TABLES_SETTING, _TABLES_FORM, value, "not a mapping")
    specs: dict[str, TableSpec] = {}
    for item_type, raw in value.items():
        specs[str(item_type)] = _parse_spec(str(item_type), raw)
    return specs


def _fail(value: Any, detail: str) -> SettingError:
    return SettingError(TABLES_SETTING, _TABLES_FORM, value, detail)


def _names(value: Any, what: str, item_type: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, str) and v for v in value)):
        raise _fail(value, f"{item_type}: {what} must be a field name or a non-empty list")
    return tuple(value)


def _parse_spec(item_type: str, raw: Any) -> TableSpec:
    if not isinstance(raw, Mapping):
        raise _fail(raw, f"{item_type}: spec must be a mapping")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise _fail(raw, f"{item_type}: unknown keys {sorted(unknown)}")
    table = raw.get("table")
    if not isinstance(table, str) or not table or table.count(".") > 1:
        raise _fail(raw, f"{item_type}: table must be 'name' or 'schema.name'")
    if "key" not in raw:
        raise _fail(raw, f"{item_type}: key is required")
    key = _names(raw["key"], "key", item_type)
    columns: str | dict[str, str] = raw.get("columns", "auto")
    if isinstance(columns, (list, tuple)):
        columns = {f: f for f in _names(columns, "columns", item_type)}
    elif isinstance(columns, Mapping):
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items()):
            raise _fail(raw, f"{item_type}: columns map must be field -> column name")
        columns = dict(columns)
        for k in key:
            columns.setdefault(k, k)
    elif columns != "auto":
        raise _fail(raw, f"{item_type}: columns must be 'auto', a list or a mapping")
    extra = raw.get("extra")
    if extra is not None and (not isinstance(extra, str) or not extra):
        raise _fail(raw, f"{item_type}: extra must be a column name")
    conflict = raw.get("conflict", "update")
    if isinstance(conflict, (list, tuple)):
        conflict = _names(conflict, "conflict", item_type)
    elif conflict not in ("update", "nothing"):
        raise _fail(raw, f"{item_type}: conflict must be 'update', 'nothing' or columns")
    types = raw.get("types") or {}
    if not isinstance(types, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in types.items()):
        raise _fail(raw, f"{item_type}: types must map column -> SQL type")
    return TableSpec(item_type, table, key, columns, extra, conflict, dict(types))


def spec_for(specs: Mapping[str, TableSpec], item: Any) -> TableSpec | None:
    """The spec for ``item``: by dotted class path, class name, ``dict``, then ``*``."""
    cls = type(item)
    for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__, cls.__name__):
        if name in specs:
            return specs[name]
    if isinstance(item, dict) and "dict" in specs:
        return specs["dict"]
    return specs.get("*")


class SpecResolver:
    """:func:`spec_for` cached per item class (it runs once per item)."""

    def __init__(self, specs: Mapping[str, TableSpec]) -> None:
        self.specs = specs
        self._cache: dict[type, TableSpec | None] = {}

    def __call__(self, item: Any) -> TableSpec | None:
        cls = type(item)
        try:
            return self._cache[cls]
        except KeyError:
            spec = self._cache[cls] = spec_for(self.specs, item)
            return spec


def item_type_name(item: Any) -> str:
    return type(item).__name__


# --------------------------------------------------------------------------- secrets


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ``***`` (for logs and errors)."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        if "password" in params:
            params["password"] = "***"
        return make_conninfo("", **params)
    except Exception:  # noqa: BLE001 - unparsable: show nothing of it
        return "<unparsable DSN>"


def dsn_password(dsn: str) -> str | None:
    try:
        from psycopg.conninfo import conninfo_to_dict

        password = conninfo_to_dict(dsn).get("password")
    except Exception:  # noqa: BLE001
        return None
    return str(password) if password else None


def scrub(text: str, dsn: str) -> str:
    """``text`` with the DSN's password (and the raw DSN) removed."""
    password = dsn_password(dsn)
    if dsn and dsn in text:
        text = text.replace(dsn, redact_dsn(dsn))
    if password:
        text = text.replace(password, "***")
    return text
