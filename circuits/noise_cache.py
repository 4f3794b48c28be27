"""Device noise models, built once per backend and cut down to the physical qubits a circuit uses.

Building a 127-qubit model from a fake backend takes seconds; the cut-down model (a handful of qubits,
renumbered like the compacted circuit) is what a run needs. Both are kept in memory; the cut-down one also on
disk.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

from qiskit_aer.noise import NoiseModel

_FULL: dict[tuple[str, str], NoiseModel] = {}
_REDUCED: dict[str, NoiseModel] = {}


def noise_model(backend, name: str, stamp: str, physical: list[int], cache_dir: Path) -> NoiseModel:
    """The noise of `backend` on `physical` qubits, renumbered 0..len-1 in that order."""
    digest = hashlib.sha256(repr((name, stamp, tuple(physical))).encode()).hexdigest()[:32]
    if digest in _REDUCED:
        return _REDUCED[digest]
    path = Path(cache_dir) / "noise" / f"{digest}.pkl"
    if path.exists():  # our own cache directory, written below
        model = pickle.loads(path.read_bytes())
    else:
        if (name, stamp) not in _FULL:
            _FULL[(name, stamp)] = NoiseModel.from_backend(backend)
        model = _restrict(_FULL[(name, stamp)], physical)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(model))
    _REDUCED[digest] = model
    return model


def _restrict(full: NoiseModel, physical: list[int]) -> NoiseModel:
    # NoiseModel has no public "restrict to qubits"; its error tables are read directly (stable since Aer
    # 0.7).
    index = {q: i for i, q in enumerate(physical)}
    model = NoiseModel(basis_gates=full.basis_gates)
    for instr, errors in full._default_quantum_errors.items():
        model.add_all_qubit_quantum_error(errors, instr)
    for instr, by_qubits in full._local_quantum_errors.items():
        for qubits, error in by_qubits.items():
            if all(q in index for q in qubits):
                model.add_quantum_error(error, instr, [index[q] for q in qubits])
    if full._default_readout_error is not None:
        model.add_all_qubit_readout_error(full._default_readout_error)
    for qubits, error in full._local_readout_errors.items():
        if all(q in index for q in qubits):
            model.add_readout_error(error, [index[q] for q in qubits])
    return model
