"""The one settings object, read from `QAA_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        ge=256,
        description="Data memory (MiB, RLIMIT_DATA) a job-running worker process may use; a job past it fails "
        "with an out-of-memory error instead of the kernel killing the worker. Unset: no bound.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be at most half of lease_seconds "
                f"({self.lease_seconds}), or one late heartbeat loses the job"
            )
        return self

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


@lru_cache
def get_settings() -> Settings:
    return Settings()
