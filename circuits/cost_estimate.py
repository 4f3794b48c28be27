"""Cost of a QAA job on a circuit backend, computed from the config alone (no torch, no qiskit).

The figures are the ones the engines count (`circuits.usage`), so a job can be priced and refused before it
runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .config import QAAConfig

#: IBM Quantum caps one runtime job at 10 million executions (parameter sets x shots); the runner splits there.
MAX_EXECUTIONS_PER_JOB = 10_000_000
#: Overhead of one runtime job on IBM hardware (low, high), assumed: IBM's "Workload usage" guide counts the time a
#: QPU is locked for a job, its preparation included; it publishes no figure, so the range is our assumption.
JOB_OVERHEAD_S = (2.0, 10.0)
#: QPU time per shot at least: the repetition delay of IBM's Eagle and Heron devices (their `default_rep_delay`,
#: 250 us, in the backend configuration), before any circuit time or per-job overhead.
DEFAULT_REP_DELAY_S = 250e-6


@dataclass(frozen=True)
class Estimate:
    """Per training step and in total, over all adapters. With `input_grad: shift` every adapter is assumed to
    need its input gradient, so an adapter whose input depends on nothing trainable costs less than estimated.
    `primitive_calls` counts primitive runs: one per adapter and step on Aer; on `fake:`/`ibm:` each run is a
    runtime job, and a step is split into ceil(rows / (10^7 // shots)) of them (`runtime_jobs`). `qpu_seconds`
    (device backends only) is the floor the shots alone take at the default repetition delay. `note` says what
    the figures leave out."""

    circuits_per_step: int
    circuits: int
    shots: int
    primitive_calls: int
    note: str
    qpu_seconds: float = 0.0
    runtime_jobs: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Overhead:
    """What mitigation adds on a device backend (`config.mitigation`): each parameter set runs as
    `circuits_per_row` circuits (twirling randomizations x ZNE noise factors) taking `shots_per_row` shots in all;
    each runtime job adds TREX's calibration circuits (`per_call`), each run M3's, once per qubit set
    (`per_run`). Without mitigation: one circuit of `shots` shots per parameter set, nothing else. Estimates count
    M3's calibration once per adapter shape in training and once more in evaluation, an upper bound: a run
    calibrates each qubit set once."""

    circuits_per_row: int
    shots_per_row: int
    circuits_per_call: int = 0
    shots_per_call: int = 0
    circuits_per_run: int = 0
    shots_per_run: int = 0
    jobs_per_run: int = 0


def twirl_shape(shots: int, randomizations: int | str) -> tuple[int, int]:
    """(randomizations, shots per randomization) by qiskit-ibm-runtime's rule (`calculate_twirling_shots`): with
    `auto`, max(64, ceil(shots / 32)) shots each."""
    if randomizations == "auto":
        per = max(64, -(-shots // 32))
        return -(-shots // per), per
    return int(randomizations), -(-shots // int(randomizations))


def per_row(config: QAAConfig) -> tuple[int, int]:
    """(circuits, shots) one parameter set takes on its backend: 1 and `shots` without mitigation; twirling
    runs each randomization as a circuit, ZNE each noise factor."""
    shots = config.effective_shots() or 0
    m = config.mitigation
    if m is None or not m.active:
        return 1, shots
    circuits, total = 1, shots
    if m.twirling or m.readout == "trex":
        circuits, per = twirl_shape(shots, m.randomizations)
        total = circuits * per
    if m.zne is not None:
        circuits, total = circuits * len(m.zne.noise_factors), total * len(m.zne.noise_factors)
    return circuits, total


def overhead(config: QAAConfig, n: int) -> Overhead:
    """Per-row and per-job costs of the mitigation in `config` on an n-qubit adapter (see `Overhead`)."""
    circuits, shots = per_row(config)
    m = config.mitigation
    extra = {}
    if m is not None and m.readout == "trex":  # one measurement-noise calibration item in every Estimator job
        count, per = twirl_shape(config.effective_shots() or 0, m.randomizations)
        extra.update(circuits_per_call=count, shots_per_call=count * per)
    if m is not None and m.readout == "m3":  # mthree's balanced calibration: 2^bit_length(n) circuits, 2 x shots
        count = 2 ** n.bit_length()
        extra.update(
            circuits_per_run=count,
            shots_per_run=count * -(-2 * m.calibration_shots // count),
            jobs_per_run=1,
        )
    return Overhead(circuits, shots, **extra)


def circuits_per_input(config: QAAConfig, n: int) -> int:
    """Circuits one input vector costs in a training step (forward + gradient)."""
    p = config.num_params(n)
    data = 0
    if config.input_grad == "shift":
        data = 2 * (2**n - 1) if config.embedding == "gates" else 2 * 2**n
    if config.gradient == "spsa":
        return 1 + 2 * config.spsa_samples
    return 2 * p + 1 + data


def estimate(config: QAAConfig, tokens_per_step: int, steps: int, d_in: int, adapters: int = 1) -> Estimate:
    """Predict circuits, shots and primitive calls for `steps` training steps in which each of `adapters`
    layers of width `d_in` sees `tokens_per_step` input vectors.

    Example:
        >>> cfg = QAAConfig(backend="aer", gradient="parameter-shift", layers=2, input_grad="none")
        >>> estimate(cfg, tokens_per_step=32, steps=1, d_in=64).circuits_per_step
        1952
    """
    if config.backend == "exact":
        return Estimate(0, 0, 0, 0, "the exact engine runs no circuits")
    device = config.backend.startswith(("fake:", "ibm:"))
    n = config.num_qubits(d_in)
    rows = tokens_per_step * circuits_per_input(config, n)  # one adapter's parameter sets in one step
    cost = overhead(config, n)
    calls = -(-rows // max_bindings(cost.shots_per_row)) if device else 1
    per_step = adapters * (rows * cost.circuits_per_row + calls * cost.circuits_per_call)
    shots_per_step = adapters * (rows * cost.shots_per_row + calls * cost.shots_per_call)
    shots = config.effective_shots() or 0
    notes = []
    if config.readout == "probs" and shots:
        notes.append(f"probs reads {2**n} probabilities per circuit: {shots} shots give about 1/sqrt(shots) each")
    if config.embedding == "direct":
        notes.append("embedding direct sets the ideal state: the preparation's noise is not simulated")
    if config.gradient == "spsa":
        notes.append("spsa: gradient estimates, not exact gradients")
    if config.mitigation is not None and config.mitigation.zne is not None:
        notes.append("zne: folded circuits run longer than the circuit figures show")
    jobs = adapters * steps * calls + cost.jobs_per_run
    total_shots = shots_per_step * steps + cost.shots_per_run
    return Estimate(
        circuits_per_step=per_step,
        circuits=per_step * steps + cost.circuits_per_run,
        shots=total_shots,
        primitive_calls=jobs,  # M3's calibration job included
        note="; ".join(notes),
        qpu_seconds=qpu_floor(total_shots, jobs) if device else 0.0,
        runtime_jobs=jobs if device else 0,
    )


def max_bindings(shots_per_row: int) -> int:
    """Parameter sets per runtime job: IBM's 10^7 executions, each set costing `shots_per_row` of them."""
    return max(1, MAX_EXECUTIONS_PER_JOB // max(1, shots_per_row))


def qpu_floor(executions: int, runtime_jobs: int) -> float:
    """QPU seconds that `executions` (parameter sets x shots) in `runtime_jobs` jobs take at least: the default
    repetition delay per execution and the low per-job overhead (circuit durations need the transpilation:
    `circuits.hardware.qpu_seconds` gives the range with them)."""
    return executions * DEFAULT_REP_DELAY_S + runtime_jobs * JOB_OVERHEAD_S[0]


#: Adapters by (d_in, d_out) of the module each wraps.
Widths = Mapping[tuple[int, int], int]


def estimate_widths(config: QAAConfig, tokens_per_step: int, steps: int, widths: Widths) -> Estimate:
    """`estimate` summed over adapters of several shapes: what a whole model's adapters cost."""
    parts = [estimate(config, tokens_per_step, steps, d_in=d_in, adapters=n) for (d_in, _), n in sorted(widths.items())]
    total = combined(*parts)
    if not total.note and config.backend == "exact":
        return Estimate(0, 0, 0, 0, "the exact engine runs no circuits")
    return total


def combined(*parts: Estimate) -> Estimate:
    """The sum of estimates (training and evaluation, adapters of several shapes), notes kept once."""
    notes = list(dict.fromkeys(p.note for p in parts if p.note))
    return Estimate(
        circuits_per_step=sum(p.circuits_per_step for p in parts),
        circuits=sum(p.circuits for p in parts),
        shots=sum(p.shots for p in parts),
        primitive_calls=sum(p.primitive_calls for p in parts),
        note="; ".join(notes),
        qpu_seconds=sum(p.qpu_seconds for p in parts),
        runtime_jobs=sum(p.runtime_jobs for p in parts),
    )


def forward_estimate(config: QAAConfig, widths: Widths, calls: list[int]) -> Estimate:
    """Inference only (evaluation, generation): each of `calls` runs that many input vectors through every
    adapter once, one circuit each, with no shifted rows."""
    if config.backend == "exact":
        return Estimate(0, 0, 0, 0, "the exact engine runs no circuits")
    device = config.backend.startswith(("fake:", "ibm:"))
    parts = []
    for (d_in, _), adapters in sorted(widths.items()):
        cost = overhead(config, config.num_qubits(d_in))
        limit = max_bindings(cost.shots_per_row) if device else None
        primitive = adapters * sum(-(-c // limit) if limit else 1 for c in calls if c)
        tokens = adapters * sum(calls)
        shots = tokens * cost.shots_per_row + primitive * cost.shots_per_call + cost.shots_per_run
        jobs = primitive + cost.jobs_per_run
        parts.append(
            Estimate(
                circuits_per_step=0,
                circuits=tokens * cost.circuits_per_row + primitive * cost.circuits_per_call + cost.circuits_per_run,
                shots=shots,
                primitive_calls=jobs,
                note="",
                qpu_seconds=qpu_floor(shots, jobs) if device else 0.0,
                runtime_jobs=jobs if device else 0,
            )
        )
    return combined(*parts)


def engine_state_bytes(config: QAAConfig, tokens_per_step: int, widths: Widths) -> int:
    """Memory the adapters of a step hold, an upper-bound model that servers cap (`QAA_MAX_ENGINE_STATE_MB`).

    Per adapter: its final state kept for the backward pass (tokens x 2^n complex64), its readout (tokens x k
    float32) and `Up` with its gradient and two Adam moments (4 x k x d_out float32); on circuit backends
    also its Jacobians (tokens x k x (P + D) float64) and, for the adapter being run, the values of every
    row of the step (tokens x circuits per input x k float64). Once per step: the engine's two working
    states. The compression matrix, when there is one, is the base layer's size and not counted.
    """
    total = 0
    largest = 0
    for (d_in, d_out), count in widths.items():
        n = config.num_qubits(d_in)
        dim, k = 2**n, config.num_outputs(n)
        per_adapter = tokens_per_step * dim * 8 + tokens_per_step * k * 4 + 4 * k * d_out * 4
        if config.backend != "exact":
            jacobian_columns = config.num_params(n) + (2**n - 1 if config.input_grad == "shift" else 0)
            per_adapter += tokens_per_step * k * jacobian_columns * 8
            largest = max(largest, tokens_per_step * circuits_per_input(config, n) * k * 8)
        total += count * per_adapter
        largest = max(largest, 2 * tokens_per_step * dim * 8)
    return total + largest


def check_budget(config: QAAConfig, est: Estimate) -> None:
    """Refuse a job whose estimate exceeds `max_circuits`, `max_shots` or `max_qpu_seconds`, naming the figures."""
    if config.max_circuits is not None and est.circuits > config.max_circuits:
        raise ValueError(f"estimated {est.circuits} circuits exceed max_circuits={config.max_circuits}")
    if config.max_shots is not None and est.shots > config.max_shots:
        raise ValueError(f"estimated {est.shots} shots exceed max_shots={config.max_shots}")
    if config.max_qpu_seconds is not None and est.qpu_seconds > config.max_qpu_seconds:
        raise ValueError(
            f"estimated {est.qpu_seconds:,.0f} QPU seconds at least exceed max_qpu_seconds={config.max_qpu_seconds:g}"
        )
