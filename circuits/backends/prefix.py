"""One noisy preparation per input for density-matrix runs (`fake:` and `aer` with `noise`, `embedding: gates`).

The 2P + 1 parameter-shift rows of an input differ only in theta. Every gate of the ISA circuit that no theta
gate (or measurement) precedes on its qubits, which is most of the embedding tree and the routing around it,
acts identically in all of them, noise included. A density-matrix simulation is deterministic, so that prefix
runs once per input, saving its density matrix, and each row runs only the rest of the same ISA circuit from it:
the same channel, so the same output distribution sampled with the same shots, for a fraction of the gates.
Nothing is approximated (the tests compare the probabilities of both ways to 1e-12); only the order of gates on
disjoint qubits changes, and noise acts locally on each gate's qubits. On FakeBrisbane at n = 6 a row runs 418 of
the 1,285 ISA gates. Rows alone with their input (data-angle shifts, SPSA, a forward pass without gradients)
run the whole circuit; hardware, twirled and statevector-trajectory runs never share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import Gate
from qiskit_aer.library import SetDensityMatrix

#: Widest register whose density matrices are shared: each bound row carries a copy (16 * 4^w bytes, 1 MiB at 8).
MAX_SHARED_WIDTH = 8

_LABEL = "qaa_prefix"


@dataclass(frozen=True)
class PrefixSplit:
    """The ISA circuit cut into a theta-free `prefix` (ending in a density-matrix save) and the `suffix`.

    `prefix_columns` / `suffix_columns` select each part's parameters from a row in ISA parameter order.
    """

    prefix: QuantumCircuit
    suffix: QuantumCircuit
    prefix_columns: np.ndarray
    suffix_columns: np.ndarray

    def start_from(self, rho: np.ndarray) -> QuantumCircuit:
        """The suffix run from density matrix `rho` (the prefix's output for one input)."""
        circuit = self.suffix.copy_empty_like()
        circuit.append(SetDensityMatrix(rho), circuit.qubits)
        return circuit.compose(self.suffix)


def split_prefix(isa: QuantumCircuit, late_parameter: str) -> PrefixSplit | None:
    """Cut `isa` before the first gate on each qubit that depends on a parameter named `late_parameter[...]`,
    follows such a gate on a shared qubit, or is not a unitary gate (measurement, barrier, delay). None when
    the prefix would hold no parameter: then nothing differs between inputs' preparations worth sharing."""
    late: set[int] = set()
    prefix, suffix = isa.copy_empty_like(), isa.copy_empty_like()
    for inst in isa.data:
        qubits = {isa.find_bit(q).index for q in inst.qubits}
        names = {p.name for value in inst.operation.params for p in getattr(value, "parameters", ())}
        if (
            qubits & late
            or inst.clbits
            or not isinstance(inst.operation, Gate)
            or any(name.startswith(f"{late_parameter}[") for name in names)
        ):
            late |= qubits
            suffix.append(inst)
        else:
            prefix.append(inst)
    if not prefix.parameters:
        return None
    prefix.save_density_matrix(label=_LABEL)
    position = {p.name: i for i, p in enumerate(isa.parameters)}
    return PrefixSplit(
        prefix,
        suffix,
        np.array([position[p.name] for p in prefix.parameters], dtype=np.int64),
        np.array([position[p.name] for p in suffix.parameters], dtype=np.int64),
    )


def prefix_states(simulator, split: PrefixSplit, rows: np.ndarray) -> list[np.ndarray]:
    """The prefix's density matrix for each row of ISA-ordered parameters [S, ...], from one simulator run."""
    values = rows[:, split.prefix_columns]
    binds = {p: values[:, j] for j, p in enumerate(split.prefix.parameters)}
    result = simulator.run(split.prefix, parameter_binds=[binds], shots=1).result()
    return [np.asarray(result.data(i)[_LABEL]) for i in range(len(rows))]
