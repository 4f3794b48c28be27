"""Device noise models and targets, built once per backend and cut down to the physical qubits a circuit uses.

Building a 127-qubit model from a fake backend takes seconds; the cut-down model (a handful of qubits,
renumbered like the compacted circuit) is what a run needs. Both are kept in memory; the cut-down one also on
disk. The cut-down target keeps the device's durations, which scheduling passes (dynamical decoupling) need.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

from qiskit.transpiler import Target
from qiskit_aer.noise import NoiseModel
from qiskit_aer.noise.passes import RelaxationNoisePass

#: Bumped when the cut-down model changes shape, so a cache directory never serves an older one.
_FORMAT = 2
_FULL: dict[tuple[str, str], NoiseModel] = {}
_REDUCED: dict[str, NoiseModel] = {}


def noise_model(backend, name: str, stamp: str, physical: list[int], cache_dir: Path) -> NoiseModel:
    """The noise of `backend` on `physical` qubits, renumbered 0..len-1 in that order."""
    digest = hashlib.sha256(repr((_FORMAT, name, stamp, tuple(physical))).encode()).hexdigest()[:32]
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
    for noise_pass in full._custom_noise_passes:  # from_backend's only one: thermal relaxation during delays
        if isinstance(noise_pass, RelaxationNoisePass):
            model._custom_noise_passes.append(
                RelaxationNoisePass(
                    [noise_pass._t1s[q] for q in physical],
                    [noise_pass._t2s[q] for q in physical],
                    dt=noise_pass._dt,
                    op_types=noise_pass._ops,
                    excited_state_populations=[noise_pass._p1s[q] for q in physical],
                )
            )
    return model


def compact_target(full: Target, physical: list[int]) -> Target:
    """`full` on `physical` qubits only, renumbered 0..len-1 in that order, durations and errors kept."""
    index = {q: i for i, q in enumerate(physical)}
    target = Target(
        num_qubits=len(physical),
        dt=full.dt,
        granularity=full.granularity,
        min_length=full.min_length,
        pulse_alignment=full.pulse_alignment,
        acquire_alignment=full.acquire_alignment,
    )
    for name in full.operation_names:
        properties = full[name]
        if properties is None or None in properties:  # a global instruction (control flow): on every qubit
            target.add_instruction(full.operation_from_name(name), name=name)
            continue
        kept = {tuple(index[q] for q in qargs): p for qargs, p in properties.items() if all(q in index for q in qargs)}
        target.add_instruction(full.operation_from_name(name), kept, name=name)
    return target
