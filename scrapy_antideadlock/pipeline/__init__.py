"""PostgreSQL item pipeline: deadlock-free batched upserts (needs psycopg and psycopg_pool)."""

from .component import PostgresUpsertPipeline, owner_of
from .config import TableSpec, parse_tables, redact_dsn
from .engine import EngineOptions, Outcome, PgConfigError, Stats, UpsertEngine

__all__ = ["EngineOptions", "Outcome", "PgConfigError", "PostgresUpsertPipeline", "Stats",
           "TableSpec", "UpsertEngine", "owner_of", "parse_tables", "redact_dsn"]
