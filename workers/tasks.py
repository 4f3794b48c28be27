"""What `workers.train(job_id)` does: claim the job, train it under a lease, record how it ended.

Everything that must survive a crash lives in the store or in the run directory's checkpoints, never in the
message or in worker memory (Celery's own guidance): a redelivered or re-sent message re-runs this function,
which claims the job again and lets the trainer resume from its last checkpoint.

- The lease: `Store.claim_job` lets exactly one worker hold a job; `Lease` renews it every step (so a
  cancel is seen within one step) and from a background thread every `heartbeat_seconds` (so a long step,
  model loading or the final evaluation do not lose it). If the store is unreachable for a while the run
  goes on until the lease it last renewed would have expired, then stops: another worker may own it now; the
  writes that end a job (last metrics, artifacts, status) are retried for as long (`Lease.retry`).
- Failures: `JobError` (bad input: unknown model, malformed dataset, ...) ends the job `failed` with its
  message; any other exception ends it `failed` with a one-line `Type: message`, the traceback going only to
  the worker log. Nothing propagates: the worker serves the next job.
- Clean shutdown (`SHUTTING_DOWN`, set when the worker is told to stop): the run stops at the next step
  boundary after a checkpoint, and the job goes back to its queue (`Store.release_job`, and the task's
  message is requeued, not acknowledged), so the next worker to start resumes it at once instead of waiting
  for the lease to expire.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from circuits.backends import environment
from circuits.cost_estimate import check_budget
from service import admission
from service.admission import (
    Refused,
    check_daily,
    check_device,
    check_references,
    check_source,
    check_spend,
    per_width_executions,
    spend_of,
)
from service.settings import Settings
from service.spec import JobSpec
from service.store import STORE_UNREACHABLE, Job, JobStatus, Store
from workers import job_log
from workers.trainer import JobError, TrainingHooks, train

log = logging.getLogger(__name__)

MAX_ERROR_LINE = 2000
#: `run_train`'s answer when it handed the job back: the task requeues its message rather than acknowledging it.
RELEASED = "released"
#: Set by the worker's shutdown signal (`workers.app`): running jobs stop at their next step and are released.
SHUTTING_DOWN = threading.Event()
T = TypeVar("T")


class Lease:
    """A job's lease held by `worker_id`: renewed every step and every `interval` seconds meanwhile.

    `should_continue(step)` is the trainer's per-step check: false once the job is being cancelled or the
    lease is no longer ours.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        worker_id: str,
        *,
        interval: float,
        lease_seconds: float,
        deadline: datetime | None = None,
    ):
        self.store, self.job_id, self.worker_id = store, job_id, worker_id
        self.interval, self.lease_seconds = interval, lease_seconds
        self.deadline = deadline  # the job's wall-clock deadline (QAA_JOB_DEADLINE_SECONDS from its first start)
        #: Called once, from the heartbeat, when the job is cancelled or the lease is lost: stops runtime jobs
        #: in flight instead of letting them run (and bill) until the step ends.
        self.on_stop: Callable[[], None] | None = None
        self._stopped = False
        self.ours = True
        self.cancel_requested = False
        self.step: int | None = None
        self._valid_until = time.monotonic() + lease_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def live(self) -> bool:
        return self.ours and not self.cancel_requested

    def renew(self) -> bool:
        """Renew now; the answer to "go on?". A store error keeps the last answer while the lease lasts."""
        started = time.monotonic()
        try:
            beat = self.store.heartbeat(self.job_id, self.worker_id, step=self.step)
        except Exception as exc:  # the store is down or flaky: the lease we hold is still ours until it expires
            if time.monotonic() >= self._valid_until:
                log.warning("job %s: lease not renewed in time (%s); stopping", self.job_id, exc)
                with self._lock:
                    self.ours = False
                self._stop_if_done()
            return self.live
        with self._lock:
            self.ours = self.ours and beat.ours
            self.cancel_requested = self.cancel_requested or beat.cancel_requested
            if beat.ours:
                self._valid_until = started + self.lease_seconds
        self._stop_if_done()
        return self.live

    def _stop_if_done(self) -> None:
        with self._lock:
            stop = not self.live and not self._stopped and self.on_stop is not None
            self._stopped = self._stopped or stop
        if stop:
            try:
                self.on_stop()
            except Exception:  # stopping is best effort; the step ends with the run either way
                log.exception("job %s: stopping the run's runtime jobs failed", self.job_id)

    @property
    def past_deadline(self) -> bool:
        return self.deadline is not None and datetime.now(UTC) >= self.deadline

    def should_continue(self, step: int) -> bool:
        return self.renew() and not SHUTTING_DOWN.is_set() and not self.past_deadline

    def retry(self, what: str, write: Callable[[], T]) -> T:
        """`write()`, retried while the store is unreachable and the lease we last renewed still holds: the end
        of a job (last metrics, artifacts, final status) waits out a store restart instead of failing the job.
        Once the lease would have expired the error propagates: another worker may own the job by then."""
        delay = 0.5
        while True:
            try:
                return write()
            except STORE_UNREACHABLE as exc:
                if time.monotonic() + delay >= self._valid_until:
                    raise
                log.warning("job %s: %s waits for the store (%s)", self.job_id, what, type(exc).__name__)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew()


class MetricsSink:
    """The trainer's `record_metrics`: upserts points, and keeps those the store refused for the next call.

    Points are keyed by (job, step) and merged, so writing one again after a failure is harmless. The
    highest step written is the job's progress, which the next heartbeat records.
    """

    def __init__(self, store: Store, job_id: str, lease: Lease):
        self.store, self.job_id, self.lease = store, job_id, lease
        self._pending: list[dict[str, Any]] = []

    def __call__(self, points: Iterable[Mapping[str, Any]]) -> None:
        self._pending.extend(dict(p) for p in points)
        try:
            self.flush()
        except Exception as exc:  # kept for the next call; `flush()` at the end raises if still failing
            log.warning("job %s: %d metric points not written yet: %s", self.job_id, len(self._pending), exc)

    def flush(self) -> None:
        if self._pending:
            self.store.record_metrics(self.job_id, self._pending)
            steps = [p["step"] for p in self._pending if isinstance(p.get("step"), int)]
            if steps:
                self.lease.step = max(steps + [self.lease.step or 0])
            self._pending = []


def error_line(exc: BaseException) -> str:
    """`Type: message` on one line, for the job's `error` field (the traceback goes to the log only)."""
    message = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return line if len(line) <= MAX_ERROR_LINE else line[: MAX_ERROR_LINE - 3] + "..."


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def register_artifacts(store: Store, job_id: str, run_dir: Path, paths: Iterable[Path]) -> list[str]:
    """Add each file to the store under its path relative to `run_dir`; returns the names."""
    names = []
    for path in map(Path, paths):
        name = path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else path.name
        size, sha256 = file_digest(path)
        store.add_artifact(job_id, name, str(path.resolve()), size, sha256)
        names.append(name)
    return names


def dataset_resolver(store: Store, owner: str):
    """`resolve_dataset` for the trainer: a `ds_` id -> the uploaded file, only among `owner`'s datasets."""

    def resolve(ref: str) -> Path:
        dataset = store.get_dataset(ref, owner)
        if dataset is None:
            raise JobError(f"dataset {ref!r} not found: upload it with POST /v1/datasets")
        return Path(dataset.path)

    return resolve


def ibm_credentials(store: Store, owner: str, settings: Settings) -> tuple[str | None, str | None]:
    """`service.admission.ibm_credentials`, a refusal failing the job (`JobError`)."""
    try:
        return admission.ibm_credentials(store, owner, settings)
    except Refused as exc:
        raise JobError(exc.message) from None


@contextmanager
def ibm_sign_in(spec: JobSpec, store: Store, owner: str, settings: Settings,
                secrets: set[str] | None = None) -> Iterator[None]:  # fmt: skip
    """For an `ibm:` job, the circuit backends' environment carries `ibm_credentials` while it runs, and its
    earlier values after: a worker process runs one job at a time, so the process-wide environment is the job's."""
    if spec.quantum is None or not spec.quantum.backend.startswith("ibm:"):
        yield
        return
    token, instance = ibm_credentials(store, owner, settings)
    if token and secrets is not None:
        secrets.add(token)  # never in the job's own log
    before = environment.environment()
    environment.configure(ibm_token=token, ibm_instance=instance)
    try:
        yield
    finally:
        environment.configure(ibm_token=before.ibm_token, ibm_instance=before.ibm_instance)


def bound_memory(limit_mb: int | None) -> None:
    """Cap this process's data memory (RLIMIT_DATA) at `limit_mb` MiB, if set.

    Without a bound, a job too big for the machine is killed by the kernel together with its worker, and
    again on every worker it is re-sent to. With one, its allocation fails inside the job (torch raises),
    the job fails with that message, the memory is freed and the worker serves the next job.
    """
    if limit_mb is not None:
        limit = limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def failure_message(exc: Exception, settings: Settings) -> str:
    """The job's `error` for an unexpected exception; out-of-memory says which bound it hit."""
    line = error_line(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in line or "out of memory" in line.lower():
        if settings.worker_memory_mb:
            bound = f"QAA_WORKER_MEMORY_MB={settings.worker_memory_mb}"
        elif settings.worker_memory_bound_mb:
            bound = f"{settings.worker_memory_bound_mb} MiB, the default share of the machine's memory"
        else:
            bound = "the machine"
        return f"out of memory (bound: {bound}); reduce batch_size, max_length or qubits. {line}"
    return line


def run_train(job_id: str, store: Store, settings: Settings, worker_id: str) -> str:
    """Run one job to its end; returns what happened (`skipped`, `lost`, or the final status)."""
    bound_memory(settings.worker_memory_bound_mb)
    job = store.claim_job(job_id, worker_id)
    if job is None:
        log.info("job %s: not claimable (finished, or held by a live worker); message dropped", job_id)
        return "skipped"
    run_dir = settings.artifacts_dir / job_id
    deadline = (job.started_at or datetime.now(UTC)) + timedelta(seconds=settings.job_deadline_seconds)
    lease = Lease(store, job_id, worker_id, interval=settings.heartbeat_seconds, lease_seconds=settings.lease_seconds,
                  deadline=deadline)  # fmt: skip
    with lease, job_log.captured(run_dir) as log_format:
        log.info("job %s: claimed by %s (attempt %d)", job_id, worker_id, job.attempts)
        try:
            return _run(job, run_dir, lease, store, settings, worker_id, log_format.secrets)
        finally:
            log_file = run_dir / job_log.LOG_NAME
            if lease.ours and log_file.is_file():
                lease.retry("registering the job log", lambda: register_artifacts(store, job_id, run_dir, [log_file]))


def _run(job: Job, run_dir: Path, lease: Lease, store: Store, settings: Settings, worker_id: str,
         secrets: set[str]) -> str:  # fmt: skip
    """The claimed job's run and how it ended (`run_train`'s body, inside its lease and its log)."""
    job_id = job.id
    sink = MetricsSink(store, job_id, lease)
    try:
        status, evaluation, usage = _train(job, run_dir, lease, sink, store, settings, secrets)
    except JobError as exc:
        log.info("job %s failed: %s", job_id, exc)
        return _finish(store, job_id, worker_id, lease, JobStatus.FAILED, error=str(exc) or error_line(exc))
    except Exception as exc:  # a bug or an environment problem: readable in the job, full in the log
        log.exception("job %s failed with an unexpected error", job_id)
        error = failure_message(exc, settings)
        return _finish(store, job_id, worker_id, lease, JobStatus.FAILED, error=error)
    if status == JobStatus.CANCELLED and not lease.cancel_requested:
        if lease.ours and lease.past_deadline:
            error = (
                f"the job ran past its deadline of {settings.job_deadline_seconds} s from its first start "
                f"(QAA_JOB_DEADLINE_SECONDS); stopped at step {lease.step}"
            )
            return _finish(store, job_id, worker_id, lease, JobStatus.FAILED, error=error)
        if lease.ours and SHUTTING_DOWN.is_set():
            return _release(store, job_id, worker_id, lease)
        log.warning("job %s: lease lost to another worker; leaving the job to it", job_id)
        return "lost"
    return _finish(store, job_id, worker_id, lease, status, evaluation=evaluation, usage=usage)


def admission_hook(job: Job, spec: JobSpec, store: Store, settings: Settings):
    """The trainer's `admit`: the spec's budgets, the per-job ceilings and the engine state cap, on the estimate of
    the adapters actually built; for a job the API could not price, the owner's daily ceilings too (and its
    estimate is recorded, so later jobs count it)."""

    def check(est, engine_bytes: int, widths: dict) -> None:
        try:
            if spec.method.kind == "qaa":
                config = spec.qaa_config()
                check_budget(config, est)
                if config.min_esp is not None or config.max_qpu_seconds is not None:
                    check_device_here(spec, config, widths)
            spend = spend_of(spec, est)
            check_spend(spend, engine_bytes, settings)
            if job.estimated_circuits is None:
                check_daily(store, job.owner, spend, settings)
                store.record_estimate(job.id, spend)
        except Refused as exc:
            raise JobError(str(exc)) from None
        except ValueError as exc:  # check_budget: over the spec's own max_circuits / max_shots
            raise JobError(f"quantum: {exc}; raise the budget or shrink the job") from None

    return check


def check_device_here(spec: JobSpec, config, widths: dict) -> None:
    """`admission.check_device` on figures computed in this process (the run's transpilation, cached)."""
    from circuits.hardware import report
    from service.api.hardware import qpu_range, register_sizes

    figures = report(config, register_sizes(config, widths))
    check_device(config, figures, qpu_range(config, per_width_executions(spec, widths), figures)[1])


def _train(
    job: Job, run_dir: Path, lease: Lease, sink: MetricsSink, store: Store, settings: Settings, secrets: set[str]
) -> tuple[JobStatus, dict | None, dict]:
    spec = JobSpec.model_validate(job.spec)
    owner = job.owner
    try:  # asked again here: the settings may differ from the API's, and a path may have changed since
        model, dataset = check_references(spec, store, owner, settings)
        source = check_source(spec, store, owner)
    except Refused as exc:
        raise JobError(str(exc)) from None
    spec = spec.model_copy(update={"model": model, "dataset": dataset})
    run_dir.mkdir(parents=True, exist_ok=True)

    def started(execution) -> None:
        lease.on_stop = execution.cancel if execution is not None else None

    hooks = TrainingHooks(record_metrics=sink, should_continue=lease.should_continue,
                          admit=admission_hook(job, spec, store, settings), started=started)  # fmt: skip
    with ibm_sign_in(spec, store, owner, settings, secrets):
        result = train(
            spec,
            run_dir,
            hooks,
            models_dir=settings.models_dir,
            resolve_dataset=dataset_resolver(store, owner),
            source=source,
        )
    lease.retry("writing the last metrics", sink.flush)
    if lease.ours:
        lease.retry("registering artifacts", lambda: register_artifacts(store, lease.job_id, run_dir, result.artifacts))
    return JobStatus(result.status), result.evaluation, result.usage


def _release(store: Store, job_id: str, worker_id: str, lease: Lease) -> str:
    """Hand the job back at a clean shutdown; the task then returns its message to the queue (`RELEASED`)."""
    if not lease.retry("handing the job back", lambda: store.release_job(job_id, worker_id)):
        return "lost"
    log.info("job %s: released at step %s for the next worker (shutting down)", job_id, lease.step)
    return RELEASED


def _finish(store: Store, job_id: str, worker_id: str, lease: Lease, status: JobStatus, **fields: Any) -> str:
    if lease.retry("recording the end", lambda: store.finish_job(job_id, worker_id, status, step=lease.step, **fields)):
        log.info("job %s: %s", job_id, status.value)
        return status.value
    log.warning("job %s: ended %s here, but the lease had passed to another worker", job_id, status.value)
    return "lost"
