"""The one settings object, read from `QAA_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Share of the machine's memory a job-running worker may use when `QAA_WORKER_MEMORY_MB` is unset.
DEFAULT_WORKER_MEMORY_SHARE = 0.8
DAY_S = 86_400

#: A list read from one environment variable: JSON (`["/a", "/b"]`) or separated by commas or os.pathsep.
EnvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAA_", extra="ignore")

    home: Path = Field(Path("~/.qaa"), description="Root of the embedded store, artifacts, caches and models.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; SQLite under `home` when unset.")
    broker_url: str | None = Field(None, description="Celery broker URL; the embedded no-server broker when unset.")
    ibm_token: SecretStr | None = Field(None, description="IBM Quantum API token for `ibm:` backends (workers only).")
    ibm_instance: str | None = Field(None, description="IBM Quantum instance (CRN) for `ibm:` backends.")
    secret_key: SecretStr | None = Field(
        None,
        description="Key (32+ characters) encrypting the IBM tokens users store; the API and every worker need "
        "the same one. Embedded default: made once in `home/secret_key`. Unset in production: tokens are refused.",
    )

    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API binds to.")
    max_upload_bytes: int = Field(64 * 2**20, ge=1, description="Largest dataset upload accepted (bytes).")
    # Job submissions per API key: a token bucket refilled at `submit_rate_per_minute`, holding `submit_burst`.
    submit_rate_per_minute: float = Field(
        60, ge=0, description="Job submissions per API key per minute (POST /v1/jobs); 0 turns the limit off."
    )
    submit_burst: int = Field(20, ge=1, description="Submissions a key may make at once before the rate applies.")
    # A worker holds a job through a lease it renews every `heartbeat_seconds`; a lease left to expire
    # (worker crashed) lets another worker claim the job. The gap tolerates clock skew and GC pauses.
    lease_seconds: int = Field(60, ge=2, description="How long a job lease lasts without a heartbeat.")
    heartbeat_seconds: int = Field(15, ge=1, description="How often a worker renews its lease.")
    max_attempts: int = Field(3, ge=1, description="Claims of one job before it fails as 'worker lost'.")
    resend_after_seconds: int = Field(
        300, ge=1, description="The reconciler re-sends a queued job's message when it is older than this."
    )
    worker_memory_mb: int | None = Field(
        None,
        ge=0,
        description="Data memory (MiB, RLIMIT_DATA) a job-running worker process may use; a job past it fails "
        "with an out-of-memory error instead of the kernel killing the worker. Unset: 80 % of the machine's "
        "memory; 0: no bound.",
    )

    # What jobs may name on the workers' disks: by default only builtins, uploads and these (issue: a spec
    # must not make a worker open any file it can read).
    local_model_dirs: EnvList = Field(
        default_factory=list,
        description="Folders whose models (HF folders, GGUF files) jobs may name by path; empty: no paths.",
    )
    local_dataset_dirs: EnvList = Field(
        default_factory=list,
        description="Folders whose JSONL files jobs may name by path; empty: datasets come as uploads only.",
    )
    hub_models: EnvList = Field(
        default_factory=list,
        description="Hugging Face ids, already in the workers' local cache, that jobs may name.",
    )

    # Spending on IBM Quantum: the operator's, never a spec's, decision.
    ibm_token_owners: EnvList = Field(
        default_factory=list,
        description="Owners whose ibm: jobs may sign in with the workers' QAA_IBM_TOKEN ('*': everyone); "
        "everyone else needs a token of their own (PUT /v1/credentials/ibm).",
    )
    max_job_circuits: int = Field(10**8, ge=1, description="Ceiling on one job's estimated circuits.")
    max_job_shots: int = Field(10**11, ge=1, description="Ceiling on one job's estimated shots.")
    max_job_qpu_seconds: float = Field(3600, ge=0, description="Ceiling on one ibm: job's estimated QPU seconds.")
    max_owner_daily_circuits: int = Field(10**9, ge=1, description="Ceiling on one owner's circuits per 24 h.")
    max_owner_daily_shots: int = Field(10**12, ge=1, description="Ceiling on one owner's shots per 24 h.")
    max_owner_daily_qpu_seconds: float = Field(
        4 * 3600, ge=0, description="Ceiling on one owner's estimated QPU seconds on ibm: backends per 24 h."
    )

    # Quotas.
    max_active_jobs_per_owner: int = Field(50, ge=1, description="Queued + running jobs one owner may have.")
    max_datasets_per_owner: int = Field(200, ge=1, description="Datasets one owner may keep.")
    max_dataset_bytes_per_owner: int = Field(2 * 2**30, ge=1, description="Bytes of datasets one owner may keep.")
    estimate_rate_per_minute: float = Field(120, ge=0, description="POST /v1/estimate per API key per minute.")
    estimate_burst: int = Field(30, ge=1, description="Estimates a key may ask for at once.")
    upload_rate_per_minute: float = Field(10, ge=0, description="Dataset uploads per API key per minute.")
    upload_burst: int = Field(5, ge=1, description="Uploads a key may make at once.")
    job_deadline_seconds: int = Field(
        DAY_S, ge=1, description="Wall-clock time a job may run, from its first start; past it the job fails."
    )
    max_engine_state_mb: int = Field(
        8192,
        ge=1,
        description="Ceiling on the memory a spec's adapters imply (tokens x 2^qubits states, readout, Up).",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without an API key (only on an internal bind or network)."
    )

    @field_validator("local_model_dirs", "local_dataset_dirs", "hub_models", "ibm_token_owners", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.replace(os.pathsep, ",").split(",") if part.strip()]
        return v

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be at most half of lease_seconds "
                f"({self.lease_seconds}), or one late heartbeat loses the job"
            )
        return self

    @property
    def worker_memory_bound_mb(self) -> int | None:
        """`worker_memory_mb`, or by default a share of the machine's memory; None when turned off (0)."""
        if self.worker_memory_mb is not None:
            return self.worker_memory_mb or None
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * DEFAULT_WORKER_MEMORY_SHARE) // 2**20

    @property
    def sqlalchemy_url(self) -> str:
        """`database_url`, or the embedded SQLite file `home/qaa.db`."""
        return self.database_url or f"sqlite:///{self.home_dir / 'qaa.db'}"

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the API (a wildcard bind address is reached on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def models_dir(self) -> Path:
        return self.home_dir / "models"

    @property
    def cache_dir(self) -> Path:
        return self.home_dir / "cache"

    @property
    def artifacts_dir(self) -> Path:
        return self.home_dir / "artifacts"

    @property
    def datasets_dir(self) -> Path:
        return self.home_dir / "datasets"


def private_home(settings: Settings) -> Path:
    """Make `QAA_HOME` readable by its owner only (0700), and everything this process writes from now on under
    it too (umask 077: databases, datasets, artifacts with dataset rows, caches are 0600/0700). Called by the
    API at startup, by every worker and by `qaa up`: each is a process of the service itself."""
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    os.umask(0o077)
    return home


@lru_cache
def get_settings() -> Settings:
    return Settings()
