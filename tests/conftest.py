"""Shared test setup. Tests never download: the hub is off before anything imports huggingface_hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_models_dir(tmp_path_factory: pytest.TempPathFactory):
    """A models dir holding the SmolLM2 export, made once per session (dequantizing the GGUF takes ~25 s)."""
    from workers.models import export_smollm2

    models_dir = tmp_path_factory.mktemp("models")
    export_smollm2(models_dir)
    return models_dir


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A TestClient on a fresh embedded API (SQLite store and broker under a temporary QAA_HOME)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import get_settings

    monkeypatch.setenv("QAA_HOME", str(tmp_path / "qaa-home"))
    for name in ("QAA_DATABASE_URL", "QAA_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as client:
        yield client
    get_settings.cache_clear()


@pytest.fixture
def auth_for(api):
    """`auth_for("alice")`: request headers carrying a new API key of that owner."""

    def make(owner: str) -> dict[str, str]:
        _, plaintext = api.app.state.store.create_api_key(owner)
        return {"Authorization": f"Bearer {plaintext}"}

    return make
