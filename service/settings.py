"""The one settings object, read from `QAA_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAA_", extra="ignore")

    home: Path = Field(Path("~/.qaa"), description="Root of the embedded store, artifacts, caches and models.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; SQLite under `home` when unset.")
    broker_url: str | None = Field(None, description="Celery broker URL; the embedded no-server broker when unset.")
    ibm_token: SecretStr | None = Field(None, description="IBM Quantum API token for `ibm:` backends (workers only).")
    ibm_instance: str | None = Field(None, description="IBM Quantum instance (CRN) for `ibm:` backends.")

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


@lru_cache
def get_settings() -> Settings:
    return Settings()
