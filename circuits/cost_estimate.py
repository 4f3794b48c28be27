"""Cost of a QAA job on a circuit backend, computed from the config alone (no torch, no qiskit).

The figures are the ones the engines count (`circuits.usage`), so a job can be priced and refused before it
runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import QAAConfig


@dataclass(frozen=True)
class Estimate:
    """Per training step and in total, over all adapters. With `input_grad: shift` every adapter is assumed to
    need its input gradient, so an adapter whose input depends on nothing trainable costs less than estimated.
    `primitive_calls` is a lower bound on `ibm:` backends, which split a step where the backend's job limits
    force it. `note` says what the figures leave out."""

    circuits_per_step: int
    circuits: int
    shots: int
    primitive_calls: int
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


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
    n = config.num_qubits(d_in)
    per_step = adapters * tokens_per_step * circuits_per_input(config, n)
    shots = config.effective_shots() or 0
    notes = []
    if config.readout == "probs" and shots:
        notes.append(f"probs reads {2**n} probabilities per circuit: {shots} shots give about 1/sqrt(shots) each")
    if config.embedding == "direct":
        notes.append("embedding direct sets the ideal state: the preparation's noise is not simulated")
    if config.gradient == "spsa":
        notes.append("spsa: gradient estimates, not exact gradients")
    return Estimate(
        circuits_per_step=per_step,
        circuits=per_step * steps,
        shots=per_step * steps * shots,
        primitive_calls=adapters * steps,
        note="; ".join(notes),
    )


def check_budget(config: QAAConfig, est: Estimate) -> None:
    """Refuse a job whose estimate exceeds `max_circuits` or `max_shots`, naming the figures."""
    if config.max_circuits is not None and est.circuits > config.max_circuits:
        raise ValueError(f"estimated {est.circuits} circuits exceed max_circuits={config.max_circuits}")
    if config.max_shots is not None and est.shots > config.max_shots:
        raise ValueError(f"estimated {est.shots} shots exceed max_shots={config.max_shots}")
