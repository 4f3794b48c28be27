"""`QAALayer`: a frozen linear map plus the quantum-amplitude update of docs/qaa.md, as a PEFT tuner layer.

y = f(x) + sum over active adapters of alpha * ||z|| * Up(r(U(theta) |psi(z)>))

One layer holds any number of named adapters (`QAAAdapter`), like PEFT's LoRA layers: `set_adapter`,
`disable_adapters` and `delete_adapter` are PEFT's own (`BaseTunerLayer`), keyed by the `qaa_adapters` dict.
"""

from __future__ import annotations

import math
import zlib

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backends import get_engine
from .config import QAAConfig


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a module QAA can wrap: `nn.Linear`, or GPT-2's `Conv1D` (weight stored as [d_in, d_out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    raise TypeError(f"QAA cannot wrap {type(module).__name__}; supported modules: torch.nn.Linear, transformers Conv1D")


def _generator(seed: int, name: str) -> torch.Generator:
    """Seeded per module name, so an adapter's initialisation does not depend on injection order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class QAAAdapter(nn.Module):
    """One adapter of one layer: its tensors and the engine that computes its readout.

    `theta` ([P], P = 2Ln + n, uniform in [0, 2pi) as PennyLane's TorchLayer) and `up` (`nn.Linear(k, d_out,
    bias=False)`, zero-initialised so the adapted model starts identical to its base). With `compress: learned`,
    `compress` is a trainable `nn.Linear(d_in, 2^n, bias=False)`; with `fixed`, the buffer `compress_matrix` holds
    a seeded matrix with orthonormal rows. `engine` is the exact engine, or a circuit engine of the run the
    adapter is bound to (`circuits.execution`); None while a circuit-backend adapter is unbound.
    """

    def __init__(self, in_features: int, out_features: int, config: QAAConfig, name: str, device, *, bind: bool):
        super().__init__()
        self.config, self.in_features, self.out_features = config, in_features, out_features
        self.n_qubits = config.num_qubits(in_features)
        self.engine = get_engine(config, self.n_qubits) if bind or config.backend == "exact" else None
        gen = _generator(config.seed, name)
        p, k, dim = config.num_params(self.n_qubits), config.num_outputs(self.n_qubits), 2**self.n_qubits
        self.theta = nn.Parameter((torch.rand(p, generator=gen) * (2 * math.pi)).to(device))
        self.up = nn.Linear(k, out_features, bias=False, device=device)
        nn.init.zeros_(self.up.weight)
        self.compress: nn.Linear | None = None
        if dim < in_features:
            if config.compress == "learned":
                self.compress = nn.Linear(in_features, dim, bias=False, device=device)
                with torch.no_grad():
                    self.compress.weight.copy_(_orthonormal_rows(dim, in_features, gen))
            else:
                self.register_buffer("compress_matrix", _orthonormal_rows(dim, in_features, gen).to(device))

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """z of docs/qaa.md: x itself (zero-padded by the engine) or its compression, as [M, d] in float32."""
        z = x.reshape(-1, self.in_features).float()
        if self.compress is not None:
            return self.compress(z)
        if hasattr(self, "compress_matrix"):
            return z @ self.compress_matrix.transpose(0, 1)
        return z

    def add_to(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """flat + alpha * up(readout(x)) as one addmm: no separate tensors for the update, its scale and the sum."""
        if self.engine is None:
            raise RuntimeError(
                f"this adapter's circuits run on {self.config.backend!r} and it is bound to no run: "
                "call the model inside `with circuits.execution(model):`"
            )
        readout = self.engine(self.adapter_input(x), self.theta)
        return torch.addmm(flat, readout, self.up.weight.t(), alpha=self.config.alpha)

    def extra_repr(self) -> str:
        c = self.config
        return f"qubits={self.n_qubits}, layers={c.layers}, entangler={c.entangler}, readout={c.readout}"


class QAALayer(nn.Module, BaseTunerLayer):
    """Wraps `base_layer` (kept frozen and intact, so adapters can be disabled or removed) with named adapters.

    A layer on its own runs its circuits on its own (`bind=True`); a model's layers are left unbound and share
    one run (`circuits.execution`). The exact engine needs no run.

    Example:
        >>> base = nn.Linear(64, 32)
        >>> layer = QAALayer(base, QAAConfig(layers=1))
        >>> layer.adapter().theta.shape, layer.adapter().n_qubits
        (torch.Size([18]), 6)
        >>> torch.equal(layer(torch.ones(2, 64)), base(torch.ones(2, 64)))
        True
    """

    adapter_layer_names = ("qaa_adapters",)

    def __init__(self, base_layer: nn.Module, config: QAAConfig, name: str = "", *, adapter_name: str = "default",
                 bind: bool = True):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.qaa_adapters = nn.ModuleDict()
        self._bind = bind
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config, name)

    def update_layer(self, adapter_name: str, config: QAAConfig, name: str) -> None:
        """Add the adapter `adapter_name` (PEFT's name for this step), on the base layer's device."""
        device = self.get_base_layer().weight.device
        self.qaa_adapters[adapter_name] = QAAAdapter(
            self.in_features, self.out_features, config, name, device, bind=self._bind
        )
        self.set_adapter(self.active_adapters)

    def adapter(self, adapter_name: str | None = None) -> QAAAdapter:
        """The adapter `adapter_name`, or the active one."""
        return self.qaa_adapters[adapter_name or self.active_adapters[0]]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.qaa_adapters]
        if self.disable_adapters or not active:
            return result
        flat = result.reshape(-1, self.out_features).float()
        for name in active:
            flat = self.qaa_adapters[name].add_to(flat, x)
        return flat.view(result.shape).to(result.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("a QAA update is not linear in x (it is normalised, embedded and measured): it cannot be "
                         "merged into the base weight; keep the adapter, or `unload()` it")  # fmt: skip

    def extra_repr(self) -> str:
        return f"adapters={list(self.qaa_adapters)}"


def _orthonormal_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=gen))
    return q.transpose(0, 1).contiguous()
