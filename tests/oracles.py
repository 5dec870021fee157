"""Reference solvers for one QP at a time: CVXPY + Clarabel (including the two-stage closest-feasible
oracle) and ProxSuite's dense ProxQP.

All oracles take numpy arrays (``A, b`` and/or ``C, l, u`` may be ``None``; entries of l, u may be
-inf/+inf) and return an :class:`OracleResult` in alqp's (ProxSuite's) sign convention:

    H x + g + A'y + C'z = 0,   z_i > 0 only where C_i x = u_i,   z_i < 0 only where C_i x = l_i,

with the shifts ``s_eq = A x - b`` and ``s_in = C x - clip(C x, l, u)`` of the closest feasible
problem (zero for a feasible one).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np

import cvxpy as cp

# Clarabel tolerances: tight enough that the oracle is good to ~1e-8 on the small test problems.
CLARABEL_OPTS = dict(
    tol_gap_abs=1e-11,
    tol_gap_rel=1e-11,
    tol_feas=1e-11,
    tol_ktratio=1e-9,
    max_iter=400,
)
# ProxSuite's representation of an infinite bound.
PROXSUITE_INF = 1e20


class OracleResult(NamedTuple):
    x: np.ndarray
    y: np.ndarray  # (p,)
    z: np.ndarray  # (m,)
    s_eq: np.ndarray  # (p,)
    s_in: np.ndarray  # (m,)
    obj: float


def _as_np(v):
    if v is None:
        return None
    if hasattr(v, "detach"):
        v = v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def normalize(H, g, A=None, b=None, C=None, l=None, u=None):
    """numpy float64 arrays with empty (0-row) A, b, C, l, u where absent, and infinite bounds
    filled in where one of l, u is missing."""
    H, g = _as_np(H), _as_np(g)
    n = g.shape[0]
    A, b, C, l, u = map(_as_np, (A, b, C, l, u))
    if A is None:
        A, b = np.zeros((0, n)), np.zeros(0)
    if C is None:
        C, l, u = np.zeros((0, n)), np.zeros(0), np.zeros(0)
    else:
        m = C.shape[0]
        l = np.full(m, -np.inf) if l is None else l
        u = np.full(m, np.inf) if u is None else u
    return H, g, A, b, C, l, u


def objective(H, g, x) -> float:
    return float(0.5 * x @ H @ x + g @ x)


def shifts(A, b, C, l, u, x):
    """(s_eq, s_in) = (A x - b, C x - clip(C x, l, u))."""
    Cx = C @ x
    return A @ x - b, Cx - np.clip(Cx, l, u)


def _check_status(prob, what):
    if prob.status != cp.OPTIMAL:
        raise RuntimeError(f"oracle ({what}): CVXPY/Clarabel returned status {prob.status!r}")


def _quad_objective(H, g, x):
    terms = g @ x
    if np.any(H != 0):
        terms = terms + 0.5 * cp.quad_form(x, cp.psd_wrap(H))
    return terms


def cvxpy_qp(H, g, A=None, b=None, C=None, l=None, u=None) -> OracleResult:
    """Solve a feasible QP with CVXPY + Clarabel; multipliers mapped to alqp's convention.

    CVXPY's Lagrangian for ``expr <= rhs`` (resp. ``expr >= rhs``) adds ``lam'(expr - rhs)``
    (resp. ``lam'(rhs - expr)``) with ``lam >= 0``, and for ``expr == rhs`` it adds
    ``nu'(expr - rhs)``. Hence alqp's ``y = nu`` and ``z = lam_upper - lam_lower``
    (``test_oracle_kkt_and_signs`` checks this mapping on every family).
    """
    H, g, A, b, C, l, u = normalize(H, g, A, b, C, l, u)
    n, p, m = g.shape[0], A.shape[0], C.shape[0]
    x = cp.Variable(n)
    cons, eq, up, lo = [], None, None, None
    if p:
        eq = A @ x == b
        cons.append(eq)
    iu, il = np.isfinite(u), np.isfinite(l)
    if iu.any():
        up = C[iu] @ x <= u[iu]
        cons.append(up)
    if il.any():
        lo = C[il] @ x >= l[il]
        cons.append(lo)
    prob = cp.Problem(cp.Minimize(_quad_objective(H, g, x)), cons)
    prob.solve(solver=cp.CLARABEL, **CLARABEL_OPTS)
    _check_status(prob, "qp")
    xv = np.asarray(x.value, dtype=np.float64)
    y = np.asarray(eq.dual_value, dtype=np.float64).reshape(p) if p else np.zeros(0)
    z = np.zeros(m)
    if up is not None:
        z[iu] += np.asarray(up.dual_value).reshape(-1)
    if lo is not None:
        z[il] -= np.asarray(lo.dual_value).reshape(-1)
    return OracleResult(xv, y, z, np.zeros(p), np.zeros(m), objective(H, g, xv))


def closest_feasible_shift(A, b, C, l, u):
    """Stage 1: the unique least-squares shift (s_eq, s_in) making the constraints feasible,

        minimize ||s_eq||^2 + ||s_in||^2  over x, s  s.t.  A x = b + s_eq,  l <= C x - s_in <= u.
    """
    n = A.shape[1] if A.shape[0] else C.shape[1]
    p, m = A.shape[0], C.shape[0]
    x = cp.Variable(n)
    se = cp.Variable(p) if p else None
    si = cp.Variable(m) if m else None
    cons, obj = [], 0
    if p:
        cons.append(A @ x - se == b)
        obj = obj + cp.sum_squares(se)
    if m:
        iu, il = np.isfinite(u), np.isfinite(l)
        if iu.any():
            cons.append(C[iu] @ x - si[iu] <= u[iu])
        if il.any():
            cons.append(C[il] @ x - si[il] >= l[il])
        obj = obj + cp.sum_squares(si)
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver=cp.CLARABEL, **CLARABEL_OPTS)
    _check_status(prob, "closest-feasible stage 1")
    s_eq = np.asarray(se.value, dtype=np.float64).reshape(p) if p else np.zeros(0)
    s_in = np.asarray(si.value, dtype=np.float64).reshape(m) if m else np.zeros(0)
    return s_eq, s_in


def shifted_multipliers(H, g, A, C, l, u, x, bound_tol=1e-8):
    """Multipliers (y, z) of the QP on the shifted set at its solution x, with alqp's signs.

    The shifted bounds active at x are those where clip(C x, l, u) sits on l or u. Among the (y, z)
    with z_i >= 0 only on rows at their upper bound, z_i <= 0 only on rows at their lower bound and
    z_i = 0 elsewhere, this returns one minimizing ||H x + g + A'y + C'z||_inf; the residual is ~0
    when such multipliers exist.
    """
    p, m = A.shape[0], C.shape[0]
    cx = np.clip(C @ x, l, u)
    at_u = np.isfinite(u) & (np.abs(cx - u) <= bound_tol * np.maximum(1.0, np.abs(u)))
    at_l = np.isfinite(l) & (np.abs(cx - l) <= bound_tol * np.maximum(1.0, np.abs(l)))
    y = cp.Variable(p) if p else None
    z = cp.Variable(m) if m else None
    resid = H @ x + g
    cons = []
    if p:
        resid = resid + A.T @ y
    if m:
        resid = resid + C.T @ z
        off = ~(at_u | at_l)
        if off.any():
            cons.append(z[off] == 0)
        if (at_u & ~at_l).any():
            cons.append(z[at_u & ~at_l] >= 0)
        if (at_l & ~at_u).any():
            cons.append(z[at_l & ~at_u] <= 0)
    if not p and not m:
        return np.zeros(0), np.zeros(0)
    # Minimize the infinity norm of the stationarity residual; its optimum is ~0 when sign-consistent
    # multipliers exist, which makes relative gaps meaningless, so Clarabel's default tolerances are
    # used, 'optimal_inaccurate' is accepted, and the callers check the residual of the result
    # (test_two_stage_oracle_consistency asks for <= 1e-7).
    prob = cp.Problem(cp.Minimize(cp.norm(resid, "inf")), cons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver=cp.CLARABEL)
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"oracle (shifted multipliers): status {prob.status!r}")
    yv = np.asarray(y.value, dtype=np.float64).reshape(p) if p else np.zeros(0)
    zv = np.asarray(z.value, dtype=np.float64).reshape(m) if m else np.zeros(0)
    return yv, zv


def cvxpy_closest_feasible(H, g, A=None, b=None, C=None, l=None, u=None, feas_tol=1e-8) -> OracleResult:
    """Two-stage closest-feasible oracle.

    Stage 1 (:func:`closest_feasible_shift`) finds the least-squares shift s*. If it is below
    ``feas_tol`` the problem is feasible and the plain QP oracle answers (with s = 0).

    Otherwise stage 2 solves the QP on the shifted set with s* fixed. That set is
    {x : A x = b + s_eq*,  C_i x = u_i + s_in*_i where s_in*_i > 0,  C_i x = l_i + s_in*_i where
    s_in*_i < 0,  l_i <= C_i x <= u_i where s_in*_i = 0} (a row is shifted only when the shifted
    point sits on its bound), so stage 2 is a QP with the equality block E x = f and the unshifted
    inequality rows. E x = f is consistent in exact arithmetic but typically rank-deficient (duplicated
    rows, p > n, contradictory pairs) and consistent only to the ~1e-10 accuracy of s*; handing it to
    Clarabel as is (or relaxed into 1e-9 slabs) makes Clarabel stall at 'optimal_inaccurate'. So
    instead of relaxing, we eliminate it: x = x_p + N w with x_p = lstsq(E, f) and N an orthonormal
    basis of null(E) (numerical rank with relative tolerance 1e-9), and solve the reduced, strictly
    convex QP in w with Clarabel. This is exact up to the accuracy of s* (the least-squares x_p
    resolves the ~1e-10 inconsistency of f in the least-squares sense).

    Returns the stage-2 x, the stage-1 shift s*, and multipliers of the stage-2 problem from
    :func:`shifted_multipliers` (not unique in general).
    """
    H, g, A, b, C, l, u = normalize(H, g, A, b, C, l, u)
    s_eq, s_in = closest_feasible_shift(A, b, C, l, u)
    if max(np.abs(s_eq).max(initial=0.0), np.abs(s_in).max(initial=0.0)) <= feas_tol:
        return cvxpy_qp(H, g, A, b, C, l, u)
    row_tol = 1e-7
    pos, neg = s_in > row_tol, s_in < -row_tol
    free = ~(pos | neg)
    E = np.vstack([A, C[pos], C[neg]])
    f = np.concatenate([b + s_eq, u[pos] + s_in[pos], l[neg] + s_in[neg]])
    x_p = np.linalg.lstsq(E, f, rcond=None)[0]
    _, sv, Vt = np.linalg.svd(E, full_matrices=True)
    rank = int((sv > 1e-9 * max(sv.max(initial=0.0), 1.0)).sum())
    N = Vt[rank:].T  # (n, n - rank)
    if N.shape[1] == 0:
        x = x_p
    else:
        Hw = N.T @ H @ N
        Hw = 0.5 * (Hw + Hw.T)
        gw = N.T @ (H @ x_p + g)
        if free.any():
            Cf = C[free]
            red = cvxpy_qp(Hw, gw, C=Cf @ N, l=l[free] - Cf @ x_p, u=u[free] - Cf @ x_p)
        else:
            red = cvxpy_qp(Hw, gw)
        x = x_p + N @ red.x
    y, z = shifted_multipliers(H, g, A, C, l, u, x)
    return OracleResult(x, y, z, s_eq, s_in, objective(H, g, x))


def proxsuite_qp(H, g, A=None, b=None, C=None, l=None, u=None, eps_abs=1e-10) -> OracleResult:
    """Solve a feasible QP with ``proxsuite.proxqp.dense`` (same sign convention as alqp).

    Infinite bounds are passed as +-PROXSUITE_INF. Raises if ProxQP does not report PROXQP_SOLVED.
    """
    import proxsuite

    H, g, A, b, C, l, u = normalize(H, g, A, b, C, l, u)
    n, p, m = g.shape[0], A.shape[0], C.shape[0]
    qp = proxsuite.proxqp.dense.QP(n, p, m)
    qp.settings.eps_abs = eps_abs
    qp.settings.eps_rel = 0.0
    qp.settings.max_iter = 100000
    qp.settings.verbose = False
    # The oracle is only used on feasible, bounded problems. ProxQP's default infeasibility
    # tolerances (1e-4) give false PRIMAL_INFEASIBLE verdicts on some of the random LPs, so the
    # certificates are made strict enough never to fire here.
    qp.settings.eps_primal_inf = 1e-12
    qp.settings.eps_dual_inf = 1e-12
    lc = np.clip(l, -PROXSUITE_INF, PROXSUITE_INF)
    uc = np.clip(u, -PROXSUITE_INF, PROXSUITE_INF)
    qp.init(
        np.ascontiguousarray(H),
        np.ascontiguousarray(g),
        np.ascontiguousarray(A) if p else None,
        np.ascontiguousarray(b) if p else None,
        np.ascontiguousarray(C) if m else None,
        np.ascontiguousarray(lc) if m else None,
        np.ascontiguousarray(uc) if m else None,
    )
    qp.solve()
    status = qp.results.info.status.name
    if status != "PROXQP_SOLVED":
        raise RuntimeError(f"oracle (proxsuite): status {status}")
    x = np.array(qp.results.x, dtype=np.float64)
    y = np.array(qp.results.y, dtype=np.float64).reshape(p)
    z = np.array(qp.results.z, dtype=np.float64).reshape(m)
    return OracleResult(x, y, z, np.zeros(p), np.zeros(m), objective(H, g, x))


def solve_each(prob: dict, oracle, batch: Optional[int] = None) -> list:
    """Run ``oracle`` on every member of a batched problem dict (see tests/families.py)."""
    from families import batch_size, member

    B = batch_size(prob) if batch is None else batch
    return [oracle(**member(prob, i)) for i in range(B)]
