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
* `blocks`: for larger registers the ops run over the batch of states, each writing into one of two reused
  buffers. Gradients use the adjoint method (as PennyLane's `diff_method="adjoint"`): the forward keeps its input z
  and the final state, and the backward walks the state and the cotangent back through the ops together, so no
  per-gate intermediate is ever stored.

Both return `||z|| * r(U(theta) |z/||z||>)`: the norm restore of docs/qaa.md is part of the engine, and a zero vector
yields zero output and zero gradient.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ansatz import Gate, ansatz_gates
from ..config import zz_pairs

#: Largest fused block of qubits. Blocks of at most 4 measured fastest on CPU at n = 8..12 (n = 10 as 4+3+3 beats
#: 5+5 by a fifth: half the flops for one more pass over a state that the buffers below keep in place).
_MAX_BLOCK = 4
#: Below this register size the dense unitary wins (measured crossover on a 2-core CPU, see benchmarks/).
_DENSE_MAX_QUBITS = 7
#: Largest reused state buffer, in floats (64 MiB): n = 10 with 4,096 tokens in the backward pass.
_BUFFER_CAP = 2**24


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
    """Split n qubits into near-equal blocks of at most `_MAX_BLOCK` (10 -> 4+3+3, 11 -> 4+4+3)."""
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

    Index `num_params` points at an appended identity angle: RY(0) = I, and a zero RZ coefficient. Every block is
    built at the largest block size, smaller ones padded with identity qubits on top and cut back to their corner.
    """
    width = max(size for _, size in plan.blocks)
    rows: list[list[int]] = []  # per block: the angle index of each of its qubits, padded to `width`
    slots: list[tuple[str, int, int]] = []  # per op tensor: ("block", row, size) or ("phase", column, 0)
    phase_columns: list[list[int]] = []
    for op in plan.ops:
        param_of = dict(zip(op.qubits, op.params, strict=True)) if not isinstance(op, Permutation) else {}
        if isinstance(op, RealRotation):
            for start, size in plan.blocks:
                slots.append(("block", len(rows), size))
                rows.append([param_of.get(q, num_params) for q in range(start, start + size)])
                rows[-1] += [num_params] * (width - size)
        elif isinstance(op, Phase):
            slots.append(("phase", len(phase_columns), 0))
            phase_columns.append([param_of.get(q, num_params) for q in range(plan.n)])
    blocks = torch.tensor(rows, device=device) if rows else None  # [blocks, width]
    phases = torch.tensor(phase_columns, device=device).T if phase_columns else None  # [n, phases]
    return blocks, phases, tuple(slots)


def _ry(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[[c, -s], [s, c]] as [..., 2, 2]."""
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _kron(ry: torch.Tensor) -> torch.Tensor:
    """[..., w, 2, 2] -> [..., 2^w, 2^w]: the Kronecker product with qubit w-1 as the most significant bit, built one
    qubit at a time (RY_t (x) the product of the qubits below t)."""
    out = ry[..., 0, :, :]
    for t in range(1, ry.shape[-3]):
        size = 2 * out.shape[-1]
        out = (ry[..., t, :, None, :, None] * out[..., None, :, None, :]).reshape(*ry.shape[:-3], size, size)
    return out


def _half_angles(theta: torch.Tensor) -> torch.Tensor:
    """theta / 2 with one zero appended: the identity angle that `_gather_layout` pads with."""
    return torch.cat([theta.float(), theta.new_zeros(1, dtype=torch.float32)]) / 2


def op_tensors(plan: Plan, theta: torch.Tensor) -> list[torch.Tensor]:
    """For each RealRotation, one real matrix per block; for each Phase, (cos phi, sin phi) as [2, 2^n, 1].

    A block is the Kronecker product of its qubits' RY matrices, built for all blocks at once.
    """
    block_index, phase_index, slots = _gather_layout(plan, len(theta), theta.device)
    half = _half_angles(theta)
    blocks = phases = None
    if block_index is not None:
        blocks = _kron(_ry(torch.cos(half)[block_index], torch.sin(half)[block_index]))  # [blocks, 2^w, 2^w]
    if phase_index is not None:
        phi = -_bit_signs(plan.n, theta.device) @ half[phase_index]  # [2^n, phases]
        phases = torch.stack([torch.cos(phi), torch.sin(phi)])[..., None]  # [2, 2^n, phases, 1]
    return [blocks[key, : 2**size, : 2**size] if kind == "block" else phases[:, :, key] for kind, key, size in slots]


def theta_grad(plan: Plan, theta: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d theta from d loss / d (each block matrix, each phase's angles phi): the chain rule through
    `op_tensors` by hand.

    The adjoint path uses this instead of an autograd graph of op_tensors, whose few dozen tiny nodes per adapter
    cost as much time as a third of the circuit's GEMMs at SmolLM2 scale. d K / d theta_t for a block K is K with
    qubit t's RY replaced by its derivative; all of them are built at once, as the blocks are.
    """
    block_index, phase_index, slots = _gather_layout(plan, len(theta), theta.device)
    half = _half_angles(theta)
    d_half = torch.zeros_like(half)
    if block_index is not None:
        count, width = block_index.shape
        upstream = half.new_zeros(count, 2**width, 2**width)  # smaller blocks fill their corner, as in op_tensors
        by_size: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for (kind, key, size), grad in zip(slots, grads, strict=True):
            if kind == "block":
                rows, of_size = by_size.setdefault(size, ([], []))
                rows.append(key)
                of_size.append(grad)
        for size, (rows, of_size) in by_size.items():
            upstream[rows, : 2**size, : 2**size] = torch.stack(of_size)
        c, s = torch.cos(half)[block_index], torch.sin(half)[block_index]
        ry, d_ry = _ry(c, s), _ry(-s, c)  # RY(2h) and d/dh of it, [blocks, width, 2, 2]
        one_hot = torch.eye(width, dtype=torch.bool, device=theta.device)[None, :, :, None, None]
        d_blocks = _kron(torch.where(one_hot, d_ry[:, None], ry[:, None]))  # [blocks, width (t), 2^w, 2^w]
        d_half.index_add_(0, block_index.flatten(), (d_blocks * upstream[:, None]).sum((-2, -1)).flatten())
    if phase_index is not None:
        upstream = torch.stack([g for (kind, _, _), g in zip(slots, grads, strict=True) if kind == "phase"], 1)
        d_phase = -_bit_signs(plan.n, theta.device).transpose(0, 1) @ upstream  # [n, phases]
        d_half.index_add_(0, phase_index.flatten(), d_phase.flatten())
    return (d_half[:-1] / 2).to(theta.dtype)


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


# ---------------------------------------------------------------------------------------------------------------
# Applying ops to a state stored batch-last as [S, 2^n, M]: S = 1 while it is real, else (real part, imaginary part).
# With the basis index before the tokens, every block is one large GEMM with no copies (the tokens ride along as
# columns), a CNOT run gathers whole contiguous rows, and a phase scales rows. Every op takes an optional `out`.


class _Buffers(threading.local):
    """Two reusable buffers that the ops of one adjoint pass write into by turns, plus a scratch buffer.

    Each op writes a state of megabytes at model scale, and torch has no caching allocator on CPU: a fresh tensor
    per op cost page faults on first touch that measured as long as the op itself. So the adjoint path keeps these
    per thread and device, grown to the largest call and reused; calls above `_BUFFER_CAP` floats allocate as usual.
    """

    def __init__(self) -> None:
        self.flat: dict[tuple[torch.device, int], torch.Tensor] = {}
        self.views: dict[tuple[torch.device, int, tuple[int, ...]], torch.Tensor] = {}  # no view op per call
        self.turn = 0

    def _get(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        view = self.views.get((like.device, slot, shape))
        if view is not None:
            return view
        numel = math.prod(shape)
        if numel > _BUFFER_CAP:
            return like.new_empty(shape)
        key = (like.device, slot)
        flat = self.flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.flat[key] = like.new_empty(numel)
            self.views = {k: v for k, v in self.views.items() if k[:2] != key}  # views of the old buffer
        if len(self.views) > 1024:  # batch shapes vary (padding): keep the cache to the recent ones
            self.views.clear()
        view = self.views[(like.device, slot, shape)] = flat[:numel].view(shape)
        return view

    def first(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        self.turn = 0
        return self._get(0, shape, like)

    def next(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer the current state is not in."""
        self.turn ^= 1
        return self._get(self.turn, shape, like)

    def scratch(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return self._get(2, shape, like)


_BUFFERS = _Buffers()


def _permute(state: torch.Tensor, perm: Permutation, inverse: bool = False, out: torch.Tensor | None = None):
    """Gather whole rows of the flattened state: a contiguous copy per row, the cheapest gather on CPU."""
    rows = state.reshape(-1, state.shape[-1])
    idx = _index(perm, state.device, len(rows) // len(perm.index), inverse)
    if out is None:
        return rows.index_select(0, idx).view(state.shape)
    return torch.index_select(rows, 0, idx, out=out.view(rows.shape)).view(state.shape)


def _block_view(state: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """[S * hi, 2^size, lo * M]: the block's qubits as the middle axis (S: every leading axis)."""
    return state.view(-1, 2**size, (2**start) * state.shape[-1])


def _apply_block(state: torch.Tensor, mat: torch.Tensor, start: int, size: int, out: torch.Tensor | None = None):
    """Apply a real 2^size matrix to qubits start..start+size-1 of every column."""
    view = _block_view(state, start, size)
    # An explicit bmm: torch.matmul folds a 2-D @ 3-D product into one GEMM over a transposed copy of the state.
    if out is None:
        return torch.bmm(mat.expand(len(view), -1, -1), view).view(state.shape)
    return torch.bmm(mat.expand(len(view), -1, -1), view, out=out.view(view.shape)).view(state.shape)


def _block_grad(cot: torch.Tensor, before: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """d loss / d mat for out = mat . before on one block: the sum over columns of cot (x) before."""
    a, b = _block_view(cot, start, size), _block_view(before, start, size)
    return torch.bmm(a, b.transpose(1, 2)).sum(0)


def _apply_phase(state: torch.Tensor, trig: torch.Tensor, conj: bool = False, out: torch.Tensor | None = None):
    """Multiply by e^{i phi} (e^{-i phi} with conj) along axis -3 = (real, imaginary); a real state becomes complex.
    `trig` is (cos phi, sin phi) as [2, 2^n, 1]."""
    c, s = trig[0], trig[1]
    re = state[..., 0, :, :]
    im = state[..., 1, :, :] if state.shape[-3] == 2 else None
    if out is None:  # the dense path differentiates through this with autograd
        s = -s if conj else s
        if im is None:
            return torch.stack([re * c, re * s], dim=-3)
        return torch.stack([re * c - im * s, re * s + im * c], dim=-3)
    sign = -1 if conj else 1
    out_re, out_im = out[..., 0, :, :], out[..., 1, :, :]
    torch.mul(re, c, out=out_re)
    if im is None:
        torch.mul(re, s, out=out_im)
        if conj:
            out_im.neg_()
        return out
    out_re.addcmul_(im, s, value=-sign)
    torch.mul(im, c, out=out_im)
    out_im.addcmul_(re, s, value=sign)
    return out


def _run(plan: Plan, state: torch.Tensor, tensors: list[torch.Tensor], buffers: _Buffers | None = None,
         last: torch.Tensor | None = None):  # fmt: skip
    """Apply the plan to a state [S, 2^n, M]; with `buffers`, every op writes into the next buffer, and the last
    one into `last` where given (flat, at least as long as the final state)."""
    writes = sum(len(plan.blocks) if isinstance(op, RealRotation) else 1 for op in plan.ops)

    def target(shape: tuple[int, ...]) -> torch.Tensor | None:
        nonlocal writes
        writes -= 1
        if writes == 0 and last is not None:
            return last[: math.prod(shape)].view(shape)
        return None if buffers is None else buffers.next(shape, state)

    it = iter(tensors)
    for op in plan.ops:
        if isinstance(op, Permutation):
            state = _permute(state, op, out=target(state.shape))
        elif isinstance(op, Phase):
            state = _apply_phase(state, next(it), out=target((2, *state.shape[1:])))
        else:
            for start, size in plan.blocks:
                state = _apply_block(state, next(it), start, size, out=target(state.shape))
    return state


def _probs(state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|amplitude|^2 as [2^n, M] from a state [S, 2^n, M], written into `out`."""
    torch.mul(state[0], state[0], out=out)
    for part in state[1:]:
        out.addcmul_(part, part)
    return out


def _readout(plan: Plan, probs: torch.Tensor) -> torch.Tensor:
    """r as [M, k] from probs stored [2^n, M]."""
    signs = _readout_matrix(plan.n, plan.readout, probs.device)
    return probs.transpose(0, 1).clone() if signs is None else (signs.transpose(0, 1) @ probs).transpose(0, 1)


def _norms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||z|| as [M, 1] in float32, 1 / ||z|| with zero rows kept finite)."""
    norm = torch.linalg.vector_norm(z.float(), dim=-1, keepdim=True)
    return norm, 1 / norm.clamp_min(torch.finfo(torch.float32).tiny)


def _initial_state(buffers: _Buffers, z: torch.Tensor, inv_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """psi = z / ||z|| as the state [1, 2^n, M] (zero-padded) in the first buffer, written there in one pass."""
    state = buffers.first((1, dim, len(z)), inv_norm)
    torch.mul(z.transpose(0, 1).float(), inv_norm.transpose(0, 1), out=state[0, : z.shape[-1]])
    state[0, z.shape[-1] :].zero_()
    return state


class _SavedStates:
    """Final states kept from a forward to its backward, in recycled buffers.

    The adjoint walk starts from the final state. Replaying the circuit to get it costs a forward; keeping it costs
    2^n x M x 8 bytes per adapter until the backward, and fresh memory for that every step costs page faults that
    measured as much as the replay. So each backward hands its buffer back and the next forward takes it again.
    """

    def __init__(self, limit: int = 256):
        self.free: list[torch.Tensor] = []  # flat buffers
        self.limit = limit
        self.lock = threading.Lock()

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of at least `numel` floats: the smallest free one that fits, else a new one."""
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= numel and b.device == like.device]
            flat = self.free.pop(min(fits, key=lambda i: self.free[i].numel())) if fits else None
        return like.new_empty(numel) if flat is None else flat

    def give(self, flat: torch.Tensor) -> None:
        with self.lock:
            self.free.append(flat)
            if len(self.free) > self.limit:  # shapes changed a lot: drop the smallest
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))


_SAVED = _SavedStates()


class _AdjointCircuit(torch.autograd.Function):
    """||z|| * r(U |z/||z||>) with adjoint differentiation: keeps z and the final state, nothing per gate."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, plan: Plan, keep: bool) -> torch.Tensor:
        tensors = op_tensors(plan, theta)  # no graph: `theta_grad` is their backward
        norm, inv_norm = _norms(z)
        shape = (1 if plan.first_phase < 0 else 2, plan.dim, len(z))
        kept = _SAVED.take(math.prod(shape), norm) if keep else None  # the last op writes the final state there
        final = _run(plan, _initial_state(_BUFFERS, z, inv_norm, plan.dim), tensors, _BUFFERS, last=kept)
        r = _readout(plan, _probs(final, _BUFFERS.scratch(final.shape[1:], final)))
        ctx.plan, ctx.tensors, ctx.shape, ctx.kept = plan, tensors, final.shape, kept
        ctx.save_for_backward(z, theta, r)
        return norm * r

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan: Plan = ctx.plan
        z, theta, r = ctx.saved_tensors
        tensors: list[torch.Tensor] = ctx.tensors
        buffers = _BUFFERS
        norm, inv_norm = _norms(z)
        kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph) replays the circuit instead
        if kept is None:
            final = _run(plan, _initial_state(buffers, z, inv_norm, plan.dim), tensors, buffers)
        else:
            final = kept[: math.prod(ctx.shape)].view(ctx.shape)
        weights = buffers.scratch(final.shape[1:], final)
        g = (grad_out.float() * norm).transpose(0, 1)  # d loss / d r, as [k, M]: the output is ||z|| * r
        signs = _readout_matrix(plan.n, plan.readout, final.device)
        if signs is None:
            torch.mul(g, 2, out=weights)
        else:
            torch.mm(signs, g, out=weights).mul_(2)  # d loss / d |amplitude|^2, times 2: d |a|^2 / d a = 2a

        # Walk back through the ops with the state and its cotangent side by side, [state; cot] as [2, S, 2^n, M]:
        # every op inverts the state and propagates the cotangent in one call (the ops are unitary).
        pair = buffers.next((2, *final.shape), final)
        pair[0].copy_(final)
        torch.mul(final, weights, out=pair[1])  # d loss / d amplitudes
        if kept is not None:
            _SAVED.give(kept)
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        k = len(tensors)
        for index, op in reversed(list(enumerate(plan.ops))):
            if isinstance(op, Permutation):
                pair = _permute(pair, op, inverse=True, out=buffers.next(pair.shape, pair))
                continue
            if isinstance(op, Phase):
                k -= 1
                pair = _apply_phase(pair, tensors[k], conj=True, out=buffers.next(pair.shape, pair))
                if ctx.needs_input_grad[1]:  # d/dphi_j = sum_cols Im(conj(before) * cot)
                    im = torch.mul(pair[0, 0], pair[1, 1], out=weights)
                    grads[k] = im.addcmul_(pair[0, 1], pair[1, 0], value=-1).sum(1)
                if index == plan.first_phase:  # the state was real before it: drop the (zero) imaginary parts
                    pair = buffers.next((2, 1, *pair.shape[2:]), pair).copy_(pair[:, :1])
                continue
            for start, size in reversed(plan.blocks):
                k -= 1
                cot_after = pair[1]
                pair = _apply_block(pair, tensors[k].transpose(0, 1), start, size, buffers.next(pair.shape, pair))
                if ctx.needs_input_grad[1]:
                    grads[k] = _block_grad(cot_after, pair[0], start, size)
        grad_z = None
        if ctx.needs_input_grad[0]:
            # v = d loss / d psi, scaled by ||z||. With psi = z / ||z|| and the output ||z|| r, the chain rule gives
            # d/dz = (v - psi (psi . v)) / ||z|| + psi (grad_out . r) = (v + z (grad_out . r - z . v / ||z||^2)) / ||z||
            # (only the first d rows of v: the padding is not an input).
            v = pair[1, 0, : z.shape[-1]].transpose(0, 1)
            zf = z.float()
            coef = (grad_out.float() * r).sum(-1, keepdim=True) - _row_dot(zf, v).unsqueeze(1) * inv_norm * inv_norm
            grad_z = torch.addcmul(v, zf, coef).mul_(inv_norm).to(z.dtype)
        grad_theta = theta_grad(plan, theta, grads) if ctx.needs_input_grad[1] else None
        return grad_z, grad_theta, None, None


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_m a[j, m] b[j, m] for every row j, without materialising a * b."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def exact_expectations(plan: Plan, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`||z|| * r(U(theta)|z/||z||>)` for z of shape [M, d <= 2^n]; differentiable in z and theta."""
    if plan.strategy == "blocks":
        keep = torch.is_grad_enabled() and (z.requires_grad or theta.requires_grad)
        return _AdjointCircuit.apply(z, theta, plan, keep)
    tensors = op_tensors(plan, theta)
    norm, inv_norm = _norms(z)
    psi = torch.nn.functional.pad(z.float() * inv_norm, (0, plan.dim - z.shape[-1]))
    # Run over the basis as columns: u[s] holds the real (s = 0) and imaginary parts of U.
    u = _run(plan, torch.eye(plan.dim, device=z.device)[None], tensors)
    final = torch.matmul(u, psi.transpose(0, 1))
    return norm * _readout(plan, final.square().sum(0))
