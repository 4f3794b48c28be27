"""Engines for the two supported databases: an embedded SQLite file and PostgreSQL.

SQLite is shared by the API and worker processes, so it runs in WAL mode (readers never block the writer)
with a busy timeout (a writer waits for the lock instead of failing at once). pysqlite's own transaction
handling starts transactions lazily and never for SELECT, which breaks read-then-write atomicity; the
SQLAlchemy-documented recipe below takes over and emits BEGIN itself. Transactions that write start with
BEGIN IMMEDIATE (see `write_options`), so they queue for the write lock up front rather than failing with
SQLITE_BUSY when they upgrade from read to write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: Execution option that makes a SQLite transaction BEGIN IMMEDIATE; ignored on other dialects.
IMMEDIATE = "qaa_sqlite_immediate"

#: What the store raises while it is down or restarting: the API answers 503, workers retry their writes.
STORE_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` / `postgres://` URLs (psycopg2 is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` with the pragmas/pool settings this store relies on.

    A SQLite file's parent directory is created, so `QAA_HOME` need not exist yet.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, in `_on_begin`
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, much faster
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
