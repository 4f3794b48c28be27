"""What a job spec will cost, from the spec alone: circuits, shots, primitive calls and a time range.

The circuit figures come from `circuits.estimate` (the counts the engines keep), applied to every adapter the
spec's `target_modules` would wrap. Which modules those are, and their input widths, the API knows for the
builtin models from `BUILTIN_SHAPES` without loading them (the API process never imports torch); for any
other model the caller passes `d_in` and `adapters`.

The time range is coarse on purpose: per-token and per-circuit costs measured on a 2-core CPU (README,
"Benchmarks"), widened to cover the spread between small and large circuits. Queue waits on IBM
hardware are not included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from circuits import QAAConfig
from circuits.config import matches_target
from circuits.cost_estimate import (
    Estimate,
    Widths,
    check_budget,
    combined,
    engine_state_bytes,
    estimate_widths,
    forward_estimate,
)
from service.spec import EVAL_BATCH_FACTOR, EVAL_LOSS_EXAMPLES, JobSpec, QAAMethod


@dataclass(frozen=True)
class ModelShape:
    """Per transformer block: (module path inside the block, its input width, its output width); and seconds
    per trained token (low, high) for the classical forward + backward on a 2-core CPU."""

    prefix: str
    blocks: int
    modules: tuple[tuple[str, int, int], ...]
    seconds_per_token: tuple[float, float]


def _llama(hidden: int, kv: int, intermediate: int, blocks: int, per_token: tuple[float, float]) -> ModelShape:
    attn = (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden))
    mlp = (("mlp.gate_proj", hidden, intermediate), ("mlp.up_proj", hidden, intermediate),
           ("mlp.down_proj", intermediate, hidden))  # fmt: skip
    return ModelShape("model.layers", blocks, tuple((f"self_attn.{n}", hidden, out) for n, out in attn) + mlp,
                      per_token)  # fmt: skip


# Mirrors the configs in workers/models.py (the API may not import workers; tests/test_cost_shapes.py checks
# the mirror against the loaded models): tiny-llama hidden 64, key/value width 32, intermediate 128, 2 blocks;
# tiny-gpt2 n_embd 64 (MLP 4x), 2 blocks; SmolLM2-135M hidden 576, key/value width 192, intermediate 1536,
# 30 blocks (1.2-3 s per 4 x 64-token step with adapters).
BUILTIN_SHAPES: dict[str, ModelShape] = {
    "builtin:tiny-llama": _llama(64, 32, 128, 2, (2e-5, 1e-3)),
    "builtin:tiny-gpt2": ModelShape(
        "transformer.h",
        2,
        (("attn.c_attn", 64, 192), ("attn.c_proj", 64, 64), ("mlp.c_fc", 64, 256), ("mlp.c_proj", 256, 64)),
        (2e-5, 1e-3),
    ),
    "builtin:smollm2-135m": _llama(576, 192, 1536, 30, (3e-3, 2e-2)),
}

#: Seconds per executed circuit (low, high) and per primitive call (low, high), by backend kind.
#: aer: 0.36 ms per binding at 6 qubits up to 11.5 ms at 10 qubits with the gate embedding; fake: noiseless
#: 0.4 ms up to 70 ms per binding with FakeTorino's noise; ibm: QPU time per circuit at a few thousand
#: shots, and the runtime's per-job overhead (no queue wait).
CIRCUIT_SECONDS = {"aer": (3e-4, 1.5e-2), "fake": (4e-4, 8e-2), "ibm": (5e-3, 1e-1)}
CALL_SECONDS = {"aer": (1e-3, 0.1), "fake": (1e-2, 1.0), "ibm": (2.0, 60.0)}


class EstimateError(ValueError):
    """The spec cannot be priced as given; `path` names the input to fix."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class SpecCost:
    estimate: Estimate
    d_in: list[int]
    adapters: int
    tokens_per_step: int
    seconds: tuple[float, float] | None
    over_budget: str | None  # why the estimate exceeds the spec's budget; None when it fits
    engine_state_bytes: int = 0  # what the adapters' states imply (`circuits.cost_estimate.engine_state_bytes`)
    evaluation: Estimate | None = None  # at most what evaluation runs (`evaluation_calls`)
    widths: Widths | None = None  # adapters by (d_in, d_out)


def evaluation_calls(spec: JobSpec) -> list[int]:
    """Input vectors per forward call of a job's evaluation, at most: every eval-loss pass over up to
    EVAL_LOSS_EXAMPLES validation examples padded to `max_length` (an evaluate job: one pass over its `samples`
    test examples), and the generation of `samples` test prompts (a prefill of `max_length` tokens, then one
    token per row for each further new token)."""
    t, e = spec.training, spec.evaluation
    batch = t.batch_size * EVAL_BATCH_FACTOR
    if spec.kind == "evaluate":
        passes, examples = 1, e.samples
    else:
        passes = sum(1 for s in range(1, t.steps + 1) if (t.eval_every and s % t.eval_every == 0) or s == t.steps)
        examples = EVAL_LOSS_EXAMPLES
    calls = []
    for _ in range(passes):
        for start in range(0, examples, batch):
            calls.append(min(batch, examples - start) * t.max_length)
    for start in range(0, e.samples, batch):
        rows = min(batch, e.samples - start)
        calls += [rows * t.max_length] + [rows] * (e.max_new_tokens - 1)
    return calls


def adapter_widths(shape: ModelShape, targets: list[str] | str) -> Counter[tuple[int, int]]:
    """(d_in, d_out) -> number of adapters the targets wrap in a model of this shape."""
    widths: Counter[tuple[int, int]] = Counter()
    for block in range(shape.blocks):
        for module, d_in, d_out in shape.modules:
            if matches_target(f"{shape.prefix}.{block}.{module}", targets):
                widths[(d_in, d_out)] += 1
    return widths


def spec_cost(spec: JobSpec, *, d_in: int | None = None, adapters: int | None = None) -> SpecCost:
    """Price `spec`. `d_in` and `adapters` override the builtin shapes (and are required for other models;
    their output width is then taken as `d_in`)."""
    tokens = spec.training.batch_size * spec.training.max_length
    steps = 0 if spec.kind == "evaluate" else spec.training.steps
    shape = BUILTIN_SHAPES.get(spec.model)
    classical = None
    if shape is not None:
        low, high = shape.seconds_per_token
        classical = (low * tokens * steps, high * tokens * steps)
    if not isinstance(spec.method, QAAMethod) or spec.quantum is None:
        zero = Estimate(0, 0, 0, 0, f"method {spec.method.kind} runs no circuits")
        return SpecCost(zero, [], 0, tokens, classical, None, 0, Estimate(0, 0, 0, 0, ""), {})

    config = spec.qaa_config()
    widths = _widths(spec, shape, d_in, adapters)
    try:
        total, evaluation, state = cost_of(spec, widths)
    except ValueError as exc:  # e.g. a width that needs more qubits than allowed without compression
        raise EstimateError("method.qubits", str(exc)) from exc
    seconds = _seconds(config, combined(total, evaluation), classical)
    try:
        check_budget(config, combined(total, evaluation))
        over = None
    except ValueError as exc:
        over = str(exc)
    d_ins = sorted({w for w, _ in widths})
    return SpecCost(total, d_ins, sum(widths.values()), tokens, seconds, over, state, evaluation, widths)


def cost_of(spec: JobSpec, widths: Widths) -> tuple[Estimate, Estimate, int]:
    """(training, evaluation at most, engine state bytes) of a QAA spec whose adapters have `widths`: the one
    pricing the API (from the builtin shapes) and the worker (from the loaded model) both use."""
    config = spec.qaa_config()
    tokens = spec.training.batch_size * spec.training.max_length
    if spec.kind == "evaluate":  # inference only: the evaluation below is the whole job
        training = Estimate(0, 0, 0, 0, "an evaluate job trains nothing")
    else:
        training = estimate_widths(config, tokens, spec.training.steps, widths)
    evaluation = forward_estimate(config, widths, evaluation_calls(spec))
    return training, evaluation, engine_state_bytes(config, tokens, widths)


def _widths(spec: JobSpec, shape: ModelShape | None, d_in: int | None, adapters: int | None) -> Widths:
    if d_in is not None or adapters is not None or shape is None:
        if d_in is None or adapters is None:
            missing = "d_in" if d_in is None else "adapters"
            raise EstimateError(
                missing,
                f"the API knows the module shapes of {', '.join(BUILTIN_SHAPES)} only; for {spec.model!r} "
                "pass both d_in (the adapted modules' input width) and adapters (how many modules match)",
            )
        return Counter({(d_in, d_in): adapters})
    widths = adapter_widths(shape, spec.method.target_modules)
    if not widths:
        names = sorted({m.rsplit(".", 1)[-1] for m, _, _ in shape.modules})
        raise EstimateError(
            "method.target_modules",
            f"target_modules {spec.method.target_modules!r} match no module of {spec.model}; "
            f"its linear modules: {', '.join(names)}",
        )
    return widths


def _backend_kind(backend: str) -> str:
    return backend.split(":", 1)[0]


def _seconds(config: QAAConfig, est: Estimate, classical: tuple[float, float] | None) -> tuple[float, float] | None:
    if classical is None:
        return None
    kind = _backend_kind(config.backend)
    if kind == "exact":  # the statevector engine is part of the step time: up to 2x a LoRA step
        return classical[0], classical[1] * 2
    circuit, call = CIRCUIT_SECONDS[kind], CALL_SECONDS[kind]
    low = classical[0] + est.circuits * circuit[0] + est.primitive_calls * call[0]
    high = classical[1] + est.circuits * circuit[1] + est.primitive_calls * call[1]
    return low, high
