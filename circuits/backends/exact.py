"""The exact statevector engine: QAA circuits as batched real tensor contractions on the model's device.

The ansatz gate list is compiled once per (n, layers, entangler, readout) into a `Plan` of three kinds of op:

* `RealRotation`: RY gates, fused into Kronecker blocks of a few qubits; real matrices, so a complex state is
  handled as its real and imaginary halves stacked along the batch (one real GEMM, half the flops of complex).
* `Phase`: RZ gates, a diagonal e^{i phi_j} over the basis; the only source of complex amplitudes.
* `Permutation`: a run of CNOTs as one gather.

The state lives as a real tensor [S*M, 2^n], S = 1 while it is real (the embedding and the first RY layer) and
S = 2 (real part rows, then imaginary part rows) after the first phase.

Two strategies, chosen by cost:

* `dense`: for small registers the whole circuit is one 2^n x 2^n unitary built from theta (not per token), and
  every token costs two real matrix products. Plain autograd.
* `blocks`: for larger registers the ops run over the batch of states. Gradients use the adjoint method (as
  PennyLane's `diff_method="adjoint"`): the forward saves only its input z, and the backward replays the circuit
  and walks the cotangent back through the ops, so no per-gate intermediate outlives one layer's backward.

Both return `||z|| * r(U(theta) |z/||z||>)`: the norm restore of DESIGN.md is part of the engine, so the saved input
is `z` alone, and a zero vector yields zero output and zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ansatz import Gate, ansatz_gates
from ..config import zz_pairs

#: Largest fused block of qubits: 5-qubit real blocks measured fastest on CPU (2^5 x 2^5 GEMMs stay in cache).
_MAX_BLOCK = 5
#: Below this register size the dense unitary wins (measured crossover on a 2-core CPU, see benchmarks/).
_DENSE_MAX_QUBITS = 7


@dataclass(frozen=True)
class RealRotation:
    """RY(theta[params[i]]) on qubits[i], all commuting; applied as Kronecker blocks."""

    qubits: tuple[int, ...]
    params: tuple[int, ...]


@dataclass(frozen=True)
class Phase:
    """RZ(theta[params[i]]) on qubits[i]: multiplies amplitude j by e^{-i/2 sum_i theta_i (-1)^{bit_i(j)}}."""

    qubits: tuple[int, ...]
    params: tuple[int, ...]


@dataclass(frozen=True)
class Permutation:
    """A run of CNOTs as a basis permutation: new_state[:, j] = state[:, index[j]]."""

    index: tuple[int, ...]


Op = RealRotation | Phase | Permutation


@dataclass(frozen=True)
class Plan:
    """A compiled circuit: ops in order, fused blocks, readout and the chosen strategy."""

    n: int
    ops: tuple[Op, ...]
    blocks: tuple[tuple[int, int], ...]  # (first qubit, size) of each fused block
    readout: str
    strategy: str  # "dense" | "blocks"

    @property
    def dim(self) -> int:
        return 2**self.n


def compile_gates(n: int, gates: list[Gate], readout: str, strategy: str = "auto") -> Plan:
    """Group a gate list into rotation, phase and permutation ops (qubit i = bit i of the basis index).

    Rotations on different qubits commute, so a run of single-qubit gates is split into stages (each qubit's k-th
    gate), and each stage into its RY part and its RZ part.
    """
    ops: list[Op] = []
    pending: list[list[Gate]] = [[] for _ in range(n)]
    perm: list[int] | None = None

    def flush_rotations() -> None:
        for stage in range(max(len(g) for g in pending)):
            gates_at = [g[stage] for g in pending if len(g) > stage]
            for name, kind in (("ry", RealRotation), ("rz", Phase)):
                chosen = [g for g in gates_at if g.name == name]
                if chosen:
                    ops.append(kind(tuple(g.qubits[0] for g in chosen), tuple(g.param for g in chosen)))
        for g in pending:
            g.clear()

    for gate in gates:
        if gate.name == "cx":
            flush_rotations()
            control, target = gate.qubits
            perm = list(range(2**n)) if perm is None else perm
            # Composing gathers: after this CNOT, amplitude j comes from cx(j) of the previous state.
            perm = [perm[j ^ (((j >> control) & 1) << target)] for j in range(2**n)]
        else:
            if perm is not None:
                ops.append(Permutation(tuple(perm)))
                perm = None
            pending[gate.qubits[0]].append(gate)
    flush_rotations()
    if perm is not None:
        ops.append(Permutation(tuple(perm)))
    if strategy == "auto":
        strategy = "dense" if n <= _DENSE_MAX_QUBITS else "blocks"
    return Plan(n, tuple(ops), _split(n), readout, strategy)


@lru_cache(maxsize=64)
def plan_for(n: int, layers: int, entangler: str, readout: str, strategy: str = "auto") -> Plan:
    """The compiled QAA ansatz, shared by every adapter of the same shape."""
    return compile_gates(n, ansatz_gates(n, layers, entangler), readout, strategy)


def _split(n: int) -> tuple[tuple[int, int], ...]:
    """Split n qubits into near-equal blocks of at most `_MAX_BLOCK` (10 -> 5+5, 11 -> 4+4+3)."""
    count = math.ceil(n / _MAX_BLOCK)
    sizes = [n // count + (1 if i < n % count else 0) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return tuple(zip(starts, sizes, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Op tensors from theta (differentiable, tiny: nothing here scales with the number of tokens)


@lru_cache(maxsize=64)
def _bit_signs(n: int, device: torch.device) -> torch.Tensor:
    """[2^n, n]: (-1)^{bit_i(j)}."""
    j = torch.arange(2**n, device=device)
    return 1.0 - 2.0 * ((j[:, None] >> torch.arange(n, device=device)[None, :]) & 1).float()


def op_tensors(plan: Plan, theta: torch.Tensor) -> list[torch.Tensor]:
    """For each RealRotation, one real matrix per block; for each Phase, the angle vector phi [2^n]."""
    theta = theta.float()
    cos, sin = torch.cos(theta / 2), torch.sin(theta / 2)
    signs = _bit_signs(plan.n, theta.device)
    eye = torch.eye(2, device=theta.device)
    tensors: list[torch.Tensor] = []
    for op in plan.ops:
        if isinstance(op, Phase):
            tensors.append(-0.5 * signs[:, list(op.qubits)] @ theta[list(op.params)])
        elif isinstance(op, RealRotation):
            idx = list(op.params)
            c, s = cos[idx], sin[idx]
            ry = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [gates, 2, 2]
            per_qubit = dict(zip(op.qubits, ry, strict=True))
            for start, size in plan.blocks:
                block = per_qubit.get(start, eye)
                for q in range(start + 1, start + size):
                    block = torch.kron(per_qubit.get(q, eye), block)  # higher qubits are more significant bits
                tensors.append(block)
    return tensors


@lru_cache(maxsize=64)
def _readout_matrix(n: int, readout: str, device: torch.device) -> torch.Tensor | None:
    """S with r = probs @ S: Z signs for expval (+ ZZ products for expval+zz); None for probs (r = probs)."""
    if readout == "probs":
        return None
    z = _bit_signs(n, device)
    pairs = zz_pairs(n) if readout == "expval+zz" else []
    if pairs:
        z = torch.cat([z, torch.stack([z[:, a] * z[:, b] for a, b in pairs], dim=1)], dim=1)
    return z.contiguous()


@lru_cache(maxsize=256)
def _index(perm: tuple[int, ...], device: torch.device, halves: int, inverse: bool = False) -> torch.Tensor:
    """Row gather index over a state flattened to [S * 2^n, M] (S = halves)."""
    idx = torch.tensor(perm, device=device)
    idx = torch.argsort(idx) if inverse else idx
    return torch.cat([idx + h * len(perm) for h in range(halves)])


def _permute(state: torch.Tensor, perm: tuple[int, ...], inverse: bool = False) -> torch.Tensor:
    """Gather whole rows of the flattened state: a contiguous copy per row, the cheapest gather on CPU."""
    idx = _index(perm, state.device, len(state), inverse)
    return state.reshape(-1, state.shape[2]).index_select(0, idx).reshape(state.shape)


# ---------------------------------------------------------------------------------------------------------------
# Applying ops to a state stored batch-last as [S, 2^n, M]: S = 1 while it is real, else (real part, imaginary part).
# With the basis index before the tokens, every block is one large GEMM with no copies (the tokens ride along as
# columns), a CNOT run gathers whole contiguous rows, and a phase scales rows.


def _block_view(state: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """[S * hi, 2^size, lo * M]: the block's qubits as the middle axis."""
    s, dim, cols = state.shape
    return state.reshape(s * (dim >> (start + size)), 2**size, (2**start) * cols)


def _apply_block(state: torch.Tensor, mat: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Apply a real 2^size matrix to qubits start..start+size-1 of every column."""
    view = _block_view(state, start, size)
    # An explicit bmm: torch.matmul folds a 2-D @ 3-D product into one GEMM over a transposed copy of the state.
    return torch.bmm(mat.expand(len(view), -1, -1), view).reshape(state.shape)


def _block_grad(cot: torch.Tensor, before: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """d loss / d mat for out = mat . before on one block: the sum over columns of cot (x) before."""
    a, b = _block_view(cot, start, size), _block_view(before, start, size)
    return torch.bmm(a, b.transpose(1, 2)).sum(0)


def _apply_phase(state: torch.Tensor, phi: torch.Tensor, conj: bool = False) -> torch.Tensor:
    """Multiply by e^{i phi} (e^{-i phi} with conj); a real state becomes complex."""
    c, s = torch.cos(phi)[:, None], torch.sin(phi)[:, None]
    s = -s if conj else s
    re, im = state[0], (state[1] if len(state) == 2 else None)
    if torch.is_grad_enabled():  # the dense path differentiates through this with autograd
        if im is None:
            return torch.stack([re * c, re * s])
        return torch.stack([re * c - im * s, re * s + im * c])
    out = state.new_empty((2, *state.shape[1:]))  # written in place: two passes fewer on the hot path
    torch.mul(re, c, out=out[0])
    torch.mul(re, s, out=out[1])
    if im is not None:
        out[0].addcmul_(im, s, value=-1)
        out[1].addcmul_(im, c)
    return out


def _run(plan: Plan, state: torch.Tensor, tensors: list[torch.Tensor], keep: bool = False):
    """Apply the plan; with keep, also return each tensor's op input (for the adjoint)."""
    inputs: list[torch.Tensor] = []
    it = iter(tensors)
    for op in plan.ops:
        if isinstance(op, Permutation):
            state = _permute(state, op.index)
        elif isinstance(op, Phase):
            if keep:
                inputs.append(state)
            state = _apply_phase(state, next(it))
        else:
            for start, size in plan.blocks:
                if keep:
                    inputs.append(state)
                state = _apply_block(state, next(it), start, size)
    return state, inputs


def _readout(plan: Plan, probs: torch.Tensor) -> torch.Tensor:
    """r as [M, k] from probs stored [2^n, M]."""
    signs = _readout_matrix(plan.n, plan.readout, probs.device)
    return probs.transpose(0, 1) if signs is None else (signs.transpose(0, 1) @ probs).transpose(0, 1)


def _embed(z: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm real state (zero-padded to 2^n) and the norms; zero rows stay zero."""
    z = z.float()
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    psi = z / norm.clamp_min(torch.finfo(z.dtype).tiny)
    if psi.shape[-1] < dim:
        psi = torch.nn.functional.pad(psi, (0, dim - psi.shape[-1]))
    return psi, norm


class _AdjointCircuit(torch.autograd.Function):
    """||z|| * r(U |z/||z||>) with adjoint differentiation; saves only z and the op tensors."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, plan: Plan, *tensors: torch.Tensor) -> torch.Tensor:
        psi, norm = _embed(z, plan.dim)
        final, _ = _run(plan, psi.transpose(0, 1)[None].contiguous(), list(tensors))
        ctx.plan = plan
        ctx.save_for_backward(z, *tensors)
        return norm * _readout(plan, final.square().sum(0))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan: Plan = ctx.plan
        z, *tensors = ctx.saved_tensors
        psi, norm = _embed(z, plan.dim)
        final, inputs = _run(plan, psi.transpose(0, 1)[None].contiguous(), tensors, keep=True)
        r = _readout(plan, final.square().sum(0))
        g = (grad_out.float() * norm).transpose(0, 1)  # d loss / d r, as [k, M]: the output is ||z|| * r
        signs = _readout_matrix(plan.n, plan.readout, final.device)
        cot = final * (2 * (g if signs is None else signs @ g))  # d loss / d amplitudes

        grads: list[torch.Tensor | None] = [None] * len(tensors)
        k = len(tensors)
        for op in reversed(plan.ops):
            if isinstance(op, Permutation):
                cot = _permute(cot, op.index, inverse=True)
                continue
            if isinstance(op, Phase):
                k -= 1
                before = inputs.pop()
                cot = _apply_phase(cot, tensors[k], conj=True)
                if ctx.needs_input_grad[2 + k]:  # d/dphi_j = sum_cols Im(conj(before) * cot)
                    grads[k] = (before[0] * cot[1]).sum(1)
                    if len(before) == 2:
                        grads[k] -= (before[1] * cot[0]).sum(1)
                cot = cot[: len(before)]  # where the state was real, only the real part flows back
                continue
            for start, size in reversed(plan.blocks):
                k -= 1
                before = inputs.pop()
                if ctx.needs_input_grad[2 + k]:
                    grads[k] = _block_grad(cot, before, start, size)
                cot = _apply_block(cot, tensors[k].transpose(0, 1), start, size)
        grad_z = None
        if ctx.needs_input_grad[0]:
            # cot is d loss / d psi scaled by ||z||; with psi = z/||z|| the chain rule gives
            # d/dz = (v - psi (psi . v)) / ||z|| + psi (grad_out . r).
            v = cot[0].transpose(0, 1)
            tangential = (v - psi * (psi * v).sum(-1, keepdim=True)) / norm.clamp_min(torch.finfo(v.dtype).tiny)
            grad_psi = tangential + psi * (grad_out.float() * r).sum(-1, keepdim=True)
            grad_z = grad_psi[:, : z.shape[-1]].to(z.dtype)
        return (grad_z, None, *grads)


def exact_expectations(plan: Plan, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`||z|| * r(U(theta)|z/||z||>)` for z of shape [M, d <= 2^n]; differentiable in z and theta."""
    tensors = op_tensors(plan, theta)
    if plan.strategy == "blocks":
        return _AdjointCircuit.apply(z, plan, *tensors)
    psi, norm = _embed(z, plan.dim)
    # Run over the basis as columns: u[s] holds the real (s = 0) and imaginary parts of U.
    u, _ = _run(plan, torch.eye(plan.dim, device=z.device)[None], tensors)
    final = torch.matmul(u, psi.transpose(0, 1))
    return norm * _readout(plan, final.square().sum(0))
