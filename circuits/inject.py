"""Model-level QAA: inject adapters into matching modules, save and load them, count what trains.

Injection is PEFT's (`circuits.tuner`): `inject_qaa` is `peft.inject_adapter_in_model` with QAA's config, and
`get_peft_model` gives the same layers inside a `PeftModel`. A saved adapter is PEFT's format (adapter_config.json
with `peft_type: QAA`, adapter_model.safetensors), so `PeftModel.from_pretrained` loads what `save_qaa` writes;
`load_qaa` also reads the format written before QAA was a PEFT method.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import EXECUTION_FIELDS, QAAConfig, matches_target
from .layer import QAAAdapter, QAALayer, linear_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: The prefix PEFT gives every key of a saved adapter (the `PeftModel` -> tuner -> base model path).
PEFT_PREFIX = "base_model.model."
#: Between a wrapped module's name and a saved adapter tensor's key (PEFT drops the adapter's name).
ADAPTERS = ".qaa_adapters."


def _is_wrappable(module: nn.Module) -> bool:
    try:
        linear_features(module)
    except TypeError:
        return False
    return True


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last names of the modules an adapter can wrap (Linear, GPT-2's Conv1D), for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_wrappable(module)})


def wrap_modules(
    model: nn.Module, targets: list[str] | str, wrap: Callable[[nn.Module, str], nn.Module], wrapper: type
) -> list[str]:
    """Freeze the whole model and replace every module matching `targets` by `wrap(module, name)` (SoRA's
    injection; modules already wrapped by `wrapper` are skipped). No match is an error listing the wrappable
    modules."""
    names = [
        name
        for name, module in model.named_modules()
        if name and not isinstance(module, wrapper) and matches_target(name, targets)
    ]
    if not names:
        raise no_match(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child), name))
    return names


def no_match(model: nn.Module, targets: list[str] | str) -> ValueError:
    return ValueError(
        f"target_modules {targets!r} matched no module; linear modules: {', '.join(linear_module_names(model))}"
    )


def inject_qaa(model: nn.Module, config: QAAConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap every module whose name matches `config.target_modules` in a `QAALayer` and freeze all else.

    The adapters compute on the exact engine; `circuits.execution(model)` binds them to `config`'s backend for
    a run (one runner, one Batch or Session for the whole model).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential()
        >>> model.add_module("q_proj", nn.Linear(16, 16))
        >>> model = inject_qaa(model, QAAConfig(target_modules=["q_proj"], layers=1))
        >>> trainable_summary(model)["trainable"]
        76
    """
    from peft import inject_adapter_in_model

    from .tuner import peft_config

    if not any(name and matches_target(name, config.target_modules) for name, _ in model.named_modules()):
        raise no_match(model, config.target_modules)
    inject_adapter_in_model(peft_config(config), model, adapter_name=adapter_name)
    model.qaa_config = config
    return model


def qaa_adapters(model: nn.Module) -> dict[str, QAAAdapter]:
    """Every adapter of every `QAALayer`, keyed by the wrapped module's name under the base model (the name a
    saved adapter's keys carry), `:<adapter>` appended for any adapter but `default`."""
    out: dict[str, QAAAdapter] = {}
    for name, module in model.named_modules():
        if isinstance(module, QAALayer):
            for adapter, layer in module.qaa_adapters.items():
                key = base_name(name)
                out[key if adapter == "default" else f"{key}:{adapter}"] = layer
    return out


def base_name(name: str) -> str:
    """A module's name in the base model, whether the model is wrapped in a `PeftModel` or not."""
    return name.removeprefix(PEFT_PREFIX)


def _tensors(model: nn.Module, adapter_name: str):
    """(module name under the base model, tensor key within the adapter, tensor) of adapter `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, QAALayer) and adapter_name in module.qaa_adapters:
            for key, tensor in module.qaa_adapters[adapter_name].state_dict().items():
                if not key.startswith("engine."):
                    yield base_name(name), key, tensor


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` (theta, up, compression) keyed `<module>.<tensor>`, as adapters saved
    before QAA was a PEFT method: the canonical names both formats load onto."""
    return {f"{module}.{key}": tensor for module, key, tensor in _tensors(model, adapter_name)}


def save_qaa(model: nn.Module, directory: str | Path) -> Path:
    """PEFT's adapter format for a model `inject_qaa` adapted: what `PeftModel.from_pretrained` reads."""
    from .tuner import peft_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config(model.qaa_config).save_pretrained(str(directory))
    tensors = {
        f"{PEFT_PREFIX}{module}{ADAPTERS}{key}": tensor.detach().contiguous().cpu()
        for module, key, tensor in _tensors(model, "default")
    }
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


def _canonical(key: str) -> str:
    """A saved key (PEFT's or the old format's) as `<module>.<tensor>`."""
    return base_name(key).replace(ADAPTERS, ".", 1)


def read_qaa(directory: str | Path) -> tuple[QAAConfig, dict[str, torch.Tensor]]:
    """(the adapter's config, its tensors by canonical name) from a directory in either format."""
    directory = Path(directory)
    raw = json.loads((directory / CONFIG_NAME).read_text())
    if raw.get("peft_type") == "QAA":
        from .tuner import QAAPeftConfig, adapter_config

        config = adapter_config(QAAPeftConfig.from_pretrained(str(directory)))
    else:  # written before QAA was a PEFT method: `method` is our tag, or (older still) Aer's method
        raw.pop("method", None)
        config = QAAConfig(**{k: v for k, v in raw.items() if k not in EXECUTION_FIELDS or k == "seed"})
    return config, {_canonical(k): v for k, v in load_file(directory / WEIGHTS_NAME).items()}


def load_qaa(model: nn.Module, directory: str | Path) -> nn.Module:
    """Restore a saved adapter (either format) as the model's `default` adapter, injecting it first if the model
    has none."""
    config, tensors = read_qaa(directory)
    if not qaa_adapters(model):
        inject_qaa(model, config)
    expected = adapter_state_dict(model)
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trainable parameter count, total count and share (trainable / total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}
