"""Amplitude embedding as a fixed gate structure: a tree of uniformly controlled RY rotations.

Real amplitudes need only RY: qubit n-1 is rotated first by the split of the norm between the two halves of
`z`, then each lower qubit by the split inside the half selected by the qubits above it; on qubit 0 the angle
is `2 atan2(z_odd, z_even)`, which carries the signs. Each uniformly controlled rotation with k controls is
decomposed as in Mottonen et al. (2004) into 2^k plain RY gates and 2^k CNOTs in Gray-code order, so every
data angle appears in exactly one RY gate and the two-term parameter-shift rule is exact for it.

`embedding_gates` (the structure) and `data_angles` (torch, differentiable in z) are the two halves of one
definition: the circuit template renders the first, the engines feed it the second.
"""

from __future__ import annotations

from functools import lru_cache

from .ansatz import Gate


def num_data_angles(n: int) -> int:
    """D = 2^n - 1: one angle per node of the binary tree."""
    return 2**n - 1


def _gray(i: int) -> int:
    return i ^ (i >> 1)


@lru_cache(maxsize=32)
def embedding_gates(n: int) -> tuple[Gate, ...]:
    """The preparation circuit; `Gate.param` indexes the data angles (level by level, qubit n-1 first)."""
    gates: list[Gate] = []
    offset = 0
    for target in range(n - 1, -1, -1):
        controls = list(range(target + 1, n))  # bit b of the control value is qubit target+1+b
        size = 2 ** len(controls)
        for i in range(size):
            gates.append(Gate("ry", (target,), offset + i))
            if controls:
                changed = (_gray(i) ^ _gray((i + 1) % size)).bit_length() - 1
                gates.append(Gate("cx", (controls[changed], target)))
        offset += size
    return tuple(gates)


def data_angles(z, n: int):
    """The D data angles of each row of z ([M, d <= 2^n], floating torch), differentiable; zero sub-blocks get
    0.

    A sub-block of exactly zero amplitudes has no defined angle: it gets 0 and a zero gradient (instead of
    NaN), so a zero input stays harmless. Real hidden states do not hit this set; zero padding does, and its
    gradient is discarded with the padding.
    """
    import torch

    dim = 2**n
    if z.shape[-1] < dim:
        z = torch.nn.functional.pad(z, (0, dim - z.shape[-1]))
    rows = z.shape[0]
    squares = z.square()
    levels = []
    for target in range(n - 1, -1, -1):
        if target == 0:
            pair = z.reshape(rows, dim // 2, 2)
            y, x = pair[..., 1], pair[..., 0]
        else:
            halves = squares.reshape(rows, dim // 2 ** (target + 1), 2, 2**target).sum(-1)
            y, x = _safe_sqrt(halves[..., 1]), _safe_sqrt(halves[..., 0])
        alpha = 2 * _safe_atan2(y, x)
        levels.append(alpha @ _gray_walsh(n - 1 - target).to(z))
    return torch.cat(levels, dim=-1)


def _safe_sqrt(s):
    import torch

    positive = s > 0
    return torch.where(positive, torch.where(positive, s, 1.0).sqrt(), 0.0)


def _safe_atan2(y, x):
    import torch

    defined = (y != 0) | (x != 0)
    return torch.where(defined, torch.atan2(torch.where(defined, y, 0.0), torch.where(defined, x, 1.0)), 0.0)


@lru_cache(maxsize=64)
def _gray_walsh(k: int):
    """W with theta' = alpha @ W: the rotation seen under control value p is sum_i (-1)^{p . gray(i)}
    theta'_i."""
    import torch

    size = 2**k
    p = torch.arange(size)[:, None]
    g = torch.tensor([_gray(i) for i in range(size)])[None, :]
    parity = torch.zeros(size, size, dtype=torch.long)
    for b in range(k):
        parity ^= ((p >> b) & 1) & ((g >> b) & 1)
    signs = 1.0 - 2.0 * parity.float()  # M[p, i]; M^T M = 2^k I
    return signs / size
