"""Model-level QAA: inject adapters into matching modules, save and load them, count what trains."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import EXECUTION_FIELDS, QAAConfig, matches_target
from .layer import QAALayer, linear_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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
    """Freeze the whole model and replace every module matching `targets` by `wrap(module, name)`.

    The injection step of every adapter method (QAA here, SoRA in the workers); modules already wrapped by
    `wrapper` are skipped. Returns the wrapped names; no match is an error listing the wrappable modules.
    """
    names = [
        name
        for name, module in model.named_modules()
        if name and not isinstance(module, wrapper) and matches_target(name, targets)
    ]
    if not names:
        raise ValueError(
            f"target_modules {targets!r} matched no module; linear modules: {', '.join(linear_module_names(model))}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child), name))
    return names


def inject_qaa(model: nn.Module, config: QAAConfig) -> nn.Module:
    """Wrap every module whose name matches `config.target_modules` in a `QAALayer` and freeze all else.

    On a circuit backend the adapters are left unbound: run the model inside `circuits.execution(model)`,
    which binds them all to one run.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential()
        >>> model.add_module("q_proj", nn.Linear(16, 16))
        >>> model = inject_qaa(model, QAAConfig(target_modules=["q_proj"], layers=1))
        >>> trainable_summary(model)["trainable"]
        76
    """
    wrap_modules(
        model, config.target_modules, lambda module, name: QAALayer(module, config, name=name, bind=False), QAALayer
    )
    for layer in qaa_layers(model).values():
        for param in _adapter_parameters(layer):
            param.requires_grad_(True)
    model.qaa_config = config
    return model


def qaa_layers(model: nn.Module) -> dict[str, QAALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QAALayer)}


def _adapter_parameters(layer: QAALayer) -> list[nn.Parameter]:
    return [p for name, p in layer.named_parameters() if not name.startswith("base_layer.")]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (theta, up, compression), keyed by its full name in the model."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if ".base_layer." not in name and any(name.startswith(p + ".") for p in qaa_layers(model))
    }


def save_qaa(model: nn.Module, directory: str | Path) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (adapter tensors only) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: QAAConfig = model.qaa_config
    # The adapter's shape only: where its circuits run is the next run's choice, not the adapter's.
    shape = config.model_dump(exclude=set(EXECUTION_FIELDS) - {"seed"})
    (directory / CONFIG_NAME).write_text(json.dumps({"method": "qaa", **shape}, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_NAME)
    return directory


def load_qaa(model: nn.Module, directory: str | Path) -> nn.Module:
    """Restore adapters saved by `save_qaa`, injecting them first if the model has none."""
    directory = Path(directory)
    raw = json.loads((directory / CONFIG_NAME).read_text())
    raw.pop("method", None)  # our tag, or (adapters saved before the backend left the file) Aer's method
    config = QAAConfig(**{k: v for k, v in raw.items() if k not in EXECUTION_FIELDS or k == "seed"})
    if not qaa_layers(model):
        inject_qaa(model, config)
    tensors = load_file(directory / WEIGHTS_NAME)
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
