"""The exact engine's CPU kernel (`exact_kernel.cpp`): the `blocks` strategy's circuit, one tile of tokens at a time.

The eager engine is bound by memory: each op is a pass over every token's state (megabytes at model scale) plus a
Python-dispatched call. The kernel simulates 16 tokens from the embedding to the probabilities while their state
stays in the core's cache, one gate at a time, and walks them back the same way for the adjoint gradient
(`benchmarks/exact_engine.py` measures it against LoRA).

The kernel is built on first use with torch's C++ extension loader (gcc and ninja, both offline) into torch's
extension cache, once per machine and source. `QAA_EXACT_KERNEL` = auto (use it on a CPU; if it cannot be built,
warn once and run the eager engine) or never.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("exact_kernel.cpp")
_LOCK = threading.Lock()
_BUILT: list = []  # [module or None] once a build was tried


def kernel_wanted(device: torch.device) -> bool:
    """Whether `QAA_EXACT_KERNEL` asks for the kernel on `device` (a CPU only)."""
    mode = os.environ.get("QAA_EXACT_KERNEL", "auto")
    if mode not in ("auto", "never"):
        raise ValueError(f"QAA_EXACT_KERNEL={mode!r}: expected auto or never")
    return mode == "auto" and device.type == "cpu"


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: the kernel is built with -march=native, so a cache is per kind of CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in info.splitlines() if line.startswith("flags")), "")


def kernel():
    """The built extension module, or None where it cannot be built (the reason is logged once)."""
    with _LOCK:
        if not _BUILT:
            _BUILT.append(_build())
        return _BUILT[0]


def _build():
    from torch.utils import cpp_extension

    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:12]
    try:
        return cpp_extension.load(
            name=f"qaa_exact_{tag}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],  # at::parallel_for is OpenMP, inline
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler, no ninja, a failed build
        log.warning("the exact engine's CPU kernel could not be built (%s); running the eager engine", exc)
        return None


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """A plan as the kernel's op table: int32 rows (kind, qubit or slot, rotation), per-RY angle indices and the
    permutations' forward and inverse gathers."""

    ops: torch.Tensor
    rotations: torch.Tensor  # [G]: theta index of each RY
    perm: torch.Tensor
    inverse: torch.Tensor


@lru_cache(maxsize=64)
def kernel_plan(plan) -> KernelPlan:
    from .exact import Permutation, Phase, RealRotation

    rows, rotations, perms, inverse = [], [], [], []
    phases = 0
    for op in plan.ops:
        if isinstance(op, RealRotation):
            for qubit, param in zip(op.qubits, op.params, strict=True):
                rows.append((0, qubit, len(rotations)))
                rotations.append(param)
        elif isinstance(op, Phase):
            rows.append((1, phases, 0))
            phases += 1
        else:
            assert isinstance(op, Permutation)
            rows.append((2, len(perms), 0))
            perms.append(op.index)
            inverse.append(op.inverse())

    def table(lists: list) -> torch.Tensor:
        return torch.tensor(lists, dtype=torch.int32).reshape(len(lists), plan.dim)

    return KernelPlan(
        ops=torch.tensor(rows, dtype=torch.int32).reshape(-1, 3),
        rotations=torch.tensor(rotations, dtype=torch.long),
        perm=table(perms),
        inverse=table(inverse),
    )


if __name__ == "__main__":  # `python -m circuits.backends.exact_kernel`: build it ahead of the first job (make install)
    logging.basicConfig(format="%(message)s")
    built = kernel()
    print(f"exact engine CPU kernel: {built.__file__ if built else 'not built, the eager engine will run'}")
