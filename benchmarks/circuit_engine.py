"""One QAA layer step (n = 6, L = 2, M = 32 inputs, forward + backward for theta) on circuit backends.

Compares (a) our circuit engine on Aer's exact estimator (one PUB per step), (b) qiskit-machine-learning's
EstimatorQNN + TorchConnector with its parameter-shift gradient on the same Aer estimator (the same simulator
object, so the same options), (c) the exact torch engine; then the same step on fake:FakeBrisbane (noisy,
sampled; also with every circuit simulated whole, for comparison) and at n = 10 with `embedding: direct`.
Writes benchmarks/results/circuit_engine.json with the load average around the run (the ratios are measured side
by side, so they are what to compare across machines). Run: `.venv/bin/python benchmarks/circuit_engine.py`;
`--device GPU --out FILE` runs every Aer simulator on the GPU (qiskit-aer-gpu; `benchmarks/gpu_check.sh`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from circuits import QAAConfig, QAALayer
from circuits.backends import environment

M, LAYERS, N = 32, 2, 6
PEER_INPUTS = 4  # the peer runs one PUB per sample, observable and shift: timed on a fraction, scaled linearly
OUT = Path(__file__).parent / "results" / "circuit_engine.json"
#: Aer's device for every circuit-backend layer (`--device`).
DEVICE = "CPU"


def _step_seconds(layer: QAALayer, x: torch.Tensor, repeats: int = 3) -> float:
    """Best of `repeats` forward + backward steps (after one warm-up), theta only."""
    x = x.detach()
    times = []
    for _ in range(repeats + 1):
        layer.zero_grad()
        start = time.perf_counter()
        layer(x).square().sum().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _layer(n: int, **options) -> tuple[QAALayer, float]:
    start = time.perf_counter()
    if options.get("backend", "exact") != "exact":
        options = {"device": DEVICE, **options}
    layer = QAALayer(nn.Linear(2**n, 2**n), QAAConfig(layers=LAYERS, input_grad="none", **options), name="q_proj")
    with torch.no_grad():
        layer.adapter().up.weight.normal_(std=0.1)
    return layer, time.perf_counter() - start


def _peer_seconds(x: torch.Tensor, simulator) -> float:
    """EstimatorQNN + TorchConnector on the same template and the same Aer simulator as ours, `PEER_INPUTS`
    inputs. The simulator's options (statevector, parameters bound at run time) do not change the peer's time:
    it sends one parameter set per PUB."""
    from qiskit_aer.primitives import EstimatorV2
    from qiskit_machine_learning.connectors import TorchConnector
    from qiskit_machine_learning.gradients import ParamShiftEstimatorGradient
    from qiskit_machine_learning.neural_networks import EstimatorQNN

    from circuits.embedding import data_angles
    from circuits.template import build_template

    template = build_template(N, LAYERS, "ring", "expval", "gates", False)
    params = {p.name: p for p in template.circuit.parameters}
    inputs = [params[f"x[{i}]"] for i in range(template.data_params)]
    weights = [params[f"theta[{i}]"] for i in range(template.theta_params)]
    estimator = EstimatorV2.from_backend(simulator, options={"default_precision": 0.0})
    qnn = EstimatorQNN(
        circuit=template.circuit,
        observables=template.observables,
        input_params=inputs,
        weight_params=weights,
        estimator=estimator,
        gradient=ParamShiftEstimatorGradient(estimator),
        input_gradients=False,
    )
    model = TorchConnector(qnn)
    angles = data_angles(x[:PEER_INPUTS].double(), N).float()
    start = time.perf_counter()
    model(angles).square().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["CPU", "GPU"], default="CPU", help="Aer's device")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    environment.configure(cache_dir=Path(tempfile.mkdtemp(prefix="qaa-bench-")))
    torch.manual_seed(0)
    x = torch.randn(M, 2**N)
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "n": N,
        "layers": LAYERS,
        "inputs": M,
        "aer_device": DEVICE,
    }

    ours, build = _layer(N, backend="aer", gradient="parameter-shift")
    result["ours_seconds"] = _step_seconds(ours, x)
    result["ours_build_seconds"] = build
    used = ours.adapter().engine.usage
    steps = 4  # warm-up + 3 timed
    result["circuits_per_step"] = used.circuits // steps
    result["primitive_calls_per_step"] = used.primitive_calls / steps
    result["theoretical_circuits_per_step"] = M * (2 * ours.adapter().config.num_params(N) + 1)
    result["theta_params"] = ours.adapter().config.num_params(N)

    exact, _ = _layer(N)
    result["exact_seconds"] = _step_seconds(exact, x, repeats=10)

    peer = _peer_seconds(x, ours.adapter().engine.runner.simulator(ours.adapter().engine.isa))
    result["peer_seconds"] = peer * M / PEER_INPUTS
    result["peer_note"] = (
        f"timed on {PEER_INPUTS} of {M} inputs ({peer:.1f} s) and scaled linearly: the peer "
        "sends one PUB per input, observable and shift, so its cost is linear in inputs"
    )
    result["peer_over_ours"] = result["peer_seconds"] / result["ours_seconds"]
    result["ours_over_exact"] = result["ours_seconds"] / result["exact_seconds"]

    noisy, build = _layer(N, backend="fake:FakeBrisbane", gradient="parameter-shift")
    result["noisy_build_seconds"] = build
    result["noisy_seconds"] = _step_seconds(noisy, x, repeats=2)
    result["noisy_shots"] = noisy.adapter().config.effective_shots()
    result["noisy_width"] = noisy.adapter().engine.isa.num_qubits
    result["noisy_method"] = noisy.adapter().engine.runner.simulator(noisy.adapter().engine.isa).options.method
    split = noisy.adapter().engine.split
    result["noisy_gates_whole"] = len(noisy.adapter().engine.isa.data)
    result["noisy_gates_per_row"] = None if split is None else len(split.suffix.data)
    sampled, _ = _layer(N, backend="aer", gradient="parameter-shift", shots=noisy.adapter().config.effective_shots())
    result["noiseless_sampled_seconds"] = _step_seconds(sampled, x, repeats=2)
    noisy.adapter().engine.split = None  # every circuit simulated whole: what sharing the preparation saves
    result["noisy_unshared_seconds"] = _step_seconds(noisy, x, repeats=1)
    noisy.adapter().engine.split = split
    result["noisy_over_noiseless"] = result["noisy_seconds"] / result["noiseless_sampled_seconds"]
    result["noisy_unshared_over_noiseless"] = result["noisy_unshared_seconds"] / result["noiseless_sampled_seconds"]
    result["noisy_over_ours"] = result["noisy_seconds"] / result["ours_seconds"]
    result["noisy_note"] = (
        "noisy_over_noiseless: fake:FakeBrisbane (runtime local testing mode, 4096 shots, noise of the used "
        "qubits only, density matrix fused) over the same step sampled noiselessly on Aer with the same shots. "
        "Each input's noisy preparation is simulated once and its 2P + 1 rows run the rest of the same ISA "
        "circuit from that density matrix (circuits/backends/prefix.py: the same distribution, checked to 1e-12); "
        "noisy_unshared_seconds runs every circuit whole. noisy_over_ours: over the exact-expectation step"
    )

    x10 = torch.randn(M, 2**10)
    big, build = _layer(10, backend="aer", gradient="parameter-shift", embedding="direct")
    result["ours_10q_seconds"] = _step_seconds(big, x10, repeats=2)
    result["ours_10q_circuits_per_step"] = M * (2 * big.adapter().config.num_params(10) + 1)
    exact10, _ = _layer(10)
    result["exact_10q_seconds"] = _step_seconds(exact10, x10, repeats=5)
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
