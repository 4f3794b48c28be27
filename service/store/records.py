"""Everything a job or user accumulates besides the job row: metric points, artifacts, datasets, API keys."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import Insert, delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.store.base import StoreBase, check_owner, new_id
from service.store.models import ApiKey, Artifact, Dataset, MetricPoint

API_KEY_PREFIX = "qaa_"
MAX_METRICS_PAGE = 10_000


def hash_api_key(key: str) -> str:
    """SHA-256 hex. Keys are 256 random bits, so a fast hash is safe (no need for a password KDF)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_dataset_id() -> str:
    """An id for a dataset whose file is written before its row (the path usually contains the id)."""
    return new_id("ds")


def _insert(session: Session, table: Any) -> Insert:
    """The dialect's INSERT, which has `on_conflict_do_update` on both SQLite and PostgreSQL."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"the job store supports SQLite and PostgreSQL, not {dialect}")
    return insert(table)


def _metric_value(key: str, value: Any) -> Any:
    # NaN/inf are not JSON (PostgreSQL rejects them): a diverged loss is stored as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"metric {key!r} must be a number, string or null, got {type(value).__name__}")


def _clean_points(points: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for point in points:
        data = dict(point)
        step = data.pop("step", None)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"each metric point needs an integer step >= 0, got {step!r}")
        clean = {str(k): _metric_value(str(k), v) for k, v in data.items()}
        rows.setdefault(step, {}).update(clean)
    return rows


class RecordRepo(StoreBase):
    """The metric, artifact, dataset and API-key methods of `Store`."""

    # --- metrics ---

    def record_metrics(self, job_id: str, points: Iterable[Mapping[str, Any]]) -> int:
        """Upsert points keyed by (job, step); returns how many steps were written.

        Idempotent: writing a step again (a redelivered task, a resume from an earlier checkpoint) leaves
        one row. Values merge by key, so an eval point (`eval_loss`) at a step keeps that step's `loss`;
        a key written again takes the new value.
        """
        rows = _clean_points(points)
        if not rows:
            return 0
        with self._write() as s:
            existing = dict(
                s.execute(
                    select(MetricPoint.step, MetricPoint.data).where(
                        MetricPoint.job_id == job_id, MetricPoint.step.in_(list(rows))
                    )
                ).all()
            )
            payload = [
                {"job_id": job_id, "step": step, "data": {**existing.get(step, {}), **data}}
                for step, data in sorted(rows.items())
            ]
            stmt = _insert(s, MetricPoint)
            stmt = stmt.on_conflict_do_update(
                index_elements=[MetricPoint.job_id, MetricPoint.step], set_={"data": stmt.excluded.data}
            )
            s.execute(stmt, payload)
        return len(payload)

    def metrics_after(self, job_id: str, after_step: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Points with step > `after_step` (all when None), in step order, as `{"step": n, **values}`."""
        if not 1 <= limit <= MAX_METRICS_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_METRICS_PAGE}, got {limit}")
        query = select(MetricPoint.step, MetricPoint.data).where(MetricPoint.job_id == job_id)
        if after_step is not None:
            query = query.where(MetricPoint.step > after_step)
        query = query.order_by(MetricPoint.step).limit(limit)
        with self._read() as s:
            return [{"step": step, **data} for step, data in s.execute(query)]

    # --- artifacts ---

    def add_artifact(self, job_id: str, name: str, path: str, size: int, sha256: str) -> Artifact:
        """Register a file; the same name again (a retried job) replaces the earlier entry."""
        now = self._now()
        values = {"path": path, "size": size, "sha256": sha256, "created_at": now}
        with self._write() as s:
            stmt = _insert(s, Artifact).values(job_id=job_id, name=name, **values)
            keys = [Artifact.job_id, Artifact.name]
            s.execute(stmt.on_conflict_do_update(index_elements=keys, set_=values))
            return s.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)).one()

    def list_artifacts(self, job_id: str) -> list[Artifact]:
        with self._read() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))

    def get_artifact(self, job_id: str, name: str) -> Artifact | None:
        with self._read() as s:
            return s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))

    def delete_artifacts(self, job_id: str) -> list[Artifact]:
        """Forget every artifact of a job; returns the rows removed, whose files the caller deletes."""
        with self._write() as s:
            rows = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))
            s.execute(delete(Artifact).where(Artifact.job_id == job_id))
            return rows

    # --- datasets ---

    def create_dataset(
        self, owner: str, name: str, *, rows: int, size: int, path: str, dataset_id: str | None = None
    ) -> Dataset:
        dataset = Dataset(
            id=dataset_id or new_dataset_id(),
            owner=check_owner(owner),
            name=name,
            rows=rows,
            size=size,
            path=path,
            created_at=self._now(),
        )
        with self._write() as s:
            s.add(dataset)
        return dataset

    def get_dataset(self, dataset_id: str, owner: str) -> Dataset | None:
        """Owner-scoped: workers pass the job's owner, so a spec cannot name someone else's dataset."""
        with self._read() as s:
            return s.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner))

    def list_datasets(self, owner: str) -> list[Dataset]:
        with self._read() as s:
            query = select(Dataset).where(Dataset.owner == owner)
            return list(s.scalars(query.order_by(Dataset.created_at.desc(), Dataset.id.desc())))

    def dataset_usage(self, owner: str) -> tuple[int, int]:
        """(datasets, bytes) `owner` keeps, for the upload quotas."""
        query = select(func.count(), func.coalesce(func.sum(Dataset.size), 0)).where(Dataset.owner == owner)
        with self._read() as s:
            count, size = s.execute(query).one()
        return int(count), int(size)

    def delete_dataset(self, dataset_id: str, owner: str) -> Dataset | None:
        """Forget `owner`'s dataset (None if there is none); the caller deletes its file."""
        with self._write() as s:
            dataset = s.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner))
            if dataset is not None:
                s.delete(dataset)
            return dataset

    # --- API keys ---

    def create_api_key(
        self, owner: str, label: str | None = None, expires_in: timedelta | None = None
    ) -> tuple[ApiKey, str]:
        """A new key for `owner`: the row, and the plaintext, which is never stored nor shown again. With
        `expires_in` the key stops working that long after creation; without it, only revocation ends it."""
        if expires_in is not None and expires_in <= timedelta(0):
            raise ValueError(f"a key's lifetime must be positive, not {expires_in}")
        plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
        now = self._now()
        key = ApiKey(
            id=new_id("key"),
            owner=check_owner(owner),
            key_hash=hash_api_key(plaintext),
            prefix=plaintext[:12],
            label=label,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
        )
        with self._write() as s:
            s.add(key)
        return key, plaintext

    def verify_api_key(self, plaintext: str) -> str | None:
        """The owner of a live key, or None (unknown, revoked, expired, or not a key at all)."""
        if not plaintext or len(plaintext) > 200:
            return None
        with self._read() as s:
            return s.scalar(
                select(ApiKey.owner).where(
                    ApiKey.key_hash == hash_api_key(plaintext),
                    ApiKey.revoked_at.is_(None),
                    or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > self._now()),
                )
            )

    def revoke_api_key(self, key_id: str, owner: str | None = None) -> bool:
        """Revoke by id (scoped to `owner` when given); False if there was no such live key."""
        query = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        if owner is not None:
            query = query.where(ApiKey.owner == owner)
        with self._write() as s:
            query = query.values(revoked_at=self._now()).execution_options(synchronize_session=False)
            result = s.execute(query)
            return result.rowcount == 1

    def list_api_keys(self, owner: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if owner is not None:
            query = query.where(ApiKey.owner == owner)
        with self._read() as s:
            return list(s.scalars(query))
