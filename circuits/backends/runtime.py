"""`fake:<Name>` and `ibm:<name>`: one runner for IBM devices, fake or real, through qiskit-ibm-runtime.

The same lines run both: the executor-based `Sampler` of the pinned runtime, one execution mode per run (a
`Batch`, a `Session` or plain jobs, `ibm_mode`), steps split into runtime jobs at the device's limit of 10
million executions (parameter sets x shots) per job, each job polled to its end under `job_timeout_s`,
retried once if it fails (its circuits counted once), its id kept for the user (IBM's console finds it), its
reported usage added up, and every job still in flight cancelled when the run is cancelled. Only the backend
object differs: a `QiskitRuntimeService` backend on hardware; a fake backend in the runtime's local testing mode.

Local execution has two speed-ups of its own, both exact: the primitive runs on an Aer simulator carrying the
noise of only the physical qubits the circuit uses (the circuit is compacted to them), with the method chosen
by cost; and with the density-matrix method and no runtime options that rewrite circuits, each input's noisy
preparation is simulated once for all its rows (`prefix`). Local jobs report no QPU time (there is none).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from qiskit import QuantumCircuit

from ..accounting import Usage
from ..config import QAAConfig
from ..cost_estimate import max_bindings, overhead, per_row
from ..execution import ExecutionCancelled, RuntimeJobFailed, RuntimeJobTimeout
from ..mitigation import M3Readout, estimator_options, estimator_pubs, sampler_options, unmeasured
from ..template import Template
from .environment import BackendEnvironment
from .readout import bits_to_readout, evs_to_readout

#: Poll interval for a runtime job's state: starts short (local jobs take milliseconds), grows to the cap.
POLL_FIRST_S, POLL_MAX_LOCAL_S, POLL_MAX_REMOTE_S = 0.002, 0.05, 2.0
#: A failed runtime job is submitted once more before the step fails.
RETRIES = 1


@dataclass
class _Local:
    """The local execution of one ISA circuit: a compact simulator with the noise of its physical qubits."""

    simulator: object
    shares_prefix: bool


class RuntimeRunner:
    """Runs PUBs of ISA circuits on `device` (a fake backend when `local`, else an IBM backend)."""

    measured = True  # devices sample

    def __init__(self, config: QAAConfig, env: BackendEnvironment, device, *, local: bool):
        from .fake import calibration_stamp

        self.config, self.env, self.device, self.local = config, env, device, local
        self.name = f"{'fake' if local else 'ibm'}:{device.name}"
        self.stamp = calibration_stamp(device)
        self.transpile_backend = device
        self.compact = local  # a simulator needs only the used qubits; hardware runs the full-width ISA circuit
        self.shots = config.effective_shots()
        self.mitigation = config.mitigation if config.mitigation is not None and config.mitigation.active else None
        self.estimator = self.mitigation is not None and self.mitigation.estimator
        self.m3 = None
        if self.mitigation is not None and self.mitigation.readout == "m3":
            self.m3 = M3Readout(self.mitigation.calibration_shots)
        self.circuits_per_row, self.shots_per_row = per_row(config)
        self.max_bindings = max_bindings(self.shots_per_row)  # 10^7 executions per runtime job
        self.extra_usage = Usage()  # calibration circuits (TREX per job, M3 per qubit set): the run's, no adapter's
        self._unmeasured: dict[int, QuantumCircuit] = {}
        self.rng = np.random.default_rng(config.seed)
        self.job_ids: list[str] = []
        self.retries = 0
        self.modes_opened = self.modes_closed = 0
        self._modes: dict[int, object] = {}  # id(target) -> its Batch / Session (absent in job mode)
        self._targets: dict[int, object] = {}
        self._local: dict[int, tuple[QuantumCircuit, _Local]] = {}  # id(isa) -> (isa, its local execution)
        self._inflight: set = set()
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    # --- binding --------------------------------------------------------------------------------------------

    def bind(self, isa: QuantumCircuit) -> None:
        """Prepare to run `isa`: locally, its simulator (built once per ISA circuit)."""
        if not self.local or id(isa) in self._local:
            return
        from ..noise_cache import compact_target, noise_model
        from .aer import choose_method, tuned_options
        from .prefix import MAX_SHARED_WIDTH

        physical = isa.metadata["qaa_physical"]
        model = noise_model(self.device, self.device.name, self.stamp, physical, self.env.cache_dir)
        method = self.config.aer_method or choose_method(isa.num_qubits, self.shots, direct=False)
        tuned = tuned_options(method, False, isa.num_qubits, self.config.device)
        target = compact_target(self.device.target, physical)  # the durations the primitives' scheduling needs
        simulator = self.local_simulator(
            noise_model=model, target=target, method=method, device=self.config.device, **tuned
        )
        # runtime options (twirling, dynamical decoupling) rewrite the whole circuit, the prefix included
        shares = (
            method == "density_matrix"
            and isa.num_qubits <= MAX_SHARED_WIDTH
            and not self.config.primitive_options
            and self.mitigation is None
        )
        self._local[id(isa)] = (isa, _Local(simulator, shares))

    def local_simulator(self, **options):
        """The Aer simulator a local run executes on (a subclass may wrap it, e.g. to inject faults)."""
        from qiskit_aer import AerSimulator

        return AerSimulator(**options)

    def shares_prefix(self, isa: QuantumCircuit) -> bool:
        return self.local and self._local[id(isa)][1].shares_prefix

    def simulator(self, isa: QuantumCircuit):
        """The local simulator of `isa` (for the shared noisy preparation)."""
        return self._local[id(isa)][1].simulator

    def _target(self, isa: QuantumCircuit):
        return self._local[id(isa)][1].simulator if self.local else self.device

    def _mode(self, target):
        """The run's execution mode on `target`, opened on first use: one Batch or Session per run."""
        with self._lock:
            key = id(target)
            if key in self._targets:
                return self._modes.get(key, target)
            self._targets[key] = target
            kind = self.config.ibm_mode
            if kind == "job":
                return target
            from qiskit_ibm_runtime import Batch, Session

            mode = (Batch if kind == "batch" else Session)(backend=target)
            self._modes[key] = mode
            self.modes_opened += 1
            return mode

    # --- running --------------------------------------------------------------------------------------------

    def run(self, pubs, template: Template, isa: QuantumCircuit) -> tuple[list[np.ndarray], float]:
        """Readout of every PUB from one runtime job (retried once if it fails), and its reported QPU seconds:
        the Sampler's counts (M3-corrected with `readout: m3`), or with Estimator mitigation its expectations."""
        if self._cancelled.is_set():
            raise ExecutionCancelled("the run was cancelled")
        primitive = self._estimator(isa) if self.estimator else self._sampler(isa)
        if self.local:
            primitive.options.simulator.seed_simulator = int(self.rng.integers(2**31))
        if self.estimator:
            pubs = estimator_pubs(pubs, template, isa, self._unmeasured_of(isa))
        for attempt in range(RETRIES + 1):
            job = primitive.run(pubs)
            self.job_ids.append(job.job_id())
            try:
                result = self._wait(job)
                break
            except RuntimeJobFailed:
                if attempt == RETRIES:
                    raise
                self.retries += 1
        cost = overhead(self.config, template.n)
        self.extra_usage.circuits += cost.circuits_per_call
        self.extra_usage.shots += cost.shots_per_call
        return self._readout(result, template, isa), _usage_seconds(job)

    def _sampler(self, isa: QuantumCircuit):
        from qiskit_ibm_runtime.executor_sampler import Sampler

        options = sampler_options(self.mitigation, self.config.primitive_options)
        sampler = Sampler(mode=self._mode(self._target(isa)), options=options)
        sampler.options.default_shots = self.shots
        return sampler

    def _estimator(self, isa: QuantumCircuit):
        from qiskit_ibm_runtime.executor_estimator import Estimator

        options = estimator_options(self.mitigation, self.config.primitive_options)
        estimator = Estimator(mode=self._mode(self._target(isa)), options=options)
        estimator.options.default_shots = self.shots
        return estimator

    def _readout(self, result, template: Template, isa: QuantumCircuit) -> list[np.ndarray]:
        if self.estimator:
            # an extrapolation can leave [-1, 1] (or diverge); a Pauli expectation cannot: clipped to its range
            evs = [np.clip(np.nan_to_num(np.asarray(r.data.evs), nan=0.0), -1.0, 1.0) for r in result]
            return [evs_to_readout(e, template) for e in evs]
        if self.m3 is None:
            return [bits_to_readout(r.data.meas, template) for r in result]
        target = self._target(isa)
        before = self.m3.calibrations
        mit, mapping = self.m3.calibration(target, isa, runtime_mode=self._modes.get(id(target)))
        if self.m3.calibrations > before:  # priced as `Overhead.*_per_run`: counted where it happened
            cost = overhead(self.config, template.n)
            self.extra_usage.circuits += cost.circuits_per_run
            self.extra_usage.shots += cost.shots_per_run
            self.extra_usage.primitive_calls += cost.jobs_per_run
        return [self.m3.correct(mit, mapping, r.data.meas, template) for r in result]

    def _unmeasured_of(self, isa: QuantumCircuit) -> QuantumCircuit:
        if id(isa) not in self._unmeasured:
            self._unmeasured[id(isa)] = unmeasured(isa)
        return self._unmeasured[id(isa)]

    def _wait(self, job):
        """Poll `job` to its end; cancel it on a timeout or a cancelled run."""
        with self._lock:
            self._inflight.add(job)
        try:
            limit = self.config.job_timeout_s
            deadline = None if limit is None else time.monotonic() + limit
            delay, cap = POLL_FIRST_S, (POLL_MAX_LOCAL_S if self.local else POLL_MAX_REMOTE_S)
            while not job.in_final_state():  # done, failed or cancelled
                if self._cancelled.is_set():
                    _cancel(job)
                    raise ExecutionCancelled(f"runtime job {job.job_id()} cancelled with the run")
                if deadline is not None and time.monotonic() > deadline:
                    _cancel(job)
                    raise RuntimeJobTimeout(
                        f"runtime job {job.job_id()} ran past quantum.job_timeout_s={limit:g} s on {self.name} "
                        "and was cancelled"
                    )
                time.sleep(delay)
                delay = min(2 * delay, cap)
            try:
                return job.result()
            except Exception as exc:  # the device or the simulator failed this job: retried once by `run`
                text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
                raise RuntimeJobFailed(f"runtime job {job.job_id()} on {self.name} failed: {text}") from exc
        finally:
            with self._lock:
                self._inflight.discard(job)

    def cancel(self) -> None:
        """Cancel every runtime job in flight and refuse new ones; safe from any thread."""
        self._cancelled.set()
        with self._lock:
            jobs = list(self._inflight)
        for job in jobs:
            _cancel(job)

    def close(self) -> None:
        """Close the run's Batch or Session (queued jobs of a cancelled run are cancelled by `cancel`)."""
        with self._lock:
            modes, self._modes, self._targets = list(self._modes.values()), {}, {}
        for mode in modes:
            try:
                mode.close()
            finally:
                self.modes_closed += 1


def _cancel(job) -> None:
    try:
        job.cancel()
    except Exception:  # a job that just ended cannot be cancelled; nothing is left to stop
        pass


def _usage_seconds(job) -> float:
    try:
        return float(job.usage() or 0.0)
    except Exception:  # usage is informative; a missing figure must not fail the step
        return 0.0
