"""Execution engines for QAA circuits, resolved by the config's `backend` name.

Every engine is a callable `engine(z, theta) -> ||z|| * r(U(theta)|z/||z||>)` for z of shape [M, d <= 2^n],
differentiable in z and theta, so `QAALayer` never needs to know where its circuit runs.

| backend | engine |
|---|---|
| `exact` | `ExactEngine`: the torch statevector engine, autograd |
| `aer` | `CircuitEngine` + `aer.AerRunner`: Aer primitives, exact or sampled, optional device noise |
| `fake:<Name>` | `CircuitEngine` + `runtime.RuntimeRunner` on a fake IBM device, in local testing mode |
| `ibm:<name>` | `CircuitEngine` + `runtime.RuntimeRunner` on IBM Quantum hardware |

A runner is the backend side of a run: one serves every adapter of a model (`circuits.execution`), so a job
signs in once and opens one Batch or Session. Qiskit is imported only when a circuit engine is built or
backends are listed, so importing this package (and `circuits`) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from ..config import MAX_EXACT_QUBITS

if TYPE_CHECKING:
    import torch

    from ..config import QAAConfig

Engine = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class ExactEngine:
    """The PyTorch statevector engine on the input's device (`backend: exact`)."""

    def __init__(self, config: QAAConfig, n: int):
        from .exact import plan_for

        self.plan = plan_for(n, config.layers, config.entangler, config.readout)

    def __call__(self, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        from .exact import exact_expectations

        return exact_expectations(self.plan, z, theta)


def make_runner(config: QAAConfig):
    """The backend side of a run on `config.backend` (None for `exact`); unknown names and unusable backends
    raise with a message that says what is available or what to fix (an `ibm:` device signs in here)."""
    backend = config.backend
    if backend == "exact":
        return None
    if backend != "aer" and not backend.startswith(("fake:", "ibm:")):
        raise ValueError(f"unknown backend {backend!r}; available: exact, aer, fake:<FakeBackend>, ibm:<backend>")
    from .environment import environment

    env = environment()
    if backend == "aer":
        from .aer import AerRunner

        return AerRunner(config, env)
    from .runtime import RuntimeRunner

    if backend.startswith("fake:"):
        from .fake import fake_backend

        return RuntimeRunner(config, env, fake_backend(backend.removeprefix("fake:")), local=True)
    from .ibm import connect

    return RuntimeRunner(config, env, connect(backend.removeprefix("ibm:"), env), local=False)


def get_engine(config: QAAConfig, n: int, runner=None) -> Engine:
    """The engine for `config.backend` on an n-qubit register, on `runner` (a new one when None: a layer used on
    its own; a model's adapters share their run's, see `circuits.execution`)."""
    if config.backend == "exact":
        return ExactEngine(config, n)
    from .circuit_engine import CircuitEngine
    from .environment import environment

    return CircuitEngine(config, n, runner or make_runner(config), environment())


@lru_cache(maxsize=1)
def _local_backends() -> tuple[dict, ...]:
    from qiskit_aer import AerSimulator

    from .fake import fake_backend, fake_names

    aer = AerSimulator().configuration()
    rows = [
        {
            "name": "exact",
            "kind": "simulator",
            "qubits": MAX_EXACT_QUBITS,
            "basis_gates": ["ry", "rz", "cx"],
            "noise": False,
            "max_shots": None,
        },
        {
            "name": "aer",
            "kind": "simulator",
            "qubits": aer.n_qubits,
            "basis_gates": sorted(aer.basis_gates),
            "noise": "optional (noise: <FakeBackend>)",
            "max_shots": aer.max_shots,
        },
    ]
    for name in fake_names():
        rows.append(device_row(f"fake:{name}", "fake", fake_backend(name), pending_jobs=0))
    return tuple(rows)


def device_row(name: str, kind: str, backend, pending_jobs: int | None) -> dict:
    """A device as `list_backends` shows it, the same fields for fake and real ones: qubits, basis gates, shot
    limit, the median 2-qubit and readout errors of its Target (its calibration), and the jobs waiting on it."""
    from statistics import median

    conf = backend.configuration()
    target = backend.target
    two_qubit, readout = [], []
    for op in target.operation_names:
        for qargs, props in (target[op] or {}).items():
            if props is None or props.error is None or qargs is None:
                continue
            if op == "measure":
                readout.append(props.error)
            elif len(qargs) == 2:
                two_qubit.append(props.error)
    return {
        "name": name,
        "kind": kind,
        "qubits": backend.num_qubits,
        "basis_gates": sorted(conf.basis_gates),
        "noise": True,
        "max_shots": conf.max_shots,
        "median_two_qubit_error": median(two_qubit) if two_qubit else None,
        "median_readout_error": median(readout) if readout else None,
        "pending_jobs": pending_jobs,
    }


def list_backends(hardware: bool = False) -> list[dict]:
    """Name, kind (simulator/fake/hardware), qubits, basis gates, noise and shot limit of every backend; with
    `hardware`, also the IBM devices the configured token can use (a network call under a deadline)."""
    rows = [dict(row) for row in _local_backends()]
    if hardware:
        from .environment import environment
        from .ibm import list_devices

        rows += list_devices(environment())
    return rows
