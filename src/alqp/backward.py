"""Implicit differentiation of the QP solution map, for feasible and closest-feasible QPs.

Pure tensor math (no autograd), batched, any device. The layer (:mod:`alqp.layer`) calls
:func:`implicit_backward` with the incoming gradients of the five outputs and gets the gradients of
the seven inputs.

The map being differentiated
----------------------------
At a solution, with J the active inequality rows (on a bound of the shifted set, or z_i != 0) and
I c J the violated rows (s_in,i != 0, closest-feasible problems only), these equations hold and stay
true under small perturbations of the data (beta_i is u_i or l_i, the bound row i sits on):

    R1  H x + g + A'y + C'z = 0                  (n)  stationarity
    R2  A x - b - s_eq = 0                       (p)  shifted equalities
    R3  C_J x - s_J - beta_J = 0                 (|J|) active shifted inequalities (s_J = 0 off I)
    R5  A's_eq + C_I's_I = 0                     (n)  the shift is least-squares (DESIGN section 2)
    R6  w_V - G_V c - t s_V = 0                  (|V|) the solver's choice among the multipliers
    R7  z_i* = 0                                 (1, only where t > 0)

V are the shifted rows (equality and inequality, :func:`alqp.activity.shifted_rows`), G_V their
rows of [A; C], w_V their multipliers and s_V their shift. The shifted rows are dependent
(G_V's_V = 0), so their multipliers are unique only up to null(G_V'); the forward reports the part
in range(G_V) (R6 with t = 0; c is then the smallest solution of G_V c = w_V), moved along s by
the least t >= 0 that gives every shifted inequality row its bound's sign, which pins one row's
multiplier at zero (R7; :func:`alqp.activity.closest_feasible_multipliers`). Where null(G_V') is
the line through s, R6 says w_V's = 0.

Where no derivative exists, which element of the conservative Jacobian: a row on its bound with
a zero multiplier (weakly active; the map has a kink there) is kept in J, so the gradient is the
derivative of the piece on which that row stays active. Along a direction d it is the one-sided
derivative from the side where that piece's dz_i has its bound's sign (dz_i >= 0 on an upper
bound): along +d where it has, along -d where not. tests/test_closest_feasible_grad.py checks this
on 960 items of closest-feasible QPs with such a row: on the 553 where the two one-sided
differences differ, the gradient matches the predicted side on all, the other side on none.

These hold together with z_i = 0 off J and s_i = 0 off I, which pin those derivatives to zero. A feasible
(SOLVED) problem keeps R1-R3 only, with s = 0 and ds = 0: the QPLayer paper's convention that the
shift of a feasible QP has derivative zero. R1-R7 is our form of the paper's map G (appendix B):
the paper's slack t with s = [t]+ is replaced by the shift itself, and its last block C'[t]+ = 0 by
R5, which also covers equality rows.

Linearizing gives J_v dv = -J_theta dtheta for v = (x, y, z_J, s_eq, s_I, c, t). The derivative is
defined, as in the paper, as the least-squares solution dv = -pinv(J_v) J_theta dtheta, so the
backward pass is exactly its adjoint: w = pinv(J_v') (dL/dv), dL/dtheta = -w' J_theta. Where J_v
has full column rank and the linearization is consistent (the derivative exists: strict
complementarity, independent active rows, H positive definite on their null space), this is the
ordinary derivative. Where it is singular (LPs, H only PSD, dependent or weakly active rows), the
minimum-norm least-squares solution is taken in the metric of a Ruiz equilibration of J_v', which
makes the answer independent of the units of the data.

The adjoint system J_v' w = dL/dv, unknowns w = (w1 (n), w2 (p), w3 (m, used on J), w5 (n),
w6 (p+m, used on V), w7):

    H w1 + A'w2 + C_J'w3_J                  = dL/dx          (dx)
    A w1 + w6_eq                            = dL/dy          (dy)
    C_J w1 + w6_in + w7 e_i*                = dL/dz_J        (dz_J)
    -w2 + A w5 - t w6_eq                    = dL/ds_eq       (ds_eq, closest-feasible only)
    -w3_I + C_I w5 - t w6_in                = dL/ds_I        (ds_I)
    -G_V' w6                                = 0              (dc)
    -s_V' w6                                = 0              (dt, only where t > 0)

The dc rows are solved by construction: w6 = N omega with N a basis of null(G_V') on the rows V
(:func:`_shift_geometry`, usually of small dimension), so the system assembled has the columns
(w1, w2, w3, w5, omega, w7) and no dc rows (:class:`AdjointLayout`, the one definition of where
each block sits, for the assembly and for the readers of its solution).

and the parameter gradients, read off J_theta:

    dL/dH = -1/2 (w1 x' + x w1')      dL/dg = -w1
    dL/dA = -(y w1' + w2 x' + s_eq w5' - w6_eq c')     dL/db = w2
    dL/dC = -(z w1' + w3_J x' + s_in w5' - w6_in c')   dL/du_i = w3_i (row on its upper bound),
                                                       dL/dl_i = w3_i (row on its lower bound).

How the systems are solved: a SOLVED problem whose forward factorization is at hand (the active-set
engine's :class:`alqp.active_set.LeastDistanceFactor`) gets :func:`kkt_solve_factored`, one
|J| x |J| factorization on top of the forward's; otherwise :func:`kkt_solve_direct`; a system
that neither solves (singular: LPs, degenerate or dependent active rows) gets
:func:`lstsq_min_norm`, and every closest-feasible one :func:`lstsq_svd`.

:func:`implicit_backward` runs in phases, each a function of typed values: promote the data to
float64 (:func:`_promote`), classify the rows (:func:`classify_rows`), solve the adjoint systems
by kind of problem (:func:`_solve_adjoint`: :func:`_solve_feasible`, the cascade above, and
:func:`_solve_closest_feasible`), and read the input gradients off J_theta
(:func:`_input_gradients`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from alqp.linalg import (WORK_DTYPE, as_dtype, cholesky_solve_rows, inf_norm, inf_norm_host, magnitudes,
                         rows_or_zeros, safe_rsqrt, solve_triangular_rows, vm, vm_host)
from alqp.active_set import LeastDistanceFactor, problem_rows, take_rows
from alqp.activity import activity_tol, bound_activity_tol, row_tolerance, shifted_rows
from alqp.failure import mark_nan, screen_incoming
from alqp.pool import chunk_threads, concat_rows, map_batch_chunks
from alqp.problem import QPProblem
from alqp.settings import Settings, Status, has_solution
from alqp.types import QPSolution



class ActiveSet(NamedTuple):
    """Per-row classification of a solution, all (B,m) unless noted.

    Attributes:
        active: float 0/1, the row is in J (on a bound of the shifted set, or z_i != 0).
        violated: float 0/1, the row is shifted (s_in,i != 0; closest-feasible problems only).
        violated_eq: (B,p) float 0/1, the equality row is shifted (s_eq,i != 0).
        upper, lower: float weights in [0,1] (upper + lower = active, except that an infinite
            bound has weight 0): which bound the row sits on, hence whether dL/du_i or dL/dl_i
            receives w3_i. A row with l_i = u_i and z_i = 0 gets half of each (the mean of the two
            one-sided derivatives).
        feasible: (B,) bool, status SOLVED.  shifted: (B,) bool, status CLOSEST_FEASIBLE.
    """

    active: Tensor
    violated: Tensor
    violated_eq: Tensor
    upper: Tensor
    lower: Tensor
    feasible: Tensor
    shifted: Tensor


def classify_rows(problem: QPProblem, x: Tensor, y: Tensor, z: Tensor, s_eq: Tensor, s_in: Tensor, status: Tensor,
                  tol: float, bound_tol: Optional[float] = None) -> ActiveSet:
    """Decide the active and violated inequality rows of each solution.

    A row is active when the shifted value C_i x - s_in,i lies within
    ``bound_tol * (1 + |C_i||x| + |bound|)`` of a finite bound (``bound_tol`` defaults to ``tol``,
    and a CLOSEST_FEASIBLE answer's rows always use ``tol``),
    or when |z_i| exceeds ``tol`` times the problem's dual scale (the largest of
    |Hx|, |g|, |A'y|, |C'z|, +1) divided by |C_i|_inf. A row is violated when |s_in,i| exceeds the
    first tolerance (closest-feasible problems only; :func:`alqp.activity.shifted_rows`, which
    also tells the shifted equality rows); violated rows are active.

    Args:
        problem: the canonical batch.  x (B,n), y (B,p), z (B,m), s_eq (B,p), s_in (B,m), status (B,).
        tol: relative tolerance, see :func:`activity_tol`.

    Returns:
        :class:`ActiveSet`.
    """
    C, l, u = problem.C, problem.l, problem.u
    dtype = x.dtype
    # (canonicalize admits no NaN, no l = +inf and no u = -inf: one comparison per side tells a
    # finite bound, where isfinite takes four operations.)
    fin_l, fin_u = l > -math.inf, u < math.inf
    absC = C.abs()
    feasible = status == int(Status.SOLVED)
    shifted = status == int(Status.CLOSEST_FEASIBLE)
    any_shifted = bool(shifted.any())
    ptol = row_tolerance(C, l, u, x, tol if bound_tol is None else bound_tol, abs_M=absC, finite=(fin_l, fin_u))
    if any_shifted and bound_tol is not None and bound_tol != tol:
        # A closest-feasible answer is certified only to 100 times the tolerance, so its rows' slacks
        # are known to no better than ``tol``: there, a row within ``tol`` of its bound stays on it.
        coarse = row_tolerance(C, l, u, x, tol, abs_M=absC, finite=(fin_l, fin_u))
        ptol = torch.where(shifted.unsqueeze(-1), coarse, ptol)
    r = vm(x, C.transpose(-1, -2))
    if any_shifted:
        r = r - s_in  # the row's value in the shifted set (equal to clip(C x, l, u) there)
    # (At an infinite bound |r - bound| is inf: never within the tolerance.)
    on_u = (r - u).abs() <= ptol
    on_l = (r - l).abs() <= ptol

    dual_scale = 1.0 + torch.cat([vm(x, problem.H), problem.g, vm(y, problem.A), vm(z, C)], -1).abs().amax(-1)
    row_norm = absC.amax(-1) if C.shape[-1] > 0 else torch.zeros_like(l)
    z_tol = tol * dual_scale.unsqueeze(-1) / row_norm.clamp_min(torch.finfo(dtype).tiny)
    z_up, z_lo = z > z_tol, z < -z_tol
    violated_eq, violated = shifted_rows(problem.A, problem.b, C, l, u, x, s_eq, s_in, shifted, tol)
    z_nonzero = z_up | z_lo
    active = z_nonzero | on_u | on_l
    if any_shifted:
        active = (feasible | shifted).unsqueeze(-1) & (active | violated)
    else:
        active = feasible.unsqueeze(-1) & active

    # Which bound a row sits on: the sign of the shift for violated rows, else the sign of z, else
    # the bound it touches (half each when it touches both, l_i = u_i). A bound that is infinite
    # gets no weight (and so no gradient).
    upper = torch.where(z_nonzero, z_up.to(dtype), on_u * (1.0 - 0.5 * on_l))
    if any_shifted:
        upper = torch.where(violated, (s_in > 0).to(dtype), upper)
    active = active.to(dtype)
    upper = upper * active
    lower = (active - upper) * fin_l
    return ActiveSet(active, violated.to(dtype), violated_eq.to(dtype), upper * fin_u, lower, feasible, shifted)


def equilibrate(M: Tensor, iterations: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Ruiz equilibration of a batch of rectangular matrices: D_r M D_c with rows and columns of
    infinity norm near 1 (a zero row or column keeps scale 1). A symmetric M stays symmetric.

    A few sweeps suffice: the scaling only has to remove the gross unit mismatch between blocks
    (H against A, C, multipliers against data), not to be optimal.

    Args:
        M: (B,R,K).

    Returns:
        The scaled (B,R,K) matrix, d_r (B,R), d_c (B,K).
    """
    B, R, K = M.shape
    d_r, d_c = M.new_ones(B, R), M.new_ones(B, K)
    if R * K == 0:
        return M.clone(), d_r, d_c
    # The scaled magnitudes, kept in single precision and scaled in place (the scalings need a few
    # digits only): a fraction of the memory traffic of float64 copies made at every sweep.
    S = magnitudes(M)
    for sweep in range(iterations):
        e_r, e_c = safe_rsqrt(S.amax(-1)), safe_rsqrt(S.amax(-2))
        d_r, d_c = d_r * e_r.to(M.dtype), d_c * e_c.to(M.dtype)
        if sweep + 1 < iterations:
            S.mul_(e_r.unsqueeze(-1)).mul_(e_c.unsqueeze(-2))
    return (M * d_r.unsqueeze(-1)).mul_(d_c.unsqueeze(-2)), d_r, d_c


def lstsq_min_norm(M: Tensor, rhs: Tensor, rel_reg: float = 1e-10, max_refine: int = 12,
                   equilibrate_iter: int = 5) -> Tensor:
    """Minimum-norm least-squares solution of a batch of (possibly singular, possibly
    inconsistent) systems M w = rhs, in the metric of their Ruiz equilibration.

    With M_s = D_r M D_c, solves min |M_s v - D_r rhs| with minimum |v| and returns w = D_c v. For a
    system with a unique exact solution this is that solution whatever the scaling.

    Method: proximal-point (Tikhonov) iterations v <- argmin |M_s v - r|^2 + delta |v - v_k|^2 from
    v_0 = 0, which converge to the minimum-norm least-squares solution: each step contracts the error
    along a singular direction sigma by delta / (sigma^2 + delta) and never moves along the null space.
    So delta leaves no bias on directions with sigma^2 >> delta, and directions with sigma^2 << delta
    (numerically singular) are filtered out. One Cholesky factorization of the smaller Gram matrix
    serves every step.

    Args:
        M: (B,R,K).  rhs: (B,R).
        rel_reg: delta relative to the largest diagonal entry of the Gram matrix. Directions with
            sigma below about sqrt(rel_reg) (relative) are treated as singular.
        max_refine: maximum number of proximal steps; a problem stops earlier once its normal
            equations hold to round-off or its step no longer changes v.

    Returns:
        w (B,K).
    """
    B, R, K = M.shape
    if B == 0:
        return M.new_zeros(B, K)
    Ms, d_r, d_c = equilibrate(M, equilibrate_iter)
    r = d_r * rhs
    Mt = Ms.transpose(-1, -2)
    primal = K <= R
    # Gram matrix of the smaller side: (M'M + delta)^-1 M' = M' (M M' + delta)^-1.
    G = torch.matmul(Mt, Ms) if primal else torch.matmul(Ms, Mt)
    N = G.shape[-1]
    diag_max = G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1.0)
    eye = torch.eye(N, dtype=M.dtype, device=M.device)
    delta = rel_reg * diag_max
    L, info = torch.linalg.cholesky_ex(G + delta[:, None, None] * eye)
    if bool((info != 0).any()):
        # Only round-off can make G + delta I indefinite; a larger delta always fixes it.
        delta = torch.where(info != 0, delta * 1e4, delta)
        L, info = torch.linalg.cholesky_ex(G + delta[:, None, None] * eye)
        L = torch.where((info == 0)[:, None, None], L, eye.expand_as(L))
    v = M.new_zeros(B, K)
    # Round-off adds about eps |M| |res| / delta along the null space at every step (it is not
    # damped there), so each problem stops as soon as its normal equations M'(r - M v) = 0 hold to
    # round-off, or its step no longer changes v.
    r_size = r.abs().amax(-1)
    m_size = Ms.abs().amax((-2, -1)) if R * K > 0 else r_size
    normal_tol = 1e-13 * K * m_size * r_size
    running = torch.ones(B, dtype=torch.bool, device=M.device)
    for _ in range(max_refine):
        res = r - vm(v, Mt)
        normal = vm(res, Ms)
        running = running & (normal.abs().amax(-1) > normal_tol)
        if not bool(running.any()):
            break
        if primal:
            step = cholesky_solve_rows(L, normal)
        else:
            step = vm(cholesky_solve_rows(L, res), Ms)
        v = v + torch.where(running.unsqueeze(-1), step, torch.zeros_like(step))
        running = running & (step.abs().amax(-1) > 1e-14 * v.abs().amax(-1))
    return d_c * v


def lstsq_svd(M: Tensor, rhs: Tensor, rcond: float = 1e-11, equilibrate_iter: int = 5) -> Tensor:
    """Minimum-norm least-squares solution of M w = rhs in the metric of M's Ruiz equilibration,
    by a singular value decomposition: w = D_c pinv(D_r M D_c; rcond) D_r rhs. The closest-feasible
    adjoint systems are solved with it (:func:`implicit_backward`).

    Why not :func:`lstsq_min_norm`: its Tikhonov steps work on the Gram matrix, which squares the
    condition number, and filter out every direction whose singular value is below about
    sqrt(rel_reg) = 1e-5 of the largest. A closest-feasible adjoint system can be nonsingular and
    still have singular values far below that (issue 17: shifts of 5e-3 on some rows next to
    multipliers of 1.5e3 give singular values near 1e-9 after equilibration, and a derivative of
    the multipliers of 1e6), and the filter then returned a gradient off by up to 90%. The SVD
    resolves every singular value above ``rcond`` (relative to the largest). The directions it
    drops are those of exact singularity (dependent rows, LPs, H only PSD), whose singular values
    lie at round-off, 1e-16 to 1e-15 relative on the test families, far below ``rcond``; on those
    directions the answer is the minimum-norm one, as :func:`lstsq_min_norm`'s.

    Args:
        M: (B,R,K).  rhs: (B,R).
        rcond: singular values below rcond times the largest (of each problem) are treated as 0.

    Returns:
        w (B,K).
    """
    B, R, K = M.shape
    if B == 0 or R * K == 0:
        return M.new_zeros(B, K)
    Ms, d_r, d_c = equilibrate(M, equilibrate_iter)
    U, S, Vh = torch.linalg.svd(Ms, full_matrices=False)
    keep = S > rcond * S[:, :1]
    inv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    v = vm(vm(d_r * rhs, U) * inv, Vh)
    # One step of iterative refinement against the equilibrated system (cheap: the SVD is reused).
    res = d_r * rhs - vm(v, Ms.mT)
    v = v + vm(vm(res, U) * inv, Vh)
    return d_c * v


def _inf_norm2_host(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(B,) max(|u|_inf, |v|_inf) of (B,k) arrays."""
    return np.maximum(inf_norm_host(u), inf_norm_host(v))


def _active_schur_factor(factor: LeastDistanceFactor, active: Tensor, min_pivot: float) -> tuple[Tensor, np.ndarray]:
    """The Cholesky factor T_f of T = R_J R_J' + diag(1 - a) (:func:`kkt_solve_factored`), and
    where it is good: (B,m,m) (the identity where not) and (B,) bool (numpy)."""
    m = active.shape[-1]
    Ra = factor.R * active.unsqueeze(-1)
    T = torch.bmm(Ra, Ra.mT)
    T.diagonal(dim1=-2, dim2=-1).add_(1.0 - active)  # w3 = 0 on the inactive rows
    T_f, info = torch.linalg.cholesky_ex(T)
    # (The factor lives on the CPU: the tests on small vectors run on numpy views, where torch's
    # per-call cost would dominate at batch 1.)
    ok = info.numpy() == 0
    if m:
        pivot = T_f.diagonal(dim1=-2, dim2=-1).numpy()
        row2 = np.where(active.numpy() > 0, factor.M_C_norm2.numpy(), 1.0)
        ok &= (pivot * pivot >= min_pivot * row2).all(-1)
    if not ok.all():
        T_f = torch.where(torch.from_numpy(ok)[:, None, None], T_f, torch.eye(m, dtype=T.dtype))
    return T_f, ok


def kkt_solve_factored(factor: LeastDistanceFactor, H: Tensor, A: Tensor, C: Tensor, active: Tensor, r1: Tensor,
                       r2: Tensor, r3: Tensor, min_pivot: float = 1e-10,
                       max_refine: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve the KKT systems of feasible problems with the forward's factorization of H and A.

    The system [[H, A', C_J'], [A, 0, 0], [C_J, 0, 0]] (w1, w2, w3_J) = (r1, r2, r3_J), J the
    active rows, is solved with the :class:`alqp.active_set.LeastDistanceFactor` of the forward
    (H = L L', M = [A; C] L^-T = [M_A; M_C], S = M_A M_A' = S_f S_f', W = S_f^-1 M_A M_C',
    R = M_C - W'S_f^-1 M_A = M_C P): with
    w1 = L^-T q it is the KKT system of min 1/2|q|^2 - h'q, h = L^-1 r1, on the rows M, whose
    multipliers solve (M_J M_J') w = M_J h - r, M_J = [M_A; D_a M_C]. The Cholesky factor of
    M_J M_J' is [[S_f, 0], [D_a W', T_f]], T_f the factor of the Schur complement
    T = R_J R_J' (|J| x |J|): only T is factored here. Then

        [w2; w3] = (M_J M_J')^-1 e,  w1 = L^-T (h - M_J'[w2; w3]),  e = M_J h - r.

    (The inactive rows get the identity in T, and 0 in e: w3 is exactly 0 there.) A problem is
    reported unsolved (the caller takes :func:`kkt_solve_direct`) where T's factorization fails,
    where a pivot t_i of T has t_i^2 below ``min_pivot`` |M_C,i|^2 (an active row within
    sin = 1e-5 of the span of the equality rows and the active rows before it), or where the
    residual in the problem's own terms misses :func:`kkt_solve_direct`'s tolerance after
    ``max_refine`` refinement steps.

    Args:
        factor: the LeastDistanceFactor, its tensors already restricted to this batch (batch
            size B or 1), usable everywhere.
        H (B,n,n), A (B,p,n), C (B,m,n): the problems.  active: (B,m) float 0/1, the rows J.
        r1 (B,n), r2 (B,p), r3 (B,m).

    Returns:
        w1 (B,n), w2 (B,p), w3 (B,m) (0 off J), and solved (B,) bool (w are 0 where it is False).
    """
    # (Longer than the module's other functions: its substitution and its refinement share the
    # factor's pieces, which a split would pass around as arguments; a third of it is docstring.)
    B, n = r1.shape
    p, m = A.shape[-2], C.shape[-2]
    L, Mt, S_f = factor.L, factor.Mt, factor.S_factor
    a = active
    T_f, ok = _active_schur_factor(factor, a, min_pivot)
    ok_all = bool(ok.all())
    W = factor.W
    mask = torch.cat([torch.ones_like(r2), a], -1)  # the rows in the system
    r23 = torch.cat([r2, r3], -1) * mask

    def solve(q1: Tensor, q23: Tensor) -> tuple[Tensor, Tensor]:
        h = solve_triangular_rows(L, q1)
        e = (vm(h, Mt) - q23) * mask
        # Forward and back substitution with the block factor [[S_f, 0], [D_a W', T_f]] (never
        # assembled: at large batches its copy would cost more than the solves).
        y2 = e[:, p:]
        if p:
            y1 = solve_triangular_rows(S_f, e[:, :p])
            y2 = y2 - a * vm(y1, W)
        v3 = cholesky_solve_rows(T_f, y2) if m else y2
        v23 = torch.cat([solve_triangular_rows(S_f, y1 - vm(a * v3, W.mT), transposed=True), v3], -1) if p else v3
        v1 = solve_triangular_rows(L, h - vm(v23, Mt.mT), transposed=True)
        return v1, v23

    # The residual check on numpy views (matrix-vector products and norms: at batch 1 numpy's
    # per-call cost is a fraction of torch's, and at batch 100 its stacked products are as fast).
    H_, A_, C_, r1_, r23_, mask_ = (t.numpy() for t in (H, A, C, r1, r23, mask))

    def residual(v1: np.ndarray, v23: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res1 = r1_ - vm_host(v1, H_) - vm_host(v23[:, :p], A_) - vm_host(v23[:, p:], C_)
        Gv1 = np.concatenate([vm_host(v1, A_.transpose(0, 2, 1)), vm_host(v1, C_.transpose(0, 2, 1))], -1)
        return res1, (r23_ - Gv1) * mask_

    norm = _inf_norm2_host
    w1, w23 = solve(r1, r23)
    size = norm(r1_, r23_)
    scale = factor.scale.numpy()
    for step in range(max_refine + 1):
        res1, res23 = residual(w1.numpy(), w23.numpy())
        w_size = norm(w1.numpy(), w23.numpy())
        tol = 1e-11 * (n + p + m) * (scale * w_size + size)
        solved = ok & (norm(res1, res23) <= tol) & np.isfinite(w_size)
        if step == max_refine or solved.all() or (not ok_all and (solved | ~ok).all()):
            break
        d1, d23 = solve(torch.from_numpy(res1), torch.from_numpy(res23))
        w1, w23 = w1 + d1, w23 + d23
    all_solved = bool(solved.all())
    solved = torch.from_numpy(solved)
    if not all_solved:
        keep = solved.unsqueeze(-1)
        w1 = torch.where(keep, w1, torch.zeros_like(w1))
        w23 = torch.where(keep, w23, torch.zeros_like(w23))
    return w1, w23[:, :p], w23[:, p:], solved


def _kkt_equilibrate(H: Tensor, G: Tensor, iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric Ruiz scaling diag(d) M diag(d) of M = [[H, G'], [G, 0]], H (B,n,n), G (B,k,n).

    Computed on single-precision magnitude copies scaled in place (see
    alqp.problem.ruiz_equilibrate): the scalings need a few digits only.

    Returns:
        d1 (B,n), d2 (B,k) in H's dtype, and scale (B,): the largest |entry| of the scaled H and G.
    """
    B, n = H.shape[:2]
    k = G.shape[1]
    absH, absG = magnitudes(H), magnitudes(G)
    d1, d2 = absH.new_ones(B, n), absH.new_ones(B, k)
    for _ in range(iterations if n else 0):
        row1 = torch.maximum(absH.amax(-1), absG.amax(-2)) if k else absH.amax(-1)
        e1 = safe_rsqrt(row1)
        e2 = safe_rsqrt(absG.amax(-1)) if k else d2
        d1.mul_(e1)
        absH.mul_(e1.unsqueeze(-1)).mul_(e1.unsqueeze(-2))
        if k:
            d2.mul_(e2)
            absG.mul_(e2.unsqueeze(-1)).mul_(e1.unsqueeze(-2))
    if n:
        scale_G = absG.flatten(1).amax(-1) if k * n else absH.new_zeros(B)
        scale = torch.maximum(absH.flatten(1).amax(-1), scale_G).to(H.dtype)
    else:
        scale = H.new_zeros(B)
    return d1.to(H.dtype), d2.to(H.dtype), scale


def kkt_solve_direct(H: Tensor, G: Tensor, r1: Tensor, r2: Tensor, rel_reg: float = 1e-9, max_refine: int = 8,
                     equilibrate_iter: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Solve symmetric KKT systems [[H, G'], [G, 0]] (w1, w2) = (r1, r2) where they are nonsingular,
    and report where they are not. Zero rows of G stand for absent constraints (their w2 is 0).

    Method: on the symmetrically Ruiz-equilibrated blocks, the quasi-definite regularization
    [[H + delta I, G'], [G, -delta I]] reduces to one n x n Cholesky factor of
    H + delta I + G'G/delta; iterative refinement against the unregularized system removes the
    regularization's bias. It contracts only where the system is nonsingular, so a problem whose
    residual does not fall below 1e-11 (n + k) of its scale within ``max_refine`` steps is
    reported unsolved (the caller then takes the least-squares route). That tolerance is reached
    in two solves on well-posed systems, where round-off (1e-13) would take a third. The blocks
    are never assembled into the (n+k)^2 matrix: an n x n factorization and block products
    instead of :func:`lstsq_min_norm`'s Gram matrix. On a nonsingular system both return the
    unique solution.

    Args:
        H: (B,n,n) symmetric.  G: (B,k,n).  r1: (B,n).  r2: (B,k).

    Returns:
        w1 (B,n), w2 (B,k), and solved (B,) bool.
    """
    B, n = r1.shape
    k = G.shape[1]
    d1, d2, scale = _kkt_equilibrate(H, G, equilibrate_iter)
    Gs = (G * d2.unsqueeze(-1)).mul_(d1.unsqueeze(-2))
    GsT = Gs.transpose(-1, -2)  # a view: a transposed copy costs more than all its products
    r1s, r2s = d1 * r1, d2 * r2
    delta = (rel_reg * scale.clamp_min(1.0)).unsqueeze(-1)
    # delta * (Hs + delta I + Gs'Gs/delta) with Hs = diag(d1) H diag(d1): the per-problem delta
    # scales the matrix instead of Gs, so the product accumulates in place; its solves are delta
    # times K's inverse. Hs itself is never formed: Hs v = d1 * (H (d1 * v)).
    K = (H * (delta * d1).unsqueeze(-1)).mul_(d1.unsqueeze(-2))
    K.diagonal(dim1=-2, dim2=-1).add_(delta * delta)
    K.baddbmm_(GsT, Gs)
    L, info = torch.linalg.cholesky_ex(K)
    del K
    factored = info == 0
    if not bool(factored.all()):
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        L = torch.where(factored[:, None, None], L, eye.expand_as(L))

    v1, v2 = torch.zeros_like(r1s), torch.zeros_like(r2s)
    Gv1 = torch.zeros_like(r2s)  # Gs v1, carried along instead of recomputed
    res1, res2 = r1s, r2s
    solved = torch.zeros(B, dtype=torch.bool, device=H.device)
    size = torch.maximum(inf_norm(r1s), inf_norm(r2s))
    GtRes2 = vm(res2, Gs)
    for step in range(max_refine + 1):
        if step:
            res2 = r2s - Gv1
            # Gs'v2 and Gs'res2 in one pass over Gs.
            Gt_both = torch.matmul(torch.stack([v2, res2], -2), Gs)
            res1 = r1s - d1 * vm(d1 * v1, H) - Gt_both[:, 0]
            GtRes2 = Gt_both[:, 1]
        v_size = torch.maximum(inf_norm(v1), inf_norm(v2))
        tol = 1e-11 * (n + k) * (scale * v_size + size)
        solved = factored & (torch.maximum(inf_norm(res1), inf_norm(res2)) <= tol)
        if bool(solved.all()) or step == max_refine:
            break
        move = (factored & ~solved).unsqueeze(-1)
        dv1 = cholesky_solve_rows(L, delta * res1 + GtRes2)
        dv1 = torch.where(move, dv1, torch.zeros_like(dv1))
        Gdv1 = vm(dv1, GsT)
        dv2 = torch.where(move, (Gdv1 - res2) / delta, torch.zeros_like(res2))
        v1, v2, Gv1 = v1 + dv1, v2 + dv2, Gv1 + Gdv1
    return d1 * v1, d2 * v2, solved


# ------------------------------------------------------------------------------------------------
# The adjoint system: its layout, its data, its assembly
# ------------------------------------------------------------------------------------------------
def _consecutive(*sizes: int) -> tuple[list[slice], int]:
    """Slices of consecutive blocks of the given sizes, and their total size."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(slice(start, start + size))
        start += size
    return blocks, start


class AdjointLayout(NamedTuple):
    """Where each block of the adjoint system J_v' w = dL/dv (module docstring) sits: the one
    definition of its column and row layout, for the code that assembles the system and the code
    that reads its solution.

    Columns, the unknowns: w1 (n), w2 (p), w3 (m), and for a closest-feasible system w5 (n),
    omega (d; w6 = N omega, :func:`_shift_geometry`) and w7 (1). Rows, one block per derivative:
    dx (n), dy (p), dz (m), and for a closest-feasible system ds_eq (p), ds_in (m) and dt (1). The
    system of a SOLVED problem is the symmetric KKT system of the first three blocks of each; its
    other blocks are empty slices at the end.

    Build it with :meth:`kkt` or :meth:`closest_feasible`.
    """

    w1: slice
    w2: slice
    w3: slice
    w5: slice
    omega: slice
    w7: slice
    columns: int
    dx: slice
    dy: slice
    dz: slice
    ds_eq: slice
    ds_in: slice
    dt: slice
    rows: int

    @classmethod
    def kkt(cls, n: int, p: int, m: int) -> "AdjointLayout":
        """The layout of the symmetric KKT system of SOLVED problems ((n+p+m) x (n+p+m))."""
        columns, K = _consecutive(n, p, m, 0, 0, 0)
        rows, R = _consecutive(n, p, m, 0, 0, 0)
        return cls(*columns, K, *rows, R)

    @classmethod
    def closest_feasible(cls, n: int, p: int, m: int, d: int) -> "AdjointLayout":
        """The layout of the full system of closest-feasible problems, d the dimension of omega."""
        columns, K = _consecutive(n, p, m, n, d, 1)
        rows, R = _consecutive(n, p, m, p, m, 1)
        return cls(*columns, K, *rows, R)


class _Point(NamedTuple):
    """The solution the map is linearized at, each (B,k) in the backward's dtype: x (B,n), y (B,p),
    z (B,m), s_eq (B,p), s_in (B,m)."""

    x: Tensor
    y: Tensor
    z: Tensor
    s_eq: Tensor
    s_in: Tensor


class _OutputGrads(NamedTuple):
    """The incoming gradients dL/dx (B,n), dL/dy (B,p), dL/dz (B,m), dL/ds_eq (B,p), dL/ds_in (B,m)
    in the backward's dtype, zero where none was given."""

    x: Tensor
    y: Tensor
    z: Tensor
    s_eq: Tensor
    s_in: Tensor


class _Group(NamedTuple):
    """A batch, or a sub-batch of it, with everything its adjoint systems are built from."""

    problem: QPProblem
    point: _Point
    incoming: _OutputGrads
    act: ActiveSet

    def select(self, index: Tensor) -> "_Group":
        """The sub-batch of the problems at ``index`` (1-D long tensor)."""
        return _Group(self.problem.select(index), _Point(*(t[index] for t in self.point)),
                      _OutputGrads(*(t[index] for t in self.incoming)), ActiveSet(*(t[index] for t in self.act)))


class AdjointSystem(NamedTuple):
    """One batch of adjoint systems M w = rhs, zero-padded to the batch's sizes.

    Attributes:
        M: (B,R,K) with R = layout.rows, K = layout.columns.  rhs: (B,R).
        layout: the :class:`AdjointLayout` of M's rows and columns.
        N: (B,p+m,d) the basis of w6 (w6 = N omega) on the rows [A; C], and c (B,n) the vector of
            R6 (:func:`_shift_geometry`); both None for a KKT system.
    """

    M: Tensor
    rhs: Tensor
    layout: AdjointLayout
    N: Optional[Tensor]
    c: Optional[Tensor]


class AdjointSolution(NamedTuple):
    """The parts of the adjoint solution w that the input gradients are made of.

    Attributes:
        w1 (B,n), w2 (B,p), w3 (B,m) (zero off the active rows).
        w5 (B,n), w6 (B,p+m) (on the rows [A; C], zero off the shifted rows) and c (B,n), the
            vector of R6: all three None when no problem of the batch is closest-feasible, and
            zero for SOLVED problems otherwise.
    """

    w1: Tensor
    w2: Tensor
    w3: Tensor
    w5: Optional[Tensor] = None
    w6: Optional[Tensor] = None
    c: Optional[Tensor] = None


def _multiplier_shift(act: ActiveSet, s_V: Tensor, w_V: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """R6's t and R7's row: w_V = G_V c + t s_V, with t > 0 only where the forward had to move the
    multipliers along s to give a shifted row its bound's sign
    (:func:`alqp.activity.closest_feasible_multipliers`); that row's z is then 0 (R7).

    Args:
        act: the batch's :class:`ActiveSet`.  s_V, w_V: (B,p+m) the shift and the multipliers on
            the shifted rows (zero off them).  z: (B,m).

    Returns:
        t (B,) (0 where not pinned), pinned (B,) bool, and pin_row (B,m): one-hot on the row i*
        whose multiplier t pins at zero, all zero where not pinned.
    """
    s2 = (s_V * s_V).sum(-1)
    t = (w_V * s_V).sum(-1) / torch.where(s2 > 0, s2, torch.ones_like(s2))
    pinned = act.shifted & (t.abs() * s2 > 1e-6 * (w_V * s_V).abs().sum(-1)) & (s2 > 0)
    t = torch.where(pinned, t, torch.zeros_like(t))
    B, m = z.shape
    # The pinned row is the shifted inequality row with the smallest |z| (z_i* is 0 up to round-off).
    candidates = torch.where(act.violated > 0, z.abs(), torch.full_like(z, float("inf")))
    pin_row = torch.nn.functional.one_hot(candidates.argmin(-1), m).to(z.dtype) if m else z.new_zeros(B, 0)
    return t, pinned, pin_row * pinned.to(z.dtype).unsqueeze(-1)


def _fill_kkt(M: Tensor, blocks: AdjointLayout, H: Tensor, A: Tensor, C_active: Tensor) -> None:
    """Write the symmetric KKT block [[H, A', C_J'], [A, 0, 0], [C_J, 0, 0]] into M (zeros there)."""
    M[:, blocks.dx, blocks.w1] = H
    M[:, blocks.dx, blocks.w2] = A.mT
    M[:, blocks.dx, blocks.w3] = C_active.mT
    M[:, blocks.dy, blocks.w1] = A
    M[:, blocks.dz, blocks.w1] = C_active


def _adjoint_system(group: _Group, full: bool) -> AdjointSystem:
    """Assemble the adjoint systems J_v' w = dL/dv of the module docstring, zero-padded to the
    batch's sizes, in the :class:`AdjointLayout`.

    Inactive rows of dz, non-shifted rows of ds_eq and ds_in and their columns are zero, as is
    every closest-feasible block of a SOLVED problem: zero rows and columns do not change the
    minimum-norm least-squares solution. ``full=False`` (a batch of SOLVED problems) builds the
    KKT system only.

    Returns:
        :class:`AdjointSystem` (B,R,K).
    """
    P, pt, grad, act = group
    H, A, C = P.H, P.A, P.C
    B, n, p, m = P.batch_size, P.n, P.p, P.m
    a, v = act.active, act.violated
    C_active = a.unsqueeze(-1) * C  # D_a C: the rows J, zero elsewhere
    if not full:
        blocks = AdjointLayout.kkt(n, p, m)
        M = H.new_zeros(B, blocks.rows, blocks.columns)
        _fill_kkt(M, blocks, H, A, C_active)
        rhs = H.new_zeros(B, blocks.rows)
        rhs[:, blocks.dx], rhs[:, blocks.dy], rhs[:, blocks.dz] = grad.x, grad.y, a * grad.z
        return AdjointSystem(M, rhs, blocks, None, None)

    phi = act.shifted.to(H.dtype).unsqueeze(-1)  # 1 for closest-feasible problems
    V = torch.cat([act.violated_eq, v], -1)  # the shifted rows of [A; C], (B,p+m)
    s_V = V * torch.cat([pt.s_eq, pt.s_in], -1)
    w_V = V * torch.cat([pt.y, pt.z], -1)
    t, pinned, pin_row = _multiplier_shift(act, s_V, w_V, pt.z)
    # R6's adjoint lies in null(G_V') (the dc rows of the module docstring): written w6 = N omega,
    # with N a basis of that null space (usually of small dimension d), it drops the n dc rows and
    # replaces the p + m w6 columns by d.
    N, c = _shift_geometry(torch.cat([A, C], -2), V, w_V)
    N_eq, N_in = N[:, :p], N[:, p:]
    blocks = AdjointLayout.closest_feasible(n, p, m, N.shape[-1])
    M = H.new_zeros(B, blocks.rows, blocks.columns)
    _fill_kkt(M, blocks, H, A, C_active)
    eye_p = torch.eye(p, dtype=H.dtype, device=H.device).expand(B, p, p)
    minus_t = -t[:, None, None]
    M[:, blocks.dy, blocks.omega] = N_eq
    M[:, blocks.dz, blocks.omega] = N_in
    M[:, blocks.dz, blocks.w7] = pin_row.unsqueeze(-1)
    M[:, blocks.ds_eq, blocks.w2] = -phi.unsqueeze(-1) * eye_p
    M[:, blocks.ds_eq, blocks.w5] = phi.unsqueeze(-1) * A
    M[:, blocks.ds_eq, blocks.omega] = minus_t * N_eq
    M[:, blocks.ds_in, blocks.w3] = -torch.diag_embed(v)
    M[:, blocks.ds_in, blocks.w5] = v.unsqueeze(-1) * C
    M[:, blocks.ds_in, blocks.omega] = minus_t * N_in
    M[:, blocks.dt, blocks.omega] = -pinned.to(H.dtype)[:, None, None] * vm(s_V, N).unsqueeze(-2)
    rhs = H.new_zeros(B, blocks.rows)
    rhs[:, blocks.dx], rhs[:, blocks.dy], rhs[:, blocks.dz] = grad.x, grad.y, a * grad.z
    rhs[:, blocks.ds_eq], rhs[:, blocks.ds_in] = phi * grad.s_eq, v * grad.s_in
    return AdjointSystem(M, rhs, blocks, N, c)


def _shift_geometry(G: Tensor, V: Tensor, w_V: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """R6's two ingredients: an orthonormal basis N of {u : u_i = 0 off V, G'u = 0} (null(G_V') on
    the rows V), and c, the smallest solution of G_V c = w_V's part in range(G_V).

    Both come from one eigendecomposition of the k x k Gram matrix D = G_V G_V' + diag(1 - V) (the
    second term keeps the rows off V out of the null space): its eigenvalues below rtol^2 times the
    largest (singular values of [G_V, diag(1 - V)] below rtol times the largest) span N, and
    c = G_V' D^+ w_V over the others. One symmetric eigensolver on k x k instead of an SVD of the
    k x (n + k) matrix and a pseudo-inverse of G_V (four times faster on Sudoku's LP, where d = 3).
    The Gram matrix squares G_V's condition number: singular values are resolved down to about
    1e-8 of the largest, well below rtol.

    Args:
        G: (B,k,n) the rows [A; C].  V: (B,k) float 0/1, the shifted rows.  w_V: (B,k) their
        multipliers, zero off V.

    Returns:
        N (B,k,d), exactly 0 off V (zero columns pad the problems whose null space is smaller
        than the batch's largest, d), and c (B,n).
    """
    B, k, n = G.shape
    if k == 0:
        return G.new_zeros(B, 0, 0), G.new_zeros(B, n)
    G_V = V.unsqueeze(-1) * G
    D = torch.baddbmm(torch.diag_embed(1.0 - V), G_V, G_V.mT)
    lam, Q = torch.linalg.eigh(D)  # ascending
    null = lam <= rtol * rtol * lam[:, -1:].clamp_min(1.0)
    d = int(null.sum(-1).max())
    # (Exactly 0 off V: an eigensolver leaves round-off there, which the equilibration of the
    # adjoint system would blow up to O(1).)
    N = Q[:, :, :d] * null[:, :d].unsqueeze(-2).to(G.dtype) * V.unsqueeze(-1)
    inv = torch.where(null, torch.zeros_like(lam), 1.0 / torch.where(null, torch.ones_like(lam), lam))
    c = vm(vm(vm(w_V, Q) * inv, Q.mT), G_V)
    return N, c


# ------------------------------------------------------------------------------------------------
# Solving the adjoint systems
# ------------------------------------------------------------------------------------------------
def _factor_rows(factor: LeastDistanceFactor, index: Optional[Tensor]) -> LeastDistanceFactor:
    """The factor of the problems at ``index`` (None: all); tensors shared by the batch (batch size
    1) stay shared."""
    if index is None:
        return factor
    return LeastDistanceFactor(*(t if t.shape[0] == 1 else take_rows(t, index) for t in factor))


def _compose(outer: Optional[Tensor], inner: Tensor) -> Tensor:
    """The index into the batch of the problems ``inner`` of the sub-batch ``outer`` (None: all)."""
    return inner if outer is None else outer[inner]


def _solve_factored(group: _Group, factor: LeastDistanceFactor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`kkt_solve_factored` on a group of SOLVED problems, ``factor`` restricted to it:
    w1 (B,n), w2 (B,p), w3 (B,m), solved (B,) bool."""
    P, grad = group.problem, group.incoming
    return kkt_solve_factored(factor, P.H, P.A, P.C, group.act.active, grad.x, grad.y, grad.z)


def _solve_direct(group: _Group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`kkt_solve_direct` on a group of SOLVED problems: w1 (B,n), w2 (B,p), w3 (B,m),
    solved (B,) bool."""
    P, grad, a = group.problem, group.incoming, group.act.active
    G = torch.cat([P.A, a.unsqueeze(-1) * P.C], -2)  # the rows [A; C_J], inactive rows zero
    w1, w23, solved = kkt_solve_direct(P.H, G, grad.x, torch.cat([grad.y, a * grad.z], -1))
    return w1, w23[:, :P.p], w23[:, P.p:], solved


def _solve_feasible(group: _Group, factor: Optional[LeastDistanceFactor], index: Optional[Tensor],
                    batch_size: int) -> AdjointSolution:
    """The adjoint (KKT) systems of a group of SOLVED problems, cheapest method first.

    Most are nonsingular: those the forward's factorization covers get :func:`kkt_solve_factored`,
    the others (and those it reports unsolved) :func:`kkt_solve_direct`; the singular rest (LPs,
    degenerate or dependent active rows) the least-squares solution of :func:`lstsq_min_norm`.

    Args:
        group: the problems, (B_g, ...).
        factor: the forward's factor of the whole batch (on the CPU, as the data), or None.
        index: (B_g,) the group's problems in the batch, None when it is the whole batch.
        batch_size: the batch's size B.

    Returns:
        :class:`AdjointSolution` without its closest-feasible parts.
    """
    P, a = group.problem, group.act.active
    count = P.batch_size
    usable = np.zeros(count, dtype=bool)
    if factor is not None:
        usable = factor.usable.expand(batch_size).numpy()
        usable = usable if index is None else usable[index.numpy()]
    if usable.all():  # (the common case: no index juggling)
        w1, w2, w3, solved = _solve_factored(group, _factor_rows(factor, index))
    else:
        w1, w2, w3 = P.H.new_zeros(count, P.n), P.H.new_zeros(count, P.p), P.H.new_zeros(count, P.m)
        solved = torch.zeros(count, dtype=torch.bool, device=w1.device)
        pick = torch.from_numpy(np.flatnonzero(usable))
        if pick.numel():
            picked = _solve_factored(group.select(pick), _factor_rows(factor, _compose(index, pick)))
            w1[pick], w2[pick], w3[pick], solved[pick] = picked
    if not bool(solved.all()):
        rest = (~solved).nonzero().squeeze(-1)
        if rest.numel() == count:  # (none solved yet, as without a factor: no index juggling)
            w1, w2, w3, solved = _solve_direct(group)
        else:
            w1[rest], w2[rest], w3[rest], solved[rest] = _solve_direct(group.select(rest))
        rest = (~solved).nonzero().squeeze(-1)
        if rest.numel():
            system = _adjoint_system(group.select(rest), full=False)
            w = lstsq_min_norm(system.M, system.rhs)
            blocks = system.layout
            w1[rest], w2[rest], w3[rest] = w[:, blocks.w1], w[:, blocks.w2], w[:, blocks.w3]
    return AdjointSolution(w1, w2, w3 * a)


def _solve_closest_feasible(group: _Group) -> AdjointSolution:
    """The full adjoint systems of a group of closest-feasible problems, by :func:`lstsq_svd`
    (they can be nonsingular with singular values far below what :func:`lstsq_min_norm` resolves).

    Returns:
        :class:`AdjointSolution` (B_g, ...), with its closest-feasible parts.
    """
    act = group.act
    system = _adjoint_system(group, full=True)
    w = lstsq_svd(system.M, system.rhs)
    blocks = system.layout
    V = torch.cat([act.violated_eq, act.violated], -1)
    w6 = V * vm(w[:, blocks.omega], system.N.mT)
    return AdjointSolution(w[:, blocks.w1], w[:, blocks.w2], w[:, blocks.w3] * act.active, w[:, blocks.w5], w6,
                           system.c)


def _solve_adjoint(batch: _Group, factor: Optional[LeastDistanceFactor], all_feasible: bool,
                   any_shifted: bool) -> AdjointSolution:
    """The adjoint solution of every problem of the batch, zero for problems without a solution.

    SOLVED problems need only the symmetric KKT system (:func:`_solve_feasible`), closest-feasible
    ones the full system (:func:`_solve_closest_feasible`): each kind is solved as one group.

    Args:
        batch: the whole batch (B).  factor: see :func:`_solve_feasible`.
        all_feasible: every problem is SOLVED.  any_shifted: some problem is closest-feasible.

    Returns:
        :class:`AdjointSolution` (B, ...); its closest-feasible parts are None unless ``any_shifted``.
    """
    P, act = batch.problem, batch.act
    B = P.batch_size
    if all_feasible:  # (the common case: one group, no scatter)
        return _solve_feasible(batch, factor, None, B)
    w1, w2, w3 = P.H.new_zeros(B, P.n), P.H.new_zeros(B, P.p), P.H.new_zeros(B, P.m)
    w5 = w6 = c = None
    if any_shifted:
        w5, w6, c = P.H.new_zeros(B, P.n), P.H.new_zeros(B, P.p + P.m), P.H.new_zeros(B, P.n)
    for members, full in ((act.feasible, False), (act.shifted, True)):
        if full and not any_shifted:
            continue
        index = members.nonzero().squeeze(-1)
        if index.numel() == 0:
            continue
        whole = index.numel() == B
        group = batch if whole else batch.select(index)
        part = _solve_closest_feasible(group) if full else _solve_feasible(group, factor, None if whole else index, B)
        if whole:
            w1, w2, w3 = part.w1, part.w2, part.w3
        else:
            w1[index], w2[index], w3[index] = part.w1, part.w2, part.w3
        if full:
            w5[index], w6[index], c[index] = part.w5, part.w6, part.c
    return AdjointSolution(w1, w2, w3, w5, w6, c)


# ------------------------------------------------------------------------------------------------
# From the adjoint solution to the input gradients
# ------------------------------------------------------------------------------------------------
def _input_gradients(point: _Point, act: ActiveSet, adjoint: AdjointSolution) -> dict[str, Tensor]:
    """dL/d(H, g, A, b, C, l, u) read off J_theta (module docstring), batched, in the point's dtype.

    dL/dH, dL/dA and dL/dC are sums of outer products with the same right factors x and w1 (and
    w5, c for closest-feasible problems): one (B, r, J) @ (B, J, n) product per gradient, one pass
    over its output. At batch 1 a single product makes all three (its slices are then contiguous,
    so autograd takes them as they are; at larger B it would copy them).
    """
    x, y, z, s_eq, s_in = point
    w1, w2, w3 = adjoint.w1, adjoint.w2, adjoint.w3
    B, n = x.shape
    p = y.shape[-1]
    right = [x, w1]
    A_left, C_left = [w2, y], [w3, z]
    if adjoint.w5 is not None:  # the closest-feasible terms (zero for SOLVED problems)
        s_eq_used = torch.where(act.shifted.unsqueeze(-1), s_eq, torch.zeros_like(s_eq))
        right = right + [adjoint.w5, adjoint.c]
        A_left = A_left + [s_eq_used, -adjoint.w6[:, :p]]
        C_left = C_left + [act.violated * s_in, -adjoint.w6[:, p:]]
    right, H_left = torch.stack(right, -2), torch.stack([w1, x], -1)
    A_left, C_left = torch.stack(A_left, -1), torch.stack(C_left, -1)
    if B == 1:
        H_left = torch.nn.functional.pad(H_left, (0, right.shape[-2] - 2))  # (zero weight on w5, c)
        outer = torch.bmm(torch.cat([H_left, A_left, C_left], -2), right).neg_()  # (1, n+p+m, n)
        dH, dA, dC = outer[:, :n], outer[:, n:n + p], outer[:, n + p:]
    else:
        dH = torch.bmm(H_left, right[:, :2]).neg_()
        dA, dC = torch.bmm(A_left, right).neg_(), torch.bmm(C_left, right).neg_()
    return {
        "H": dH.mul_(0.5),
        "g": -w1,
        "A": dA,
        "b": w2,
        "C": dC,
        "l": act.lower * w3,  # (0 at infinite bounds: classify_rows gives them no weight)
        "u": act.upper * w3,
    }


# ------------------------------------------------------------------------------------------------
# The backward
# ------------------------------------------------------------------------------------------------
def _keep_rows(t: Tensor, keep: Tensor) -> Tensor:
    """``t`` (B, ...) with the rows where ``keep`` (B,) is False set to zero."""
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))


def _promote(problem: QPProblem, solution: QPSolution, incoming: tuple[Optional[Tensor], ...]
             ) -> tuple[QPProblem, _Point, _OutputGrads]:
    """The problem, the solution and the incoming gradients (None: zero) in :data:`WORK_DTYPE`,
    the gradients materialized with the batch's shapes."""
    P = problem if problem.H.dtype == WORK_DTYPE else QPProblem(
        **{k: as_dtype(t, WORK_DTYPE) for k, t in problem.tensors().items()},
        batched=problem.batched, unbatched=problem.unbatched)
    B = P.batch_size
    point = _Point(*(as_dtype(t, WORK_DTYPE) for t in (solution.x, solution.y, solution.z, solution.s_eq,
                                                       solution.s_in)))
    grads = (rows_or_zeros(t, B, k, P.H) for t, k in zip(incoming, (P.n, P.p, P.m, P.p, P.m)))
    return P, point, _OutputGrads(*grads)


def implicit_backward(problem: QPProblem, solution: QPSolution, grad_x: Optional[Tensor] = None,
                      grad_y: Optional[Tensor] = None, grad_z: Optional[Tensor] = None,
                      grad_s_eq: Optional[Tensor] = None, grad_s_in: Optional[Tensor] = None,
                      settings: Optional[Settings] = None, active_tol: Optional[float] = None,
                      factor: Optional[LeastDistanceFactor] = None) -> dict[str, Tensor]:
    """Gradients of a loss with respect to the QP data, by implicit differentiation.

    See the module docstring for the equations. Problems whose status carries no solution
    (:func:`alqp.settings.has_solution`) have no derivative: they get the gradient that
    ``settings.failed_gradient`` says (:mod:`alqp.failure`; zero by default). A problem whose
    incoming gradient holds NaN or Inf gets NaN gradients.

    Args:
        problem: the canonical batch (:func:`alqp.problem.canonicalize`), shapes H (B,n,n), g (B,n),
            A (B,p,n), b (B,p), C (B,m,n), l, u (B,m).
        solution: the :class:`alqp.QPSolution` of ``problem`` (batched).
        grad_x (B,n), grad_y (B,p), grad_z (B,m), grad_s_eq (B,p), grad_s_in (B,m): dL/d(output);
            None means zero.
        settings: the forward's :class:`Settings` (sets the default activity tolerance and the
            failure policy).
        active_tol: override of :func:`activity_tol`.
        factor: the forward's :class:`alqp.active_set.LeastDistanceFactor` of ``problem``, or
            None: SOLVED problems it covers get their KKT solve from it (:func:`kkt_solve_factored`).

    Returns:
        dict with keys "H", "g", "A", "b", "C", "l", "u": gradients with the batched shapes above,
        in the problem's dtype and device; dL/dH is symmetric; dL/dl, dL/du are 0 at infinite bounds.
    """
    # --- alqp.pool: a large CPU batch in contiguous chunks, each its own backward, on threads.
    # Only where every problem is SOLVED: each problem's gradient is then the same whatever its
    # batch-mates, bit for bit (a closest-feasible problem's adjoint system is padded to the
    # sizes of its group, and the failure policy's messages name problems by their index). ---
    B = problem.batch_size
    threads = chunk_threads(B, problem.n) if problem.H.device.type == "cpu" else 0
    if threads and bool((solution.status == int(Status.SOLVED)).all()):
        incoming = (grad_x, grad_y, grad_z, grad_s_eq, grad_s_in)

        def grads_rows(start: int, stop: int) -> dict[str, Tensor]:
            return implicit_backward(
                problem_rows(problem, start, stop), QPSolution(*(t[start:stop] for t in solution)),
                *(t[start:stop] if t is not None and t.dim() == 2 and t.shape[0] == B else t for t in incoming),
                settings=settings, active_tol=active_tol, factor=None if factor is None else factor.rows(start, stop))

        parts = map_batch_chunks(grads_rows, B, threads)
        return {name: concat_rows([part[name] for part in parts], threads) for name in parts[0]}
    # --- end alqp.pool ---
    out_dtype = problem.H.dtype
    tol = active_tol if active_tol is not None else activity_tol(out_dtype, settings)
    status = solution.status
    P, point, incoming = _promote(problem, solution, (grad_x, grad_y, grad_z, grad_s_eq, grad_s_in))
    incoming, nan_rows = screen_incoming(status, incoming, settings)
    if factor is not None and factor.L.device != P.H.device:
        factor = None  # (the active-set engine on CUDA data factors on the CPU: not worth a copy)
    bound_tol = bound_activity_tol(tol, out_dtype) if active_tol is None else tol
    act = classify_rows(P, *point, status, tol, bound_tol)
    # (The statuses summed up once: each test is a device sync, and they add up at batch 1.)
    all_feasible = bool(act.feasible.all())
    any_shifted = not all_feasible and bool(act.shifted.any())
    ok = has_solution(status)
    all_ok = all_feasible or bool(ok.all())
    if not all_ok:  # keep the non-finite values of problems that get no gradient out of the arithmetic
        point = _Point(*(_keep_rows(t, ok) for t in point))
        incoming = [_keep_rows(t, ok) for t in incoming]
    batch = _Group(P, point, _OutputGrads(*incoming), act)
    grads = _input_gradients(point, act, _solve_adjoint(batch, factor, all_feasible, any_shifted))
    if not all_ok:
        grads = {k: _keep_rows(v, ok) for k, v in grads.items()}
    return mark_nan({k: as_dtype(v, out_dtype) for k, v in grads.items()}, nan_rows)
