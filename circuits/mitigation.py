"""Error mitigation on the runtime path (`fake:`, `ibm:`), by the field's implementations.

`readout: trex`, `twirling` and `zne` become options of qiskit-ibm-runtime's executor-based Estimator, which
twirls, folds gates and post-processes on the client: the same code acts on a fake backend in local testing mode
and on a device (the runtime's server-side options would be ignored locally). `readout: m3` keeps the Sampler and
corrects each parameter set's counts with mthree, calibrated once per run and qubit set on the backend the
circuit runs on (locally the compact simulator, which carries the noise of the circuit's physical qubits).
`dynamical_decoupling` is either primitive's client-side pass, scheduled with the durations of the physical
qubits (locally the compact simulator's target carries them, and its noise model relaxes the qubits during the
delays). The costs are priced from the same config in `cost_estimate.overhead`.
"""

from __future__ import annotations

import threading

import numpy as np
from qiskit import QuantumCircuit

from .config import Mitigation
from .template import Template, readout_matrix


def estimator_options(mitigation: Mitigation, primitive_options: dict) -> dict:
    """EstimatorOptions (as a dict) for `mitigation`, over the spec's pass-through `primitive_options`."""
    options = dict(primitive_options)
    twirl_measure = mitigation.readout == "trex"
    resilience: dict = {"measure_mitigation": twirl_measure, "zne_mitigation": mitigation.zne is not None}
    if mitigation.zne is not None:
        resilience["zne"] = {
            "noise_factors": list(mitigation.zne.noise_factors),
            "extrapolator": mitigation.zne.extrapolator,
        }
    _decouple(options, mitigation)
    options.update(
        resilience_level=0,
        resilience=resilience,
        twirling={
            **options.get("twirling", {}),
            "enable_gates": mitigation.twirling,
            "enable_measure": twirl_measure,
            "num_randomizations": mitigation.randomizations,
        },
    )
    return options


def sampler_options(mitigation: Mitigation | None, primitive_options: dict) -> dict | None:
    """SamplerOptions for the Sampler path: with `m3` and `twirling`, the gates are twirled (not the measurements,
    whose errors M3's calibration describes untwirled)."""
    options = dict(primitive_options)
    if mitigation is not None and mitigation.twirling:
        options["twirling"] = {
            **options.get("twirling", {}),
            "enable_gates": True,
            "enable_measure": False,
            "num_randomizations": mitigation.randomizations,
        }
    if mitigation is not None:
        _decouple(options, mitigation)
    return options or None


def _decouple(options: dict, mitigation: Mitigation) -> None:
    """Dynamical decoupling, applied by either primitive's client-side pass (it needs the target's durations)."""
    if mitigation.dynamical_decoupling != "none":
        options["dynamical_decoupling"] = {"enable": True, "sequence_type": mitigation.dynamical_decoupling}


def unmeasured(isa: QuantumCircuit) -> QuantumCircuit:
    """The ISA circuit without its final measurements (an Estimator PUB), keeping its layout metadata."""
    circuit = isa.remove_final_measurements(inplace=False)
    circuit.metadata = dict(isa.metadata)
    return circuit


def estimator_pubs(pubs, template: Template, isa: QuantumCircuit, circuit: QuantumCircuit) -> list:
    """Sampler PUBs (ISA circuit, params [B, P]) as Estimator PUBs on `circuit` (the ISA circuit unmeasured): one
    diagonal observable per readout component, as Aer's Estimator gets them."""
    from .backends.readout import estimator_pub

    return [estimator_pub(template, isa, circuit, params) for _, params in pubs]


class M3Readout:
    """mthree's readout correction for one run: one balanced calibration per (backend, physical qubits)."""

    def __init__(self, calibration_shots: int):
        self.calibration_shots = calibration_shots
        self._calibrated: dict[tuple, tuple[object, dict]] = {}
        self._lock = threading.Lock()
        self.calibrations = 0

    def calibration(self, system, isa: QuantumCircuit, runtime_mode=None):
        """(M3Mitigation, clbit -> physical qubit) for `isa` on `system`, calibrated on first use."""
        import mthree
        from mthree.utils import final_measurement_mapping

        mapping = final_measurement_mapping(isa)
        key = (id(system), tuple(sorted(mapping.items())))
        with self._lock:
            if key not in self._calibrated:
                mit = mthree.M3Mitigation(system)
                mit.cals_from_system(
                    qubits=sorted(set(mapping.values())),
                    shots=self.calibration_shots,
                    method="balanced",
                    async_cal=False,
                    runtime_mode=runtime_mode,
                )
                self._calibrated[key] = (mit, mapping)
                self.calibrations += 1
            return self._calibrated[key]

    def correct(self, mit, mapping: dict, bits, template: Template) -> np.ndarray:
        """BitArray [B] of the `meas` register to mitigated readout r [B, k]: each set's counts through M3's
        quasi-probabilities (unbiased, may be slightly negative), then the readout matrix."""
        n = template.n
        counts = [bits[i].get_counts() for i in range(bits.shape[0])]
        quasis = mit.apply_correction(counts, [mapping] * len(counts))
        probs = np.zeros((len(counts), 2**n))
        for row, quasi in enumerate(quasis):
            for key, value in quasi.items():
                probs[row, int(key, 2)] = value
        s = readout_matrix(n, template.readout)
        return probs if s is None else probs @ s
