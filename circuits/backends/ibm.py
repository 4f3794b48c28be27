"""`ibm:<backend>`: IBM Quantum hardware through qiskit-ibm-runtime's executor-based Sampler.

Sign-in and backend lookup run under a deadline in a daemon thread: with no token, a rejected token or no
network the engine fails at construction with a readable error, instead of retrying for minutes inside the
client.
"""

from __future__ import annotations

import threading

import numpy as np
from qiskit import QuantumCircuit

from ..config import QAAConfig
from ..template import Template
from .environment import BackendEnvironment
from .fake import calibration_stamp
from .readout import bits_to_readout

#: IBM Quantum caps one job at 10 million executions (parameter sets x shots); larger steps are split.
MAX_EXECUTIONS_PER_JOB = 10_000_000


class BackendUnavailable(RuntimeError):
    """A backend cannot be used: missing or rejected credentials, unreachable service, unknown name."""


def _with_deadline(fn, seconds: float, what: str):
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"qaa-{what}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise BackendUnavailable(f"IBM Quantum did not answer within {seconds:.0f} s ({what}); check the network")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _guarded(fn, env: BackendEnvironment, label: str):
    """Run `fn(service)` under the deadline, turning every failure into a BackendUnavailable about `label`."""
    if not env.ibm_token:
        raise BackendUnavailable(
            f"{label} needs an IBM Quantum API token: set QAA_IBM_TOKEN (and QAA_IBM_INSTANCE) for the worker"
        )

    def call():
        from qiskit_ibm_runtime import QiskitRuntimeService

        service = QiskitRuntimeService(channel="ibm_quantum_platform", token=env.ibm_token, instance=env.ibm_instance)
        return fn(service)

    try:
        return _with_deadline(call, env.connect_timeout_s, label)
    except BackendUnavailable:
        raise
    except Exception as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if any(word in text.lower() for word in ("unauthorized", "401", "403", "invalid", "api key", "token")):
            raise BackendUnavailable(f"IBM Quantum rejected the API token ({label}): {text}") from None
        raise BackendUnavailable(f"cannot reach IBM Quantum ({label}): {text}") from None


def connect(name: str, env: BackendEnvironment):
    """The IBMBackend `name`, or BackendUnavailable saying what to fix."""
    return _guarded(lambda service: service.backend(name), env, f"backend 'ibm:{name}'")


def list_devices(env: BackendEnvironment) -> list[dict]:
    """The hardware backends the configured account can use, as `list_backends` rows."""

    def rows(service):
        return [
            {
                "name": f"ibm:{b.name}",
                "kind": "hardware",
                "qubits": b.num_qubits,
                "basis_gates": sorted(b.operation_names),
                "noise": True,
                "max_shots": b.configuration().max_shots,
            }
            for b in service.backends()
        ]

    return _guarded(rows, env, "listing IBM backends")


class IbmRunner:
    measured = True
    compact = False  # hardware runs the full-width ISA circuit
    shares_prefix = False  # hardware runs every circuit whole

    def __init__(self, config: QAAConfig, env: BackendEnvironment, name: str):
        self.config = config
        self.device = connect(name, env)
        self.name, self.stamp = f"ibm:{self.device.name}", calibration_stamp(self.device)
        self.transpile_backend = self.device
        self.shots = config.effective_shots()
        self.max_bindings = MAX_EXECUTIONS_PER_JOB // self.shots
        self.mode = None
        self.sampler = None

    def bind(self, isa: QuantumCircuit) -> None:
        from qiskit_ibm_runtime import Batch, Session
        from qiskit_ibm_runtime.executor_sampler import Sampler

        mode = {"batch": Batch, "session": Session}.get(self.config.ibm_mode)
        self.mode = mode(backend=self.device) if mode else None
        self.sampler = Sampler(mode=self.mode or self.device, options=self.config.primitive_options or None)
        self.sampler.options.default_shots = self.shots

    def run(self, pubs, template: Template, isa: QuantumCircuit) -> tuple[list[np.ndarray], float]:
        job = self.sampler.run(pubs)
        result = job.result()
        try:
            seconds = float(job.usage())
        except Exception:  # usage is informative; a missing figure must not fail the step
            seconds = 0.0
        return [bits_to_readout(r.data.meas, template) for r in result], seconds

    def close(self) -> None:
        if self.mode is not None:
            self.mode.close()
