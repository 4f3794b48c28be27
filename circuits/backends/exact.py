"""The exact statevector engine: QAA circuits as batched real tensor contractions on the model's device.

The ansatz gate list is compiled once per (n, layers, entangler, readout) into a `Plan` of three kinds of op:

* `RealRotation`: RY gates, fused into Kronecker blocks of a few qubits; real matrices, so a complex state is
  handled as its real and imaginary halves stacked along the batch (one real GEMM, half the flops of complex).
* `Phase`: RZ gates, a diagonal e^{i phi_j} over the basis; the only source of complex amplitudes.
* `Permutation`: a run of CNOTs as one gather.

The state lives as a real tensor [S*M, 2^n], S = 1 while it is real (the embedding and the first RY layer) and
S = 2 (real part rows, then imaginary part rows) after the first phase.

Two strategies, chosen by cost:

* `dense`: for small registers (n <= 7) where the CPU kernel does not run, the whole circuit is one 2^n x 2^n
  unitary built from theta (not per token), and every token costs two real matrix products. Plain autograd.
* `blocks`: for larger registers, and at every size on the CPU kernel (`strategy_on`), the ops run over the
  batch of states, each writing into one of two reused buffers. Gradients use the adjoint method (as PennyLane's
  `diff_method="adjoint"`): the forward keeps its input z and the final state, and the backward walks the state
  and the cotangent back through the ops together, so no per-gate intermediate is ever stored.

Both return `||z|| * r(U(theta) |z/||z||>)`: the norm restore of docs/qaa.md is part of the engine, and a zero vector
yields zero output and zero gradient.

`blocks` runs one of three ways (`engine_path`):

* on a CPU by default, as the C++ kernel of `exact_kernel` (the same ops, one tile of 16 tokens at a time in cache;
  it keeps nothing from forward to backward): it measured about twice as fast as the eager path at SmolLM2 scale
  (`benchmarks/exact_engine.py`);
* on CUDA by default (`QAA_EXACT_COMPILE`), as two torch.compile graphs of the eager functions without buffers
  (`_compiled`): one adapter's forward and backward is then at most 150 aten ops instead of hundreds
  (`tests/test_exact_engine.py` counts them), which on a GPU is the difference between launch-bound and not;
* eagerly into reused buffers, where neither applies (`QAA_EXACT_KERNEL=never`, or no compiler to build the kernel).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ansatz import Gate, ansatz_gates
from ..config import zz_pairs
from .exact_kernel import kernel, kernel_plan, kernel_wanted

#: Largest fused block of qubits. Blocks of at most 4 measured fastest on CPU at n = 8..12 (n = 10 as 4+3+3 beats
#: 5+5 by a fifth: half the flops for one more pass over a state that the buffers below keep in place).
_MAX_BLOCK = 4
#: Up to this register size the dense unitary beats the eager `blocks` path (measured crossover on a 2-core CPU);
#: the C++ kernel beats it at every size, so where the kernel runs, `auto` plans run `blocks` (`strategy_on`).
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

    def inverse(self) -> list[int]:
        """The gather that undoes this one: inverse[index[j]] = j."""
        inverse = [0] * len(self.index)
        for j, source in enumerate(self.index):
            inverse[source] = j
        return inverse


Op = RealRotation | Phase | Permutation


@dataclass(frozen=True, eq=False)  # identity hashing: plans are shared through plan_for's cache and hash in O(1)
class Plan:
    """A compiled circuit: ops in order, fused blocks, readout and the chosen strategy."""

    n: int
    ops: tuple[Op, ...]
    blocks: tuple[tuple[int, int], ...]  # (first qubit, size) of each fused block
    readout: str
    strategy: str  # "dense" | "blocks" | "auto" (decided per engine path by `strategy_on`)

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
    if strategy == "auto" and n > _DENSE_MAX_QUBITS:
        strategy = "blocks"
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


@dataclass(frozen=True, eq=False)
class _Tables:
    """Every index and sign tensor one plan needs on one device, built once per (plan, P, device) by `_tables`.

    The ops take these instead of building them, so an eager call looks up one cache entry and a compiled graph
    holds them as constants (`_compiled`). `blocks` [blocks, width] and `phases` [n, phases] index theta so that
    every op tensor is built in a few batched ops (the per-gate loop is Python-bound): index P points at an
    appended identity angle (RY(0) = I, a zero RZ coefficient), and every block is built at the largest size,
    smaller ones padded with identity qubits on top and cut back to their corner. `slots` says which op tensor is
    which: ("block", row, size) or ("phase", column, 0). `gathers[(op position, halves, inverse)]` is a
    permutation's row index over a state flattened to [halves * 2^n, M]. `readout` is S with r = probs @ S (Z
    signs, and ZZ products for expval+zz; None for probs).
    """

    blocks: torch.Tensor | None
    phases: torch.Tensor | None
    slots: tuple[tuple[str, int, int], ...]
    bit_signs: torch.Tensor  # [2^n, n]: (-1)^{bit_i(j)}
    readout: torch.Tensor | None
    gathers: dict[tuple[int, int, bool], torch.Tensor]
    one_hot: torch.Tensor  # [width, width] booleans: the identity, for the derivative of each block's qubits


@lru_cache(maxsize=64)
def _tables(plan: Plan, num_params: int, device: torch.device) -> _Tables:
    # Built from Python lists only, so that inside a compiled graph every table is a constant, not a computation.
    width = max(size for _, size in plan.blocks)
    rows: list[list[int]] = []  # per block: the angle index of each of its qubits, padded to `width`
    slots: list[tuple[str, int, int]] = []
    phase_columns: list[list[int]] = []
    gathers = {}
    for position, op in enumerate(plan.ops):
        if isinstance(op, Permutation):
            for inverse, idx in ((False, op.index), (True, op.inverse())):
                for halves in (1, 2, 4):  # a real or complex state, or a (state, cotangent) pair of either
                    flat = [i + h * len(idx) for h in range(halves) for i in idx]
                    gathers[position, halves, inverse] = torch.tensor(flat, device=device)
            continue
        param_of = dict(zip(op.qubits, op.params, strict=True))
        if isinstance(op, RealRotation):
            for start, size in plan.blocks:
                slots.append(("block", len(rows), size))
                rows.append([param_of.get(q, num_params) for q in range(start, start + size)])
                rows[-1] += [num_params] * (width - size)
        else:
            slots.append(("phase", len(phase_columns), 0))
            phase_columns.append([param_of.get(q, num_params) for q in range(plan.n)])
    signs = [[1.0 - 2.0 * ((j >> i) & 1) for i in range(plan.n)] for j in range(plan.dim)]
    readout = None
    if plan.readout != "probs":
        pairs = zz_pairs(plan.n) if plan.readout == "expval+zz" else []
        readout = torch.tensor([row + [row[a] * row[b] for a, b in pairs] for row in signs], device=device)
    return _Tables(
        blocks=torch.tensor(rows, device=device) if rows else None,
        phases=torch.tensor(list(zip(*phase_columns, strict=True)), device=device) if phase_columns else None,
        slots=tuple(slots),
        bit_signs=torch.tensor(signs, device=device),
        readout=readout,
        gathers=gathers,
        one_hot=torch.tensor([[i == t for t in range(width)] for i in range(width)], device=device),
    )


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
    """theta / 2 with one zero appended: the identity angle that `_Tables` pads with."""
    return torch.cat([theta.float(), theta.new_zeros(1, dtype=torch.float32)]) / 2


def op_tensors(theta: torch.Tensor, tables: _Tables) -> list[torch.Tensor]:
    """For each RealRotation, one real matrix per block; for each Phase, (cos phi, sin phi) as [2, 2^n, 1].

    A block is the Kronecker product of its qubits' RY matrices, built for all blocks at once.
    """
    block_index, phase_index, slots = tables.blocks, tables.phases, tables.slots
    half = _half_angles(theta)
    blocks = phases = None
    if block_index is not None:
        blocks = _kron(_ry(torch.cos(half)[block_index], torch.sin(half)[block_index]))  # [blocks, 2^w, 2^w]
    if phase_index is not None:
        phi = -(tables.bit_signs[:, :, None] * half[phase_index]).sum(1)  # [2^n, phases]: a fused sum
        phases = torch.stack([torch.cos(phi), torch.sin(phi)])[..., None]  # [2, 2^n, phases, 1]
    return [blocks[key, : 2**size, : 2**size] if kind == "block" else phases[:, :, key] for kind, key, size in slots]


def theta_grad(theta: torch.Tensor, grads: list[torch.Tensor], tables: _Tables) -> torch.Tensor:
    """d loss / d theta from d loss / d (each block matrix, each phase's angles phi): the chain rule through
    `op_tensors` by hand.

    The adjoint path uses this instead of an autograd graph of op_tensors, whose few dozen tiny nodes per adapter
    cost as much time as a third of the circuit's GEMMs at SmolLM2 scale. d K / d theta_t for a block K is K with
    qubit t's RY replaced by its derivative; all of them are built at once, as the blocks are.
    """
    block_index, phase_index, slots = tables.blocks, tables.phases, tables.slots
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
        one_hot = tables.one_hot[None, :, :, None, None]
        d_blocks = _kron(torch.where(one_hot, d_ry[:, None], ry[:, None]))  # [blocks, width (t), 2^w, 2^w]
        d_half.index_add_(0, block_index.flatten(), (d_blocks * upstream[:, None]).sum((-2, -1)).flatten())
    if phase_index is not None:
        upstream = torch.stack([g for (kind, _, _), g in zip(slots, grads, strict=True) if kind == "phase"], 1)
        d_phase = -(tables.bit_signs[:, :, None] * upstream[:, None]).sum(0)  # [n, phases]
        d_half.index_add_(0, phase_index.flatten(), d_phase.flatten())
    return (d_half[:-1] / 2).to(theta.dtype)


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


def _permute(state: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather whole rows of the flattened state: a contiguous copy per row, the cheapest gather on CPU."""
    rows = state.reshape(-1, state.shape[-1])
    if out is None:
        return rows.index_select(0, index).view(state.shape)
    return torch.index_select(rows, 0, index, out=out.view(rows.shape)).view(state.shape)


def _gather(tables: _Tables, position: int, state: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The row index of the permutation at `position` for a state [..., 2^n, M]."""
    return tables.gathers[position, math.prod(state.shape[:-2]), inverse]


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


def _block_grad(cot: torch.Tensor, before: torch.Tensor, start: int, size: int, fused: bool = False):
    """d loss / d mat for out = mat . before on one block: the sum over columns of cot (x) before. `fused`: as one
    reduction, which a compiled graph runs as one kernel (eagerly it would materialise every product)."""
    a, b = _block_view(cot, start, size), _block_view(before, start, size)
    if fused:
        return (a[:, :, None, :] * b[:, None, :, :]).sum((0, 3))
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


def _next(buffers: _Buffers | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """The buffer an op writes into, or None (the op allocates) on the unbuffered path."""
    return None if buffers is None else buffers.next(shape, like)


def _run(plan: Plan, state: torch.Tensor, tensors: list[torch.Tensor], tables: _Tables,
         buffers: _Buffers | None = None, last: torch.Tensor | None = None):  # fmt: skip
    """Apply the plan to a state [S, 2^n, M]; with `buffers`, every op writes into the next buffer, and the last
    one into `last` where given (flat, at least as long as the final state)."""
    writes = sum(len(plan.blocks) if isinstance(op, RealRotation) else 1 for op in plan.ops)

    def target(shape: tuple[int, ...]) -> torch.Tensor | None:
        nonlocal writes
        writes -= 1
        if writes == 0 and last is not None:
            return last[: math.prod(shape)].view(shape)
        return _next(buffers, shape, state)

    it = iter(tensors)
    for position, op in enumerate(plan.ops):
        if isinstance(op, Permutation):
            state = _permute(state, _gather(tables, position, state), out=target(state.shape))
        elif isinstance(op, Phase):
            state = _apply_phase(state, next(it), out=target((2, *state.shape[1:])))
        else:
            for start, size in plan.blocks:
                state = _apply_block(state, next(it), start, size, out=target(state.shape))
    return state


def _probs(state: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|amplitude|^2 as [2^n, M] from a state [S, 2^n, M] (written into `out` where given)."""
    if out is None:
        return state.square().sum(0)
    torch.mul(state[0], state[0], out=out)
    for part in state[1:]:
        out.addcmul_(part, part)
    return out


def _readout(probs: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """r as [M, k] from probs stored [2^n, M]."""
    signs = tables.readout
    return probs.transpose(0, 1).clone() if signs is None else (signs.transpose(0, 1) @ probs).transpose(0, 1)


def _norms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||z|| as [M, 1] in float32, 1 / ||z|| with zero rows kept finite)."""
    norm = torch.linalg.vector_norm(z.float(), dim=-1, keepdim=True)
    return norm, 1 / norm.clamp_min(torch.finfo(torch.float32).tiny)


def _initial_state(z: torch.Tensor, inv_norm: torch.Tensor, dim: int, buffers: _Buffers | None) -> torch.Tensor:
    """psi = z / ||z|| as the state [1, 2^n, M] (zero-padded), in the first buffer where there are buffers."""
    if buffers is None:
        return torch.nn.functional.pad((z.float() * inv_norm).transpose(0, 1), (0, 0, 0, dim - z.shape[-1]))[None]
    state = buffers.first((1, dim, len(z)), inv_norm)
    torch.mul(z.transpose(0, 1).float(), inv_norm.transpose(0, 1), out=state[0, : z.shape[-1]])
    state[0, z.shape[-1] :].zero_()
    return state


def _circuit(plan: Plan, z: torch.Tensor, tensors: list[torch.Tensor], tables: _Tables,
             buffers: _Buffers | None = None, last: torch.Tensor | None = None):  # fmt: skip
    """The forward: (||z|| r as [M, k], the final state [S, 2^n, M], r)."""
    norm, inv_norm = _norms(z)
    final = _run(plan, _initial_state(z, inv_norm, plan.dim, buffers), tensors, tables, buffers, last)
    r = _readout(_probs(final, None if buffers is None else buffers.scratch(final.shape[1:], final)), tables)
    return norm * r, final, r


def _adjoint(plan: Plan, z: torch.Tensor, theta: torch.Tensor, r: torch.Tensor, final: torch.Tensor,
             grad_out: torch.Tensor, tensors: list[torch.Tensor], tables: _Tables, need_z: bool, need_theta: bool,
             buffers: _Buffers | None = None):  # fmt: skip
    """The backward: (d loss / d z, d loss / d theta) from the final state, walking the ops back."""
    norm, inv_norm = _norms(z)
    scratch = None if buffers is None else buffers.scratch(final.shape[1:], final)
    g = (grad_out.float() * norm).transpose(0, 1)  # d loss / d r, as [k, M]: the output is ||z|| * r
    if tables.readout is None:
        weights = torch.mul(g, 2, out=scratch)
    else:  # d loss / d |amplitude|^2, times 2: d |a|^2 / d a = 2a
        weights = torch.mm(tables.readout, g, out=scratch).mul_(2)

    # Walk back through the ops with the state and its cotangent side by side, [state; cot] as [2, S, 2^n, M]:
    # every op inverts the state and propagates the cotangent in one call (the ops are unitary).
    if buffers is None:
        pair = torch.stack([final, final * weights])
    else:
        pair = buffers.next((2, *final.shape), final)
        pair[0].copy_(final)
        torch.mul(final, weights, out=pair[1])  # d loss / d amplitudes
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    k = len(tensors)
    for position, op in reversed(list(enumerate(plan.ops))):
        if isinstance(op, Permutation):
            pair = _permute(pair, _gather(tables, position, pair, inverse=True), _next(buffers, pair.shape, pair))
            continue
        if isinstance(op, Phase):
            k -= 1
            pair = _apply_phase(pair, tensors[k], conj=True, out=_next(buffers, pair.shape, pair))
            if need_theta:  # d/dphi_j = sum_cols Im(conj(before) * cot)
                im = torch.mul(pair[0, 0], pair[1, 1], out=scratch)
                grads[k] = im.addcmul_(pair[0, 1], pair[1, 0], value=-1).sum(1)
            if position == plan.first_phase:  # the state was real before it: drop the (zero) imaginary parts
                if buffers is None:
                    pair = pair[:, :1].contiguous()
                else:
                    pair = buffers.next((2, 1, *pair.shape[2:]), pair).copy_(pair[:, :1])
            continue
        for start, size in reversed(plan.blocks):
            k -= 1
            cot_after = pair[1]
            pair = _apply_block(pair, tensors[k].transpose(0, 1), start, size, _next(buffers, pair.shape, pair))
            if need_theta:
                grads[k] = _block_grad(cot_after, pair[0], start, size, fused=buffers is None)
    grad_z = _input_grad(z, pair[1, 0, : z.shape[-1]].transpose(0, 1), r, grad_out, inv_norm) if need_z else None
    grad_theta = theta_grad(theta, grads, tables) if need_theta else None
    return grad_z, grad_theta


def _input_grad(z: torch.Tensor, v: torch.Tensor, r: torch.Tensor, grad_out: torch.Tensor, inv_norm: torch.Tensor):
    """d loss / d z from v = d loss / d psi [M, d] (scaled by ||z||; the padding is not an input).

    With psi = z / ||z|| and the output ||z|| r, the chain rule gives
    d/dz = (v - psi (psi . v)) / ||z|| + psi (grad_out . r) = (v + z (grad_out . r - z . v / ||z||^2)) / ||z||.
    """
    zf = z.float()
    coef = (grad_out.float() * r).sum(-1, keepdim=True) - (zf * v).sum(-1, keepdim=True) * inv_norm * inv_norm
    return torch.addcmul(v, zf, coef).mul_(inv_norm).to(z.dtype)


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


@lru_cache(maxsize=64)
def _compiled(plan: Plan, num_params: int):
    """`plan`'s forward and backward as two torch.compile graphs: the unbuffered path of the same functions.

    Each graph is a handful of fused kernels and GEMMs instead of hundreds of small ops, which is what a GPU needs:
    there one launch costs more than the arithmetic of an op. The tables are built inside the graphs (from Python
    lists, past `_tables`' cache, which dynamo would only warn about), so they are constants of the compiled code.
    The token count is marked dynamic (`_dynamic`): one compile serves every training step (on a CPU inductor's
    reductions guard a range, 65 to 4,096 tokens; a shorter or longer call compiles once more). The backward always
    computes both gradients: one graph, not four.
    """

    def forward(z: torch.Tensor, theta: torch.Tensor):
        tables = _tables.__wrapped__(plan, num_params, z.device)
        return _circuit(plan, z, op_tensors(theta, tables), tables)

    def backward(z, theta, r, final, grad_out):  # fmt: skip
        tables = _tables.__wrapped__(plan, num_params, z.device)
        return _adjoint(plan, z, theta, r, final, grad_out, op_tensors(theta, tables), tables, True, True)

    return torch.compile(forward, fullgraph=True), torch.compile(backward, fullgraph=True)


def _dynamic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mark the token axis (the first of z, r and grad_out, the last of a state) dynamic for torch.compile."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0 if t.dim() == 2 else t.dim() - 1)
    return tensors


def compiled_on(device: torch.device) -> bool:
    """Whether the exact engine runs compiled on `device`: `QAA_EXACT_COMPILE` = auto (on CUDA only: on a CPU the
    buffered eager path measured faster, and compiling costs a minute per circuit shape), always, or never."""
    mode = os.environ.get("QAA_EXACT_COMPILE", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"QAA_EXACT_COMPILE={mode!r}: expected auto, always or never")
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def engine_path(device: torch.device) -> str:
    """How the `blocks` strategy runs on `device`: "compiled" (`QAA_EXACT_COMPILE`; CUDA by default), "kernel" (the
    C++ CPU kernel, `QAA_EXACT_KERNEL`, where it builds) or "eager"."""
    if compiled_on(device):
        return "compiled"
    if kernel_wanted(device) and kernel() is not None:
        return "kernel"
    return "eager"


def strategy_on(plan: Plan, path: str) -> str:
    """The strategy, "dense" or "blocks", that `plan` runs on `path` (`engine_path` of the device). An explicit one
    stands; an `auto` plan (n at most `_DENSE_MAX_QUBITS`) runs `blocks` on the C++ kernel, which measured faster
    than the dense unitary at every n from 4 to 7 (README, the exact engine's per-adapter costs), and the dense
    unitary elsewhere."""
    if plan.strategy != "auto":
        return plan.strategy
    return "blocks" if path == "kernel" else "dense"


class _AdjointCircuit(torch.autograd.Function):
    """||z|| * r(U |z/||z||>) with adjoint differentiation: keeps z and the final state, nothing per gate."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, plan: Plan, keep: bool, compiled: bool) -> torch.Tensor:
        ctx.plan, ctx.compiled = plan, compiled
        if compiled:
            out, final, r = _compiled(plan, len(theta))[0](*_dynamic(z), theta)
            ctx.final = final if keep else None
        else:
            ctx.tables = tables = _tables(plan, len(theta), z.device)
            tensors = op_tensors(theta, tables)  # no graph: `theta_grad` is their backward
            shape = (1 if plan.first_phase < 0 else 2, plan.dim, len(z))
            # The last op writes the final state into `kept`, a recycled buffer.
            kept = _SAVED.take(math.prod(shape), z.new_empty(0, dtype=torch.float32)) if keep else None
            out, final, r = _circuit(plan, z, tensors, tables, _BUFFERS, last=kept)
            ctx.tensors, ctx.shape, ctx.kept = tensors, final.shape, kept
        ctx.save_for_backward(z, theta, r)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan: Plan = ctx.plan
        z, theta, r = ctx.saved_tensors
        need_z, need_theta = ctx.needs_input_grad[:2]
        if ctx.compiled:
            # A backward runs only where the forward kept its final state (`keep`); it stays for a second one.
            grad_z, grad_theta = _compiled(plan, len(theta))[1](*_dynamic(z), theta, *_dynamic(r, ctx.final, grad_out))
            return grad_z if need_z else None, grad_theta if need_theta else None, None, None, None
        kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph) replays the circuit instead
        if kept is None:
            final = _circuit(plan, z, ctx.tensors, ctx.tables, _BUFFERS)[1]
        else:
            final = kept[: math.prod(ctx.shape)].view(ctx.shape)
        grads = _adjoint(plan, z, theta, r, final, grad_out, ctx.tensors, ctx.tables, need_z, need_theta, _BUFFERS)
        if kept is not None:
            _SAVED.give(kept)
        return *grads, None, None, None


class _KernelCircuit(torch.autograd.Function):
    """The `blocks` strategy on a CPU through the C++ kernel (`exact_kernel`): the same circuit, per tile of tokens
    in cache. Keeps no state: the backward replays each tile's circuit in cache before walking it back (keeping the
    final states instead, as the eager path does, measured no faster in a full SmolLM2 step and costs 2^n x 8 bytes
    per token and adapter)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, plan: Plan, module) -> torch.Tensor:
        tables = _tables(plan, len(theta), z.device)
        spec = kernel_plan(plan)
        norm, inv_norm = _norms(z)
        zf = z.float().contiguous()
        ry, phase = _kernel_angles(theta, spec, tables)
        probs = module.forward(zf, inv_norm.view(-1), spec.ops, ry, phase, spec.perm, spec.inverse, plan.dim)
        r = _readout(probs, tables)
        ctx.plan, ctx.module, ctx.tables, ctx.spec = plan, module, tables, spec
        ctx.save_for_backward(z, theta, r, norm, inv_norm, ry, phase)
        return norm * r

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan: Plan = ctx.plan
        z, theta, r, norm, inv_norm, ry, phase = ctx.saved_tensors
        tables, spec = ctx.tables, ctx.spec
        g = (grad_out.float() * norm).transpose(0, 1)  # d loss / d r as [k, M]: the output is ||z|| * r
        weights = (g if tables.readout is None else tables.readout @ g).mul(2).contiguous()
        v, grad_ry, grad_phi = ctx.module.backward(
            z.float().contiguous(), inv_norm.view(-1), spec.ops, ry, phase, spec.perm, spec.inverse, plan.dim, weights
        )
        grad_z = _input_grad(z, v, r, grad_out, inv_norm) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            d_theta = theta.new_zeros(len(theta) + 1, dtype=torch.float32).index_add_(0, spec.rotations, grad_ry)
            if tables.phases is not None:  # phi_j = -sum_i s_ij theta_i / 2
                d_phase = -(tables.bit_signs.transpose(0, 1) @ grad_phi.transpose(0, 1)) / 2  # [n, phases]
                d_theta.index_add_(0, tables.phases.flatten(), d_phase.flatten())
            grad_theta = d_theta[:-1].to(theta.dtype)
        return grad_z, grad_theta, None, None


def _kernel_angles(theta: torch.Tensor, spec, tables: _Tables) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's angle tables: (cos, sin) of each RY's half angle [G, 2], and of each phase's phi [F, 2^n, 2]."""
    half = _half_angles(theta.detach())
    ry = torch.stack([torch.cos(half[spec.rotations]), torch.sin(half[spec.rotations])], -1)
    if tables.phases is None:
        phase = half.new_zeros(0, len(tables.bit_signs), 2)
    else:
        phi = -(tables.bit_signs[:, :, None] * half[tables.phases]).sum(1).transpose(0, 1)  # [phases, 2^n]
        phase = torch.stack([torch.cos(phi), torch.sin(phi)], -1)
    return ry.contiguous(), phase.contiguous()


def exact_expectations(plan: Plan, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`||z|| * r(U(theta)|z/||z||>)` for z of shape [M, d <= 2^n]; differentiable in z and theta."""
    path = engine_path(z.device)
    if strategy_on(plan, path) == "blocks":
        if path == "kernel":
            return _KernelCircuit.apply(z, theta, plan, kernel())
        keep = torch.is_grad_enabled() and (z.requires_grad or theta.requires_grad)
        return _AdjointCircuit.apply(z, theta, plan, keep, path == "compiled")
    tables = _tables(plan, len(theta), z.device)
    tensors = op_tensors(theta, tables)
    norm, inv_norm = _norms(z)
    psi = torch.nn.functional.pad(z.float() * inv_norm, (0, plan.dim - z.shape[-1]))
    # Run over the basis as columns: u[s] holds the real (s = 0) and imaginary parts of U.
    u = _run(plan, torch.eye(plan.dim, device=z.device)[None], tensors, tables)
    final = torch.matmul(u, psi.transpose(0, 1))
    return norm * _readout(final.square().sum(0), tables)
