"""`CircuitEngine`: the QAA circuit on a qiskit backend, behind the same `engine(z, theta)` call as the exact
engine.

Construction transpiles the template once (or finds it in the cache) and binds the backend's primitive. A call
computes the data angles (or, for `embedding: direct`, the unit state) in torch, hands them to the single
autograd bridge (`shift.CircuitFunction`), and restores the norm: `||z|| * r`. Every row of a step goes out in
one primitive call, split only at the runner's `max_bindings`; the counters in `usage` record what was sent.
Rows that share a starting state go out as one PUB per state: `direct` sets each input's ideal state, and a
density-matrix runner (`runner.shares_prefix`) simulates each input's noisy preparation once (`prefix`).
"""

from __future__ import annotations

import numpy as np
import torch
from qiskit import QuantumCircuit
from qiskit_aer.library import SetStatevector

from ..accounting import Usage
from ..config import QAAConfig
from ..embedding import data_angles
from ..shift import CircuitFunction, plan_step
from ..template import DATA, THETA, template_for
from ..transpile_cache import TranspileCache, TranspileKey
from .environment import BackendEnvironment
from .prefix import prefix_states, split_prefix


class CircuitEngine:
    """Runs `||z|| * r(U(theta)|z/||z||>)` through `runner` (an Aer, fake or IBM runner) with parameter-shift
    or SPSA gradients. `input_grad: none` drops the gradient through the state: z then receives only the
    gradient of the norm factor ||z||."""

    def __init__(self, config: QAAConfig, n: int, runner, env: BackendEnvironment):
        self.config, self.n, self.runner = config, n, runner
        self.direct = config.embedding == "direct"
        self.template = template_for(config, n, measured=runner.measured)
        self.usage = Usage()
        key = TranspileKey(
            runner.name,
            runner.stamp,
            self.template.key,
            config.optimization_level,
            config.seed,
            runner.compact,
        )
        self.isa, hit = TranspileCache(env.cache_dir).get(key, self.template.circuit, runner.transpile_backend)
        self.usage.transpile_hits += int(hit)
        self.usage.transpile_misses += int(not hit)
        runner.bind(self.isa)
        ours = [f"{DATA}[{i}]" for i in range(self.template.data_params)]
        ours += [f"{THETA}[{i}]" for i in range(self.template.theta_params)]
        position = {name: i for i, name in enumerate(ours)}
        self.columns = np.array([position[p.name] for p in self.isa.parameters], dtype=np.int64)
        self.rng = np.random.default_rng(config.seed)
        if self.direct:
            initial = self.isa.metadata["qaa_initial"]
            j = np.arange(2**n)
            self.placement = sum(((j >> i) & 1) << q for i, q in enumerate(initial))
        self.split = split_prefix(self.isa, THETA) if runner.shares_prefix(self.isa) and not self.direct else None

    def __call__(self, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        z = z.double()
        norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        grad = torch.is_grad_enabled()
        theta_grad = grad and theta.requires_grad
        data_grad = grad and z.requires_grad and self.config.input_grad == "shift"
        if self.direct:
            psi = z / norm.clamp_min(torch.finfo(z.dtype).tiny)
            data = torch.nn.functional.pad(psi, (0, 2**self.n - psi.shape[-1]))
            ground = torch.zeros_like(data[:1])
            ground[0, 0] = 1.0  # a zero input still needs a valid state; its output is multiplied by 0
            data = torch.where(norm > 0, data, ground)
        else:
            data = data_angles(z, self.n)
        r = CircuitFunction.apply(self, data, theta.double(), theta_grad, data_grad)
        return (norm * r).float()

    def evaluate(self, data: np.ndarray, theta: np.ndarray, theta_grad: bool, data_grad: bool):
        """Readout and Jacobians for a step (see `shift.plan_step`), from one batched execution."""
        spsa = self.config.spsa_samples if self.config.gradient == "spsa" else None
        step = plan_step(
            data,
            theta,
            direct=self.direct,
            theta_grad=theta_grad,
            data_grad=data_grad,
            spsa_samples=spsa,
            rng=self.rng,
        )
        return step.recombine(self._execute(step.rows))

    def _execute(self, rows) -> np.ndarray:
        """Values [B, k] of all rows: PUBs (one, or one per starting state) split into primitive calls."""
        if self.direct:
            groups = []
            for s in np.unique(rows.which):
                idx = np.flatnonzero(rows.which == s)
                params = np.concatenate([np.zeros((len(idx), 0)), rows.theta[idx]], axis=1)[:, self.columns]
                groups.append((self._with_state(rows.data[s]), params, idx))
        else:
            params = np.concatenate([rows.data[rows.which], rows.theta], axis=1)[:, self.columns]
            everything = np.arange(len(rows.which))
            groups = [(self.isa, params, everything)] if self.split is None else self._shared(rows.which, params)
        values = None
        for call in _split(groups, self.runner.max_bindings):
            outputs, qpu_seconds = self.runner.run([(c, p) for c, p, _ in call], self.template, self.isa)
            for (_, _, idx), out in zip(call, outputs, strict=True):
                if values is None:
                    values = np.zeros((len(rows.which), out.shape[-1]))
                values[idx] = out.reshape(len(idx), -1)
            self.usage.primitive_calls += 1
            self.usage.qpu_seconds += qpu_seconds
        count = len(rows.which)
        self.usage.circuits += count * self.runner.circuits_per_row  # twirling randomizations x ZNE noise factors
        self.usage.shots += count * self.runner.shots_per_row
        return values * rows.weight[:, None]

    def _shared(self, which: np.ndarray, params: np.ndarray) -> list:
        """One PUB per input used by several rows, run from its prepared density matrix (see `prefix`); rows
        alone with their input (data-angle shifts) run the whole circuit in one more PUB."""
        points, first, counts = np.unique(which, return_index=True, return_counts=True)
        shared = counts > 1
        groups = []
        if shared.any():
            states = prefix_states(self.runner.simulator(self.isa), self.split, params[first[shared]])
            for point, rho in zip(points[shared], states, strict=True):
                idx = np.flatnonzero(which == point)
                groups.append((self.split.start_from(rho), params[idx][:, self.split.suffix_columns], idx))
        alone = np.flatnonzero(~np.isin(which, points[shared]))
        if len(alone):
            groups.append((self.isa, params[alone], alone))
        return groups

    def _with_state(self, psi: np.ndarray) -> QuantumCircuit:
        """The ISA ansatz after the ideal state, placed on the qubits the layout gave the virtual ones."""
        full = np.zeros(2**self.isa.num_qubits, dtype=complex)
        full[self.placement] = psi
        circuit = self.isa.copy_empty_like()
        circuit.global_phase = 0
        circuit.append(SetStatevector(full), circuit.qubits)
        return circuit.compose(self.isa)


def _split(groups, limit: int | None):
    """Group PUBs into primitive calls of at most `limit` parameter sets, each call filled to the limit (a PUB
    is split at a call boundary), so a step of B rows takes exactly ceil(B / limit) calls, as estimated."""
    if limit is None:
        yield groups
        return
    call, room = [], limit
    for circuit, params, idx in groups:
        start = 0
        while start < len(idx):
            take = min(room, len(idx) - start)
            call.append((circuit, params[start : start + take], idx[start : start + take]))
            start, room = start + take, room - take
            if room == 0:
                yield call
                call, room = [], limit
    if call:
        yield call
