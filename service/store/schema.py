"""Schema management: tables exist only through the Alembic migrations in `service/migrations`.

`migrate()` runs `upgrade head` without an alembic.ini, so it works from an installed package. Several
processes (API, workers) may start at once and all call it: on PostgreSQL an advisory lock serialises them
(DDL is transactional there, so the loser finds the schema at head and does nothing); on SQLite the
migration transaction begins IMMEDIATE, which serialises them the same way.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from service.store.engine import IMMEDIATE, make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: Arbitrary constant naming this application's migration lock in pg_advisory_xact_lock.
_PG_LOCK_KEY = 0x51AA_0001


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations.

    For a new revision from a checkout:
    `python -c "from alembic import command; from service.store import alembic_config;
    command.revision(alembic_config('sqlite:///rev.db'), 'message', autogenerate=True)"` against a database
    migrated to head.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str | Engine | None = None, revision: str = "head") -> None:
    """Upgrade the database at `url` (default: the settings' URL) to `revision`."""
    if isinstance(url, Engine):
        _upgrade(url, revision)
        return
    if url is None:
        from service.settings import get_settings

        url = get_settings().sqlalchemy_url
    engine = make_engine(url)
    try:
        _upgrade(engine, revision)
    finally:
        engine.dispose()


def _upgrade(engine: Engine, revision: str) -> None:
    with engine.execution_options(**{IMMEDIATE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the newest revision (for `/readyz`)."""
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads()) == heads
