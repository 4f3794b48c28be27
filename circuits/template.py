"""The QAA circuit as one parametrized qiskit template: embedding (data angles `x`) + ansatz (`theta`) +
readout.

Both halves are rendered from gate lists (`embedding.embedding_gates`, `ansatz.ansatz_gates`), so the gate
order is spelled in one place. Qubit i of the template is bit i of the basis index, as in the exact engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import ParameterVector
from qiskit.quantum_info import SparsePauliOp

from .ansatz import Gate, ansatz_gates
from .config import QAAConfig, zz_pairs
from .embedding import embedding_gates, num_data_angles

DATA, THETA = "x", "theta"


@dataclass(frozen=True)
class Template:
    """The virtual (untranspiled) circuit and what its readout means.

    `measured`: the circuit ends in `measure_all` (sampler backends); otherwise the readout is `observables`
    (one diagonal Pauli per output, for estimators). `readout_matrix` S maps a probability vector to r = p @ S
    (None for `probs`, where r = p).
    """

    circuit: QuantumCircuit
    n: int
    data_params: int
    theta_params: int
    measured: bool
    readout: str
    key: str  # hash of the structure, part of the transpile cache key

    @property
    def observables(self) -> list[SparsePauliOp]:
        return readout_observables(self.n, self.readout)


def _render(circuit: QuantumCircuit, gates: tuple[Gate, ...] | list[Gate], params) -> None:
    for gate in gates:
        if gate.name == "cx":
            circuit.cx(*gate.qubits)
        else:
            getattr(circuit, gate.name)(params[gate.param], gate.qubits[0])


@lru_cache(maxsize=64)
def build_template(n: int, layers: int, entangler: str, readout: str, embedding: str, measured: bool) -> Template:
    """The template of one adapter shape; `embedding: direct` leaves out the preparation (state is set)."""
    ansatz = ansatz_gates(n, layers, entangler)
    prep = embedding_gates(n) if embedding == "gates" else ()
    d = num_data_angles(n) if prep else 0
    p = 2 * layers * n + n
    circuit = QuantumCircuit(n, name="qaa")
    if prep:
        _render(circuit, prep, ParameterVector(DATA, d))
    _render(circuit, ansatz, ParameterVector(THETA, p))
    if measured:
        circuit.measure_all()
    # readout is part of the key only where it changes the circuit: a sampler measures every qubit for every
    # readout
    signature = repr((n, prep, ansatz, measured, None if measured else readout))
    key = hashlib.sha256(signature.encode()).hexdigest()[:16]
    return Template(circuit, n, d, p, measured, readout, key)


def template_for(config: QAAConfig, n: int, measured: bool) -> Template:
    return build_template(n, config.layers, config.entangler, config.readout, config.embedding, measured)


def readout_observables(n: int, readout: str) -> list[SparsePauliOp]:
    """Diagonal Pauli observables giving r: Z_i (+ Z_a Z_b), or every Z-string for `probs`."""

    def z_string(qubits) -> SparsePauliOp:
        label = ["I"] * n
        for q in qubits:
            label[n - 1 - q] = "Z"
        return SparsePauliOp("".join(label))

    if readout == "probs":
        return [z_string([q for q in range(n) if (s >> q) & 1]) for s in range(2**n)]
    obs = [z_string([q]) for q in range(n)]
    if readout == "expval+zz":
        obs += [z_string(pair) for pair in zz_pairs(n)]
    return obs


def observables_to_readout(n: int, readout: str) -> np.ndarray | None:
    """C with r = evs @ C for the observables above: None (identity) except for `probs`, where the Z-string
    expectations are the Walsh transform of the probabilities: p_j = 2^-n sum_S (-1)^{|S & j|} <Z_S>."""
    if readout != "probs":
        return None
    idx = np.arange(2**n)
    parity = np.array([[bin(s & j).count("1") & 1 for j in idx] for s in idx])
    return (1.0 - 2.0 * parity) / 2**n


def readout_matrix(n: int, readout: str) -> np.ndarray | None:
    """S with r = p @ S over basis-state probabilities p (sampler backends); None for `probs`."""
    if readout == "probs":
        return None
    j = np.arange(2**n)[:, None]
    z = 1.0 - 2.0 * ((j >> np.arange(n)[None, :]) & 1)
    cols = [z]
    if readout == "expval+zz":
        cols += [z[:, [a]] * z[:, [b]] for a, b in zz_pairs(n)]
    return np.concatenate(cols, axis=1)
