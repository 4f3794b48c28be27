"""QAA adapters on real model architectures: injection, freezing, save/load and learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from circuits import QAAConfig, QAALayer, inject_qaa, load_qaa, qaa_adapters, save_qaa, trainable_summary
from workers.models import load_model


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize(
    ("name", "targets", "expected"),
    [("builtin:tiny-llama", ["q_proj", "v_proj"], 4), ("builtin:tiny-gpt2", ["c_attn"], 2)],
)
def test_injection_keeps_outputs_and_trains_only_adapters(name: str, targets: list[str], expected: int) -> None:
    model, tokenizer = load_model(name)
    batch = _batch(tokenizer, ["a table for two near the river", "cheap food"])
    before = _logits(model, batch)
    inject_qaa(model, QAAConfig(target_modules=targets, layers=2))
    layers = qaa_adapters(model)
    assert len(layers) == expected
    assert torch.equal(_logits(model, batch), before)  # `up` starts at zero: the adapted model is its base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base_layer." not in n and (".theta" in n or ".up." in n) for n in trainable)
    summary = trainable_summary(model)
    n = next(iter(layers.values())).n_qubits
    per_layer = [layer.theta.numel() + layer.up.weight.numel() for layer in layers.values()]
    assert summary["trainable"] == sum(per_layer)
    assert layers[next(iter(layers))].theta.numel() == 2 * 2 * n + n


def test_gpt2_conv1d_uses_its_transposed_layout() -> None:
    model, _ = load_model("builtin:tiny-gpt2")
    conv = model.transformer.h[0].attn.c_attn
    d_in, d_out = conv.weight.shape
    layer = QAALayer(conv, QAAConfig(layers=1), name="c_attn")
    assert (layer.in_features, layer.out_features) == (d_in, d_out)
    assert layer.adapter().n_qubits == math.ceil(math.log2(d_in))
    with torch.no_grad():
        layer.adapter().up.weight.normal_()
    x = torch.randn(2, 3, d_in)
    delta = layer(x) - conv(x)
    assert delta.shape == (2, 3, d_out) and delta.abs().max() > 0


def test_target_regex_and_unmatched_error() -> None:
    model, _ = load_model("builtin:tiny-llama")
    inject_qaa(model, QAAConfig(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert sorted(qaa_adapters(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    fresh, _ = load_model("builtin:tiny-llama")
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        inject_qaa(fresh, QAAConfig(target_modules=["nonexistent"]))


@pytest.mark.parametrize("compress", ["fixed", "learned"])
def test_save_load_round_trip_is_exact(tmp_path, compress: str) -> None:
    config = QAAConfig(target_modules=["q_proj", "v_proj"], qubits=4, compress=compress, readout="expval+zz")
    model, tokenizer = load_model("builtin:tiny-llama")
    inject_qaa(model, config)
    with torch.no_grad():
        for layer in qaa_adapters(model).values():
            layer.up.weight.normal_(0, 0.5)
            layer.theta.add_(0.3)
    batch = _batch(tokenizer, ["Aromi is a coffee shop", "in the city centre"])
    trained = _logits(model, batch)
    save_qaa(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    restored, _ = load_model("builtin:tiny-llama")
    load_qaa(restored, tmp_path)
    assert torch.equal(_logits(restored, batch), trained)
    assert qaa_adapters(restored)["model.layers.0.self_attn.q_proj"].config == config


def test_zero_input_gives_zero_update() -> None:
    layer = QAALayer(nn.Linear(8, 4), QAAConfig(layers=1))
    with torch.no_grad():
        layer.adapter().up.weight.normal_()
    x = torch.zeros(3, 8, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, layer.base_layer(x))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bfloat16_model() -> None:
    model, tokenizer = load_model("builtin:tiny-llama", dtype=torch.bfloat16)
    inject_qaa(model, QAAConfig(target_modules=["q_proj"]))
    batch = _batch(tokenizer, ["bf16 works"])
    out = model(**batch)
    out.loss.backward()
    layer = next(iter(qaa_adapters(model).values()))
    assert layer.up.weight.grad is not None and layer.up.weight.grad.dtype == torch.float32


def _train(model, tokenizer, steps: int = 60, lr: float = 5e-2) -> list[float]:
    batch = _batch(tokenizer, ["The Eagle is a cheap coffee shop near Burger King.", "Zizzi serves French food."])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_lowers_the_loss_like_lora() -> None:
    """60 AdamW steps on one batch of the tiny random model. Measured: QAA 5.53 -> 4.91, LoRA r=8 5.53 -> 4.81."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tokenizer = load_model("builtin:tiny-llama")
    inject_qaa(model, QAAConfig(target_modules=["q_proj", "v_proj"], layers=2))
    theta0 = {n: layer.theta.detach().clone() for n, layer in qaa_adapters(model).items()}
    qaa = _train(model, tokenizer)
    assert all(not torch.equal(layer.theta, theta0[n]) for n, layer in qaa_adapters(model).items())

    torch.manual_seed(0)
    base, _ = load_model("builtin:tiny-llama")
    lora = _train(get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])), tokenizer)
    assert qaa[0] - qaa[-1] > 0.5, qaa
    assert qaa[0] - qaa[-1] > 0.75 * (lora[0] - lora[-1]), (qaa[-1], lora[-1])


@pytest.mark.slow
def test_smollm2_injection(smollm2_models_dir) -> None:
    model, tokenizer = load_model("builtin:smollm2-135m", models_dir=smollm2_models_dir)
    batch = _batch(tokenizer, ["The capital of France is Paris."])
    before = _logits(model, batch)
    inject_qaa(model, QAAConfig(target_modules=["q_proj", "v_proj"], layers=2))
    layers = qaa_adapters(model)
    assert len(layers) == 60
    assert {layer.n_qubits for layer in layers.values()} == {10}  # d_in = 576 -> ceil(log2) = 10
    assert torch.equal(_logits(model, batch), before)
    summary = trainable_summary(model)
    assert summary["trainable"] == 60 * 50 + 30 * 10 * 576 + 30 * 10 * 192
    assert summary["share"] < 0.005
