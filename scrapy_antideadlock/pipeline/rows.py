"""Items to rows: type checks, JSON, column routing, the SQL of a table, SQLSTATE classes.

No connection is held here except while :func:`resolve_table` reads the catalogue at
open. What the engine does with the rows (batches, ordering, retries) is in
:mod:`.engine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import decimal
import itertools
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from itemadapter import ItemAdapter
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout, TooManyRequests

from .config import TableSpec

logger = logging.getLogger("scrapy_antideadlock.pipeline.engine")  # one logger for the pipeline

#: SQLSTATEs worth retrying (docs/pipeline.md): deadlock, lock timeout, statement timeout /
#: cancel, serialization failure, admin/crash shutdown, cannot connect now,
#: idle-in-transaction timeout. Never 21000 (a duplicate key in one statement: dedupe).
RETRY_SQLSTATES = frozenset({"40P01", "55P03", "57014", "40001", "57P01", "57P02", "57P03",
                             "25P03"})
_CONNECTION_CLASS = "08"
#: SQLSTATE classes a single bad row can cause (data exception, integrity violation):
#: only these split a batch to isolate the row. Others (undefined table, permission)
#: fail every row alike, so the whole batch is parked at once.
_ROW_LEVEL = frozenset({"22", "23", ""})


class PgConfigError(ValueError):
    """The database does not match the configuration; the message names the setting."""


@dataclass(frozen=True)
class Outcome:
    """What became of one item: stored, or parked with a reason."""

    stored: bool
    reason: str = ""
    detail: str = ""


STORED = Outcome(True)


class BadItem(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def classify(exc: BaseException) -> str | None:
    """A retry label for a transient failure (SQLSTATE or a name), else None."""
    if isinstance(exc, TooManyRequests):
        return "pool_full"
    if isinstance(exc, PoolTimeout):
        return "pool_timeout"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "client_timeout"
    if isinstance(exc, psycopg.Error):
        code = exc.sqlstate
        if code in RETRY_SQLSTATES:
            return code
        if code and code.startswith(_CONNECTION_CLASS):
            return code
        if code is None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return "connection"
    return None


_SCALARS = (str, int, float, bool, decimal.Decimal, _dt.date, _dt.time, _dt.timedelta,
            uuid.UUID, bytes, type(None))


def _json_default(value: Any) -> Any:
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if ItemAdapter.is_item(value):  # a nested item (the pipeline adapts items shallowly)
        return ItemAdapter(value).asdict()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, allow_nan=False)


def _plain_dumps(value: Any) -> str:
    """JSON of str/int/float/None values (checked by :meth:`Table.json_doc`)."""
    return json.dumps(value, ensure_ascii=False)  # a lone surrogate fails as in COPY


def _json_text(value: Jsonb) -> str:
    """The text :func:`_to_json` serialised once, as COPY sends it."""
    return value.dumps(value.obj)


def _to_json(value: Any, field_name: str) -> Jsonb:
    try:
        text = _dumps(value)
    except (TypeError, ValueError) as exc:
        raise BadItem("unserialisable", f"field {field_name!r}: {exc}") from None
    return Jsonb(value, dumps=lambda _v, _t=text: _t)


def _check_scalar(value: Any, field_name: str) -> Any:
    if isinstance(value, _SCALARS):
        if isinstance(value, str) and "\x00" in value:
            raise BadItem("unserialisable", f"field {field_name!r}: NUL character in text")
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    raise BadItem("unserialisable",
                  f"field {field_name!r}: {type(value).__name__} has no column type")


# --------------------------------------------------------------------------- table


@dataclass
class Table:
    """A spec resolved against the live table: columns, types, SQL."""

    spec: TableSpec
    columns: dict[str, str]  # column -> type name (udt), in table order
    #: column -> its full type (typmod, collation): a JSON batch is read as these types
    typedefs: dict[str, str] = dataclasses.field(default_factory=dict)
    ident: sql.Composable = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.ident = sql.Identifier(*self.spec.table_parts)
        self._sql_cache: dict[tuple[str, ...], Statements] = {}
        self._routes: dict[str, tuple[str | None, bool]] = {}
        self.json_columns = frozenset(c for c, t in self.columns.items() if t in ("json", "jsonb"))

    def row_of(self, fields: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """(key, column -> value) for one item; raise :class:`BadItem` if it cannot be."""
        spec = self.spec
        # Few allocations per item: each one counts towards the next GC pass.
        key = tuple(fields.get(name) for name in spec.key) if len(spec.key) > 1 \
            else (fields.get(spec.key[0]),)
        for name, value in zip(spec.key, key, strict=True):
            if type(value) is str:
                continue
            if value is None:
                raise BadItem("missing_key", f"key field {name!r} missing or null")
            if not isinstance(value, (str, int, decimal.Decimal, uuid.UUID, _dt.date)) \
                    or isinstance(value, bool):
                raise BadItem("bad_key", f"key field {name!r} is a {type(value).__name__}")
        row: dict[str, Any] = {}
        extra: dict[str, Any] | None = {} if spec.extra else None
        routes = self._routes
        for name, value in fields.items():
            route = routes.get(name)
            if route is None:
                route = self._route(name)
                if len(routes) < 1000:  # bounded: dict items may carry arbitrary field names
                    routes[name] = route
            column, is_json = route
            if column is None:
                if extra is not None:
                    extra[name] = value
                continue
            if is_json:
                row[column] = _to_json(value, name)
            elif type(value) is str and "\x00" not in value:  # the common case, fast
                row[column] = value
            else:
                row[column] = _check_scalar(value, name)
        if extra is not None:
            row[spec.extra] = _to_json(extra, spec.extra)
        return key, row

    def _route(self, name: str) -> tuple[str | None, bool]:
        """(column, is json) of an item field; computed once per field name."""
        spec = self.spec
        column = spec.column_of(name) if isinstance(spec.columns, dict) else (
            name if name in self.columns and name != spec.extra else None)
        if column is None and not spec.extra and len(self._routes) < 1000:
            logger.warning("pg: field %r of %s has no column in %s and no 'extra' column "
                           "is configured; it is not stored", name, spec.item_type, spec.table)
        return column, column is not None and self.columns.get(column) in ("json", "jsonb")

    def json_doc(self, rows: list[dict[str, Any]]) -> str | None:
        """The rows as one JSON array of objects, or None if JSON cannot carry every value
        exactly as COPY does (then the batch goes through COPY).

        Each value must reach the column's input function as the same text psycopg would
        COPY: str, int and finite float do (a JSON number's text is ``repr``); None is
        NULL; a json/jsonb value is embedded as its serialised text, verbatim, unless that
        text is ``null`` (JSON null reads as SQL NULL). Anything else (bool, bytes, Decimal,
        datetime, UUID, arrays...) is dumped differently by psycopg: COPY keeps it.
        """
        wrapped = False
        json_columns = self.json_columns
        for row in rows:
            for column, value in row.items():
                kind = type(value)
                if kind is str or value is None or kind is int:
                    continue
                if kind is float:
                    if value - value == 0.0:  # finite
                        continue
                    return None
                if kind is Jsonb and column in json_columns and _json_text(value) != "null":
                    wrapped = True
                    continue
                return None
        if not wrapped:
            return _plain_dumps(rows)
        return "[" + ",".join("{" + ",".join(
            f"{_plain_dumps(c)}:{_json_text(v) if type(v) is Jsonb else _plain_dumps(v)}"
            for c, v in row.items()) + "}" for row in rows) + "]"

    def statements(self, cols: tuple[str, ...]) -> Statements:
        """How a batch with this column set is staged and merged (built once per set)."""
        cached = self._sql_cache.get(cols)
        if cached is not None:
            return cached
        spec = self.spec
        col_ids = sql.SQL(", ").join(map(sql.Identifier, cols))
        key_ids = sql.SQL(", ").join(map(sql.Identifier, spec.key_columns))
        stage_name = f"_antideadlock_stage_{next(_stage_ids)}"
        stage = sql.Identifier(stage_name)
        create = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS "
                         "SELECT {} FROM {} WITH NO DATA").format(stage, col_ids, self.ident)
        copy = sql.SQL("COPY {} ({}) FROM STDIN").format(stage, col_ids)
        if spec.conflict == "nothing":
            action = sql.SQL("NOTHING")
        else:
            targets = [c for c in cols if c not in spec.key_columns] if spec.conflict == "update" \
                else [c for c in spec.conflict if c in cols]
            if targets:
                action = sql.SQL("UPDATE SET {}").format(sql.SQL(", ").join(
                    sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                    for c in targets))
            else:
                action = sql.SQL("NOTHING")
        # The merge and the COMMIT go in one round trip (simple protocol): if the merge
        # fails, the server skips the COMMIT and the transaction is rolled back.
        merge = sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s} ORDER BY {k} "
                        "ON CONFLICT ({k}) DO {a}; COMMIT").format(t=self.ident, c=col_ids,
                                                                   s=stage, k=key_ids, a=action)
        # The same merge from one JSON parameter, read as the columns' own types (typmod
        # and collation too, so keys sort as in the stage): one autocommit statement.
        defs = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(self.typedefs[c])) for c in cols)
        upsert = sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM json_to_recordset(%s::json) "
                         "AS _r({d}) ORDER BY {k} ON CONFLICT ({k}) DO {a}").format(
            t=self.ident, c=col_ids, d=defs, k=key_ids, a=action)
        names = (*cols, *spec.table_parts, *(self.typedefs[c] for c in cols))
        if any("%" in name for name in names):  # would read as a placeholder: COPY only
            upsert = None
        cached = self._sql_cache[cols] = Statements(stage_name, create, copy, merge, upsert)
        return cached


@dataclass(frozen=True)
class Statements:
    """SQL for one (table, column set): a per-connection temp stage, COPY, merge+commit;
    or the whole batch in one statement from a JSON document (``upsert``)."""

    stage: str  # the stage's name, to remember on which connections it exists
    create: sql.Composed
    copy: sql.Composed
    merge: sql.Composed
    upsert: sql.Composed | None  # None: names JSON's parameter syntax cannot carry


_stage_ids = itertools.count(1)  # stage names unique per process (one session serves all tables)


async def resolve_table(conn: psycopg.AsyncConnection, spec: TableSpec, create: bool) -> Table:
    """How ``spec``'s items become rows of an existing table (created if ``create``)."""
    qualified = sql.Identifier(*spec.table_parts).as_string(conn)
    cur = await conn.execute("SELECT to_regclass(%s)::oid", [qualified])
    oid = (await cur.fetchone())[0]
    if oid is None:
        if not create:
            raise PgConfigError(
                f"ANTIDEADLOCK_PG_TABLES: table {spec.table!r} (for {spec.item_type}) "
                f"does not exist; create it or set ANTIDEADLOCK_PG_CREATE_TABLES=True "
                f"(development only)")
        await conn.execute(create_sql(spec))
        cur = await conn.execute("SELECT to_regclass(%s)::oid", [qualified])
        oid = (await cur.fetchone())[0]
    cur = await conn.execute(
        "SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod) || "
        "CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN "
        "' COLLATE ' || quote_ident(n.nspname) || '.' || quote_ident(c.collname) ELSE '' END "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "LEFT JOIN pg_collation c ON c.oid = a.attcollation "
        "LEFT JOIN pg_namespace n ON n.oid = c.collnamespace "
        "WHERE a.attrelid = %s AND a.attnum > 0 "
        "AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum", [oid])
    found = await cur.fetchall()
    columns = {name: typ for name, typ, _ in found}
    missing = [c for c in spec.key_columns if c not in columns]
    if isinstance(spec.columns, dict):
        missing += [c for c in spec.columns.values() if c not in columns]
    if spec.extra and spec.extra not in columns:
        missing.append(spec.extra)
    if missing:
        raise PgConfigError(f"ANTIDEADLOCK_PG_TABLES: table {spec.table!r} has no "
                            f"column(s) {sorted(set(missing))}")
    cur = await conn.execute(
        "SELECT array(SELECT a.attname FROM unnest(i.indkey) k JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = k) FROM pg_index i "
        "WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL "
        "AND i.indexprs IS NULL", [oid])
    unique = [set(row[0]) for row in await cur.fetchall()]
    if set(spec.key_columns) not in unique:
        raise PgConfigError(
            f"ANTIDEADLOCK_PG_TABLES: table {spec.table!r} needs a unique index or "
            f"primary key on exactly {list(spec.key_columns)} for ON CONFLICT")
    return Table(spec, columns, {name: typedef for name, _, typedef in found})


def create_sql(spec: TableSpec) -> sql.Composed:
    """CREATE TABLE IF NOT EXISTS for ``spec`` (ANTIDEADLOCK_PG_CREATE_TABLES, development)."""
    types = dict(spec.types)
    cols: dict[str, str] = {c: types.get(c, "text") for c in spec.key_columns}
    if isinstance(spec.columns, dict):
        for column in spec.columns.values():
            cols.setdefault(column, types.get(column, "text"))
    for column, typ in types.items():
        cols.setdefault(column, typ)
    if spec.extra:
        cols.setdefault(spec.extra, "jsonb")
    defs = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in cols.items())
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
        sql.Identifier(*spec.table_parts), defs,
        sql.SQL(", ").join(map(sql.Identifier, spec.key_columns)))
