"""A per-call fast path for small QPs on the CPU (control loops: n of a few, batch of a few).

At a few variables and a few problems the general path's time is the fixed cost of some hundred
small torch operations, not arithmetic (the README's Performance section has the numbers). This
module does the same work on numpy arrays, in a handful of calls:

* :func:`solve_small`: one DAQP solve per problem in its own form (scaled as the general path's
  direct form, :func:`alqp.active_set._direct_scaling`), then the certification of
  :mod:`alqp.certify`, evaluated on host arrays (:func:`host_residuals_meet`, the same formulas
  and tolerances as :func:`alqp.certify.residuals` and :meth:`alqp.certify.Residuals.meets`,
  checked equal by the tests). It answers only when *every* problem of the batch is certified
  SOLVED; anything else (an infeasible, unbounded or uncertified problem, a warm start, an
  ineligible size or dtype) returns None and the caller takes the general path for the whole
  batch, so every other status comes from the general path unchanged.
* :func:`backward_small`: for a batch whose problems are all SOLVED, the implicit derivative of
  :mod:`alqp.backward` (its feasible block, R1-R3) from one batched dense solve of the padded
  KKT systems [[H, A', C_J'], [A, 0, 0], [C_J, 0, I_off-J]]. The active rows J are classified as
  :func:`alqp.backward.classify_rows` does. A KKT system whose equilibrated condition number
  exceeds :data:`MAX_CONDITION` (LPs at a degenerate vertex, dependent or weakly active rows: the
  least-squares cases), a NaN or Inf incoming gradient, or any status other than SOLVED returns
  None, and the general backward runs.

Hooks (the only places that know about this module): :func:`alqp.solver.solve_problem_factored`
calls :func:`solve_small` first on the active-set engine, and :func:`alqp.layer._ift_engine`
calls :func:`backward_small` first. Set :data:`ENABLED` to False to compare both paths.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from alqp.activity import activity_tol, bound_activity_tol
from alqp.certify import Tolerance, resolve_tolerance
from alqp.linalg import inf_norm_host
from alqp.problem import QPProblem
from alqp.types import QPSolution, Status

#: Module switch: False sends every call to the general path (tests compare the two).
ENABLED = True
#: Largest sizes the fast path takes: beyond them the general path's batched algebra wins.
MAX_N = 16
MAX_BATCH = 16
MAX_ROWS = 64
#: Largest condition number (after symmetric equilibration) of a KKT system the fast backward
#: solves directly; above it the system is treated as singular and the general backward (with its
#: least-squares route) answers.
MAX_CONDITION = 1e8

#: How often each path answered (tests read it to see that the fast path is taken).
counters = {"forward": 0, "forward_fallback": 0, "backward": 0, "backward_fallback": 0}

_DTYPES = (torch.float64, torch.float32)
_DAQP_OPTIMAL = 1
_DAQP_EQUALITY = 5


def eligible(problem: QPProblem) -> bool:
    """Whether the fast path may take the canonical batch ``problem``: CPU, float64 or float32,
    1 <= n <= MAX_N, batch <= MAX_BATCH, 1 <= p + m <= MAX_ROWS."""
    H = problem.H
    k = problem.p + problem.m
    return (ENABLED and H.device.type == "cpu" and H.dtype in _DTYPES and 0 < problem.n <= MAX_N
            and problem.batch_size <= MAX_BATCH and 0 < k <= MAX_ROWS)


def _host(t: Tensor) -> np.ndarray:
    """(B, ...) tensor as a C-contiguous float64 array (a copy only where needed)."""
    if t.dtype != torch.float64:
        t = t.double()
    return np.ascontiguousarray(t.numpy())


def host_residuals_meet(H: np.ndarray, g: np.ndarray, G: np.ndarray, lo: np.ndarray, hi: np.ndarray, p: int,
                        x: np.ndarray, w: np.ndarray, tol: Tolerance) -> np.ndarray:
    """(B,) True where (x, w) meets ``tol``: :func:`alqp.certify.residuals` followed by
    :meth:`alqp.certify.Residuals.meets`, the same formulas on host arrays (a few numpy calls
    instead of some forty torch operations).

    Args:
        H (B,n,n), g (B,n), G (B,k,n) = [A; C], lo, hi (B,k) = [b; l], [b; u] (may be infinite),
        p: the number of equality rows, x (B,n), w (B,k) = [y; z], both finite.
    """
    # (matmul on (B,1,k) rows: a fraction of einsum's per-call cost on these small arrays)
    wr = w[:, None, :]
    Hx = (H @ x[..., None])[..., 0]
    Gx = (G @ x[..., None])[..., 0]
    Gtw = (wr @ G)[:, 0]
    absG = np.abs(G)
    Gx_size = (absG @ np.abs(x)[..., None])[..., 0]
    Gtw_size = (np.abs(wr) @ absG)[:, 0]

    # (x and w are finite here, so no inf - inf arises: infinite bounds only meet finite values.)
    primal = inf_norm_host(Gx - np.clip(Gx, lo, hi))
    primal_scale = np.maximum(inf_norm_host(Gx_size), inf_norm_host(lo[:, :p]))
    bound = np.where(w > 0, hi, np.where(w < 0, lo, 0.0))
    unbounded_side = (w != 0) & ~np.isfinite(bound)
    dual = np.maximum(inf_norm_host(Hx + g + Gtw), inf_norm_host(np.where(unbounded_side, w, 0.0)))
    dual_scale = np.maximum(np.maximum(inf_norm_host(Hx), inf_norm_host(g)), inf_norm_host(Gtw_size))
    bound_terms = np.where((w != 0) & ~unbounded_side, bound * w, 0.0)
    xHx, gx = x * Hx, g * x
    gap = np.abs(xHx.sum(-1) + gx.sum(-1) + bound_terms.sum(-1))
    gap_scale = np.stack([np.abs(xHx).sum(-1), np.abs(gx).sum(-1), np.abs(bound_terms).sum(-1)]).max(0)
    finite = np.isfinite(primal) & np.isfinite(dual) & np.isfinite(gap)
    return (finite & (primal <= tol.abs + tol.rel * primal_scale) & (dual <= tol.abs + tol.rel * dual_scale)
            & (gap <= tol.abs + tol.rel * gap_scale))


def solve_small(problem: QPProblem, settings) -> Optional[QPSolution]:
    """The batch solved and certified SOLVED in one numpy/DAQP pass, or None (general path).

    Args:
        problem: the canonical batch (:func:`alqp.problem.canonicalize`): H (B,n,n), g (B,n),
            A (B,p,n), b (B,p), C (B,m,n), l, u (B,m).
        settings: :class:`alqp.Settings` (its tolerances; the engine must be the active-set one).

    Returns:
        A batched :class:`alqp.QPSolution` (x (B,n), y (B,p), z (B,m), zero shifts, status SOLVED,
        iterations: DAQP's active-set iterations) in the problem's dtype, when every problem is
        certified; None otherwise (nothing is changed, and the caller solves the batch as usual).
    """
    if not eligible(problem):
        return None
    from alqp.active_set import _INNER_TOL_FACTOR, _INNER_TOL_MAX, _INNER_TOL_MIN, _import_daqp, _rounded

    solve = _import_daqp().solve
    dtype = problem.H.dtype
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    H, g = _host(problem.H), _host(problem.g)
    G = np.concatenate([_host(problem.A), _host(problem.C)], 1)
    b = _host(problem.b)
    lo = np.concatenate([b, _host(problem.l)], 1)
    hi = np.concatenate([b, _host(problem.u)], 1)
    sense = np.zeros(p + m, dtype=np.intc)
    sense[:p] = _DAQP_EQUALITY
    tol = resolve_tolerance(settings, dtype)
    finest = min(t for t in tol if t > 0)
    inner_tol = min(max(_INNER_TOL_FACTOR * finest, _INNER_TOL_MIN), _INNER_TOL_MAX)
    # The general path's direct form (alqp.active_set._direct_scaling), for the whole batch at
    # once: the cost divided by max(|H|, |g|), each row by its largest entry, so that DAQP's
    # absolute tolerances act on quantities of size one; the multipliers are lam * cost / rows.
    cost = np.maximum(np.abs(H).max(axis=(1, 2)), np.abs(g).max(axis=1))
    cost = np.where(cost > 0, cost, 1.0)
    rows = np.abs(G).max(axis=2)
    rows = np.where(rows > 0, rows, 1.0)
    Hs, gs = H / cost[:, None, None], g / cost[:, None]
    Gs, los, his = G / rows[:, :, None], lo / rows, hi / rows
    # An LP goes to DAQP without a Hessian (exact multipliers from its LP mode), as in the
    # general path's direct form.
    lp = (~H.reshape(B, -1).any(axis=1)).tolist()
    x = np.empty((B, n))
    lam = np.empty((B, p + m))
    iters = np.empty(B, dtype=np.int64)
    for i in range(B):
        x_i, _, flag, info = solve(None if lp[i] else Hs[i], gs[i], Gs[i], his[i], los[i], sense,
                                   primal_tol=inner_tol, eta_prox=inner_tol)
        if flag != _DAQP_OPTIMAL:
            counters["forward_fallback"] += 1
            return None
        x[i] = x_i
        lam[i] = info["lam"]
        iters[i] = info["iterations"]
    w = lam * cost[:, None] / rows
    x, w = _rounded(x, dtype), _rounded(w, dtype)
    if not (np.isfinite(x).all() and np.isfinite(w).all() and host_residuals_meet(H, g, G, lo, hi, p, x, w, tol).all()):
        counters["forward_fallback"] += 1
        return None
    counters["forward"] += 1
    x_t = torch.from_numpy(x).to(dtype)
    w_t = torch.from_numpy(w).to(dtype)
    zeros = torch.zeros(B, p + m, dtype=dtype)
    return QPSolution(x_t, w_t[:, :p], w_t[:, p:], zeros[:, :p], zeros[:, p:],
                      torch.full((B,), int(Status.SOLVED), dtype=torch.int64), torch.from_numpy(iters))


def _classify_host(C, l, u, H, g, A, x, y, z, tol, bound_tol):
    """The active rows of SOLVED answers and the bound each sits on, as
    :func:`alqp.backward.classify_rows` decides them (its feasible case), on host arrays.

    Returns:
        active, upper, lower: (B,m) float 0/1 (upper / lower 0.5 each on a row with l_i = u_i and
        z_i = 0; 0 on an infinite bound).
    """
    fin_l, fin_u = l > -np.inf, u < np.inf
    absC = np.abs(C)
    bound = np.maximum(np.where(fin_l, np.abs(l), 0.0), np.where(fin_u, np.abs(u), 0.0))
    ptol = bound_tol * (1.0 + (absC @ np.abs(x)[..., None])[..., 0] + bound)
    r = (C @ x[..., None])[..., 0]
    # (At an infinite bound |r - bound| is inf: never within the tolerance.)
    on_u = np.abs(r - u) <= ptol
    on_l = np.abs(r - l) <= ptol
    dual_terms = [(x[:, None] @ H)[:, 0], g, (y[:, None] @ A)[:, 0], (z[:, None] @ C)[:, 0]]
    dual_scale = 1.0 + np.abs(np.concatenate(dual_terms, -1)).max(-1)
    row_norm = absC.max(-1) if C.shape[-1] else np.zeros_like(l)
    z_tol = tol * dual_scale[:, None] / np.maximum(row_norm, np.finfo(np.float64).tiny)
    z_up, z_lo = z > z_tol, z < -z_tol
    z_nonzero = z_up | z_lo
    active = (z_nonzero | on_u | on_l).astype(np.float64)
    upper = np.where(z_nonzero, z_up.astype(np.float64), on_u * (1.0 - 0.5 * on_l)) * active
    lower = (active - upper) * fin_l
    return active, upper * fin_u, lower


def backward_small(problem: QPProblem, solution: QPSolution, grad_x, grad_y, grad_z, grad_s_eq, grad_s_in,
                   settings) -> Optional[dict]:
    """The implicit backward of an all-SOLVED small batch in one batched KKT solve, or None.

    Same arguments and result as :func:`alqp.backward.implicit_backward` (gradients (B, ...) of
    "H", "g", "A", "b", "C", "l", "u" in the problem's dtype); None where the general backward
    must answer (see the module docstring): ineligible batch, a status other than SOLVED, a NaN
    or Inf incoming gradient, or a KKT system too ill-conditioned to solve directly.
    """
    if not eligible(problem):
        return None
    status = solution.status.numpy()
    if (status != int(Status.SOLVED)).any():
        counters["backward_fallback"] += 1
        return None
    dtype = problem.H.dtype
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    incoming = []
    for t, k in ((grad_x, n), (grad_y, p), (grad_z, m), (grad_s_eq, p), (grad_s_in, m)):
        incoming.append(np.zeros((B, k)) if t is None else np.broadcast_to(_host(t), (B, k)))
    if not all(np.isfinite(t).all() for t in incoming):
        counters["backward_fallback"] += 1
        return None
    gx, gy, gz = incoming[:3]  # (a SOLVED problem's shift is 0 with derivative 0: no s terms)
    H, g, A, C, l, u = (_host(getattr(problem, k)) for k in ("H", "g", "A", "C", "l", "u"))
    x, y, z = (_host(t) for t in (solution.x, solution.y, solution.z))
    tol = activity_tol(dtype, settings)
    active, upper, lower = _classify_host(C, l, u, H, g, A, x, y, z, tol, bound_activity_tol(tol, dtype))

    # The padded KKT matrix: an inactive row i gets 1 on its diagonal and 0 on its right side,
    # so its w3_i is exactly 0.
    N = n + p + m
    K = np.zeros((B, N, N))
    Ca = active[:, :, None] * C
    K[:, :n, :n] = H
    K[:, n:n + p, :n] = A
    K[:, :n, n:n + p] = A.transpose(0, 2, 1)
    K[:, n + p:, :n] = Ca
    K[:, :n, n + p:] = Ca.transpose(0, 2, 1)
    idx = np.arange(n + p, N)
    K[:, idx, idx] = 1.0 - active
    rhs = np.concatenate([gx, gy, active * gz], -1)
    # Symmetric equilibration (two Ruiz sweeps), so that the condition test is scale-free.
    d = np.ones((B, N))
    for _ in range(2):
        norms = np.abs(K * d[:, :, None] * d[:, None, :]).max(-1)
        d = d / np.sqrt(np.where(norms > 0, norms, 1.0))
    Ks = K * d[:, :, None] * d[:, None, :]
    # The inverse gives the exact 1-norm condition number at the cost of a solve.
    try:
        K_inv = np.linalg.inv(Ks)
    except np.linalg.LinAlgError:  # exactly singular (in floating point)
        K_inv = None
    if K_inv is None or not (np.abs(Ks).sum(1).max(1) * np.abs(K_inv).sum(1).max(1) < MAX_CONDITION).all():
        counters["backward_fallback"] += 1
        return None
    r = (d * rhs)[..., None]
    v = K_inv @ r
    # One step of iterative refinement (the general path refines its solves to round-off too).
    v = (v + K_inv @ (r - Ks @ v))[..., 0]
    sol = d * v
    w1, w2, w3 = sol[:, :n], sol[:, n:n + p], sol[:, n + p:] * active

    outer = lambda a, c: a[:, :, None] * c[:, None, :]  # noqa: E731
    grads = {
        "H": -0.5 * (outer(w1, x) + outer(x, w1)),
        "g": -w1,
        "A": -(outer(y, w1) + outer(w2, x)),
        "b": w2,
        "C": -(outer(z, w1) + outer(w3, x)),
        "l": lower * w3,
        "u": upper * w3,
    }
    counters["backward"] += 1
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in grads.items()}
