"""Sampled backends: values within 4 sigma of exact expectations (noiseless or noisy), noise that shows, and
parameter-shift gradients within the shot-noise bound."""

import numpy as np
import pytest
import torch

from circuits import QAAConfig
from circuits.backends import ExactEngine, environment, get_engine

SHOTS = 4000
N = 3


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


def _inputs():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(4, 2**N, generator=gen, dtype=torch.float64)
    theta = torch.rand(QAAConfig(layers=2).num_params(N), generator=gen, dtype=torch.float64) * 6
    return (z / z.norm(dim=-1, keepdim=True)).numpy(), theta.numpy()  # unit rows: outputs are r itself


def _evaluate(engine, z, theta):
    from circuits.embedding import data_angles

    angles = data_angles(torch.from_numpy(z), N).numpy()
    return engine.evaluate(angles, theta, True, False)  # (r [M, k], d r / d theta [M, k, P], None)


def _sigma(exact_r: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(1 - exact_r**2, 1e-3, None) / SHOTS)


def test_aer_shots_within_four_sigma_and_gradients_within_bound():
    z, theta = _inputs()
    r, jac, _ = _evaluate(
        get_engine(QAAConfig(layers=2, backend="aer", gradient="parameter-shift", shots=SHOTS), N), z, theta
    )
    ref, ref_jac, _ = _evaluate(get_engine(QAAConfig(layers=2, backend="aer", gradient="parameter-shift"), N), z, theta)
    exact = ExactEngine(QAAConfig(layers=2), N)(torch.from_numpy(z).float(), torch.from_numpy(theta).float())
    assert np.allclose(ref, exact.numpy(), atol=1e-5)
    assert (np.abs(r - ref) < 4 * _sigma(ref)).all()
    # (f+ - f-) / 2 of two independent estimates: sigma <= 1 / sqrt(2 * shots)
    assert (np.abs(jac - ref_jac) < 4 / np.sqrt(2 * SHOTS)).all()


def test_fake_backend_matches_its_noise_model_and_differs_from_noiseless():
    z, theta = _inputs()
    fake = get_engine(QAAConfig(layers=2, backend="fake:FakeManilaV2", gradient="parameter-shift", shots=SHOTS), N)
    r, _, _ = _evaluate(fake, z, theta)
    # the same ISA circuit under the same noise through Aer's own sampler, with 10x the shots
    reference = get_engine(
        QAAConfig(layers=2, backend="aer", gradient="parameter-shift", noise="FakeManilaV2", shots=10 * SHOTS),
        N,
    )
    ref, _, _ = _evaluate(reference, z, theta)
    assert (np.abs(r - ref) < 4 * _sigma(ref) * np.sqrt(1.1)).all()
    noiseless, _, _ = _evaluate(get_engine(QAAConfig(layers=2, backend="aer", gradient="parameter-shift"), N), z, theta)
    assert np.abs(ref - noiseless).max() > 10 * _sigma(noiseless).max()
    assert fake.isa.num_qubits <= 5 and len(fake.isa.metadata["qaa_physical"]) == fake.isa.num_qubits
