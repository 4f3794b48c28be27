"""`kind: evaluate`: one trained QAA adapter on the exact engine and on a backend, side by side.

The same weights run the same test examples twice: bound to the exact engine, then to the spec's backend (with its
shots and mitigation) in one run. The gap is reported three ways: per adapter, the readout error against the exact
engine *on the inputs that adapter saw on the backend* (|r_backend - r_exact| for the same z, so an adapter's
figure is its own circuit's error, not its upstream neighbours'); the eval loss over the examples; and the text
scores of the generations. Inference only: no parameter shifts run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import circuits
from circuits.backends import ExactEngine
from service.spec import EVAL_BATCH_FACTOR, JobSpec
from workers import artifacts, evaluation
from workers.datasets import Splits

#: Inputs per adapter whose readout error is computed (the first ones the backend pass sends); bounds the memory.
GAP_INPUTS = 4096
GAP_NAME = "hardware_gap.json"


class _Recorder:
    """An adapter's engine that keeps the first `GAP_INPUTS` inputs and readouts it computes."""

    def __init__(self, engine: Any):
        self.engine, self.z, self.out, self.kept = engine, [], [], 0

    def __call__(self, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        out = self.engine(z, theta)
        if self.kept < GAP_INPUTS:
            take = min(len(z), GAP_INPUTS - self.kept)
            self.z.append(z[:take].detach().cpu())
            self.out.append(out[:take].detach().cpu())
            self.kept += take
        return out


def load_source(model: torch.nn.Module, files: dict[str, tuple[str, str]], job_id: str) -> None:
    """Copy the saved adapter of job `job_id` (`service.admission.SourceAdapter.files`) into `model`'s adapters,
    after checking each file against the digest recorded when it was saved."""
    from workers.tasks import file_digest
    from workers.trainer import JobError

    paths = []
    for name, (path, sha256) in files.items():
        if file_digest(Path(path))[1] != sha256:
            raise JobError(f"{name} of job {job_id} changed since the job saved it (sha256 mismatch); not loaded")
        paths.append(Path(path))
    try:
        circuits.load_qaa(model, paths[0].parent)
    except (ValueError, RuntimeError) as exc:
        raise JobError(f"the adapter of job {job_id} does not fit this model: {str(exc).splitlines()[0]}") from exc


def evaluate(spec: JobSpec, run_dir: Path, hooks: Any, model: torch.nn.Module, tokenizer: Any, chat: bool,
             splits: Splits, device: torch.device) -> Any:  # fmt: skip
    """Run the gap measurement; a `TrainingResult` with the report as its evaluation and artifacts."""
    from workers.trainer import TrainingResult

    samples = splits.test[: spec.evaluation.samples]
    if not samples:
        from workers.trainer import JobError

        raise JobError(f"dataset {spec.dataset!r} has no test examples to evaluate on")
    config = spec.qaa_config()
    with circuits.execution(model, circuits.QAAConfig()):  # the same weights on the exact engine
        exact = _measure(spec, model, tokenizer, chat, samples, device)
    with circuits.execution(model, config) as run:
        if hooks.started is not None:
            hooks.started(run)
        layers = circuits.qaa_adapters(model)
        recorders = {name: _Recorder(layer.engine) for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.engine = recorders[name]
        try:
            on_backend = _measure(spec, model, tokenizer, chat, samples, device)
        except circuits.ExecutionCancelled:
            return TrainingResult("cancelled", None, {}, [])
    per_adapter = [_readout_error(name, layers[name], recorders[name]) for name in layers]
    report = _report(spec, exact, on_backend, per_adapter)
    usage = run.usage.as_dict() | run.describe()
    out = run_dir / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / GAP_NAME).write_text(json.dumps({**report, "adapters": per_adapter}, indent=1))
    artifacts.write_samples(out, [
        {"prompt": s.prompt, "reference": s.completion, "exact": a, "backend": b}
        for s, a, b in zip(samples, exact["generations"], on_backend["generations"], strict=True)
    ])  # fmt: skip
    hooks.record_metrics([{"step": 0, "eval_loss_exact": exact["eval_loss"], "eval_loss": on_backend["eval_loss"]}])
    return TrainingResult("succeeded", report, usage, sorted(out.iterdir()))


def _measure(spec: JobSpec, model, tokenizer, chat: bool, samples, device) -> dict:
    t, e = spec.training, spec.evaluation
    batch = t.batch_size * EVAL_BATCH_FACTOR
    loss = evaluation.eval_loss(model, tokenizer, samples, chat=chat, max_length=t.max_length, batch_size=batch,
                                device=device)  # fmt: skip
    generations = evaluation.generate(
        model, tokenizer, [s.prompt for s in samples], chat=chat, max_length=t.max_length,
        max_new_tokens=e.max_new_tokens, batch_size=batch, device=device,
    )  # fmt: skip
    scores = evaluation.score(generations, [s.targets for s in samples], e.metrics)
    return {"eval_loss": loss, "scores": scores, "generations": generations}


@torch.no_grad()
def _readout_error(name: str, layer, recorder: _Recorder) -> dict:
    """|r_backend - r_exact| over the inputs the adapter saw on the backend (r = engine output / ||z||)."""
    z = torch.cat(recorder.z).float()
    device_out = torch.cat(recorder.out).double()
    exact_out = ExactEngine(layer.config, layer.n_qubits)(z, layer.theta.detach().cpu().float()).double()
    norm = torch.linalg.vector_norm(z.double(), dim=-1, keepdim=True)
    keep = norm.squeeze(-1) > 0
    delta = ((device_out - exact_out)[keep] / norm[keep]).abs()
    return {
        "name": name,
        "qubits": layer.n_qubits,
        "inputs": int(keep.sum()),
        "mean_abs": float(delta.mean()) if delta.numel() else 0.0,
        "max_abs": float(delta.max()) if delta.numel() else 0.0,
    }


def _report(spec: JobSpec, exact: dict, backend: dict, per_adapter: list[dict]) -> dict:
    config = spec.qaa_config()
    weights = [a["inputs"] for a in per_adapter]
    mean = sum(a["mean_abs"] * w for a, w in zip(per_adapter, weights, strict=True)) / max(1, sum(weights))
    return {
        "adapter_from": spec.adapter_from,
        "backend": config.backend,
        "shots": config.effective_shots(),
        "mitigation": config.mitigation.model_dump() if config.mitigation is not None else None,
        "examples": min(spec.evaluation.samples, len(exact["generations"])),
        "exact": {"eval_loss": exact["eval_loss"], **exact["scores"]},
        "on_backend": {"eval_loss": backend["eval_loss"], **backend["scores"]},
        "gap": {
            "readout_mean_abs": mean,
            "readout_max_abs": max((a["max_abs"] for a in per_adapter), default=0.0),
            "eval_loss": backend["eval_loss"] - exact["eval_loss"],
            **{k: backend["scores"][k] - exact["scores"][k] for k in exact["scores"]},
        },
    }
