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


@dataclass(frozen=True, eq=False)
class Permutation:
    """A run of CNOTs as a basis permutation: new_state[:, j] = state[:, index[j]]."""

    index: tuple[int, ...]


Op = RealRotation | Phase | Permutation


@dataclass(frozen=True, eq=False)  # identity hashing: plans are shared through plan_for's cache and hash in O(1)
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

    @property
    def first_phase(self) -> int:
        """Index of the first Phase op: before it the state is real."""
        return next((i for i, op in enumerate(self.ops) if isinstance(op, Phase)), -1)


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


@lru_cache(maxsize=64)
def _gather_layout(plan: Plan, num_params: int, device: torch.device):
    """Index tensors that build every op tensor of a plan in a few batched ops (the per-gate loop is Python-bound).

    Index `num_params` points at an appended identity angle: RY(0) = I, and a zero RZ coefficient.
    """
    by_size: dict[int, list[list[int]]] = {}
    slots: list[tuple[str, int, int]] = []  # per op tensor: ("block", size, row) or ("phase", column, 0)
    phase_columns: list[list[int]] = []
    for op in plan.ops:
        if isinstance(op, RealRotation):
            param_of = dict(zip(op.qubits, op.params, strict=True))
            for start, size in plan.blocks:
                rows = by_size.setdefault(size, [])
                slots.append(("block", size, len(rows)))
                rows.append([param_of.get(q, num_params) for q in range(start, start + size)])
        elif isinstance(op, Phase):
            param_of = dict(zip(op.qubits, op.params, strict=True))
            slots.append(("phase", len(phase_columns), 0))
            phase_columns.append([param_of.get(q, num_params) for q in range(plan.n)])
    sizes = {size: torch.tensor(rows, device=device) for size, rows in by_size.items()}
    bits = {
        size: ((torch.arange(2**size, device=device)[:, None] >> torch.arange(size, device=device)) & 1).T
        for size in sizes
    }
    phases = torch.tensor(phase_columns, device=device).T if phase_columns else None  # [n, phases]
    return sizes, bits, phases, slots


def op_tensors(plan: Plan, theta: torch.Tensor) -> list[torch.Tensor]:
    """For each RealRotation, one real matrix per block; for each Phase, the angle vector phi [2^n].

    A block is the Kronecker product of its qubits' RY matrices (higher qubits are more significant bits):
    entry (a, b) is the product over its qubits t of RY_t[a_t, b_t], built for all blocks at once by one gather.
    """
    sizes, bits, phase_index, slots = _gather_layout(plan, len(theta), theta.device)
    half = torch.cat([theta.float(), theta.new_zeros(1, dtype=torch.float32)]) / 2
    cos, sin = torch.cos(half), torch.sin(half)
    blocks = {}
    for size, index in sizes.items():
        c, s = cos[index], sin[index]  # [blocks, size]
        ry = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [blocks, size, 2, 2]
        b = bits[size]
        qubit = torch.arange(size, device=theta.device)[:, None, None]
        blocks[size] = ry[:, qubit, b[:, :, None], b[:, None, :]].prod(1)
    phases = None
    if phase_index is not None:
        phases = -_bit_signs(plan.n, theta.device) @ half[phase_index]  # [2^n, phases]
    return [blocks[key][row] if kind == "block" else phases[:, key] for kind, key, row in slots]


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
def _index(perm: Permutation, device: torch.device, halves: int, inverse: bool = False) -> torch.Tensor:
    """Row gather index over a state flattened to [S * 2^n, M] (S = halves)."""
    idx = torch.tensor(perm.index, device=device)
    idx = torch.argsort(idx) if inverse else idx
    return torch.cat([idx + h * len(idx) for h in range(halves)])


def _permute(state: torch.Tensor, perm: Permutation, inverse: bool = False) -> torch.Tensor:
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
    """Multiply by e^{i phi} (e^{-i phi} with conj) along axis -3 = (real, imaginary); a real state becomes complex."""
    c, s = torch.cos(phi)[:, None], torch.sin(phi)[:, None]
    s = -s if conj else s
    re = state[..., 0, :, :]
    im = state[..., 1, :, :] if state.shape[-3] == 2 else None
    if torch.is_grad_enabled():  # the dense path differentiates through this with autograd
        if im is None:
            return torch.stack([re * c, re * s], dim=-3)
        return torch.stack([re * c - im * s, re * s + im * c], dim=-3)
    out = state.new_empty((*state.shape[:-3], 2, *state.shape[-2:]))  # in place: two passes fewer on the hot path
    out_re, out_im = out[..., 0, :, :], out[..., 1, :, :]
    torch.mul(re, c, out=out_re)
    torch.mul(re, s, out=out_im)
    if im is not None:
        out_re.addcmul_(im, s, value=-1)
        out_im.addcmul_(im, c)
    return out


def _run(plan: Plan, state: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply the plan to a state [S, 2^n, M]."""
    it = iter(tensors)
    for op in plan.ops:
        if isinstance(op, Permutation):
            state = _permute(state, op)
        elif isinstance(op, Phase):
            state = _apply_phase(state, next(it))
        else:
            for start, size in plan.blocks:
                state = _apply_block(state, next(it), start, size)
    return state


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
        final = _run(plan, psi.transpose(0, 1)[None].contiguous(), list(tensors))
        ctx.plan = plan
        # Only z is kept: keeping the final state too saves one replay but costs 2^n x M x 8 bytes per adapter,
        # which at SmolLM2 scale (60 adapters) is more memory than the whole LoRA adapter set.
        ctx.save_for_backward(z, *tensors)
        return norm * _readout(plan, final.square().sum(0))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan: Plan = ctx.plan
        z, *tensors = ctx.saved_tensors
        psi, norm = _embed(z, plan.dim)
        final = _run(plan, psi.transpose(0, 1)[None].contiguous(), tensors)
        r = _readout(plan, final.square().sum(0))
        g = (grad_out.float() * norm).transpose(0, 1)  # d loss / d r, as [k, M]: the output is ||z|| * r
        signs = _readout_matrix(plan.n, plan.readout, final.device)
        cot = final * (2 * (g if signs is None else signs @ g))  # d loss / d amplitudes

        # Walk back through the ops with the state and its cotangent side by side, [state; cot] as [2, S, 2^n, M]:
        # every op inverts the state and propagates the cotangent in one call (the ops are unitary).
        pair = torch.stack([final, cot])
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        k = len(tensors)
        for index, op in reversed(list(enumerate(plan.ops))):
            if isinstance(op, Permutation):
                pair = _permute(pair.flatten(0, 1), op, inverse=True).view(pair.shape)
                continue
            if isinstance(op, Phase):
                k -= 1
                pair = _apply_phase(pair, tensors[k], conj=True)
                if ctx.needs_input_grad[2 + k]:  # d/dphi_j = sum_cols Im(conj(before) * cot)
                    grads[k] = (pair[0, 0] * pair[1, 1] - pair[0, 1] * pair[1, 0]).sum(1)
                if index == plan.first_phase:  # the state was real before it: drop the (zero) imaginary parts
                    pair = pair[:, :1]
                continue
            for start, size in reversed(plan.blocks):
                k -= 1
                cot_after = pair[1]
                flat = _apply_block(pair.flatten(0, 1), tensors[k].transpose(0, 1), start, size)
                pair = flat.view(pair.shape)
                if ctx.needs_input_grad[2 + k]:
                    grads[k] = _block_grad(cot_after, pair[0], start, size)
        grad_z = None
        if ctx.needs_input_grad[0]:
            # cot is d loss / d psi scaled by ||z||; with psi = z/||z|| the chain rule gives
            # d/dz = (v - psi (psi . v)) / ||z|| + psi (grad_out . r).
            v = pair[1, 0].transpose(0, 1)
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
    u = _run(plan, torch.eye(plan.dim, device=z.device)[None], tensors)
    final = torch.matmul(u, psi.transpose(0, 1))
    return norm * _readout(plan, final.square().sum(0))
