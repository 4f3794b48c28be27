"""API schemas: what the service answers, kept apart from the store's tables.

Each `from_row` maps a stored row to its public shape; secrets and internals (lease owner, file paths on
the server) never leave through these types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from service.store import Artifact, CredentialInfo, Dataset, Job

JobStatusName = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    step: int
    steps: int


class JobSummary(BaseModel):
    """A job as the list shows it: everything but the full spec (which can be large; `GET /v1/jobs/{id}` has it).

    `method` is the spec's method block (bounded in size), `backend` its quantum backend (null for classical
    methods); `usage` holds the quantum counters, `evaluation` the final scores.
    """

    id: str
    name: str | None
    status: JobStatusName
    model: str
    dataset: str
    method: dict[str, Any]
    backend: str | None
    queue: str
    progress: Progress
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    usage: dict[str, Any] | None
    evaluation: dict[str, Any] | None

    @classmethod
    def fields_of(cls, job: Job) -> dict[str, Any]:
        spec = job.spec
        return {
            "id": job.id,
            "name": job.name,
            "status": job.status.value,
            "model": spec.get("model", ""),
            "dataset": spec.get("dataset", ""),
            "method": spec.get("method") or {},
            "backend": (spec.get("quantum") or {}).get("backend"),
            "queue": job.queue,
            "progress": Progress(step=job.step, steps=job.steps),
            "attempts": job.attempts,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "error": job.error,
            "usage": job.usage,
            "evaluation": job.evaluation,
        }

    @classmethod
    def from_row(cls, job: Job) -> JobSummary:
        return cls(**cls.fields_of(job))


class JobOut(JobSummary):
    """One job in full: the summary plus the spec as submitted."""

    spec: dict[str, Any]

    @classmethod
    def from_row(cls, job: Job) -> JobOut:
        return cls(**cls.fields_of(job), spec=job.spec)


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")


class MetricsPage(BaseModel):
    points: list[dict[str, Any]] = Field(
        description="`{step, loss, lr, ...}` in step order; eval points carry `eval_loss`."
    )
    next_after_step: int = Field(description="Pass as `after_step` to get only newer points (-1: from the start).")


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    created_at: datetime
    url: str

    @classmethod
    def from_row(cls, artifact: Artifact, job_id: str) -> ArtifactOut:
        return cls(
            name=artifact.name,
            size=artifact.size,
            sha256=artifact.sha256,
            created_at=artifact.created_at,
            url=f"/v1/jobs/{job_id}/artifacts/{artifact.name}",
        )


class DatasetOut(BaseModel):
    """An uploaded dataset; name it in a spec as `dataset: <id>`."""

    id: str
    name: str
    rows: int
    size: int
    created_at: datetime

    @classmethod
    def from_row(cls, dataset: Dataset) -> DatasetOut:
        return cls(
            id=dataset.id, name=dataset.name, rows=dataset.rows, size=dataset.size, created_at=dataset.created_at
        )


class SecondsRange(BaseModel):
    low: float
    high: float


class EvaluationCost(BaseModel):
    """What evaluation (eval loss passes, generation) runs at most, beside training."""

    circuits: int
    shots: int
    runtime_jobs: int


class CircuitOnBackend(BaseModel):
    """One distinct adapter circuit as the job will run it: from the cached transpilation and the Target."""

    qubits: int = Field(description="The adapter's register size n.")
    two_qubit_gates: int
    depth: int
    duration_s: float = Field(description="Longest path through the Target's instruction durations.")
    physical_qubits: list[int]
    esp: float = Field(description="Estimated success probability: product of (1 - error) over gates, measurements.")
    readout_errors: list[float]
    median_two_qubit_error: float | None


class EstimateOut(BaseModel):
    """What a spec would cost, computed before anything runs. Training figures are exact; `evaluation` is an
    upper bound; QPU seconds follow the model in `circuits.hardware`."""

    backend: str
    circuits_per_step: int
    circuits: int
    shots: int
    primitive_calls: int
    runtime_jobs: int = Field(description="fake:/ibm: runtime jobs of training after splitting (10^7 executions).")
    evaluation: EvaluationCost
    qpu_seconds: SecondsRange | None = Field(
        None, description="fake:/ibm: QPU seconds of training and evaluation (low, high); null elsewhere."
    )
    circuits_on_backend: list[CircuitOnBackend] | None = Field(
        None, description="fake:/ibm: each distinct circuit on the device; null when not computed (see note)."
    )
    warnings: list[str] = Field(default_factory=list)
    seconds: SecondsRange | None = Field(description="Wall time range; null when the model's speed is unknown.")
    within_budget: bool
    adapters: int
    d_in: list[int]
    tokens_per_step: int
    note: str


class BackendOut(BaseModel):
    """A backend; devices (fake and IBM) also carry their calibration's medians and their queue."""

    name: str
    kind: str
    qubits: int
    basis_gates: list[str]
    noise: bool | str
    max_shots: int | None
    median_two_qubit_error: float | None = None
    median_readout_error: float | None = None
    pending_jobs: int | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok"]
    checks: dict[str, str]


class IbmCredentialIn(BaseModel):
    """An IBM Quantum API token (write-only: no answer ever holds it) and, optionally, the instance (CRN)."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr = Field(min_length=1, max_length=4096, description="IBM Quantum API key; never shown again.")
    instance: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="IBM Quantum instance (CRN); unset: any instance the token can use.",
    )

    @field_validator("token")
    @classmethod
    def _printable(cls, v: SecretStr) -> SecretStr:
        # The message must not quote the value (problem bodies never carry a validation error's input).
        token = v.get_secret_value().strip()
        if not token or any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):
            raise ValueError("the token must be non-empty text without control characters")
        return SecretStr(token)


class CredentialOut(BaseModel):
    """A stored credential as its owner sees it: set or not, never its secret."""

    kind: Literal["ibm"]
    instance: str | None
    set: Literal[True] = True
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_info(cls, info: CredentialInfo) -> CredentialOut:
        return cls(kind=info.kind, instance=info.instance, created_at=info.created_at, updated_at=info.updated_at)
