"""Primitive results to readout values r, for both primitive kinds.

Estimators get one diagonal Pauli per readout component (or every Z-string for `probs`), laid out on the ISA
circuit's final qubits. Samplers measure every qubit once per parameter set; all components come from the same
shots, as a histogram times the readout matrix.
"""

from __future__ import annotations

import numpy as np
from qiskit import QuantumCircuit

from ..template import Template, observables_to_readout, readout_matrix


def estimator_pub(template: Template, isa: QuantumCircuit, circuit: QuantumCircuit, params: np.ndarray):
    """(circuit, observables [1, k'], params [B, 1, ...]): the PUB broadcasts to [B, k']."""
    final = isa.metadata["qaa_final"]
    obs = [o.apply_layout(final, isa.num_qubits) for o in template.observables]
    return circuit, [obs], params[:, None, :]


def evs_to_readout(evs: np.ndarray, template: Template) -> np.ndarray:
    c = observables_to_readout(template.n, template.readout)
    return evs if c is None else evs @ c


def bits_to_readout(bits, template: Template) -> np.ndarray:
    """BitArray [B] of the `meas` register (bit i = virtual qubit i) to r [B, k]."""
    n = template.n
    raw = bits.array  # [B, shots, bytes], big-endian bytes
    ints = np.zeros(raw.shape[:2], dtype=np.int64)
    for b in range(raw.shape[-1]):
        ints = (ints << 8) | raw[..., b]
    rows, shots = ints.shape
    flat = (ints + (np.arange(rows) * 2**n)[:, None]).ravel()
    probs = np.bincount(flat, minlength=rows * 2**n).reshape(rows, 2**n) / shots
    s = readout_matrix(n, template.readout)
    return probs if s is None else probs @ s
