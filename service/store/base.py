"""What every part of the `Store` shares: the engine, read and write sessions, the clock, ids.

Each store method is one short transaction and returns detached ORM rows (readable after the session
closes, thanks to `expire_on_commit=False`). Time comes from `clock` (aware UTC; tests replace it). Leases
compare worker clocks through the database, so keep worker clocks in sync (NTP); the lease length absorbs
small skew.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Self

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings, get_settings
from service.store.engine import IMMEDIATE, make_engine
from service.store.schema import migrate as run_migrations


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """`<prefix>_<24 hex>`: 96 random bits, unguessable, so ids leak nothing and cannot be enumerated."""
    return f"{prefix}_{secrets.token_hex(12)}"


def check_owner(owner: str) -> str:
    if not owner or len(owner) > 200:
        raise ValueError(f"owner must be 1..200 characters, got {owner!r}")
    return owner


class StoreBase:
    """Engine, sessions and clock shared by the repository parts."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float = 60,
        max_attempts: int = 3,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Writers take SQLite's write lock at BEGIN, so read-then-write never fails on lock upgrade.
        self._write_sessions = sessionmaker(engine.execution_options(**{IMMEDIATE: True}), expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = False) -> Self:
        """A store on `settings.sqlalchemy_url`; with `migrate=True` the schema is upgraded first."""
        settings = settings or get_settings()
        engine = make_engine(settings.sqlalchemy_url)
        if migrate:
            run_migrations(engine)
        return cls(engine, lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts)

    def close(self) -> None:
        self.engine.dispose()

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("Store.clock must return timezone-aware datetimes")
        return now

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_sessions.begin() as session:
            yield session
