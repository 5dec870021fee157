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
(w1, w2, w3, w5, omega, w7) and no dc rows.

and the parameter gradients, read off J_theta:

    dL/dH = -1/2 (w1 x' + x w1')      dL/dg = -w1
    dL/dA = -(y w1' + w2 x' + s_eq w5' - w6_eq c')     dL/db = w2
    dL/dC = -(z w1' + w3_J x' + s_in w5' - w6_in c')   dL/du_i = w3_i (row on its upper bound),
                                                       dL/dl_i = w3_i (row on its lower bound).

How the systems are solved: a SOLVED problem whose forward factorization is at hand (the active-set
engine's :class:`alqp.active_set.LeastDistanceFactor`) gets :func:`kkt_solve_factored`, one
|J| x |J| factorization on top of the forward's; otherwise :func:`kkt_solve_direct`; a system
that neither solves (singular: LPs, degenerate or dependent active rows) and every closest-feasible
one get :func:`lstsq_min_norm`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from alqp.linalg import (as_dtype, cholesky_solve_rows, inf_norm, inf_norm_host, magnitudes, solve_triangular_rows, vm,
                         vm_host)
from alqp.activity import activity_tol, row_tolerance, shifted_rows
from alqp.failure import mark_nan, screen_incoming
from alqp.problem import QPProblem
from alqp.settings import Settings, Status, has_solution

#: The backward's linear algebra always runs in float64: it is a few dense solves whose conditioning
#: is that of the KKT matrix squared (normal equations), too much for float32's 7 digits.
WORK_DTYPE = torch.float64


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

    A row is active when the shifted value C_i x - s_in,i lies within ``bound_tol * (1 + |C_i||x| + |bound|)``
    of a finite bound (``bound_tol`` defaults to ``tol``), or when |z_i| exceeds ``tol`` times the problem's dual scale (the largest of
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
    ptol = row_tolerance(C, l, u, x, tol if bound_tol is None else bound_tol, abs_M=absC, finite=(fin_l, fin_u))
    feasible = status == int(Status.SOLVED)
    shifted = status == int(Status.CLOSEST_FEASIBLE)
    any_shifted = bool(shifted.any())
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

    def factor(norm: Tensor) -> Tensor:
        return torch.where(norm > 0, norm, torch.ones_like(norm)).rsqrt()

    for sweep in range(iterations):
        e_r, e_c = factor(S.amax(-1)), factor(S.amax(-2))
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


def kkt_solve_factored(factor, H: Tensor, A: Tensor, C: Tensor, active: Tensor, r1: Tensor, r2: Tensor,
                       r3: Tensor, min_pivot: float = 1e-10, max_refine: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
    B, n = r1.shape
    p, m = A.shape[-2], C.shape[-2]
    L, Mt, S_f, R = factor.L, factor.Mt, factor.S_factor, factor.R
    a = active
    Ra = R * a.unsqueeze(-1)
    T = torch.bmm(Ra, Ra.mT)
    T.diagonal(dim1=-2, dim2=-1).add_(1.0 - a)  # w3 = 0 on the inactive rows
    T_f, info = torch.linalg.cholesky_ex(T)
    # (The factor lives on the CPU: the tests on small vectors run on numpy views, where torch's
    # per-call cost would dominate at batch 1.)
    ok = info.numpy() == 0
    if m:
        pivot = T_f.diagonal(dim1=-2, dim2=-1).numpy()
        row2 = np.where(a.numpy() > 0, factor.M_C_norm2.numpy(), 1.0)
        ok &= (pivot * pivot >= min_pivot * row2).all(-1)
    ok_all = bool(ok.all())
    if not ok_all:
        T_f = torch.where(torch.from_numpy(ok)[:, None, None], T_f, torch.eye(m, dtype=T.dtype))
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

    def norm(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # (B,) max(|u|_inf, |v|_inf)
        return np.maximum(inf_norm_host(u), inf_norm_host(v))

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
    # Symmetric scaling diag(d) M diag(d) of M = [[H, G'], [G, 0]], computed on single-precision
    # magnitude copies scaled in place (see alqp.problem.ruiz_equilibrate).
    absH, absG = magnitudes(H), magnitudes(G)
    d1, d2 = absH.new_ones(B, n), absH.new_ones(B, k)

    def safe_rsqrt(norm: Tensor) -> Tensor:
        return torch.where(norm > 0, norm, torch.ones_like(norm)).rsqrt()

    for _ in range(equilibrate_iter if n else 0):
        row1 = torch.maximum(absH.amax(-1), absG.amax(-2)) if k else absH.amax(-1)
        e1 = safe_rsqrt(row1)
        e2 = safe_rsqrt(absG.amax(-1)) if k else d2
        d1.mul_(e1)
        absH.mul_(e1.unsqueeze(-1)).mul_(e1.unsqueeze(-2))
        if k:
            d2.mul_(e2)
            absG.mul_(e2.unsqueeze(-1)).mul_(e1.unsqueeze(-2))
    d1, d2 = d1.to(H.dtype), d2.to(H.dtype)
    Gs = (G * d2.unsqueeze(-1)).mul_(d1.unsqueeze(-2))
    GsT = Gs.transpose(-1, -2)  # a view: a transposed copy costs more than all its products
    r1s, r2s = d1 * r1, d2 * r2
    scale = torch.maximum(absH.flatten(1).amax(-1), absG.flatten(1).amax(-1) if k * n else absH.new_zeros(B)).to(H.dtype) \
        if n else H.new_zeros(B)
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


def _adjoint_system(P: QPProblem, x, y, z, s_eq, s_in, act: ActiveSet, gx, gy, gz, gse, gsi,
                    full: bool) -> tuple[Tensor, Tensor]:
    """Assemble the adjoint system J_v' w = dL/dv of the module docstring, padded to fixed sizes.

    Rows: (dx n, dy p, dz m, ds_eq p, ds_in m); columns: (w1 n, w2 p, w3 m, w5 n, w6 1). Inactive
    rows of dz, non-violated rows of ds_in and their columns are zero, as are the ds_eq rows and the
    w5, w6 columns of feasible problems: zero rows and columns do not change the minimum-norm
    least-squares solution. With ``full=False`` (a batch of feasible problems only) just the
    symmetric KKT block (first three row and column blocks) is built.

    Returns:
        M (B,R,K), rhs (B,R), and N (B,p+m,d) and c (B,n) of :func:`_shift_geometry` (None for
        ``full=False``).
    """
    H, A, C = P.H, P.A, P.C
    B, n, p, m = P.batch_size, P.n, P.p, P.m
    a, v = act.active, act.violated
    At = A.transpose(-1, -2)
    Ca = a.unsqueeze(-1) * C  # D_a C
    Z = lambda r, c: H.new_zeros(B, r, c)  # noqa: E731
    if not full:
        M = torch.cat([
            torch.cat([H, At, Ca.transpose(-1, -2)], -1),
            torch.cat([A, Z(p, p), Z(p, m)], -1),
            torch.cat([Ca, Z(m, p), Z(m, m)], -1),
        ], -2)
        rhs = torch.cat([gx, gy, a * gz], -1)
        return M, rhs, None, None

    phi = act.shifted.to(H.dtype).unsqueeze(-1)  # 1 for closest-feasible problems
    V = torch.cat([act.violated_eq, v], -1)  # the shifted rows, (B,k)
    G = torch.cat([A, C], -2)
    s_V = V * torch.cat([s_eq, s_in], -1)
    w_V = V * torch.cat([y, z], -1)
    # R6: w_V = G_V c + t s_V. t > 0 only where the forward had to move along s to give a shifted
    # row its sign (activity.closest_feasible_multipliers); that row's z is then 0 (R7).
    s2 = (s_V * s_V).sum(-1)
    t = (w_V * s_V).sum(-1) / torch.where(s2 > 0, s2, torch.ones_like(s2))
    pinned = act.shifted & (t.abs() * s2 > 1e-6 * (w_V * s_V).abs().sum(-1)) & (s2 > 0)
    t = torch.where(pinned, t, torch.zeros_like(t))
    candidates = torch.where(v > 0, z.abs(), torch.full_like(z, float("inf")))
    pin_row = (torch.nn.functional.one_hot(candidates.argmin(-1), m).to(H.dtype) if m else z.new_zeros(B, 0))
    pin_row = pin_row * pinned.to(H.dtype).unsqueeze(-1)
    pin_col = pinned.to(H.dtype)[:, None, None]
    eye_p = torch.eye(p, dtype=H.dtype, device=H.device).expand(B, p, p)
    # R6's adjoint lies in null(G_V') (the dc rows of the module docstring): write it w6 = N omega
    # with N a basis of that null space (usually of small dimension d), which drops the n dc rows
    # and replaces the p + m w6 columns by d.
    N, c = _shift_geometry(G, V, w_V)
    d = N.shape[-1]
    M = torch.cat([
        # columns: w1 (R1), w2 (R2), w3 (R3), w5 (R5), omega (R6), w7 (R7)
        torch.cat([H, At, Ca.transpose(-1, -2), Z(n, n), Z(n, d), Z(n, 1)], -1),  # dx
        torch.cat([A, Z(p, p), Z(p, m), Z(p, n), N[:, :p], Z(p, 1)], -1),  # dy
        torch.cat([Ca, Z(m, p), Z(m, m), Z(m, n), N[:, p:], pin_row.unsqueeze(-1)], -1),  # dz
        torch.cat([Z(p, n), -phi.unsqueeze(-1) * eye_p, Z(p, m), phi.unsqueeze(-1) * A, -t[:, None, None] * N[:, :p], Z(p, 1)], -1),  # ds_eq
        torch.cat([Z(m, n), Z(m, p), -torch.diag_embed(v), v.unsqueeze(-1) * C, -t[:, None, None] * N[:, p:], Z(m, 1)], -1),  # ds_in
        torch.cat([Z(1, n), Z(1, p), Z(1, m), Z(1, n), -pin_col * vm(s_V, N).unsqueeze(-2), Z(1, 1)], -1),  # dt
    ], -2)
    rhs = torch.cat([gx, gy, a * gz, phi * gse, v * gsi, H.new_zeros(B, 1)], -1)
    return M, rhs, N, c


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


def implicit_backward(problem: QPProblem, solution, grad_x: Optional[Tensor] = None, grad_y: Optional[Tensor] = None,
                      grad_z: Optional[Tensor] = None, grad_s_eq: Optional[Tensor] = None,
                      grad_s_in: Optional[Tensor] = None, settings: Optional[Settings] = None,
                      active_tol: Optional[float] = None, factor=None) -> dict:
    """Gradients of a loss with respect to the QP data, by implicit differentiation.

    See the module docstring for the equations. Problems whose status carries no solution
    (:func:`alqp.settings.has_solution`) have no derivative: they get the gradient that
    ``settings.failed_gradient`` says (:mod:`alqp.failure`; zero by default). A problem whose
    incoming gradient holds NaN or Inf gets NaN gradients.

    Args:
        problem: the canonical batch (:func:`alqp.problem.canonicalize`), shapes H (B,n,n), g (B,n),
            A (B,p,n), b (B,p), C (B,m,n), l, u (B,m).
        solution: the :class:`alqp.solver.QPSolution` of ``problem`` (batched).
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
    out_dtype = problem.H.dtype
    tol = active_tol if active_tol is not None else activity_tol(out_dtype, settings)
    P = problem if out_dtype == WORK_DTYPE else QPProblem(
        **{k: as_dtype(t, WORK_DTYPE) for k, t in problem.tensors().items()},
        batched=problem.batched, unbatched=problem.unbatched)
    B, n, p, m = P.batch_size, P.n, P.p, P.m
    x, y, z, s_eq, s_in = (as_dtype(t, WORK_DTYPE) for t in (solution.x, solution.y, solution.z,
                                                     solution.s_eq, solution.s_in))
    status = solution.status

    def grad_or_zero(gr, k):
        if gr is None:
            return P.H.new_zeros(B, k)
        gr = as_dtype(gr, WORK_DTYPE)
        return gr if gr.shape == (B, k) else gr.expand(B, k)

    gx, gy, gz = grad_or_zero(grad_x, n), grad_or_zero(grad_y, p), grad_or_zero(grad_z, m)
    gse, gsi = grad_or_zero(grad_s_eq, p), grad_or_zero(grad_s_in, m)
    (gx, gy, gz, gse, gsi), nan_rows = screen_incoming(status, (gx, gy, gz, gse, gsi), settings)

    if factor is not None and factor.L.device != P.H.device:
        factor = None  # (the active-set engine on CUDA data factors on the CPU: not worth a copy)
    # A row without a multiplier is on its bound only within round-off of the answer, not within the
    # requested tolerance: an answer more accurate than eps_abs (the active-set engine's are exact)
    # keeps a small but real slack, and counting that row as active returns the derivative of the
    # neighbouring piece (OptNet's Sudoku QP at eps_abs 1e-6: x_i = 8.75e-7, the puzzle's gradient at
    # cosine 0.06 with the true one; docs/results/sudoku-jumps.md). A row truly at its bound with a
    # multiplier is still found by its multiplier, at ``tol``.
    bound_tol = min(tol, 100 * torch.finfo(out_dtype).eps) if active_tol is None else tol
    act = classify_rows(P, x, y, z, s_eq, s_in, status, tol, bound_tol)
    # (The statuses summed up once: each test is a device sync, and they add up at batch 1.)
    all_feasible = bool(act.feasible.all())
    any_shifted = not all_feasible and bool(act.shifted.any())
    ok = has_solution(status)
    all_ok = all_feasible or bool(ok.all())
    # Keep non-finite values of problems that get no gradient out of the arithmetic.
    fin = lambda t: torch.where(ok.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))  # noqa: E731
    if not all_ok:
        x, y, z, s_eq, s_in = map(fin, (x, y, z, s_eq, s_in))
        gx, gy, gz, gse, gsi = map(fin, (gx, gy, gz, gse, gsi))

    # Feasible problems need only the symmetric KKT block; closest-feasible ones the full system.
    # A group is the whole batch (index None) or the problems at its index.
    if all_feasible:
        groups = [(None, False)]  # (the common case: the feasible group fills w1, w2, w3 as views)
    else:
        w1, w2, w3 = P.H.new_zeros(B, n), P.H.new_zeros(B, p), P.H.new_zeros(B, m)
        groups = [(group.nonzero().squeeze(-1), full) for group, full in ((act.feasible, False), (act.shifted, True))
                  if not full or any_shifted]
    if any_shifted:
        w5, w6, c = P.H.new_zeros(B, n), P.H.new_zeros(B, p + m), P.H.new_zeros(B, n)
    for idx, full in groups:
        if idx is not None and idx.numel() == 0:
            continue
        whole = idx is None or idx.numel() == B
        sub = (lambda t: t) if whole else (lambda t: t[idx])  # noqa: E731
        act_g = act if whole else ActiveSet(*(sub(t) for t in act))
        P_g = P if whole else P.select(idx)
        system = lambda: _adjoint_system(P_g, sub(x), sub(y), sub(z), sub(s_eq), sub(s_in), act_g,  # noqa: E731
                                         sub(gx), sub(gy), sub(gz), sub(gse), sub(gsi), full)
        if full:
            M, rhs, N, c_g = system()
            w = lstsq_svd(M, rhs)
        else:
            # Most feasible problems have a nonsingular KKT matrix: solve those directly (with the
            # forward's factorization where it has one, else by a regularized factorization), the
            # singular rest (LPs, degenerate or dependent active rows) in the least-squares sense.
            a = act_g.active
            count = B if whole else idx.numel()
            # The problems the forward's factorization covers (a factor is on the CPU, as the data).
            usable = np.zeros(count, dtype=bool)
            if factor is not None:
                usable = factor.usable.expand(B).numpy()
                usable = usable if whole else usable[idx.numpy()]
            every = bool(usable.all())  # (the common case: no index juggling)
            if not every:
                pick = torch.from_numpy(np.flatnonzero(usable))
                w = P_g.H.new_zeros(count, n + p + m)
                solved = torch.zeros(count, dtype=torch.bool, device=w.device)
            if every or pick.numel():
                take = (lambda t: sub(t)) if every else (lambda t: sub(t)[pick])  # noqa: E731
                f_g = factor if every and whole else type(factor)(*(t if t.shape[0] == 1 else take(t) for t in factor))
                w_f = kkt_solve_factored(f_g, take(P.H), take(P.A), take(P.C), take(act.active), take(gx),
                                         take(gy), take(gz))
                if every:
                    w, solved = torch.cat(w_f[:3], -1), w_f[3]
                else:
                    w[pick], solved[pick] = torch.cat(w_f[:3], -1), w_f[3]
            rest = (~solved).nonzero().squeeze(-1) if not bool(solved.all()) else None
            if rest is not None and rest.numel():
                G_r = torch.cat([P_g.A[rest], a[rest].unsqueeze(-1) * P_g.C[rest]], -2)
                w1_r, w23_r, solved_r = kkt_solve_direct(P_g.H[rest], G_r, sub(gx)[rest],
                                                         torch.cat([sub(gy)[rest], a[rest] * sub(gz)[rest]], -1))
                w[rest] = torch.cat([w1_r, w23_r], -1)
                solved[rest] = solved_r
                rest = (~solved).nonzero().squeeze(-1)
            if rest is not None and rest.numel():
                M, rhs, _, _ = system()
                w[rest] = lstsq_min_norm(M[rest], rhs[rest])
        if whole:  # (views, no scatter: the common case of one group)
            w1, w2, w3 = w[:, :n], w[:, n:n + p], w[:, n + p:n + p + m] * act_g.active
        else:
            w1[idx] = w[:, :n]
            w2[idx] = w[:, n:n + p]
            w3[idx] = w[:, n + p:n + p + m] * act_g.active
        if full:
            w5[idx] = w[:, n + p + m:n + p + m + n]
            V = torch.cat([act_g.violated_eq, act_g.violated], -1)
            w6[idx] = V * vm(w[:, 2 * n + p + m:2 * n + p + m + N.shape[-1]], N.transpose(-1, -2))
            c[idx] = c_g

    # dL/dH, dL/dA and dL/dC are sums of outer products with the same right factors x and w1 (and
    # w5, c for closest-feasible problems): one (B, r, J) @ (B, J, n) product per gradient, one pass
    # over its output. At batch 1 a single product makes all three (its slices are then contiguous,
    # so autograd takes them as they are; at larger B it would copy them).
    right = [x, w1]
    A_left, C_left = [w2, y], [w3, z]
    if any_shifted:  # the closest-feasible terms (zero for SOLVED problems)
        s_eq_used = torch.where(act.shifted.unsqueeze(-1), s_eq, torch.zeros_like(s_eq))
        right = right + [w5, c]
        A_left = A_left + [s_eq_used, -w6[:, :p]]
        C_left = C_left + [act.violated * s_in, -w6[:, p:]]
    right, H_left = torch.stack(right, -2), torch.stack([w1, x], -1)
    A_left, C_left = torch.stack(A_left, -1), torch.stack(C_left, -1)
    if B == 1:
        H_left = torch.nn.functional.pad(H_left, (0, right.shape[-2] - 2))  # (zero weight on w5, c)
        outer = torch.bmm(torch.cat([H_left, A_left, C_left], -2), right).neg_()  # (1, n+p+m, n)
        dH, dA, dC = outer[:, :n], outer[:, n:n + p], outer[:, n + p:]
    else:
        dH = torch.bmm(H_left, right[:, :2]).neg_()
        dA, dC = torch.bmm(A_left, right).neg_(), torch.bmm(C_left, right).neg_()
    grads = {
        "H": dH.mul_(0.5),
        "g": -w1,
        "A": dA,
        "b": w2,
        "C": dC,
        "l": act.lower * w3,  # (0 at infinite bounds: classify_rows gives them no weight)
        "u": act.upper * w3,
    }
    if not all_ok:
        grads = {k: fin(v) for k, v in grads.items()}
    return mark_nan({k: as_dtype(v, out_dtype) for k, v in grads.items()}, nan_rows)
