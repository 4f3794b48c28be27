"""The QAA ansatz as data: the single source of the gate order, rendered by every engine.

The exact torch engine compiles this list into fused rotation layers and CNOT permutations; the qiskit template
appends the same gates one by one. Nothing else in the code base spells out the gate order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GateName = Literal["ry", "rz", "cx"]


@dataclass(frozen=True)
class Gate:
    """One gate: `qubits` are (target,) for rotations and (control, target) for CNOT; `param` indexes theta."""

    name: GateName
    qubits: tuple[int, ...]
    param: int | None = None


def entangler_pairs(n: int, entangler: str) -> list[tuple[int, int]]:
    """CNOT (control, target) pairs of one entangling block, in order."""
    if entangler == "none" or n == 1:
        return []
    if entangler == "linear" or n == 2:
        return [(i, i + 1) for i in range(n - 1)]
    if entangler == "ring":
        return [(i, (i + 1) % n) for i in range(n)]
    raise ValueError(f"unknown entangler {entangler!r}; expected ring, linear or none")


def ansatz_gates(n: int, layers: int, entangler: str) -> list[Gate]:
    """U(theta) of docs/qaa.md: per layer RY(theta[l*2n+2i]) then RZ(theta[l*2n+2i+1]) on every qubit, then the
    entangler; after the last layer RY(theta[2Ln+i]) on every qubit. P = 2Ln + n parameters."""
    gates: list[Gate] = []
    for layer in range(layers):
        base = layer * 2 * n
        for q in range(n):
            gates.append(Gate("ry", (q,), base + 2 * q))
            gates.append(Gate("rz", (q,), base + 2 * q + 1))
        gates.extend(Gate("cx", pair) for pair in entangler_pairs(n, entangler))
    final = 2 * layers * n
    gates.extend(Gate("ry", (q,), final + q) for q in range(n))
    return gates
