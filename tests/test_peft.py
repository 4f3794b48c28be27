"""QAA as a PEFT method: the calls a LoRA user knows (get_peft_model, print_trainable_parameters, save_pretrained,
PeftModel.from_pretrained, named adapters, set_adapter, disable_adapter) on the exact engine and on Aer, adapters
saved before the change still loading, and one schema for the spec, QAAConfig and the PEFT config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import circuits
from circuits import QAAConfig, QAAPeftConfig, QAAShape
from service.spec import QAAMethod, parse_spec
from workers.methods import load_adapter_into
from workers.models import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "qaa_adapter_v1"


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["Aromi is a coffee shop", "in the city centre"], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _perturb(model: nn.Module, adapter: str = "default", scale: float = 0.5) -> None:
    """Non-zero `up` weights, so an adapter changes the outputs."""
    with torch.no_grad():
        for name, module in circuits.qaa_adapters(model).items():
            if name.endswith(f":{adapter}") or (adapter == "default" and ":" not in name):
                module.up.weight.normal_(0, scale, generator=torch.Generator().manual_seed(len(name)))


@pytest.fixture
def tiny():
    model, tokenizer = load_model("builtin:tiny-llama")
    return model, _batch(tokenizer)


def test_get_peft_model_builds_the_adapters_inject_qaa_builds(tiny, capsys):
    base, batch = tiny
    before = _logits(base, batch)
    config = QAAPeftConfig(target_modules=["q_proj", "v_proj"], layers=1, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    assert torch.equal(_logits(model, batch), before)  # `up` starts at zero
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    reference, _ = load_model("builtin:tiny-llama")
    circuits.inject_qaa(reference, QAAConfig(target_modules=["q_proj", "v_proj"], layers=1))
    assert trainable == circuits.trainable_summary(reference)["trainable"] > 0
    ours = {k: v for k, v in circuits.adapter_state_dict(model).items()}
    theirs = circuits.adapter_state_dict(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # same init


def test_save_pretrained_and_from_pretrained_round_trip_exactly(tiny, tmp_path):
    base, batch = tiny
    model = get_peft_model(base, QAAPeftConfig(qubits=4, compress="learned", readout="expval+zz", seed=7))
    _perturb(model)
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QAA" and saved["qubits"] == 4 and "backend" not in saved  # the shape only
    fresh, _ = load_model("builtin:tiny-llama")
    restored = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(_logits(restored, batch), trained)
    assert isinstance(restored.peft_config["default"], QAAPeftConfig)


def test_named_adapters_switch_and_disable_like_lora(tiny):
    base, batch = tiny
    plain = _logits(base, batch)
    model = get_peft_model(base, QAAPeftConfig(layers=1))
    model.add_adapter("deep", QAAPeftConfig(layers=3, entangler="linear", seed=3))
    _perturb(model, "default")
    _perturb(model, "deep")
    first = _logits(model, batch)
    model.set_adapter("deep")
    second = _logits(model, batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".qaa_adapters.deep." in n for n in trainable)  # only the active adapter trains
    assert not torch.allclose(first, second) and not torch.allclose(second, plain)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), plain)
    model.set_adapter("default")
    assert torch.equal(_logits(model, batch), first)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(_logits(model.unload(), batch), plain)


def test_a_peft_model_runs_its_circuits_on_the_backend_of_the_run(tiny):
    base, batch = tiny
    model = get_peft_model(base, QAAPeftConfig(target_modules=["layers.0.self_attn.q_proj"], qubits=3,
                                               compress="fixed", layers=1))  # fmt: skip
    _perturb(model)
    exact = _logits(model, batch)
    aer = QAAConfig(backend="aer", gradient="parameter-shift")  # exact expectations: no shots
    with circuits.execution(model, aer) as run:
        on_aer = model(**batch).logits
        on_aer.square().mean().backward()
    torch.testing.assert_close(on_aer.detach(), exact, atol=1e-5, rtol=0)
    assert run.usage.circuits > 0
    theta = next(p for n, p in model.named_parameters() if n.endswith("qaa_adapters.default.theta"))
    assert theta.grad is not None and theta.grad.abs().sum() > 0  # parameter-shift gradients reached PEFT's param
    assert torch.equal(_logits(model, batch), exact)  # the run over, the exact engine again


def test_an_adapter_saved_before_qaa_was_a_peft_method_still_loads():
    """tests/fixtures/qaa_adapter_v1 was written by the pre-PEFT `save_qaa` (its own key layout and config)."""
    expected = load_file(FIXTURE / "expected_io.safetensors")

    class Tiny(nn.Module):  # the model the fixture was made on (seed 0)
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8)

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.v_proj(x)], -1)

    for load in (circuits.load_qaa, load_adapter_into):
        torch.manual_seed(0)
        model = load(Tiny(), FIXTURE)
        with torch.no_grad():
            # float32 written on another CPU: GEMMs round differently across CPUs (2e-6 seen on an AMD EPYC)
            torch.testing.assert_close(model(expected["x"]), expected["y"], atol=1e-5, rtol=1e-5)


def test_save_qaa_writes_what_peft_loads(tiny, tmp_path):
    base, batch = tiny
    circuits.inject_qaa(base, QAAConfig(target_modules=["v_proj"], qubits=3, compress="fixed", seed=2))
    _perturb(base)
    trained = _logits(base, batch)
    circuits.save_qaa(base, tmp_path)
    fresh, _ = load_model("builtin:tiny-llama")
    assert torch.equal(_logits(PeftModel.from_pretrained(fresh, tmp_path), batch), trained)


def test_one_schema_for_the_spec_the_config_and_the_peft_config():
    shape = QAAShape.model_fields
    assert set(QAAMethod.model_fields) - {"kind"} == set(shape)
    assert set(shape) <= set(QAAConfig.model_fields)
    fields = {f.name: f for f in dataclasses.fields(QAAPeftConfig)}
    for name, info in shape.items():
        default = fields[name].default_factory() if info.default_factory else fields[name].default
        assert default == info.get_default(call_default_factory=True), name
        assert fields[name].metadata["help"] == info.description
    # one validator, one message: the spec's 422 and the PEFT config's error say the same
    with pytest.raises(ValidationError, match="qubits must be 'auto' or an integer between 1 and 16, got 0") as spec:
        parse_spec({"model": "builtin:tiny-llama", "dataset": "builtin:restaurants",
                    "method": {"kind": "qaa", "qubits": 0}})  # fmt: skip
    with pytest.raises(ValidationError, match="qubits must be 'auto' or an integer between 1 and 16, got 0") as peft:
        QAAPeftConfig(qubits=0)
    assert spec.value.errors()[0]["msg"] == peft.value.errors()[0]["msg"]
    # the Aer simulation method has its own name; specs that call it `method` still parse
    quantum = {"backend": "aer", "gradient": "parameter-shift", "method": "statevector"}
    old = parse_spec({"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "method": {"kind": "qaa"},
                      "quantum": quantum})  # fmt: skip
    assert old.qaa_config().aer_method == "statevector" and old.method.kind == "qaa"


def test_the_trainer_example_learns_and_its_adapter_reloads(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    example = Path(__file__).parent.parent / "examples" / "peft_trainer.py"
    argv = [str(example), "--model", "builtin:tiny-llama", "--steps", "20", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    ran = runpy.run_path(str(example), run_name="__main__")
    losses = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    trained, tokenizer = ran["model"].eval(), ran["tokenizer"]
    batch = _batch(tokenizer)
    fresh, _ = load_model("builtin:tiny-llama")
    restored = PeftModel.from_pretrained(fresh, tmp_path / "out")
    assert torch.equal(_logits(restored, batch), _logits(trained, batch))


def test_the_qaa_document_names_every_field_and_its_spec_block_is_valid():
    import re

    import yaml

    from service.spec import QuantumOptions

    text = (Path(__file__).parent.parent / "docs" / "qaa.md").read_text()
    block = text.split("## The job spec's QAA fields", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    doc = yaml.safe_load(block)
    assert set(doc["method"]) - {"kind"} == set(QAAShape.model_fields)
    assert set(doc["quantum"]) == set(QuantumOptions.model_fields)
    spec = parse_spec({"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", **doc})
    assert (
        spec.qaa_config()
        == parse_spec(
            {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "method": {"kind": "qaa"}}
        ).qaa_config()
    )  # fmt: skip  (the defaults)
    assert not re.search(r"DESIGN\.md", text)


def test_a_downloaded_adapter_runs_in_a_plain_transformers_script(tiny, tmp_path, monkeypatch, capsys):
    """examples/use_adapter.py on a trained job's artifacts (here: a PEFT QAA adapter saved as the trainer saves it)
    prints what the adapted model generates, and not what the base model does."""
    import runpy
    import sys

    from workers.evaluation import generate

    base, batch = tiny
    model = get_peft_model(base, QAAPeftConfig(layers=1, task_type="CAUSAL_LM"))
    _perturb(model, scale=2.0)
    model.save_pretrained(tmp_path)
    loaded = load_model("builtin:tiny-llama")
    prompt = "name[Aromi], eatType[coffee shop]"
    kwargs = {
        "chat": loaded.chat,
        "max_length": 64,
        "max_new_tokens": 6,
        "batch_size": 1,
        "device": torch.device("cpu"),
    }
    expected = generate(model, loaded.tokenizer, [prompt], **kwargs)[0]
    plain = generate(loaded.model, loaded.tokenizer, [prompt], **kwargs)[0]
    assert expected != plain  # the adapter changes what the model says
    example = Path(__file__).parent.parent / "examples" / "use_adapter.py"
    argv = [str(example), "--model", "builtin:tiny-llama", "--adapter", str(tmp_path), "--prompt", prompt,
            "--max-new-tokens", "6"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(example), run_name="__main__")
    assert capsys.readouterr().out.strip() == expected
