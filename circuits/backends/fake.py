"""`fake:<Name>`: a fake IBM backend of `qiskit_ibm_runtime.fake_provider`, run in the runtime's local testing
mode.

The circuit is transpiled for the fake device (coupling map, basis, calibrated layout), compacted to the
qubits it uses, and sampled by the runtime's (executor-based) Sampler on an Aer simulator that carries the
noise of exactly those physical qubits, with the method chosen by cost (`aer.choose_method`) and tuned
(`aer.tuned_options`). The simulator and noise model are built once per engine; with the density-matrix
method and no `primitive_options` (twirling and dynamical decoupling rewrite the circuits), each input's noisy
preparation is simulated once for all its rows (`prefix`).
"""

from __future__ import annotations

import numpy as np
from qiskit import QuantumCircuit
from qiskit_aer import AerSimulator

from ..config import QAAConfig
from ..noise_cache import noise_model
from ..template import Template
from .aer import choose_method, tuned_options
from .environment import BackendEnvironment
from .prefix import MAX_SHARED_WIDTH
from .readout import bits_to_readout


def fake_names() -> list[str]:
    from qiskit_ibm_runtime import fake_provider
    from qiskit_ibm_runtime.fake_provider.fake_backend import FakeBackendV2

    return sorted(
        name
        for name in dir(fake_provider)
        if isinstance(getattr(fake_provider, name), type)
        and issubclass(getattr(fake_provider, name), FakeBackendV2)
        and name not in {"FakeBackendV2"}
    )


def fake_backend(name: str):
    """The fake backend class `name` (e.g. FakeManilaV2) instantiated, or an error listing valid names."""
    from qiskit_ibm_runtime import fake_provider

    names = fake_names()
    if name not in names:
        raise ValueError(f"unknown fake backend {name!r}; available: {', '.join(names)}")
    return getattr(fake_provider, name)()


def calibration_stamp(backend) -> str:
    """Identifies the calibration a transpilation and noise model were made for: version and last update."""
    props = backend.properties()
    updated = props.last_update_date.isoformat() if props is not None else "none"
    return f"{getattr(backend, 'backend_version', '')}@{updated}"


class FakeRunner:
    max_bindings = None
    measured = True
    compact = True

    def __init__(self, config: QAAConfig, env: BackendEnvironment, name: str):
        self.config, self.env = config, env
        self.device = fake_backend(name)
        self.name, self.stamp = f"fake:{self.device.name}", calibration_stamp(self.device)
        self.transpile_backend = self.device
        self.shots = config.effective_shots()
        self.rng = np.random.default_rng(config.seed)
        self.sampler = self.simulator = None
        self.shares_prefix = False

    def bind(self, isa: QuantumCircuit) -> None:
        from qiskit_ibm_runtime.executor_sampler import Sampler

        model = noise_model(self.device, self.device.name, self.stamp, isa.metadata["qaa_physical"], self.env.cache_dir)
        method = self.config.method or choose_method(isa.num_qubits, self.shots, direct=False)
        tuned = tuned_options(method, False, isa.num_qubits, self.config.device)
        self.simulator = AerSimulator(noise_model=model, method=method, device=self.config.device, **tuned)
        # primitive options (twirling, dynamical decoupling) would rewrite the whole circuit, prefix included
        shareable = method == "density_matrix" and isa.num_qubits <= MAX_SHARED_WIDTH
        self.shares_prefix = shareable and not self.config.primitive_options
        self.sampler = Sampler(mode=self.simulator, options=self.config.primitive_options or None)
        self.sampler.options.default_shots = self.shots

    def run(self, pubs, template: Template, isa: QuantumCircuit) -> tuple[list[np.ndarray], float]:
        self.sampler.options.simulator.seed_simulator = int(self.rng.integers(2**31))
        result = self.sampler.run(pubs).result()
        return [bits_to_readout(r.data.meas, template) for r in result], 0.0
