"""What a QAA circuit costs and risks on a device, read off the transpilation the job itself will use.

`circuit_figures(config, n)` transpiles the adapter's template through the per-backend cache under the very key
the run's engines use (so an estimate transpiles for the job, and a second estimate or the job transpiles
nothing), then reads, from the backend's Target: the ISA circuit's 2-qubit gates, depth, duration (a
longest-path schedule of the Target's instruction durations) and the physical qubits the layout chose, with
their readout and 2-qubit errors; and its estimated success probability (ESP): the product of (1 - error) over
every gate and measurement of the ISA circuit. The layout is the preset pass manager's, whose VF2PostLayout
picks the qubits with the lowest calibrated error among the equivalent placements.

QPU seconds follow a stated model (`qpu_seconds`): for each runtime job, an overhead; for each execution
(parameter set x shot), the repetition delay plus the circuit's duration. Sources of the constants:
- repetition delay: the backend configuration's `default_rep_delay` (250 us on IBM Eagle and Heron devices);
- per-job overhead: IBM's "Workload usage" guide counts the time the QPU is locked for a job, including its
  preparation; we assume 2 to 10 s per job (an assumption, stated as such, not a measured figure).

Run as a program (`python -m circuits.hardware`), it reads a JSON request on stdin and answers JSON on stdout:
the API asks it in a child process, so the API itself never imports qiskit.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass

from .config import QAAConfig
from .cost_estimate import DEFAULT_REP_DELAY_S, JOB_OVERHEAD_S

#: Below this ESP the estimate warns that the readout will be mostly noise.
LOW_ESP = 0.5


@dataclass(frozen=True)
class CircuitFigures:
    """One adapter circuit (register size `qubits`) as it will run on `backend`."""

    backend: str
    qubits: int
    two_qubit_gates: int
    depth: int
    duration_s: float
    physical_qubits: list[int]
    esp: float
    readout_errors: list[float]
    median_two_qubit_error: float | None
    rep_delay_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def _errors_and_durations(target, op: str, qargs: tuple[int, ...]) -> tuple[float, float]:
    if target is None or op not in target.operation_names or op == "barrier":
        return 0.0, 0.0
    props = target[op].get(qargs) if target[op] is not None else None
    if props is None:
        return 0.0, 0.0
    return float(props.error or 0.0), float(props.duration or 0.0)


def figures_of(isa, device, backend_name: str, n: int) -> CircuitFigures:
    """The figures of an ISA circuit (compacted or not: `metadata['qaa_physical']` maps its qubits)."""
    target = getattr(device, "target", None)
    physical = isa.metadata["qaa_physical"]
    clock: dict[int, float] = {}
    esp, two_qubit = 1.0, 0
    two_qubit_errors = []
    for inst in isa.data:
        qargs = tuple(physical[isa.find_bit(q).index] for q in inst.qubits)
        name = inst.operation.name
        error, duration = _errors_and_durations(target, name, qargs)
        if len(qargs) == 2 and name != "barrier":
            two_qubit += 1
            two_qubit_errors.append(error)
        esp *= 1.0 - error
        start = max((clock.get(q, 0.0) for q in qargs), default=0.0)
        for q in qargs:
            clock[q] = start + duration
    used = sorted({physical[isa.find_bit(q).index] for inst in isa.data for q in inst.qubits})
    final = [physical[i] for i in isa.metadata["qaa_final"][:n]]
    readout = [_errors_and_durations(target, "measure", (q,))[0] for q in final]
    config = device.configuration() if hasattr(device, "configuration") else None
    rep_delay = getattr(config, "default_rep_delay", None)
    rep_delay = float(rep_delay) * (1e-6 if rep_delay and rep_delay > 1e-2 else 1.0) if rep_delay else None
    return CircuitFigures(
        backend=backend_name,
        qubits=n,
        two_qubit_gates=two_qubit,
        depth=isa.depth(),
        duration_s=max(clock.values(), default=0.0),
        physical_qubits=used,
        esp=esp,
        readout_errors=readout,
        median_two_qubit_error=statistics.median(two_qubit_errors) if two_qubit_errors else None,
        rep_delay_s=rep_delay or DEFAULT_REP_DELAY_S,
    )


def circuit_figures(config: QAAConfig, n: int, runner=None) -> CircuitFigures:
    """Transpile (through the cache, under the run's key) and measure the adapter circuit on n qubits."""
    from .backends import make_runner
    from .backends.environment import environment
    from .template import template_for
    from .transpile_cache import TranspileCache, TranspileKey

    runner = runner or make_runner(config)
    template = template_for(config, n, measured=runner.measured)
    key = TranspileKey(runner.name, runner.stamp, template.key, config.optimization_level, config.seed, runner.compact)
    isa, _ = TranspileCache(environment().cache_dir).get(key, template.circuit, runner.transpile_backend)
    return figures_of(isa, runner.device, runner.name, n)


def qpu_seconds(executions: int, runtime_jobs: int, circuit: CircuitFigures | None) -> tuple[float, float]:
    """(low, high) QPU seconds: executions x (rep delay [+ duration]) + runtime jobs x overhead (module docstring).
    Without circuit figures the duration is unknown, and the range holds the repetition delay only."""
    rep = circuit.rep_delay_s if circuit else DEFAULT_REP_DELAY_S
    duration = circuit.duration_s if circuit else 0.0
    low = executions * rep + runtime_jobs * JOB_OVERHEAD_S[0]
    high = executions * (rep + duration) + runtime_jobs * JOB_OVERHEAD_S[1]
    return low, high


def report(config: QAAConfig, register_sizes: list[int]) -> list[dict]:
    """Figures of each distinct register size's circuit, on one runner (one sign-in)."""
    from .backends import make_runner

    runner = make_runner(config)
    return [circuit_figures(config, n, runner).as_dict() for n in sorted(set(register_sizes))]


def main() -> None:
    """stdin: {"config": QAAConfig fields, "qubits": [n, ...], "cache_dir", "ibm_token", "ibm_instance"}."""
    from .backends.environment import configure

    request = json.loads(sys.stdin.read())
    configure(
        cache_dir=request["cache_dir"],
        ibm_token=request.get("ibm_token"),
        ibm_instance=request.get("ibm_instance"),
    )
    try:
        rows = report(QAAConfig(**request["config"]), request["qubits"])
    except Exception as exc:  # the caller shows the reason; no traceback (it may hold paths)
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
        print(json.dumps({"error": f"{type(exc).__name__}: {text}"}))
        return
    print(json.dumps({"circuits": rows}))


if __name__ == "__main__":
    main()
