"""`aer`: Qiskit Aer primitives on CPU or GPU, exact expectations (`shots: null`) or sampled, optionally with
the noise model of a fake IBM backend (`noise: FakeBrisbane`)."""

from __future__ import annotations

import numpy as np
import qiskit_aer
from qiskit import QuantumCircuit
from qiskit_aer import AerSimulator
from qiskit_aer.primitives import EstimatorV2, SamplerV2

from ..accounting import Usage
from ..config import QAAConfig
from ..noise_cache import noise_model
from ..template import Template
from .environment import BackendEnvironment
from .prefix import MAX_SHARED_WIDTH
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


#: Aer updates one state with several threads only above this many (state) qubits (`statevector_parallel_threshold`).
AER_PARALLEL_STATE_QUBITS = 14


def tuned_options(method: str, exact: bool, width: int, device: str) -> dict:
    """Aer settings for QAA's many small bound circuits (measured in `benchmarks/circuit_engine.py`).

    * Exact statevector expectations bind parameters inside one multi-shot run instead of building a circuit
      per parameter set (`runtime_parameter_bind_enable`): half the simulator time, identical values. Sampled
      and density-matrix runs are not faster with it.
    * Density matrices are fused from 6 qubits on (Aer fuses widths above `fusion_threshold`; its default of 7
      leaves 6 and 7 qubits unfused): a 6-qubit noisy device circuit runs 2.4x faster fused; at 5 qubits fusion
      breaks even, below it costs more than it saves.
    * On CPU, a state too small for Aer to update with several threads (a density matrix counts double) leaves
      the other cores idle, so the parameter sets of a PUB run as parallel experiments instead
      (`max_parallel_experiments: 0`, one per core): 1.35-1.7x on 2 cores.
    """
    options: dict = {}
    if method == "density_matrix":
        options["fusion_threshold"] = 5
    if method == "statevector" and exact:
        options["runtime_parameter_bind_enable"] = True
    state_qubits = 2 * width if method == "density_matrix" else width
    if device == "CPU" and state_qubits <= AER_PARALLEL_STATE_QUBITS:
        options["max_parallel_experiments"] = 0
    return options


class AerRunner:
    """Runs PUBs on an Aer estimator (exact) or sampler (shots). Noisy runs use the compacted circuit and the
    noise of its physical qubits only. Exact noisy expectations (`noise` with `shots: null`) include gate
    noise but not readout error, which acts on measurements only; sampled runs include both. One runner serves
    every adapter of a run; its simulator and primitive are built once per ISA circuit."""

    max_bindings = None  # Aer has no job limit

    def __init__(self, config: QAAConfig, env: BackendEnvironment):
        from .fake import calibration_stamp, fake_backend

        self.config, self.env = config, env
        self.shots = config.shots
        self.circuits_per_row, self.shots_per_row = 1, config.shots or 0
        self.extra_usage = Usage()  # nothing runs outside an adapter's rows on Aer
        self.measured = config.shots is not None
        self.device = fake_backend(config.noise) if config.noise else None
        if self.device is None:
            self.name, self.stamp = "aer", f"aer-{qiskit_aer.__version__}"
            self.transpile_backend, self.compact = AerSimulator(), False
        else:
            self.name, self.stamp = f"aer+noise:{self.device.name}", calibration_stamp(self.device)
            self.transpile_backend, self.compact = self.device, True
        self.rng = np.random.default_rng(config.seed)
        self._bound: dict[int, tuple[QuantumCircuit, AerSimulator, object, bool]] = {}  # id(isa) -> state

    def bind(self, isa: QuantumCircuit) -> None:
        if id(isa) in self._bound:
            return
        direct = self.config.embedding == "direct"
        options: dict = {"device": self.config.device}
        if self.device is not None:
            options["noise_model"] = noise_model(
                self.device, self.device.name, self.stamp, isa.metadata["qaa_physical"], self.env.cache_dir
            )
            options["method"] = self.config.aer_method or choose_method(isa.num_qubits, self.shots, direct)
        else:
            options["method"] = self.config.aer_method or "statevector"
        exact = not self.measured and self.device is None
        options |= tuned_options(options["method"], exact, isa.num_qubits, self.config.device)
        simulator = AerSimulator(**options)
        shares = options["method"] == "density_matrix" and isa.num_qubits <= MAX_SHARED_WIDTH
        if self.measured:
            primitive = SamplerV2.from_backend(simulator, default_shots=self.shots)
        else:
            primitive = EstimatorV2.from_backend(simulator, options={"default_precision": 0.0})
        self._bound[id(isa)] = (isa, simulator, primitive, shares)

    def shares_prefix(self, isa: QuantumCircuit) -> bool:
        return self._bound[id(isa)][3]

    def simulator(self, isa: QuantumCircuit) -> AerSimulator:
        return self._bound[id(isa)][1]

    def run(self, pubs, template: Template, isa: QuantumCircuit) -> tuple[list[np.ndarray], float]:
        primitive = self._bound[id(isa)][2]
        primitive.options.run_options["seed_simulator"] = int(self.rng.integers(2**31))
        if self.measured:
            result = primitive.run(pubs).result()
            return [bits_to_readout(r.data.meas, template) for r in result], 0.0
        result = primitive.run([estimator_pub(template, isa, c, p) for c, p in pubs]).result()
        return [evs_to_readout(r.data.evs, template) for r in result], 0.0

    def cancel(self) -> None:
        """Aer runs in this process and finishes the call in flight; there is nothing remote to cancel."""

    def close(self) -> None:
        self._bound.clear()
