"""`aer`: Qiskit Aer primitives on CPU or GPU, exact expectations (`shots: null`) or sampled, optionally with
the noise model of a fake IBM backend (`noise: FakeBrisbane`)."""

from __future__ import annotations

import numpy as np
import qiskit_aer
from qiskit import QuantumCircuit
from qiskit_aer import AerSimulator
from qiskit_aer.primitives import EstimatorV2, SamplerV2

from ..config import QAAConfig
from ..noise_cache import noise_model
from ..template import Template
from .environment import BackendEnvironment
from .readout import bits_to_readout, estimator_pub, evs_to_readout


def choose_method(width: int, shots: int | None, direct: bool) -> str:
    """The cheapest exact-enough method for a noisy run: one density-matrix pass (4^w) beats `shots`
    statevector trajectories (shots * 2^w) when 2^w <= shots; exact expectations need the density matrix; a
    directly set state needs the statevector method."""
    if direct:
        return "statevector"
    if shots is None or (2**width <= shots and width <= 12):
        return "density_matrix"
    return "statevector"


class AerRunner:
    """Runs PUBs on an Aer estimator (exact) or sampler (shots). Noisy runs use the compacted circuit and the
    noise of its physical qubits only. Exact noisy expectations (`noise` with `shots: null`) include gate
    noise but not readout error, which acts on measurements only; sampled runs include both."""

    max_bindings = None  # Aer has no job limit

    def __init__(self, config: QAAConfig, env: BackendEnvironment):
        from .fake import calibration_stamp, fake_backend

        self.config, self.env = config, env
        self.shots = config.shots
        self.measured = config.shots is not None
        self.device = fake_backend(config.noise) if config.noise else None
        if self.device is None:
            self.name, self.stamp = "aer", f"aer-{qiskit_aer.__version__}"
            self.transpile_backend, self.compact = AerSimulator(), False
        else:
            self.name, self.stamp = f"aer+noise:{self.device.name}", calibration_stamp(self.device)
            self.transpile_backend, self.compact = self.device, True
        self.rng = np.random.default_rng(config.seed)
        self.primitive = None

    def bind(self, isa: QuantumCircuit) -> None:
        direct = self.config.embedding == "direct"
        options: dict = {"device": self.config.device}
        if self.device is not None:
            options["noise_model"] = noise_model(
                self.device, self.device.name, self.stamp, isa.metadata["qaa_physical"], self.env.cache_dir
            )
            options["method"] = self.config.method or choose_method(isa.num_qubits, self.shots, direct)
        else:
            options["method"] = self.config.method or "statevector"
        if self.measured:
            self.primitive = SamplerV2(default_shots=self.shots, options={"backend_options": options})
        else:
            self.primitive = EstimatorV2(options={"backend_options": options, "default_precision": 0.0})

    def run(self, pubs, template: Template, isa: QuantumCircuit) -> tuple[list[np.ndarray], float]:
        self.primitive.options.run_options["seed_simulator"] = int(self.rng.integers(2**31))
        if self.measured:
            result = self.primitive.run(pubs).result()
            return [bits_to_readout(r.data.meas, template) for r in result], 0.0
        result = self.primitive.run([estimator_pub(template, isa, c, p) for c, p in pubs]).result()
        return [evs_to_readout(r.data.evs, template) for r in result], 0.0
