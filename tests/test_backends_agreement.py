"""Circuit backends compute the exact engine's function: `aer` with exact expectations agrees to 1e-5 in
outputs and in theta, up and input gradients (through a QAALayer), for every readout and both embeddings."""

import pytest
import torch
from torch import nn

from circuits import QAAConfig, QAALayer
from circuits.backends import environment


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


def _layer_pair(n: int, **options) -> tuple[QAALayer, QAALayer]:
    torch.manual_seed(n)
    base = nn.Linear(2**n, 5)
    exact = QAALayer(base, QAAConfig(layers=2), name="q_proj")
    circuit = QAALayer(base, QAAConfig(layers=2, backend="aer", gradient="parameter-shift", **options), name="q_proj")
    with torch.no_grad():
        exact.adapter().up.weight.normal_()
        circuit.adapter().up.weight.copy_(exact.adapter().up.weight)
    return exact, circuit


def _run(layer: QAALayer, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), x.grad, layer.adapter().theta.grad, layer.adapter().up.weight.grad


def _assert_agree(exact: QAALayer, circuit: QAALayer, x: torch.Tensor) -> None:
    for a, b, what in zip(
        _run(exact, x), _run(circuit, x), ["output", "input grad", "theta grad", "up grad"], strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"{what}: max diff {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_aer_exact_matches_exact_engine(n):
    exact, circuit = _layer_pair(n)
    _assert_agree(exact, circuit, torch.randn(2, 3, 2**n))


@pytest.mark.parametrize("readout", ["expval+zz", "probs"])
def test_every_readout_matches(readout):
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    exact = QAALayer(base, QAAConfig(layers=1, readout=readout), name="v_proj")
    circuit = QAALayer(
        base, QAAConfig(layers=1, readout=readout, backend="aer", gradient="parameter-shift"), name="v_proj"
    )
    with torch.no_grad():
        exact.adapter().up.weight.normal_()
        circuit.adapter().up.weight.copy_(exact.adapter().up.weight)
    _assert_agree(exact, circuit, torch.randn(3, 8))


def test_direct_embedding_matches():
    exact, circuit = _layer_pair(3, embedding="direct")
    _assert_agree(exact, circuit, torch.randn(4, 8))


def test_padding_and_zero_input_give_no_nan():
    torch.manual_seed(1)
    base = nn.Linear(6, 3)  # 6 features on 3 qubits: two padded amplitudes
    exact = QAALayer(base, QAAConfig(layers=1), name="k")
    circuit = QAALayer(base, QAAConfig(layers=1, backend="aer", gradient="parameter-shift"), name="k")
    with torch.no_grad():
        exact.adapter().up.weight.normal_()
        circuit.adapter().up.weight.copy_(exact.adapter().up.weight)
    _assert_agree(exact, circuit, torch.randn(3, 6))
    x = torch.zeros(2, 6, requires_grad=True)
    out = circuit(x)
    out.sum().backward()
    assert (
        torch.equal(out, base(x))
        and torch.isfinite(x.grad).all()
        and torch.isfinite(circuit.adapter().theta.grad).all()
    )
