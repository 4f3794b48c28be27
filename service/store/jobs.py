"""Job lifecycle: queued -> running (claim) -> succeeded | failed | cancelled, with cancel and leases.

State changes that can race (claim, heartbeat, cancel, finish) are single conditional UPDATEs, so the
database, not the caller, decides who wins: two workers can never both hold a live lease on one job.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from service.store.base import StoreBase, check_owner, new_id
from service.store.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Job, JobStatus, UTCDateTime

if TYPE_CHECKING:
    from service.spec import JobSpec

MAX_PAGE = 500
MAX_ERROR_CHARS = 20_000


@dataclass(frozen=True)
class Heartbeat:
    """What a worker learns from renewing its lease: stop when `ours` is false or `cancel_requested`."""

    ours: bool
    cancel_requested: bool


@dataclass(frozen=True)
class Spend:
    """Circuits, shots and QPU seconds: a job's estimate, or an owner's sum of them."""

    circuits: int = 0
    shots: int = 0
    qpu_seconds: float = 0.0


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of `encode_cursor`; ValueError (the API's 400) for anything it did not produce."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, job_id = raw.split("|", 1)
        created = datetime.fromisoformat(stamp)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc
    if created.tzinfo is None or not job_id:
        raise ValueError(f"invalid cursor {cursor!r}")
    return created, job_id


def _statuses(status: JobStatus | str | Iterable[JobStatus | str]) -> list[JobStatus]:
    items = [status] if isinstance(status, str) else list(status)
    try:
        return [JobStatus(s) for s in items]
    except ValueError as exc:
        raise ValueError(f"unknown job status in {items!r}; known: {[s.value for s in JobStatus]}") from exc


class JobRepo(StoreBase):
    """The job methods of `Store`."""

    def create_job(self, owner: str, spec: JobSpec, estimate: Spend | None = None) -> Job:
        """A queued job; `estimate` is what it was admitted with (counted by `spend_since`)."""
        now = self._now()
        job = Job(
            id=new_id("job"),
            owner=check_owner(owner),
            name=spec.name,
            status=JobStatus.QUEUED,
            spec=spec.model_dump(mode="json"),
            queue=spec.queue,
            attempts=0,
            step=0,
            steps=spec.training.steps,
            created_at=now,
            updated_at=now,
            estimated_circuits=estimate.circuits if estimate else None,
            estimated_shots=estimate.shots if estimate else None,
            estimated_qpu_seconds=estimate.qpu_seconds if estimate else None,
        )
        with self._write() as s:
            s.add(job)
        return job

    def record_estimate(self, job_id: str, estimate: Spend) -> None:
        """Set the estimate of a job admitted unpriced (its worker priced it from the loaded model)."""
        with self._write() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    estimated_circuits=estimate.circuits,
                    estimated_shots=estimate.shots,
                    estimated_qpu_seconds=estimate.qpu_seconds,
                )
                .execution_options(synchronize_session=False)
            )

    def spend_since(self, owner: str, since: datetime) -> Spend:
        """The estimates of `owner`'s jobs created since `since`, summed in SQL."""
        query = select(
            func.coalesce(func.sum(Job.estimated_circuits), 0),
            func.coalesce(func.sum(Job.estimated_shots), 0),
            func.coalesce(func.sum(Job.estimated_qpu_seconds), 0.0),
        ).where(Job.owner == owner, Job.created_at >= since)
        with self._read() as s:
            circuits, shots, qpu = s.execute(query).one()
        return Spend(int(circuits), int(shots), float(qpu))

    def count_active_jobs(self, owner: str) -> int:
        """`owner`'s jobs that are queued, running or cancelling."""
        query = select(func.count()).where(Job.owner == owner, Job.status.not_in(TERMINAL_STATUSES))
        with self._read() as s:
            return int(s.scalar(query))

    def active_jobs_naming(self, owner: str, dataset_id: str) -> list[str]:
        """Ids of `owner`'s queued or running jobs whose spec names `dataset_id`."""
        query = select(Job.id).where(
            Job.owner == owner,
            Job.status.not_in(TERMINAL_STATUSES),
            Job.spec["dataset"].as_string() == dataset_id,
        )
        with self._read() as s:
            return list(s.scalars(query))

    def circuits_executed(self) -> int:
        """Circuits every job has executed, from the `usage` counters workers report, summed in SQL."""
        with self._read() as s:
            return int(s.scalar(select(func.coalesce(func.sum(Job.usage["circuits"].as_integer()), 0))))

    def get_job(self, job_id: str, owner: str) -> Job | None:
        """The job if it exists and belongs to `owner`; another owner's job is indistinguishable from none."""
        with self._read() as s:
            return s.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))

    def load_job(self, job_id: str) -> Job | None:
        """Unscoped lookup, for workers and the reconciler only (never behind an API route)."""
        with self._read() as s:
            return s.get(Job, job_id)

    def list_jobs(
        self,
        owner: str,
        *,
        status: JobStatus | str | Iterable[JobStatus | str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Newest first, keyset-paginated on (created_at, id): stable while jobs are being added."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        query = select(Job).where(Job.owner == owner)
        if status is not None:
            query = query.where(Job.status.in_(_statuses(status)))
        if cursor is not None:
            created, job_id = decode_cursor(cursor)
            query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self._read() as s:
            jobs = list(s.scalars(query))
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return JobPage(jobs, encode_cursor(jobs[-1]) if more else None)

    def mark_enqueued(self, job_id: str) -> None:
        """Record that the task message was (re-)sent, so the reconciler waits before re-sending it."""
        now = self._now()
        with self._write() as s:
            s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=now, updated_at=now))

    def request_cancel(self, job_id: str, owner: str) -> Job | None:
        """Queued jobs are cancelled at once; running ones become `cancelling` until the worker stops.

        Idempotent: cancelling a finished or already-cancelling job changes nothing. None if not found.
        """
        now = self._now()
        with self._write() as s:
            job = s.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))
            if job is None:
                return None
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now)
            )
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(status=JobStatus.CANCELLING, updated_at=now)
            )
            s.refresh(job)
            return job

    def claim_job(self, job_id: str, worker_id: str, lease_seconds: float | None = None) -> Job | None:
        """Take the job for `worker_id`: the job if this call won it, None otherwise.

        Claimable: `queued`, or `running` with an expired lease (its worker died) and attempts left. The
        check and the write are one UPDATE, so concurrent claims of one job have exactly one winner.
        A job out of attempts is failed here, so a job that kills its workers stops being retried.
        """
        now = self._now()
        lease = timedelta(seconds=lease_seconds) if lease_seconds is not None else self.lease
        claimable = or_(
            Job.status == JobStatus.QUEUED,
            and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
        )
        with self._write() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, claimable, Job.attempts < self.max_attempts)
                .values(
                    status=JobStatus.RUNNING,
                    lease_owner=worker_id,
                    lease_expires_at=now + lease,
                    attempts=Job.attempts + 1,
                    started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:
                return s.get(Job, job_id)
            self._settle(s, now, job_id)
            return None

    def heartbeat(
        self,
        job_id: str,
        worker_id: str,
        *,
        step: int | None = None,
        usage: dict | None = None,
        lease_seconds: float | None = None,
    ) -> Heartbeat:
        """Renew the lease (and record progress/usage). The worker must stop if the answer is not `ours`."""
        now = self._now()
        lease = timedelta(seconds=lease_seconds) if lease_seconds is not None else self.lease
        values: dict = {"lease_expires_at": now + lease, "updated_at": now}
        if step is not None:
            values["step"] = step
        if usage is not None:
            values["usage"] = usage
        with self._write() as s:
            if not _update_held(s, job_id, worker_id, values):
                return Heartbeat(ours=False, cancel_requested=False)
            status = s.scalar(select(Job.status).where(Job.id == job_id))
            return Heartbeat(ours=True, cancel_requested=status == JobStatus.CANCELLING)

    def finish_job(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus | str,
        *,
        error: str | None = None,
        evaluation: dict | None = None,
        usage: dict | None = None,
        step: int | None = None,
    ) -> bool:
        """End the job; True if `worker_id` still held it (a worker that lost its lease changes nothing)."""
        status = JobStatus(status)
        if not status.is_terminal:
            raise ValueError(f"finish_job needs a final status (succeeded, failed, cancelled), got {status}")
        if status == JobStatus.FAILED and not error:
            raise ValueError("a failed job needs an error message the user can read")
        now = self._now()
        values: dict = {"status": status, "finished_at": now, "updated_at": now, "lease_expires_at": None}
        values["error"] = error[:MAX_ERROR_CHARS] if error else None
        for key, value in (("evaluation", evaluation), ("usage", usage), ("step", step)):
            if value is not None:
                values[key] = value
        with self._write() as s:
            return _update_held(s, job_id, worker_id, values)

    def release_job(self, job_id: str, worker_id: str) -> bool:
        """Give a running job back to the queue (its worker is shutting down cleanly); True if it was ours.

        The attempt is returned too: a clean stop is not a failure, so it must not count towards
        `max_attempts`. The caller sends the job's message again; the next run resumes from its checkpoint.
        """
        now = self._now()
        values = {
            "status": JobStatus.QUEUED,
            "lease_owner": None,
            "lease_expires_at": None,
            "attempts": Job.attempts - 1,
            "updated_at": now,
        }
        held = (Job.id == job_id, Job.lease_owner == worker_id, Job.status == JobStatus.RUNNING)  # not cancelling
        with self._write() as s:
            result = s.execute(update(Job).where(*held).values(**values).execution_options(synchronize_session=False))
            return result.rowcount == 1

    def jobs_to_resend(self, older_than: timedelta, limit: int = 100) -> list[Job]:
        """Jobs whose task message may be lost, oldest first; the reconciler re-sends and `mark_enqueued`s.

        Queued jobs whose message went out (or, never marked, were created) more than `older_than` ago, and
        running jobs whose worker's lease expired (with attempts left), on the same resend spacing.
        """
        now = self._now()
        cutoff = now - older_than
        orphaned = and_(
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at < now,
            Job.attempts < self.max_attempts,
        )
        query = (
            select(Job)
            .where(
                or_(Job.status == JobStatus.QUEUED, orphaned),
                func.coalesce(Job.enqueued_at, Job.created_at) < cutoff,
            )
            .order_by(Job.created_at, Job.id)
            .limit(limit)
        )
        with self._read() as s:
            return list(s.scalars(query))

    def settle_abandoned(self) -> int:
        """Finish jobs nobody will finish: `cancelling` with an expired lease (-> cancelled) and `running`
        with an expired lease and no attempts left (-> failed). Returns how many changed."""
        with self._write() as s:
            return self._settle(s, self._now(), None)

    def _settle(self, s: Session, now: datetime, job_id: str | None) -> int:
        scope = [Job.id == job_id] if job_id is not None else []
        expired = Job.lease_expires_at < now
        done = {"finished_at": now, "updated_at": now, "lease_expires_at": None}
        cancelled = s.execute(
            update(Job)
            .where(*scope, Job.status == JobStatus.CANCELLING, expired)
            .values(status=JobStatus.CANCELLED, **done)
            .execution_options(synchronize_session=False)
        )
        failed = s.execute(
            update(Job)
            .where(*scope, Job.status == JobStatus.RUNNING, expired, Job.attempts >= self.max_attempts)
            .values(
                status=JobStatus.FAILED,
                error=(
                    f"the worker running this job stopped responding (lease expired) on each of "
                    f"{self.max_attempts} attempts; giving up"
                ),
                **done,
            )
            .execution_options(synchronize_session=False)
        )
        return cancelled.rowcount + failed.rowcount

    def count_jobs_by_status(self, owner: str | None = None) -> dict[str, int]:
        """Every status with its count (zeros included), for `/metrics` and `/readyz`."""
        query = select(Job.status, func.count()).group_by(Job.status)
        if owner is not None:
            query = query.where(Job.owner == owner)
        counts = {s.value: 0 for s in JobStatus}
        with self._read() as s:
            for status, n in s.execute(query):
                counts[JobStatus(status).value] = n
        return counts


def _update_held(session, job_id: str, worker_id: str, values: dict) -> bool:
    """Update an active job only while `worker_id` holds its lease; True if it did."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(ACTIVE_STATUSES))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1
