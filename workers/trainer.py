"""The training job: a `JobSpec` in, a trained adapter, metrics and an evaluation out; resumable after a crash.

`train(spec, run_dir, hooks)` is what the Celery task calls. It resumes from the newest checkpoint in
`run_dir/checkpoints`, so a successor worker continues a killed worker's run exactly: the trainable
tensors, optimizer, scheduler and every RNG come back, and the data order is a pure function of
(seed, step). Steps after the checkpoint are recomputed and recorded again with the same values (bitwise on
CPU, same thread count); only the timing fields (`step_time_s`, `tokens_per_s`) differ.

Order within a step: forward, backward, clip, optimizer and scheduler step, the method's post-step (SoRA's
proximal step), eval loss when due, `hooks.record_metrics`, checkpoint when due, `hooks.should_continue`.

Example (a few seconds on a CPU):
    >>> from service.spec import parse_spec
    >>> spec = parse_spec({"model": "builtin:tiny-llama", "dataset": "builtin:restaurants",
    ...     "method": {"kind": "lora", "r": 4}, "training": {"steps": 2, "batch_size": 2, "max_length": 64},
    ...     "evaluation": {"metrics": ["bleu"], "samples": 2, "max_new_tokens": 4}})
    >>> import tempfile; hooks = TrainingHooks(lambda points: None, lambda step: True)
    >>> train(spec, Path(tempfile.mkdtemp()), hooks).status
    'succeeded'
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import circuits
import circuits.cost_estimate
from circuits.execution import ExecutionCancelled, RuntimeJobFailed, RuntimeJobTimeout
from service.api.cost import cost_of
from service.spec import EVAL_BATCH_FACTOR, EVAL_LOSS_EXAMPLES, JobSpec
from workers import artifacts, checkpoints, evaluation, hardware_gap, tracking
from workers.datasets import DatasetError, Splits, collate, encode, load_splits
from workers.methods import PreparedModel, prepare
from workers.models import ModelError, load_model

log = logging.getLogger(__name__)

COUNTERS = ("primitive_calls", "circuits", "shots", "qpu_seconds")


class JobError(Exception):
    """A readable failure: its message goes to the job's `error` field (unknown model, malformed dataset ...)."""


@dataclass
class TrainingHooks:
    """`admit(estimate, engine_state_bytes, widths)` sees what the loaded model's adapters (by (d_in, d_out)) will
    cost before the first step, and raises to refuse the run (the worker's check of budgets and ceilings)."""

    record_metrics: Callable[[list[dict]], None]
    should_continue: Callable[[int], bool]
    admit: Callable[[circuits.cost_estimate.Estimate, int, dict], None] | None = None
    #: Called with the run's `circuits.Execution` (None without circuits) once it is open, e.g. to cancel its
    #: runtime jobs from another thread when the job is cancelled.
    started: Callable[[Any], None] | None = None


@dataclass
class TrainingResult:
    status: Literal["succeeded", "cancelled"]
    evaluation: dict | None
    usage: dict
    artifacts: list[Path] = field(default_factory=list)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_device(spec: JobSpec) -> torch.device:
    """`training.device`: `auto` is CUDA where this worker has it; `cuda` on a worker without it is refused."""
    asked = spec.training.device
    if asked == "cuda" and not torch.cuda.is_available():
        raise JobError("training.device is 'cuda' but this worker has no CUDA device; run a GPU worker (queue gpu)")
    return default_device() if asked == "auto" else torch.device(asked)


def train(
    spec: JobSpec,
    run_dir: Path,
    hooks: TrainingHooks,
    *,
    models_dir: Path | None = None,
    resolve_dataset: Callable[[str], Path] | None = None,
    device: torch.device | None = None,
    source: Any = None,
) -> TrainingResult:
    """Run `spec` in `run_dir` (checkpoints/, artifacts/): train, resuming from the newest checkpoint there, or
    with `kind: evaluate` measure the hardware gap (`workers.hardware_gap`). `source` is the adapter the spec
    loads (`service.admission.SourceAdapter`, for `init_from` and `adapter_from`)."""
    run_dir = Path(run_dir)
    device = device or training_device(spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _deterministic():
        _seed_everything(spec.training.seed)
        splits = _splits(spec, resolve_dataset)
        prepared, tokenizer, chat = _prepared(spec, models_dir, device)
        if source is not None:  # a checkpoint of this job, if any, overrides it (`_Run._resume`)
            hardware_gap.load_source(prepared.model, source.files, source.job_id)
        if hooks.admit is not None:  # before the run signs in anywhere
            hooks.admit(*run_cost(spec, prepared.model))
        if spec.kind == "evaluate":
            try:
                return hardware_gap.evaluate(spec, run_dir, hooks, prepared.model, tokenizer, chat, splits, device)
            except (RuntimeJobFailed, RuntimeJobTimeout) as exc:
                raise JobError(str(exc)) from exc
        with _execution(spec, prepared.model) as execution:
            if hooks.started is not None:
                hooks.started(execution)
            run = _Run(spec, run_dir, hooks, prepared, tokenizer, chat, splits, device, execution)
            try:
                result = run.finish() if run.fit() else TrainingResult("cancelled", None, {}, [])
            except ExecutionCancelled:
                result = TrainingResult("cancelled", None, {}, [])
            except (RuntimeJobFailed, RuntimeJobTimeout) as exc:
                raise JobError(str(exc)) from exc
        result.usage = run.usage()  # after the run closed its Batch or Session, which the usage reports
        return result


def _execution(spec: JobSpec, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """One run for every adapter of a circuit-backed QAA job (one sign-in, one Batch or Session); nothing else."""
    if spec.method.kind == "qaa" and spec.quantum is not None and spec.quantum.backend != "exact":
        return circuits.execution(model, spec.qaa_config())
    return contextlib.nullcontext(None)


def run_cost(spec: JobSpec, model: torch.nn.Module) -> tuple[circuits.cost_estimate.Estimate, int, dict]:
    """(training + evaluation estimate, engine state in bytes, adapters by shape) of a run, priced by the API's
    own function from the adapters actually built (so a model the API cannot price is priced here)."""
    if spec.method.kind != "qaa":
        return circuits.cost_estimate.Estimate(0, 0, 0, 0, f"method {spec.method.kind} runs no circuits"), 0, {}
    widths = Counter((layer.in_features, layer.out_features) for layer in circuits.qaa_adapters(model).values())
    training, evaluation, state = cost_of(spec, widths)
    return circuits.cost_estimate.combined(training, evaluation), state, dict(widths)


class _Run:
    """One attempt at a job: the prepared model, its optimizer and schedule, and the metric history."""

    def __init__(self, spec: JobSpec, run_dir: Path, hooks: TrainingHooks, prepared: PreparedModel,
                 tokenizer: Any, chat: bool, splits: Splits, device: torch.device, execution: Any):  # fmt: skip
        self.spec, self.hooks, self.prepared, self.splits, self.device = spec, hooks, prepared, splits, device
        self.execution = execution  # the circuits.Execution of a circuit-backed run, else None
        self.earlier_job_ids: list[str] = []  # runtime jobs of earlier attempts, from the checkpoint
        self.model, self.tokenizer, self.chat = prepared.model, tokenizer, chat
        self.checkpoints, self.artifacts = run_dir / "checkpoints", run_dir / "artifacts"
        t = spec.training
        self.optimizer = torch.optim.AdamW(prepared.param_groups(t.weight_decay), lr=t.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(t.steps, t.warmup_steps))
        self.params = list(prepared.trainable().values())
        self.history: list[dict] = []
        self.step = 0
        self.quantum = spec.method.kind == "qaa" and spec.quantum is not None and spec.quantum.backend != "exact"
        # Circuit backends see every position of a max_length-padded batch, so a step runs exactly the
        # circuits `circuits.estimate` priced (batch_size * max_length inputs per adapter).
        self.pad_to = t.max_length if self.quantum else None
        self.attempt_training_usage = dict.fromkeys(COUNTERS, 0)
        self._resume()

    # --- training ---------------------------------------------------------------------------------------

    def fit(self) -> bool:
        """Train to `training.steps`; False when `should_continue` stopped it (after a checkpoint)."""
        t = self.spec.training
        self.model.train()
        while self.step < t.steps:
            self.step += 1
            point = self._train_step()
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                point["eval_loss"] = self._eval_loss()
                log.info("step %d/%d: loss %.4f, eval loss %.4f", self.step, t.steps, point["loss"], point["eval_loss"])
            self.history.append(point)
            self.hooks.record_metrics([point])
            saved = (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.steps
            if saved:
                self._checkpoint()
            if not self.hooks.should_continue(self.step):
                if not saved:
                    self._checkpoint()
                return False
        return True

    def _train_step(self) -> dict[str, Any]:
        t = self.spec.training
        started = time.perf_counter()
        before = self._counters()
        indices = batch_indices(len(self.splits.train), t.batch_size, t.seed, self.step)
        rows = [encode(self.tokenizer, self.splits.train[i], t.max_length, self.chat) for i in indices]
        batch = {k: v.to(self.device) for k, v in collate(rows, self.tokenizer.pad_token_id, self.pad_to).items()}
        loss = self.model(**batch).loss
        if not torch.isfinite(loss):
            raise JobError(f"the training loss is {loss.item()} at step {self.step}; lower training.learning_rate")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip or math.inf)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.prepared.post_step is not None:
            self.prepared.post_step(lr)
        seconds = time.perf_counter() - started
        point = {
            "step": self.step,
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": int(batch["attention_mask"].sum()) / seconds,
            "step_time_s": seconds,
        }
        if self.quantum:
            after = self._counters()
            for key in COUNTERS:
                point[key] = after[key] - before[key]
                self.attempt_training_usage[key] += point[key]
        return point

    def _counters(self) -> dict[str, float]:
        return self.execution.usage.as_dict() if self.quantum else {}

    def _eval_loss(self) -> float:
        t = self.spec.training
        return evaluation.eval_loss(
            self.model, self.tokenizer, self.splits.validation[:EVAL_LOSS_EXAMPLES], chat=self.chat,
            max_length=t.max_length, batch_size=t.batch_size * EVAL_BATCH_FACTOR, device=self.device,
        )  # fmt: skip

    # --- checkpoints ------------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        rng_tensors, rng_state = checkpoints.capture_rng(self.model)
        tensors = {
            "trainable": {n: p.detach().cpu().clone() for n, p in self.prepared.trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **rng_tensors,
        }
        meta = {"rng": rng_state, "history": self.history, "runtime_job_ids": self._job_ids()}
        checkpoints.save(self.checkpoints, checkpoints.Checkpoint(self.step, tensors, meta))

    def _resume(self) -> None:
        found = checkpoints.latest(self.checkpoints)
        if found is None:
            return
        trainable = self.prepared.trainable()
        if found.tensors["trainable"].keys() != trainable.keys():
            raise JobError(f"the checkpoint in {self.checkpoints} was made by a different spec; remove it to restart")
        with torch.no_grad():
            for name, tensor in found.tensors["trainable"].items():
                trainable[name].copy_(tensor)
        self.optimizer.load_state_dict(found.tensors["optimizer"])
        self.scheduler.load_state_dict(found.tensors["scheduler"])
        checkpoints.restore_rng(self.model, found.tensors, found.meta["rng"])
        self.history, self.step = found.meta["history"], found.step
        self.earlier_job_ids = found.meta.get("runtime_job_ids", [])
        log.info("resuming from the checkpoint at step %d", found.step)

    # --- the end ----------------------------------------------------------------------------------------

    def usage(self) -> dict[str, float]:
        """Training counters over every attempt (from the metric history), plus this attempt's transpiles and
        the circuits that evaluation ran (validation loss, generation); empty without circuits."""
        if not self.quantum:
            return {}
        now = self.execution.usage.as_dict()
        out = {key: sum(p.get(key, 0) for p in self.history) for key in COUNTERS}
        out["transpile_hits"], out["transpile_misses"] = now["transpile_hits"], now["transpile_misses"]
        for key in COUNTERS:
            out[f"eval_{key}"] = now[key] - self.attempt_training_usage[key]
        if self.execution is not None:
            out |= self.execution.describe()
            out["runtime_job_ids"] = self._job_ids()
        return out

    def _job_ids(self) -> list[str]:
        """Runtime job ids of every attempt (an attempt's jobs after its last checkpoint are not kept)."""
        current = self.execution.runtime_job_ids if self.execution is not None else []
        return [*self.earlier_job_ids, *current]

    def finish(self) -> TrainingResult:
        e = self.spec.evaluation
        log.info("trained %d steps; generating and scoring %d test examples", self.step, e.samples)
        samples = self.splits.test[: e.samples]
        generations = evaluation.generate(
            self.model, self.tokenizer, [s.prompt for s in samples], chat=self.chat,
            max_length=self.spec.training.max_length, max_new_tokens=e.max_new_tokens,
            batch_size=self.spec.training.batch_size * EVAL_BATCH_FACTOR, device=self.device,
        )  # fmt: skip
        summary = self.prepared.summary()
        result = evaluation.score(generations, [s.targets for s in samples], e.metrics)
        last_eval = next(p["eval_loss"] for p in reversed(self.history) if "eval_loss" in p)
        step_times = [p["step_time_s"] for p in self.history]
        result |= {
            "eval_loss": last_eval,
            "trainable_params": int(summary["trainable"]),
            "trainable_share": summary["share"],
            "peak_memory_mb": evaluation.peak_memory_mb(self.device),
            "seconds_per_step": sum(step_times) / len(step_times),
            "final_train_loss": self.history[-1]["loss"],
        }
        shutil.rmtree(self.artifacts, ignore_errors=True)  # a previous attempt's partial files
        self.artifacts.mkdir(parents=True)
        self.prepared.save(self.artifacts)
        (self.artifacts / "README.md").unlink(missing_ok=True)  # PEFT's generated model card
        artifacts.write_metrics(self.artifacts, self.history, result)
        artifacts.plot_loss_curve(self.artifacts, self.history, self.spec.name or self.spec.model)
        artifacts.write_samples(self.artifacts, [
            {"prompt": s.prompt, "reference": s.completion, "generation": g}
            for s, g in zip(samples, generations, strict=True)
        ])  # fmt: skip
        if self.spec.training.report_to:
            tracking.export(self.artifacts, self.spec.training.report_to, self.history, result,
                            self.spec.model_dump(mode="json"), self.spec.name or self.spec.model)  # fmt: skip
        files = sorted(p for p in self.artifacts.rglob("*") if p.is_file())
        return TrainingResult("succeeded", result, {}, files)  # usage: by `train`


# --- building blocks ----------------------------------------------------------------------------------------


def lr_factor(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup over `warmup` steps (the first step already moves), then cosine decay towards zero."""

    def factor(i: int) -> float:  # i = optimizer steps taken so far
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Training rows of `step` (1-based): a seeded permutation per epoch, read in order, so the data position
    is the step number itself and a resumed run draws the same batches."""
    start = (step - 1) * batch_size
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + batch_size)]


_PERMUTATIONS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        _PERMUTATIONS.clear()  # one epoch at a time is all a run needs
        _PERMUTATIONS[key] = order
    return _PERMUTATIONS[key]


def _seed_everything(seed: int) -> None:
    """Seeds the RNGs that adapter initialisation (PEFT's LoRA A) and dropout draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels for the run (warn-only: an op without one must not fail the job), then the
    process's previous setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _splits(spec: JobSpec, resolve_dataset: Callable[[str], Path] | None) -> Splits:
    try:
        splits = load_splits(spec.dataset, resolve_dataset=resolve_dataset, seed=spec.training.seed)
    except DatasetError as exc:
        raise JobError(str(exc)) from exc
    if not splits.train:
        raise JobError(f"dataset {spec.dataset!r} has no training examples")
    return splits


def _prepared(spec: JobSpec, models_dir: Path | None, device: torch.device) -> tuple[PreparedModel, Any, bool]:
    """(the prepared model on `device`, its tokenizer, whether it has a chat template)."""
    try:
        loaded = load_model(spec.model, models_dir=models_dir)
    except ModelError as exc:
        raise JobError(str(exc)) from exc
    try:
        prepared = prepare(loaded.model.to(device), spec)
    except ValueError as exc:
        raise JobError(f"method {spec.method.kind!r} does not fit model {spec.model!r}: {exc}") from exc
    return prepared, loaded.tokenizer, loaded.chat
