"""Adaptation methods: turn a loaded model into one whose trainable parameters are those of the spec's method.

`prepare(model, spec)` is the single entry point; `load_adapter_into(model, directory)` is its inverse for a
saved adapter. Methods:

- `qaa`, `lora`, `prefix`: PEFT's `get_peft_model` with `circuits.tuner.QAAPeftConfig` (QAA is registered with
  PEFT), `LoraConfig` or `PrefixTuningConfig`; saved by PEFT's `save_pretrained`.
- `sora`: Sparse Low-rank Adaptation (Ding et al. 2023), `SoRALayer` below, with the proximal L1 step on its
  gate after every optimizer step.
- `full`: every weight trains; the whole state dict is saved.

Every saved adapter is an `adapter_config.json` plus an `adapter_model.safetensors`.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import circuits
from circuits.config import resolve_targets
from circuits.inject import linear_module_names, wrap_modules
from circuits.layer import linear_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class PreparedModel:
    """A model ready to train: `model` is what forward and `generate` are called on (a `PeftModel` for PEFT
    methods), `save(dir)` writes the adapter, `post_step(lr)` runs after every optimizer step (SoRA's
    proximal step)."""

    model: nn.Module
    kind: str
    save: Callable[[Path], None]
    post_step: Callable[[float], None] | None = None
    #: Parameters that train without weight decay (SoRA's gates carry their own L1 penalty).
    no_decay: set[str] = field(default_factory=set)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def summary(self) -> dict[str, float]:
        return circuits.trainable_summary(self.model)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = self.trainable()
        decay = [p for n, p in params.items() if n not in self.no_decay]
        plain = [p for n, p in params.items() if n in self.no_decay]
        return [g for g in ({"params": decay, "weight_decay": weight_decay},
                            {"params": plain, "weight_decay": 0.0}) if g["params"]]  # fmt: skip


def prepare(model: nn.Module, spec: Any) -> PreparedModel:
    """Apply `spec.method` to `model` (modified in place); ValueError if its targets match nothing."""
    method = spec.method
    if method.kind in ("qaa", "lora", "prefix"):
        return _peft(model, spec)
    if method.kind == "sora":
        config = SoRAConfig(method.target_modules, method.r, method.lora_alpha, method.sparse_lambda,
                            spec.training.seed)  # fmt: skip
        inject_sora(model, config)
        gates = {n for n, _ in model.named_parameters() if n.endswith(".sora_gate")}
        return PreparedModel(model, "sora", lambda d: save_sora(model, d),
                             post_step=lambda lr: sora_proximal_step(model, lr), no_decay=gates)  # fmt: skip
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return PreparedModel(model, "full", lambda d: save_full(model, d))
    raise ValueError(f"unknown method {method.kind!r}")


def _peft(model: nn.Module, spec: Any) -> PreparedModel:
    """One injection path for the methods PEFT knows (QAA among them): their adapters' shape is the spec's
    method block; a QAA run's backend is bound by the trainer (`circuits.execution`), never by the adapter."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    method = spec.method
    if method.kind == "qaa":
        from circuits.tuner import peft_config

        config = peft_config(spec.qaa_config(), task_type="CAUSAL_LM")
    elif method.kind == "lora":
        targets = method.target_modules
        if isinstance(targets, str):  # PEFT would run the user's regex with `re`: hand it the names RE2 matched
            targets = resolve_targets([n for n, _ in model.named_modules()], targets)
            if not targets:
                raise ValueError(f"target_modules {method.target_modules!r} matched no module")
        config = LoraConfig(task_type="CAUSAL_LM", r=method.r, lora_alpha=method.lora_alpha,
                            lora_dropout=method.lora_dropout, target_modules=targets)  # fmt: skip
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"{exc} (linear modules: {', '.join(linear_module_names(model))})") from exc
    return PreparedModel(peft_model, method.kind, lambda d: peft_model.save_pretrained(str(d)))


def load_adapter_into(model: nn.Module, directory: Path) -> nn.Module:
    """Rebuild the adapted model from `prepare`'s saved files; returns the model to call (maybe a wrapper)."""
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") == "QAA":
        from circuits.tuner import register

        register()  # PEFT knows QAA from here on
    if "peft_type" in config:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(directory))
    kind = config.get("method")
    if "readout" in config and "entangler" in config:  # a QAA adapter saved before QAA was a PEFT method
        return circuits.load_qaa(model, directory)
    if kind == "sora":
        return load_sora(model, directory)
    if kind == "full":
        from safetensors.torch import load_model

        load_model(model, directory / WEIGHTS_NAME)
        return model
    raise ValueError(f"{directory / CONFIG_NAME} names no known method (got {kind!r})")


def save_full(model: nn.Module, directory: Path) -> None:
    """The whole state dict; `save_model` stores tied weights (embeddings and LM head) once."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps({"method": "full"}, indent=2))
    save_model(model, str(directory / WEIGHTS_NAME))


# --- SoRA ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoRAConfig:
    target_modules: list[str] | str
    r: int = 8
    lora_alpha: float = 16.0
    sparse_lambda: float = 1e-3
    seed: int = 0


class SoRALayer(nn.Module):
    """`y = base(x) + (lora_alpha / r) * B diag(g) A x`: LoRA with a gate `g` whose L1 proximal step zeroes
    ranks, so the effective rank shrinks while training (Ding et al. 2023, "Sparse Low-rank Adaptation").

    `sora_B` starts at zero, so the adapted model starts identical to its base; `sora_gate` starts at one.

    Example:
        >>> layer = SoRALayer(nn.Linear(8, 4), SoRAConfig(["x"], r=2))
        >>> torch.equal(layer(torch.ones(1, 8)), layer.base_layer(torch.ones(1, 8)))
        True
    """

    def __init__(self, base_layer: nn.Module, config: SoRAConfig, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = linear_features(base_layer)
        self.scaling = config.lora_alpha / config.r
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(name.encode()))
        device = base_layer.weight.device
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) as nn.Linear and LoRA's A
        self.sora_A = nn.Parameter(((torch.rand(config.r, d_in, generator=gen) * 2 - 1) * bound).to(device))
        self.sora_B = nn.Parameter(torch.zeros(d_out, config.r, device=device))
        self.sora_gate = nn.Parameter(torch.ones(config.r, device=device))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        low = (x.to(self.sora_A.dtype) @ self.sora_A.t()) * self.sora_gate
        return result + (low @ self.sora_B.t() * self.scaling).to(result.dtype)


def inject_sora(model: nn.Module, config: SoRAConfig) -> nn.Module:
    """Wrap every matching module in a `SoRALayer` and freeze everything else."""
    wrap_modules(model, config.target_modules, lambda module, name: SoRALayer(module, config, name=name), SoRALayer)
    for n, p in model.named_parameters():
        p.requires_grad_(".sora_" in n or n.startswith("sora_"))
    model.sora_config = config
    return model


@torch.no_grad()
def sora_proximal_step(model: nn.Module, lr: float) -> None:
    """g <- sign(g) * max(|g| - lr * lambda, 0) on every gate: the proximal operator of lambda * ||g||_1."""
    threshold = lr * model.sora_config.sparse_lambda
    for module in model.modules():
        if isinstance(module, SoRALayer):
            g = module.sora_gate
            g.copy_(torch.sign(g) * torch.clamp(g.abs() - threshold, min=0))


def _sora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".sora_" in n}


def save_sora(model: nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    c = model.sora_config
    config = {"method": "sora", "target_modules": c.target_modules, "r": c.r, "lora_alpha": c.lora_alpha,
              "sparse_lambda": c.sparse_lambda, "seed": c.seed}  # fmt: skip
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file({n: t.detach().contiguous().cpu() for n, t in _sora_tensors(model).items()}, directory / WEIGHTS_NAME)


def load_sora(model: nn.Module, directory: Path) -> nn.Module:
    raw = json.loads((directory / CONFIG_NAME).read_text())
    raw.pop("method")
    inject_sora(model, SoRAConfig(**raw))
    tensors, expected = load_file(directory / WEIGHTS_NAME), _sora_tensors(model)
    if tensors.keys() != expected.keys():
        raise ValueError(f"the SoRA adapter in {directory} does not fit this model")
    for name, tensor in tensors.items():
        expected[name].data.copy_(tensor)
    return model
