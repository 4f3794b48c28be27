"""`QAALayer`: a frozen linear map plus the quantum-amplitude update of DESIGN.md.

y = f(x) + alpha * ||z|| * Up(r(U(theta) |psi(z)>))
"""

from __future__ import annotations

import math
import zlib

import torch
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


class QAALayer(nn.Module):
    """Wraps `base_layer` (kept frozen and intact, so the adapter can be disabled or removed).

    `engine` computes the readout: the exact engine, or a circuit engine of the run the layer is bound to.
    Parameters: `theta` ([P], P = 2Ln + n, uniform in [0, 2pi) as PennyLane's TorchLayer) and `up`
    (`nn.Linear(k, d_out, bias=False)`, zero-initialised so the adapted model starts identical to its base).
    With `compress: learned`, `compress` is a trainable `nn.Linear(d_in, 2^n, bias=False)`; with `fixed`, the buffer
    `compress_matrix` holds a seeded matrix with orthonormal rows.

    Example:
        >>> base = nn.Linear(64, 32)
        >>> layer = QAALayer(base, QAAConfig(layers=1))
        >>> layer.theta.shape, layer.n_qubits
        (torch.Size([18]), 6)
        >>> torch.equal(layer(torch.ones(2, 64)), base(torch.ones(2, 64)))
        True
    """

    def __init__(self, base_layer: nn.Module, config: QAAConfig, name: str = "", *, bind: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.in_features, self.out_features = linear_features(base_layer)
        self.n_qubits = config.num_qubits(self.in_features)
        # A layer on its own runs its circuits on its own; a model's layers are left unbound (`bind=False`) and
        # share one run (`circuits.execution`). The exact engine needs no run.
        self.engine = get_engine(config, self.n_qubits) if bind or config.backend == "exact" else None
        self.disabled = False

        gen = _generator(config.seed, name)
        p, k, dim = config.num_params(self.n_qubits), config.num_outputs(self.n_qubits), 2**self.n_qubits
        device = base_layer.weight.device
        self.theta = nn.Parameter((torch.rand(p, generator=gen) * (2 * math.pi)).to(device))
        self.up = nn.Linear(k, self.out_features, bias=False, device=device)
        nn.init.zeros_(self.up.weight)
        self.compress: nn.Linear | None = None
        if dim < self.in_features:
            if config.compress == "learned":
                self.compress = nn.Linear(self.in_features, dim, bias=False, device=device)
                with torch.no_grad():
                    self.compress.weight.copy_(_orthonormal_rows(dim, self.in_features, gen))
            else:
                self.register_buffer("compress_matrix", _orthonormal_rows(dim, self.in_features, gen).to(device))

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """z of DESIGN.md: x itself (zero-padded by the engine) or its compression, as [M, d] in float32."""
        z = x.reshape(-1, self.in_features).float()
        if self.compress is not None:
            return self.compress(z)
        if hasattr(self, "compress_matrix"):
            return z @ self.compress_matrix.transpose(0, 1)
        return z

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.engine is None:
            raise RuntimeError(
                f"this adapter's circuits run on {self.config.backend!r} and it is bound to no run: "
                "call the model inside `with circuits.execution(model):`"
            )
        readout = self.engine(self.adapter_input(x), self.theta)
        # result + alpha * up(readout) as one addmm: no separate tensors for the update, its scaling and the sum.
        flat = result.reshape(-1, self.out_features).float()
        out = torch.addmm(flat, readout, self.up.weight.t(), alpha=self.config.alpha)
        return out.view(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return f"qubits={self.n_qubits}, layers={c.layers}, entangler={c.entangler}, readout={c.readout}"


def _orthonormal_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=gen))
    return q.transpose(0, 1).contiguous()
