"""Transpile a template once per key, keep it in memory and on disk (QPY), so a second layer or process reuses
it.

Key: backend name, calibration stamp, template hash, optimization level, seed (and whether the circuit is
compacted to its active qubits). The ISA circuit carries in `metadata` where each virtual qubit starts
(`qaa_initial`) and ends (`qaa_final`) and which physical qubits it uses (`qaa_physical`), so nothing else
needs the layout object.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from qiskit import QuantumCircuit, qpy
from qiskit.transpiler.preset_passmanagers import generate_preset_pass_manager


@dataclass(frozen=True)
class TranspileKey:
    backend: str
    stamp: str
    template: str
    optimization_level: int
    seed: int
    compact: bool

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:32]


class TranspileCache:
    """Memory (process-wide) in front of a QPY directory; `get` says whether it transpiled."""

    _memory: ClassVar[dict[str, QuantumCircuit]] = {}

    def __init__(self, directory: Path):
        self.directory = Path(directory) / "transpile"

    def get(self, key: TranspileKey, circuit: QuantumCircuit, target_backend) -> tuple[QuantumCircuit, bool]:
        """(ISA circuit, hit). On a miss: preset pass manager at the key's level and seed, then stored."""
        digest = key.digest()
        if digest in self._memory:
            return self._memory[digest], True
        path = self.directory / f"{digest}.qpy"
        if path.exists():
            with path.open("rb") as fh:
                isa = qpy.load(fh)[0]
            self._memory[digest] = isa
            return isa, True
        isa = transpile(circuit, target_backend, key.optimization_level, key.seed, key.compact)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            qpy.dump(isa, fh)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        self._memory[digest] = isa
        return isa, False


def transpile(circuit: QuantumCircuit, backend, optimization_level: int, seed: int, compact: bool) -> QuantumCircuit:
    pm = generate_preset_pass_manager(optimization_level=optimization_level, backend=backend, seed_transpiler=seed)
    isa = pm.run(circuit)
    n = circuit.num_qubits
    initial = isa.layout.initial_index_layout()[:n] if isa.layout else list(range(n))
    final = isa.layout.final_index_layout() if isa.layout else list(range(n))
    physical = list(range(isa.num_qubits))
    if compact:
        isa, physical = _compact(isa)
        index = {q: i for i, q in enumerate(physical)}
        initial, final = [index[q] for q in initial], [index[q] for q in final]
    isa.metadata = {"qaa_initial": initial, "qaa_final": final, "qaa_physical": physical}
    return isa


def _compact(isa: QuantumCircuit) -> tuple[QuantumCircuit, list[int]]:
    """The same circuit on only the qubits it touches: a 6-qubit circuit laid out on a 127-qubit device
    simulates as 6 qubits, with the noise of those physical qubits."""
    active = sorted({isa.find_bit(q).index for inst in isa.data for q in inst.qubits})
    index = {q: i for i, q in enumerate(active)}
    out = QuantumCircuit(len(active), name=isa.name, global_phase=isa.global_phase)
    for creg in isa.cregs:
        out.add_register(creg)
    for inst in isa.data:
        qubits = [out.qubits[index[isa.find_bit(q).index]] for q in inst.qubits]
        clbits = [out.clbits[isa.find_bit(c).index] for c in inst.clbits]
        out.append(inst.operation, qubits, clbits)
    return out, active
