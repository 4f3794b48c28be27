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
