"""Noisy density-matrix runs simulate each input's preparation once (`circuits/backends/prefix.py`): the split
circuit has the same output distribution as the whole ISA circuit, the engine's exact noisy values and
gradients are those of whole circuits, and the accounting still counts every circuit of the step."""

import numpy as np
import pytest
import torch
from qiskit import QuantumCircuit

from circuits import QAAConfig
from circuits.backends import environment, get_engine
from circuits.backends.prefix import prefix_states
from circuits.embedding import data_angles

N = 3


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


def _angles(m: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(m, 2**N, generator=gen, dtype=torch.float64)
    theta = torch.rand(QAAConfig(layers=2).num_params(N), generator=gen, dtype=torch.float64) * 6
    return data_angles(z, N).numpy(), theta.numpy()


def _probabilities(simulator, circuit: QuantumCircuit, rows: np.ndarray) -> np.ndarray:
    """Exact pre-measurement probabilities of `circuit` (measurements dropped) for each parameter row."""
    body = circuit.copy_empty_like()
    for inst in circuit.data:
        if inst.operation.name not in ("measure", "barrier"):
            body.append(inst)
    body.save_probabilities(label="p")
    binds = {p: rows[:, j] for j, p in enumerate(body.parameters)}
    result = simulator.run(body, parameter_binds=[binds]).result()
    return np.array([result.data(i)["p"] for i in range(len(rows))])


def test_split_circuit_has_the_whole_circuits_distribution():
    engine = get_engine(QAAConfig(layers=2, backend="fake:FakeManilaV2", gradient="parameter-shift"), N)
    split, simulator = engine.split, engine.runner.simulator(engine.isa)
    assert split is not None and simulator.options.method == "density_matrix"
    assert 0 < len(split.suffix.data) < len(engine.isa.data)
    angles, theta = _angles(2)
    rng = np.random.default_rng(0)
    for point in angles:
        # the input's preparation once, then rows with different theta from it
        thetas = theta + rng.uniform(-np.pi, np.pi, size=(4, theta.size))
        rows = np.concatenate([np.repeat(point[None], 4, axis=0), thetas], axis=1)[:, engine.columns]
        (rho,) = prefix_states(simulator, split, rows[:1])
        whole = _probabilities(simulator, engine.isa, rows)
        shared = _probabilities(simulator, split.start_from(rho), rows[:, split.suffix_columns])
        assert np.abs(whole - shared).max() < 1e-12


def test_exact_noisy_values_and_gradients_equal_whole_circuits():
    config = QAAConfig(layers=2, backend="aer", gradient="parameter-shift", noise="FakeManilaV2")
    engine = get_engine(config, N)
    assert engine.split is not None
    angles, theta = _angles(3)
    shared = engine.evaluate(angles, theta, True, True)  # data-angle shift rows run whole, theta rows shared
    engine.split = None
    whole = engine.evaluate(angles, theta, True, True)
    for a, b in zip(shared, whole, strict=True):
        assert np.abs(a - b).max() < 1e-10
    noiseless = get_engine(QAAConfig(layers=2, backend="aer", gradient="parameter-shift"), N)
    assert noiseless.split is None
    assert np.abs(shared[0] - noiseless.evaluate(angles, theta, False, False)[0]).max() > 1e-3


def test_shared_step_counts_every_circuit_in_one_call():
    engine = get_engine(QAAConfig(layers=2, backend="fake:FakeManilaV2", gradient="parameter-shift", shots=64), N)
    angles, theta = _angles(2)
    r, jac, _ = engine.evaluate(angles, theta, True, False)
    p = theta.size
    assert r.shape == (2, N) and jac.shape == (2, N, p)
    assert engine.usage.circuits == 2 * (2 * p + 1) and engine.usage.primitive_calls == 1
    assert engine.usage.shots == 64 * 2 * (2 * p + 1)
