"""Gradients of a circuit backend: which parameter sets a step runs, and the torch bridge that uses them.

One `torch.autograd.Function` (`CircuitFunction`) is the single bridge: its forward sends the value rows and
every shifted row of the step to the engine at once (one batch, so one PUB per primitive call), keeps the
Jacobians, and its backward is a vector-Jacobian product. Rows are float64 numpy arrays.

* Parameter-shift: each theta (and each data angle, `input_grad: shift`) sits in exactly one RY/RZ gate, so d
  f / d a = (f(a + pi/2) - f(a - pi/2)) / 2 exactly: 2P + 1 rows per input, plus 2D for the data angles.
* `embedding: direct` has no data angles; the readout is a quadratic form in the state, so its exact gradient
  along basis vector e_j is (f(psi + e_j) - f(psi - e_j)) / 2 with f(x) = ||x||^2 f(x / ||x||): 2 * 2^n rows.
* SPSA: per sample, a random +-1 direction over all differentiated parameters, two rows per input, step
  `SPSA_STEP`; unbiased up to O(step^2), noisy, and cheap when P is large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SHIFT = math.pi / 2
SPSA_STEP = 0.1


@dataclass
class Rows:
    """The parameter sets of one step: row b runs data point `which[b]` (angles, or a state for `direct`) with
    `theta[b]`; for `direct`, its readout is scaled by `weight[b]` (the squared norm of an unnormalised
    state)."""

    data: np.ndarray  # [S, D] distinct data points
    theta: np.ndarray  # [B, P]
    which: np.ndarray  # [B]
    weight: np.ndarray  # [B]


@dataclass
class Step:
    """Rows plus how their values recombine: value rows, and per-input Jacobian rows (plus/minus pairs)."""

    rows: Rows
    m: int
    theta_jac: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # plus rows [M, P'], minus rows, coefficients [M,P',P]
    data_jac: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # plus rows [M, D'], minus rows, coefficients [M,D',D]

    def recombine(self, values: np.ndarray):
        """(r [M, k], dr/dtheta [M, k, P] or None, dr/ddata [M, k, D] or None) from row values [B, k]."""
        r = values[: self.m]
        return r, self._jac(values, self.theta_jac), self._jac(values, self.data_jac)

    @staticmethod
    def _jac(values, spec):
        if spec is None:
            return None
        plus, minus, coef = spec
        diff = values[plus] - values[minus]  # [M, P', k]
        return np.einsum("mjk,mjp->mkp", diff, coef)


def plan_step(
    data: np.ndarray,
    theta: np.ndarray,
    *,
    direct: bool,
    theta_grad: bool,
    data_grad: bool,
    spsa_samples: int | None,
    rng: np.random.Generator,
) -> Step:
    """All rows of a step: values first, then the shifted rows of every input (see the module docstring)."""
    m, p = data.shape[0], theta.shape[0]
    d = data.shape[1]
    points = [data]  # data points; rows reference them by index
    thetas = [np.repeat(theta[None], m, axis=0)]
    which = [np.arange(m)]
    weights = [np.ones(m)]
    count = m

    def add(new_data: np.ndarray | None, new_theta: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """Append rows [M, J, ...] and return their row indices [M, J]."""
        nonlocal count
        rows_m, rows_j = new_theta.shape[:2]
        if new_data is None:  # the input's own data point
            which.append(np.repeat(np.arange(m), rows_j))
        else:
            start = sum(len(x) for x in points)
            points.append(new_data.reshape(-1, d))
            which.append(start + np.arange(rows_m * rows_j))
        thetas.append(new_theta.reshape(-1, p))
        weights.append(np.ones(rows_m * rows_j) if weight is None else weight.reshape(-1))
        idx = count + np.arange(rows_m * rows_j).reshape(rows_m, rows_j)
        count += rows_m * rows_j
        return idx

    theta_jac = data_jac = None
    if spsa_samples and (theta_grad or data_grad):
        s = spsa_samples
        dt = rng.choice([-1.0, 1.0], size=(m, s, p)) if theta_grad else np.zeros((m, s, p))
        dd = rng.choice([-1.0, 1.0], size=(m, s, d)) if data_grad else np.zeros((m, s, d))
        pts_plus, w_plus = _shifted(data[:, None] + SPSA_STEP * dd, direct)
        pts_minus, w_minus = _shifted(data[:, None] - SPSA_STEP * dd, direct)
        plus = add(pts_plus, theta + SPSA_STEP * dt, w_plus)
        minus = add(pts_minus, theta - SPSA_STEP * dt, w_minus)
        scale = 1.0 / (2 * SPSA_STEP * s)
        theta_jac = (plus, minus, dt * scale) if theta_grad else None
        data_jac = (plus, minus, dd * scale) if data_grad else None
    else:
        if theta_grad:
            eye = np.eye(p)
            plus = add(None, np.broadcast_to(theta + SHIFT * eye, (m, p, p)))
            minus = add(None, np.broadcast_to(theta - SHIFT * eye, (m, p, p)))
            theta_jac = (plus, minus, np.broadcast_to(0.5 * eye, (m, p, p)))
        if data_grad:
            eye = np.eye(d)
            step = 1.0 if direct else SHIFT
            pts_plus, w_plus = _shifted(data[:, None] + step * eye, direct)
            pts_minus, w_minus = _shifted(data[:, None] - step * eye, direct)
            th = np.broadcast_to(theta, (m, d, p))
            plus, minus = add(pts_plus, th, w_plus), add(pts_minus, th, w_minus)
            data_jac = (plus, minus, np.broadcast_to(0.5 * eye, (m, d, d)))
    rows = Rows(np.concatenate(points), np.concatenate(thetas), np.concatenate(which), np.concatenate(weights))
    return Step(rows, m, theta_jac, data_jac)


def _shifted(points: np.ndarray, direct: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Angles pass as they are; states are normalised, their squared norm kept as the row weight (a zero state
    gets weight 0 and any unit state)."""
    if not direct:
        return points, None
    sq = np.square(points).sum(-1, keepdims=True)
    safe = np.where(sq > 0, points / np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0)
    safe[..., 0] = np.where(sq[..., 0] > 0, safe[..., 0], 1.0)
    return safe, sq[..., 0]


class CircuitFunction(torch.autograd.Function):
    """r = engine readout of (data, theta); the Jacobians come from the same batched call as the values."""

    @staticmethod
    def forward(ctx, engine, data: torch.Tensor, theta: torch.Tensor, theta_grad: bool, data_grad: bool):
        r, jac_theta, jac_data = engine.evaluate(
            data.detach().cpu().numpy(), theta.detach().cpu().numpy(), theta_grad, data_grad
        )

        def as_tensor(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(data)

        ctx.jac_theta, ctx.jac_data = as_tensor(jac_theta), as_tensor(jac_data)
        return as_tensor(r)

    @staticmethod
    def backward(ctx, grad_r: torch.Tensor):
        grad_data = grad_theta = None
        if ctx.jac_data is not None:
            grad_data = torch.einsum("mk,mkd->md", grad_r, ctx.jac_data)
        if ctx.jac_theta is not None:
            grad_theta = torch.einsum("mk,mkp->p", grad_r, ctx.jac_theta)
        return None, grad_data, grad_theta, None, None
