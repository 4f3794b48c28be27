"""What a finished job leaves in `run_dir/artifacts`, and how to load its adapter back.

Files: `adapter_config.json` + `adapter_model.safetensors` (the method's adapter; for `full`, every weight),
`metrics.json` (every metric point and the evaluation), `loss_curve.png` (train and eval loss vs step) and
`samples.jsonl` (prompt, reference, generation per evaluated test example).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.methods import load_adapter_into
from workers.models import LoadedModel, load_model

METRICS_NAME = "metrics.json"
CURVE_NAME = "loss_curve.png"
SAMPLES_NAME = "samples.jsonl"


def write_metrics(directory: Path, points: Sequence[dict], evaluation: dict | None) -> Path:
    path = directory / METRICS_NAME
    path.write_text(json.dumps({"points": list(points), "evaluation": evaluation}, indent=1))
    return path


def write_samples(directory: Path, rows: Sequence[dict[str, str]]) -> Path:
    path = directory / SAMPLES_NAME
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def plot_loss_curve(directory: Path, points: Sequence[dict], title: str = "") -> Path:
    """Train loss per step and eval loss at its steps, on one axis (matplotlib's Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    train = [(p["step"], p["loss"]) for p in points if "loss" in p]
    evals = [(p["step"], p["eval_loss"]) for p in points if "eval_loss" in p]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = directory / CURVE_NAME
    fig.savefig(path)
    return path


def load_adapter(model_name: str, artifacts_dir: Path, *, models_dir: Path | None = None) -> LoadedModel:
    """The base model `model_name` with the adapter in `artifacts_dir` applied, in eval mode on the CPU."""
    loaded = load_model(model_name, models_dir=models_dir)
    model: Any = load_adapter_into(loaded.model, Path(artifacts_dir))
    return LoadedModel(model.eval(), loaded.tokenizer, loaded.name, loaded.chat)
