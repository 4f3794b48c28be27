"""`training.report_to`: a finished job's metrics exported to the experiment trackers Hugging Face's `report_to` has
taught users to open, offline and inside the job's artifacts (so `qaa-client download` brings them along).

- `tensorboard`: TensorBoard event files in `tensorboard/` (`tensorboard --logdir out/tensorboard`);
- `mlflow`: one MLflow run in the local store `mlflow/mlflow.db` (`mlflow ui --backend-store-uri
  sqlite:///out/mlflow/mlflow.db`; MLflow's SQLite store, since its plain-file store is in maintenance mode),
  with the spec's method and training options as parameters and the evaluation as final metrics.

Every metric point of the job (train loss, learning rate, eval loss, quantum counters per step) becomes a scalar
at its step, so the trackers show what the job's metrics say, no more, no less. Both need the `tracking` extra
(`pip install 'qaa-service[tracking]'`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
MLFLOW_EXPERIMENT = "qaa"
PACKAGE = "qaa-service"


def _scalars(point: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in point.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _flat(prefix: str, data: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out |= _flat(name, value)
        else:
            out[name] = str(value)
    return out


def export(artifacts: Path, report_to: Sequence[str], points: Sequence[dict[str, Any]], evaluation: dict[str, Any],
           spec: dict[str, Any], run_name: str) -> None:  # fmt: skip
    """Write the job's metric points (and its evaluation) for each tracker named in `report_to`."""
    try:
        if "tensorboard" in report_to:
            _tensorboard(artifacts / TENSORBOARD_DIR, points, evaluation)
        if "mlflow" in report_to:
            _mlflow(artifacts / MLFLOW_DIR, points, evaluation, spec, run_name)
    except ImportError as exc:
        raise RuntimeError(
            f"training.report_to needs the tracking extra (pip install '{PACKAGE}[tracking]'): {exc}"
        ) from exc


def _tensorboard(directory: Path, points: Sequence[dict[str, Any]], evaluation: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(directory)) as writer:
        for point in points:
            for key, value in _scalars(point).items():
                writer.add_scalar(key, value, global_step=point["step"])
        last = points[-1]["step"] if points else 0
        for key, value in _scalars(evaluation).items():
            writer.add_scalar(f"evaluation/{key}", value, global_step=last)


def _mlflow(directory: Path, points: Sequence[dict[str, Any]], evaluation: dict[str, Any], spec: dict[str, Any],
            run_name: str) -> None:  # fmt: skip
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    directory.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(MLFLOW_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=run_name)
    params = {**_flat("method", spec.get("method") or {}), **_flat("training", spec.get("training") or {})}
    metrics = [Metric(k, v, 0, p["step"]) for p in points for k, v in _scalars(p).items()]
    last = points[-1]["step"] if points else 0
    metrics += [Metric(f"evaluation.{k}", v, 0, last) for k, v in _scalars(evaluation).items()]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000],
                         params=[Param(k, v[:6000]) for k, v in params.items()] if start == 0 else [])  # fmt: skip
    client.set_terminated(run.info.run_id)
