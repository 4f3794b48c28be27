"""What error mitigation buys a QAA adapter on a device, and at what cost in shots.

For each device and register size n (L = 2, ring entangler, gate embedding), one adapter with fixed seeded
weights (theta uniform in [0, 2 pi), as a layer initialises it) reads 64 fixed inputs on the exact engine and on
the device's noise through the job's own runner (`fake:<Name>` in local testing mode, 4096 shots), once per
mitigation setting of the job spec (`quantum.mitigation`):

    mean_abs_error = mean over inputs and qubits of |<Z_i>_device - <Z_i>_exact|

`shots_multiplier` is the shots the run took (the adapter's circuits and every calibration, as the job's usage
counts them) over the unmitigated run's. The target: at least one setting at most halves the unmitigated error at
no more than 5x the shots, on every device.

    python benchmarks/mitigation.py          # writes benchmarks/results/mitigation.json
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
from circuits.backends import ExactEngine, get_engine, make_runner  # noqa: E402
from circuits.config import Mitigation  # noqa: E402
from circuits.embedding import data_angles  # noqa: E402

DEVICES = ("FakeManilaV2", "FakeTorino")
QUBITS = (3, 4)
INPUTS, SHOTS = 64, 4096
SETTINGS = {
    "none": {},
    "m3": {"readout": "m3"},
    "trex": {"readout": "trex"},
    "twirling+trex": {"readout": "trex", "twirling": True},
    "zne": {"zne": {}},
    "zne+trex": {"readout": "trex", "zne": {}},
}
OUT = ROOT / "benchmarks" / "results" / "mitigation.json"


def fixed_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4321 + n)
    z = torch.randn(INPUTS, 2**n, generator=gen, dtype=torch.float64)
    theta = torch.rand(QAAConfig(layers=2).num_params(n), generator=gen, dtype=torch.float64) * (2 * np.pi)
    return z / z.norm(dim=-1, keepdim=True), theta


def measure(device: str, n: int, setting: str) -> dict:
    """One row: the adapter's readout error against exact under `setting`, and the shots it took."""
    mitigation = Mitigation(**SETTINGS[setting]) if SETTINGS[setting] else None
    config = QAAConfig(
        layers=2, backend=f"fake:{device}", gradient="parameter-shift", shots=SHOTS, mitigation=mitigation, seed=7
    )
    z, theta = fixed_inputs(n)
    exact = ExactEngine(QAAConfig(layers=2), n)(z.float(), theta.float()).double().numpy()
    runner = make_runner(config)
    engine = get_engine(config, n, runner)
    started = time.perf_counter()
    values, _, _ = engine.evaluate(data_angles(z, n).numpy(), theta.numpy(), False, False)
    usage = engine.usage + runner.extra_usage
    return {
        "backend": device,
        "qubits": n,
        "mitigation": setting,
        "mean_abs_error": round(float(np.abs(values - exact).mean()), 4),
        "shots": usage.shots,
        "circuits": usage.circuits,
        "seconds": round(time.perf_counter() - started, 1),
    }


def with_multipliers(rows: list[dict]) -> list[dict]:
    base = {(r["backend"], r["qubits"]): r["shots"] for r in rows if r["mitigation"] == "none"}
    for r in rows:
        r["shots_multiplier"] = round(r["shots"] / base[(r["backend"], r["qubits"])], 3)
    return rows


def target_met(rows: list[dict]) -> dict[str, bool]:
    """Per device: some setting halves the unmitigated error, at <= 5x the shots, at every register size."""
    out = {}
    for device in DEVICES:
        sizes = {r["qubits"] for r in rows if r["backend"] == device}
        out[device] = all(
            any(
                r["mean_abs_error"] <= none["mean_abs_error"] / 2 and r["shots_multiplier"] <= 5
                for r in rows
                if (r["backend"], r["qubits"]) == (device, n) and r["mitigation"] != "none"
            )
            for n in sizes
            for none in rows
            if (none["backend"], none["qubits"], none["mitigation"]) == (device, n, "none")
        )
    return out


def markdown(result: dict) -> str:
    """The README's table of a run (tests/test_readme.py checks the README holds exactly this)."""
    settings = list(SETTINGS)
    lines = [
        "| device | n | " + " | ".join(settings) + " |",
        "|---|---|" + "---|" * len(settings),
    ]
    for device in DEVICES:
        for n in QUBITS:
            cells = []
            for s in settings:
                r = next(r for r in result["rows"] if (r["backend"], r["qubits"], r["mitigation"]) == (device, n, s))
                cells.append(f"{r['mean_abs_error']:.3f} ({r['shots_multiplier']:g}x)")
            lines.append(f"| {device} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    rows = []
    for device in DEVICES:
        for n in QUBITS:
            for setting in SETTINGS:
                rows.append(measure(device, n, setting))
                print(json.dumps(rows[-1]), flush=True)
    rows = with_multipliers(rows)
    result = {
        "definition": "mean_abs_error = mean |<Z_i>_device - <Z_i>_exact| over 64 fixed inputs and the n qubits",
        "layers": 2,
        "shots": SHOTS,
        "settings": SETTINGS,
        "target": "one setting at most halves the unmitigated error at <= 5x the shots, on every device",
        "target_met": target_met(rows),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
