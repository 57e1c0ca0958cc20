"""The PostgreSQL helpers give a real, fresh database and a server that really restarts."""

from __future__ import annotations

import os

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from scrapy_antideadlock.testing.postgres import PostgresServer, drop_database, resolve_dsn

pytestmark = pytest.mark.postgres


def test_pg_dsn_is_a_fresh_database(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute("CREATE TABLE IF NOT EXISTS testbed_probe (k text PRIMARY KEY)")
        conn.execute("INSERT INTO testbed_probe VALUES ('a') ON CONFLICT DO NOTHING")
    assert name == conninfo_to_dict(pg_dsn)["dbname"]
    if name.startswith("antideadlock_test_"):
        # fresh: created by this test run (other tests of the run may have added tables)
        assert name.startswith(f"antideadlock_test_{os.getpid()}_")


def test_resolve_creates_and_drops_a_database() -> None:
    dsn, cleanup = resolve_dsn()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    cleanup()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=3).close()
    drop_database(dsn)  # idempotent


def test_resolve_falls_back_to_embedded_server() -> None:
    dsn, cleanup = resolve_dsn(local_dsn="host=127.0.0.1 port=1 user=postgres dbname=postgres")
    try:
        assert "host=/" in dsn  # unix socket of a private server
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SHOW server_version").fetchone()[0]
    finally:
        cleanup()


def test_env_dsn_that_does_not_answer_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="ANTIDEADLOCK_TEST_PG_DSN"):
        resolve_dsn("host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=1")


def test_server_stop_kill_restart(pg_server: PostgresServer) -> None:
    conn = psycopg.connect(pg_server.dsn, autocommit=True)
    conn.execute("CREATE TABLE t (k int PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    first_pid = pg_server.pid
    pg_server.restart()
    assert pg_server.pid not in (None, first_pid)
    with pytest.raises(psycopg.OperationalError):  # the old connection is really gone
        conn.execute("SELECT 1")
    conn.close()
    pg_server.stop()
    assert not pg_server.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_server.dsn, connect_timeout=2).close()
    pg_server.start()
    pg_server.kill()  # crash; start() recovers
    assert not pg_server.running
    pg_server.start()
    with psycopg.connect(pg_server.dsn) as conn:
        assert conn.execute("SELECT k FROM t").fetchall() == [(1,)]
