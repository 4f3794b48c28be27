"""Database tables of the job store (SQLAlchemy 2 typed ORM).

These are storage types, not API schemas: the API maps them to its own pydantic models. Tables are created
only by the Alembic migrations in `service/migrations`; a test checks that these classes and the migrated
schema agree, so a change here without a migration fails CI.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 40
OWNER_LENGTH = 200


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect.

    SQLite has no timezone type and hands back naive values; storing naive UTC there and re-attaching UTC on
    read means callers always get aware datetimes, and comparisons in SQL (lease expiry, cursors) are on
    one consistent representation.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: States in which a worker holds (or held, if the lease expired) the job.
ACTIVE_STATUSES = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(none_as_null=True)}


class Job(Base):
    """One training job. The lease columns make claiming atomic: see `Store.claim_job`."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created_at_id", "owner", "created_at", "id"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    owner: Mapped[str] = mapped_column(String(OWNER_LENGTH))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(
        Enum(
            JobStatus,
            name="job_status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    spec: Mapped[dict[str, Any]]
    queue: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict[str, Any] | None]
    evaluation: Mapped[dict[str, Any] | None]
    #: The estimate the job was admitted with (per-owner daily ceilings add these up in SQL); null: not priced.
    estimated_circuits: Mapped[int | None] = mapped_column(BigInteger)
    estimated_shots: Mapped[int | None] = mapped_column(BigInteger)
    estimated_qpu_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def progress(self) -> dict[str, int]:
        return {"step": self.step, "steps": self.steps}

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, owner={self.owner!r}, status={self.status.value!r}, step={self.step})"


class MetricPoint(Base):
    """One row per (job, step); `data` holds that step's values (`loss`, `lr`, `eval_loss`, ...)."""

    __tablename__ = "metric_points"

    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Artifact(Base):
    """A file a job produced (adapter, checkpoint, plot); the bytes live on disk at `path`."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class Dataset(Base):
    """An uploaded JSONL dataset, referred to as `ds_<hex>` in job specs."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    owner: Mapped[str] = mapped_column(String(OWNER_LENGTH))
    name: Mapped[str] = mapped_column(String(200))
    rows: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class ApiKey(Base):
    """An API key. Only its SHA-256 is stored: the plaintext is shown once, at creation. A key is live until it
    is revoked or its `expires_at` passes."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    owner: Mapped[str] = mapped_column(String(OWNER_LENGTH), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    #: None: the key lives until revoked.
    expires_at: Mapped[datetime | None]


class Credential(Base):
    """A secret an owner stored for an outside service (`kind` "ibm": an IBM Quantum API token and instance).

    `encrypted_token` is a Fernet token (`service.vault`); the plaintext is never stored, returned or logged.
    """

    __tablename__ = "credentials"

    owner: Mapped[str] = mapped_column(String(OWNER_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    encrypted_token: Mapped[str] = mapped_column(Text)
    instance: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
