"""From which size a QAA adapter is noise on a device: predicted (ESP, 2-qubit gates, depth) against measured.

For each device and register size n (L = 2, ring entangler, gate embedding), the circuit is transpiled through
the per-backend cache exactly as a job would (`circuits.hardware.circuit_figures`), and the same adapter (fixed
seeded weights) reads the same fixed inputs on the exact engine and on the device's noise through the job's own
runner (`fake:<Name>` in local testing mode, sampled). Fidelity of the readout, defined once here:

    fidelity = 1 - mean over inputs and qubits of |<Z_i>_device - <Z_i>_exact| / 2

(1: the device reads what the exact engine computes). A readout of pure noise, <Z_i> ~ 0, still scores
`noise_floor_fidelity` = 1 - mean |<Z_i>_exact| / 2, which grows with n as random states' <Z_i> shrink, so each
row also reports the share of the signal the device kept, `signal_kept` = (fidelity - floor) / (1 - floor): 1
for a perfect device, 0 for noise; this is the figure to set beside the predicted ESP. Noisy simulation costs 4^w
for a compacted width w (density matrix): rows whose width passes `MAX_SIMULATED_WIDTH` report the prediction
only (`measured_fidelity: null`), and the inputs and shots used are in each row.

    python benchmarks/hardware.py            # writes benchmarks/results/hardware.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuits import QAAConfig  # noqa: E402
from circuits.backends import ExactEngine, get_engine  # noqa: E402
from circuits.cost_estimate import DEFAULT_REP_DELAY_S  # noqa: E402
from circuits.embedding import data_angles  # noqa: E402
from circuits.hardware import circuit_figures  # noqa: E402

DEVICES = {"FakeManilaV2": [3, 4, 5], "FakeBrisbane": [3, 4, 6, 8, 10], "FakeTorino": [3, 4, 6, 8, 10]}
INPUTS, SHOTS = 64, 4096
#: Widest compacted circuit simulated with noise (a 4^w density matrix); wider rows are predicted only.
MAX_SIMULATED_WIDTH = 9
OUT = ROOT / "benchmarks" / "results" / "hardware.json"


def fixed_inputs(n: int, inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234 + n)
    z = torch.randn(inputs, 2**n, generator=gen, dtype=torch.float64)
    theta = torch.rand(QAAConfig(layers=2).num_params(n), generator=gen, dtype=torch.float64) * (2 * np.pi)
    return z / z.norm(dim=-1, keepdim=True), theta


def row(device: str, n: int) -> dict:
    config = QAAConfig(layers=2, backend=f"fake:{device}", gradient="parameter-shift", shots=SHOTS)
    figures = circuit_figures(config, n)
    width = len(figures.physical_qubits)
    out = {
        "backend": device,
        "qubits": n,
        "two_qubit_gates": figures.two_qubit_gates,
        "depth": figures.depth,
        "esp": round(figures.esp, 6),
        "physical_qubits": figures.physical_qubits,
        "qpu_seconds_per_circuit": SHOTS * (figures.rep_delay_s or DEFAULT_REP_DELAY_S) + SHOTS * figures.duration_s,
        "measured_fidelity": None,
        "inputs": 0,
        "shots": SHOTS,
    }
    if width > MAX_SIMULATED_WIDTH:
        out["note"] = f"compacted width {width} > {MAX_SIMULATED_WIDTH}: predicted only"
        return out
    z, theta = fixed_inputs(n, INPUTS)
    exact = ExactEngine(QAAConfig(layers=2), n)(z.float(), theta.float()).double().numpy()
    engine = get_engine(config, n)
    started = time.perf_counter()
    noisy, _, _ = engine.evaluate(data_angles(z, n).numpy(), theta.numpy(), False, False)
    out["seconds"] = round(time.perf_counter() - started, 2)
    fidelity = 1 - float(np.abs(noisy - exact).mean()) / 2
    floor = 1 - float(np.abs(exact).mean()) / 2  # a readout of all zeros
    out["measured_fidelity"] = round(fidelity, 4)
    out["noise_floor_fidelity"] = round(floor, 4)
    out["signal_kept"] = round((fidelity - floor) / (1 - floor), 3)
    out["inputs"] = INPUTS
    return out


def markdown(result: dict) -> str:
    """The README's table of a run (tests/test_readme.py checks the README holds exactly this)."""
    lines = [
        "| device | n | 2-qubit gates | depth | predicted ESP | measured fidelity | noise floor | signal kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        measured = ["not simulated", "", ""]
        if r["measured_fidelity"] is not None:
            measured = [f"{r['measured_fidelity']:.4f}", f"{r['noise_floor_fidelity']:.4f}", f"{r['signal_kept']:.2f}"]
        lines.append(
            f"| {r['backend']} | {r['qubits']} | {r['two_qubit_gates']} | {r['depth']} | {r['esp']:.3f} | "
            + " | ".join(measured)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    rows = []
    for device, sizes in DEVICES.items():
        for n in sizes:
            rows.append(row(device, n))
            print(json.dumps(rows[-1]), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "definition": "fidelity = 1 - mean |<Z_i>_device - <Z_i>_exact| / 2 over fixed inputs and qubits",
        "layers": 2,
        "entangler": "ring",
        "embedding": "gates",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
