"""Methods: what trains for each kind, SoRA's layer and proximal step, saving and loading adapters."""

from __future__ import annotations

import pytest
import torch

from service.spec import parse_spec
from workers.methods import SoRAConfig, SoRALayer, inject_sora, load_adapter_into, prepare, sora_proximal_step
from workers.models import load_model

TINY_LLAMA_PARAMS = 90_688  # embeddings tied with the LM head


def spec(method: dict, model: str = "builtin:tiny-llama"):
    return parse_spec({"model": model, "dataset": "builtin:restaurants", "method": method})


# q_proj is 64 -> 64 and v_proj 64 -> 32 (2 kv heads of 16) in each of tiny-llama's 2 layers.
@pytest.mark.parametrize(
    ("method", "trainable"),
    [
        ({"kind": "lora", "r": 4}, 2 * 4 * ((64 + 64) + (64 + 32))),
        ({"kind": "sora", "r": 4}, 2 * (4 * ((64 + 64) + (64 + 32)) + 2 * 4)),
        ({"kind": "prefix", "num_virtual_tokens": 4}, 4 * 2 * 2 * 32),  # tokens x layers x (k, v) x kv width
        ({"kind": "qaa", "layers": 1}, 2 * ((18 + 6 * 64) + (18 + 6 * 32))),  # 6 qubits: P = 18, up 6 -> d_out
        ({"kind": "full"}, TINY_LLAMA_PARAMS),
    ],
)
def test_each_method_trains_what_it_should(method, trainable):
    model = load_model("builtin:tiny-llama").model
    prepared = prepare(model, spec(method))
    summary = prepared.summary()
    assert summary["trainable"] == trainable
    assert summary["total"] == TINY_LLAMA_PARAMS + (trainable if method["kind"] not in ("full",) else 0)
    assert summary["share"] == pytest.approx(trainable / summary["total"])
    assert sum(p.numel() for p in prepared.trainable().values()) == trainable


def test_unmatched_targets_name_the_problem():
    model = load_model("builtin:tiny-gpt2").model
    with pytest.raises(ValueError, match="matched no module"):
        prepare(model, spec({"kind": "sora"}, "builtin:tiny-gpt2"))


def test_sora_starts_identical_and_wraps_gpt2_conv1d():
    model = load_model("builtin:tiny-gpt2").model
    ids = torch.arange(4, 20).unsqueeze(0)
    before = model(ids).logits
    inject_sora(model, SoRAConfig(["c_attn"], r=3))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SoRALayer) and layer.sora_A.shape == (3, 64) and layer.sora_B.shape == (192, 3)
    assert torch.equal(model(ids).logits, before)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "sora_A",
        "sora_B",
        "sora_gate",
    }


def test_sora_proximal_step_soft_thresholds_the_gate():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 4))
    inject_sora(model, SoRAConfig(["proj"], r=4, sparse_lambda=2.0))
    with torch.no_grad():
        model.proj.sora_gate.copy_(torch.tensor([0.5, -0.15, 0.2, -1.0]))
    sora_proximal_step(model, lr=0.1)  # threshold lr * lambda = 0.2
    assert model.proj.sora_gate.tolist() == pytest.approx([0.3, 0.0, 0.0, -0.8])
    assert (model.proj.sora_gate == 0).sum().item() == 2, "exact zeros, not small numbers"


@pytest.mark.parametrize("method", [{"kind": "sora", "r": 2}, {"kind": "qaa", "layers": 1}, {"kind": "full"}])
def test_saved_adapters_load_back(tmp_path, method):
    model = load_model("builtin:tiny-llama").model
    prepared = prepare(model, spec(method))
    with torch.no_grad():
        for p in prepared.trainable().values():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.arange(4, 30).unsqueeze(0)
    want = prepared.model(ids).logits
    prepared.save(tmp_path)
    card = ["README.md"] if method["kind"] == "qaa" else []  # PEFT's save_pretrained writes a model card
    assert sorted(p.name for p in tmp_path.iterdir()) == [*card, "adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter_into(load_model("builtin:tiny-llama").model, tmp_path)
    assert torch.equal(loaded(ids).logits, want)
