"""LPGD backward: Lagrangian Proximal Gradient Descent (Paulus, Martius, Musil, ICML 2024).

Instead of differentiating the optimality conditions, LPGD re-solves the QP with its linear terms
perturbed by the incoming gradient and reads the gradient of the data off a finite difference of
the Lagrangian's data-gradient between the perturbed and the forward solution (docs/design.md section 5).

When to choose it over the implicit backward (``backward="ift"``)
-----------------------------------------------------------------
- LPs, and QPs whose solution is piecewise constant in the cost: at a vertex of an LP the true
  derivative of x with respect to g is zero, so a loss on x teaches the cost nothing through
  ``"ift"`` (examples/lpgd_learning.py: the implicit gradient of a shortest-path LP is exactly 0
  and training stalls; LPGD learns). With a finite ``tau``, large enough that g + tau dL/dx
  reaches another vertex, LPGD returns an informative non-zero replacement that points toward
  costs whose solution has a lower loss. Use the "right" or "central" variant there: the "left"
  perturbation g - tau dL/dx favours the current vertex and returns zero on an LP.
- When a forward solve is cheap: LPGD costs one warm-started re-solve (of 2B problems for the
  central variant) and never forms a KKT system.
Choose ``"ift"`` for smooth QPs where the exact gradient is wanted (LPGD approximates it: exactly
for the central variant as tau -> 0 up to the solver's tolerance / tau, to O(tau) for the one-sided
ones), where the solver's tolerance is coarse (the finite difference needs tau |dL/dx| well above
it; in float32 that means tau of about 0.1 and more), and for closest-feasible (infeasible) QPs
whose A or C is learned, or whose multipliers carry the loss (see "Closest-feasible problems").

The perturbed problem
---------------------
The QP's Lagrangian (docs/design.md section 1, ProxSuite's signs) is

    L(x, y, z; theta) = 1/2 x'Hx + g'x + y'(A x - b) + z'C x - [z]+'u - [z]-'l.

Adding tau * <(dL/dx, dL/dy, dL/dz), (x, y, z)> to it gives again the Lagrangian of a QP, the one
with the linear data

    g_tau = g + tau dL/dx,    b_tau = b - tau dL/dy,    l_tau = l - tau dL/dz,  u_tau = u - tau dL/dz

(z'(C x) + tau dL/dz'z = [z]+'(C x) + [z]-'(C x) shifted: both bounds move by -tau dL/dz). Its
solution v_tau = (x_tau, y_tau, z_tau) comes from one batched call of the forward solver
(:func:`alqp.solver.solve_problem_factored`) on the same device and dtype with the forward's settings (so an
infeasible perturbed QP is solved to its closest feasible QP, like the forward), warm started from
the forward's (x*, y*, z*); closest-feasible problems from x* only (their reported multipliers have
the unbounded component along the shift removed, and restarting the ALM from them was measured ~7x
slower than from zero multipliers).

With ``proximal`` = rho_p > 0 the re-solved cost gets rho_p/2 |x - x*|^2 added, i.e. H + rho_p I
and g_tau - rho_p x*. x* still solves it at tau = 0, so the tau -> 0 limit becomes the implicit
gradient of the QP with H + rho_p I: a damped gradient (smaller steps where H is flat). On an LP it
makes the perturbed solution unique (ties broken toward x*) and continuous in tau: x_tau moves
toward the vertex that the loss prefers instead of jumping there. 0 (the default) is plain LPGD.

The gradient
------------
With q(v) = grad_theta L(v; theta), that is

    q_H = 1/2 x x',  q_g = x,  q_A = y x',  q_b = -y,  q_C = z x',  q_u = -[z]+,  q_l = -[z]-,

the three variants are

    right:    (q(v_tau) - q(v*)) / tau
    left:     (q(v*) - q(v_-tau)) / tau
    central:  (q(v_tau) - q(v_-tau)) / (2 tau)     (one batched call of 2B problems)

As tau -> 0 this tends to the implicit (IFT) gradient wherever that exists: v_tau - v* = tau dv +
O(tau^2) with dv the response of the KKT system to the perturbation, and since that system is
symmetric, q's linearization along dv is exactly the adjoint (OptNet/IFT) gradient. On a QP the
solution is piecewise affine in g, b, l, u, so for tau below the first active-set change x_tau,
y_tau, z_tau are exactly affine in tau: the only error of the one-sided variants is tau times the
quadratic terms of q (1/2 dx dx' in H, dy dx' in A, dz dx' in C); the central variant cancels them
and is exact up to the solver's tolerance divided by tau.

An LP's x is piecewise constant in g: for small tau x_tau = x* and the x-part of the gradient
(dL/dg, dL/dH) is the true derivative, zero. For tau beyond the distance to a neighbouring vertex it
is (x_tau - x*) / tau, the LPGD update of the paper (a gradient of the loss's envelope smoothed
at scale tau).

A loss on the shift s (closest-feasible problems)
-------------------------------------------------
LPGD has no Lagrangian term for s; we use that at a closest-feasible solution the shift is an
explicit function of x and the data: s_eq = A x - b and, on a violated row, s_in,i = C_i x - u_i
(violated above, s > 0) or C_i x - l_i (below, s < 0); s_in,i = 0 on the other rows. So
dL/ds contributes the explicit terms dL/dA += ds_eq x', dL/db -= ds_eq, dL/dC_i += ds_in,i x',
dL/du_i (or dL/dl_i) -= ds_in,i, and its effect through x is carried by the re-solve with
dL/dx += A'dL/ds_eq + C_V'dL/ds_in,V. For a SOLVED problem s is identically zero (derivative zero,
the implicit backward's convention), so a loss on s contributes nothing there.

Closest-feasible problems
-------------------------
For CLOSEST_FEASIBLE problems the re-solve perturbs the same data and the same formulas apply to
the solver's (finite) multipliers. Those are unique only up to adding a vector of null(G_V'),
G_V the shifted rows of [A; C] (they are dependent: A's_eq + C's_in = 0), and the solver picks one
by a rule of its own; so the re-solve's multipliers are first aligned to the forward's: lambda_tau
<- lambda* + (lambda_tau - lambda*) with its component in null(G_V') removed (x does not see that
subspace, so the exact adjoint has none there). On violated rows z is attributed to the bound the row
violates whatever its sign. Then, as tau -> 0 (checked in tests/test_lpgd.py):
- losses on x and s: dL/dH, dL/dg, dL/db, dL/dl, dL/du equal the implicit gradient; dL/dA and
  dL/dC differ from it by a rank-one term s w' (stacked over [A; C]): the dependence of the
  least-squares shift itself on A and C, which a finite difference of the re-solve cannot see (the
  ALM moves x by O(mu_min) along it).
- losses on y, z: dL/dH and dL/dg equal the implicit gradient; dL/d(b, l, u) differ by a multiple
  of s and dL/d[A; C] by a term s w', i.e. by the normalization of the multipliers along s.
So learning A or C of infeasible QPs, or a loss on their multipliers, is a case for "ift".

Problems with zero incoming gradient are not re-solved. Problems without a solution (status other
than SOLVED and CLOSEST_FEASIBLE, :func:`alqp.settings.has_solution`) get the gradient that
``Settings.failed_gradient`` says (:mod:`alqp.failure`: zero with a warning by default, NaN, or an
error); problems whose incoming gradient holds NaN or Inf get NaN. Problems whose perturbed
re-solve does not converge (e.g. an LP that tau makes unbounded) get the same policy's gradient
(zero or NaN with a RuntimeWarning each time, or an error). A RuntimeWarning also reports re-solves
that took no step although tau times the incoming gradient is well above the solver's tolerance
(the perturbation was lost in it).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from alqp.activity import activity_tol, shifted_rows
from alqp.certify import resolve_tolerance
from alqp.failure import mark_nan, screen_incoming
from alqp.linalg import WORK_DTYPE, project_out_row_range, rows_or_zeros, vm
from alqp.problem import QPProblem
from alqp.settings import (DEFAULT_PROXIMAL, DEFAULT_TAU, DEFAULT_VARIANT, LPGD, LPGD_VARIANTS, Settings,  # noqa: F401
                           Status, has_solution)
from alqp.solver import solve_problem_factored
from alqp.types import QPSolution

#: Variants of the finite difference (see the module docstring). The option type, its defaults
#: (DEFAULT_TAU, DEFAULT_VARIANT, DEFAULT_PROXIMAL, documented there) and its validation live in
#: :mod:`alqp.settings` as :class:`alqp.LPGD`, with the other public options.
VARIANTS = LPGD_VARIANTS



#: The former name of :class:`alqp.LPGD` (the validated options of this backward).
LPGDOptions = LPGD


def _outer(a: Tensor, b: Tensor) -> Tensor:
    """(B,r), (B,k) -> (B,r,k)."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def lagrangian_data_gradient(x: Tensor, y: Tensor, z: Tensor, above: Optional[Tensor] = None,
                             below: Optional[Tensor] = None) -> dict:
    """q(v) = grad_theta L(x, y, z; theta) for theta = (H, g, A, b, C, l, u).

    Args:
        x (B,n), y (B,p), z (B,m).
        above, below: optional (B,m) 0/1 masks of rows known to sit on their upper / lower bound
            (the violated rows of a closest-feasible problem). There z is attributed to that bound
            whatever its sign: its multiplier may touch 0 (the solver's normalization), and the
            kink of [z]+ at 0 belongs to the normalization, not to the problem.

    Returns:
        dict "H" (B,n,n) 1/2 x x', "g" (B,n) x, "A" (B,p,n) y x', "b" (B,p) -y, "C" (B,m,n) z x',
        "l" (B,m) -[z]-, "u" (B,m) -[z]+.
    """
    z_up, z_lo = z.clamp(min=0.0), z.clamp(max=0.0)
    if above is not None:
        z_up = torch.where(above > 0, z, torch.where(below > 0, torch.zeros_like(z), z_up))
        z_lo = torch.where(below > 0, z, torch.where(above > 0, torch.zeros_like(z), z_lo))
    return {
        "H": 0.5 * _outer(x, x),
        "g": x,
        "A": _outer(y, x),
        "b": -y,
        "C": _outer(z, x),
        "l": -z_lo,
        "u": -z_up,
    }


def violated_rows(problem: QPProblem, solution: QPSolution,
                  settings: Optional[Settings] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows shifted above / below their bounds, and shifted equality rows (closest-feasible
    problems only), by the definition the forward and the implicit backward use
    (:func:`alqp.activity.shifted_rows` at :func:`alqp.activity.activity_tol`).

    Returns:
        (above, below) (B,m) and the shifted equality rows (B,p), float 0/1.
    """
    dtype = solution.x.dtype
    shifted = solution.status == int(Status.CLOSEST_FEASIBLE)
    eq, ineq = shifted_rows(problem.A, problem.b, problem.C, problem.l, problem.u, solution.x,
                            solution.s_eq, solution.s_in, shifted, activity_tol(dtype, settings))
    s = solution.s_in
    return (ineq & (s > 0)).to(dtype), (ineq & (s < 0)).to(dtype), eq.to(dtype)


def perturbed_problem(problem: QPProblem, x_star: Tensor, gx: Tensor, gy: Tensor, gz: Tensor,
                      step: float, proximal: float) -> QPProblem:
    """The QP whose Lagrangian is L + step <(gx, gy, gz), (x, y, z)>, plus the proximal term.

    Args:
        problem: canonical batch (B problems).  x_star (B,n): the forward solution (proximal centre).
        gx (B,n), gy (B,p), gz (B,m): incoming gradients (gx includes the shift's contribution).
        step: +tau or -tau.  proximal: rho_p >= 0.

    Returns:
        :class:`QPProblem` with g + step gx - rho_p x*, b - step gy, l - step gz, u - step gz,
        H + rho_p I (infinite bounds stay infinite).
    """
    H, g = problem.H, problem.g + step * gx
    if proximal > 0:
        eye = torch.eye(problem.n, dtype=H.dtype, device=H.device)
        H = H + proximal * eye
        g = g - proximal * x_star
    return replace(problem, H=H, g=g, b=problem.b - step * gy,
                   l=problem.l - step * gz, u=problem.u - step * gz)


def _align_multipliers(lam: Tensor, lam0: Tensor, G: Tensor, rows: Tensor) -> Tensor:
    """lam0 + (lam - lam0) with its component in null(G_V') removed (V: the shifted rows).

    The multipliers (y, z) of a closest-feasible QP are unique only up to that subspace (the
    forward picks one element by a rule of its own, :func:`alqp.activity.closest_feasible_multipliers`),
    so the re-solve's may differ from the forward's by a vector of it that is no response to the
    perturbation. The part of the solution map that is well defined, x, does not see that
    subspace, so its adjoint has no component there: dropping it from the difference gives it
    exactly. A no-op where no row is shifted.

    Args:
        lam, lam0: (B,p+m), the re-solve's and the forward's (y, z).
        G: (B,p+m,n) the rows [A; C].  rows: (B,p+m) bool, the forward's shifted rows.
    """
    d = lam - lam0
    return lam0 + d - project_out_row_range(G, rows, d)


def _cat_problems(a: QPProblem, b: QPProblem) -> QPProblem:
    """The batch of a's problems followed by b's."""
    tb = b.tensors()
    return replace(a, **{name: torch.cat([ta, tb[name]], 0) for name, ta in a.tensors().items()})


def _row_max(tensors, B: int) -> Tensor:
    """(B,) the largest |entry| of each problem over a list of (B,k) tensors (k may be 0)."""
    return torch.stack([t.abs().amax(-1) if t.shape[-1] else t.new_zeros(B) for t in tensors]).amax(0)


class _Incoming(NamedTuple):
    """The incoming gradients dL/d(output) of a batch, zero where not given.

    Attributes:
        x (B,n), y (B,p), z (B,m), s_eq (B,p), s_in (B,m).
    """

    x: Tensor
    y: Tensor
    z: Tensor
    s_eq: Tensor
    s_in: Tensor


class _ShiftedRows(NamedTuple):
    """The forward's shifted rows (closest-feasible problems only), float 0/1.

    Attributes:
        above, below: (B,m) inequality rows shifted above / below their bounds.
        eq: (B,p) shifted equality rows.
    """

    above: Tensor
    below: Tensor
    eq: Tensor


class _Resolved(NamedTuple):
    """The re-solve of the S selected problems, ``copies`` perturbations each (one per step of
    the variant: 1, or 2 for "central", stacked step-major).

    Attributes:
        solution: :class:`QPSolution` of the copies * S perturbed problems.
        copies: 1 or 2.
        ok: (S,) bool, whether every copy of the problem has a solution.
    """

    solution: QPSolution
    copies: int
    ok: Tensor


def _options(tau: Optional[float], variant: Optional[str], proximal: Optional[float]) -> LPGD:
    """The validated options, None taking the default."""
    return LPGD(tau=DEFAULT_TAU if tau is None else tau, variant=DEFAULT_VARIANT if variant is None else variant,
                proximal=DEFAULT_PROXIMAL if proximal is None else proximal)


def _steps(opts: LPGD) -> tuple:
    """The signed perturbation sizes of the variant: (tau,), (-tau,) or (tau, -tau)."""
    tau = float(opts.tau)
    return {"right": (tau,), "left": (-tau,), "central": (tau, -tau)}[opts.variant]


def _resolve(P: QPProblem, start: tuple, forward_solved: Tensor, g_sel: tuple, opts: LPGD,
             settings: Settings, factor) -> _Resolved:
    """Solve the perturbed problems of the S selected problems ``P`` in one batched call.

    Args:
        P: the selected problems.  start: the forward's (x (S,n), y (S,p), z (S,m)) of them.
        forward_solved: (S,) bool, whether the forward status is SOLVED (not closest-feasible).
        g_sel: incoming gradients (S,n) (with the shift's part), (S,p), (S,m).
        factor: the forward's factorization of the selected problems, or None.
    """
    x0, y0, z0 = start
    parts = [perturbed_problem(P, x0, *g_sel, s, float(opts.proximal)) for s in _steps(opts)]
    batch = parts[0] if len(parts) == 1 else _cat_problems(*parts)
    k = len(parts)
    # Warm start from the forward's solution. Closest-feasible problems restart from x* only:
    # their reported multipliers have the component along s removed (it grows without bound
    # in the ALM), and from those finite ones the ALM needs many more iterations (measured: ~7x
    # a cold start) than from zero.
    feas = forward_solved.unsqueeze(-1)
    y_ws, z_ws = torch.where(feas, y0, torch.zeros_like(y0)), torch.where(feas, z0, torch.zeros_like(z0))
    warm = (x0.repeat(k, 1), y_ws.repeat(k, 1), z_ws.repeat(k, 1))
    re = solve_problem_factored(batch, settings, warm, factor=factor)[0]
    return _Resolved(solution=re, copies=k, ok=has_solution(re.status).view(k, -1).all(0))


def _report_failed_resolves(resolved: _Resolved, idx: Tensor, policy: str) -> None:
    """Raise or warn, as ``Settings.failed_gradient`` says, about selected problems (batch
    indices ``idx`` (S,)) whose re-solve has no solution."""
    re_ok = resolved.ok
    if bool(re_ok.all()):
        return
    # Unlike a failed forward, "zero" warns every time here: the failure says something about
    # tau, not about the problem.
    bad = int((~re_ok).sum())
    failed_statuses = resolved.solution.status.view(resolved.copies, -1)[:, ~re_ok]
    codes = sorted({Status(int(c)).name for c in failed_statuses.flatten()})
    what = f"LPGD: the perturbed re-solve of {bad} problem(s) ended with status {codes}"
    hint = "a smaller tau, or another variant, may help"
    if policy == "raise":
        raise RuntimeError(f"{what} (indices {idx[~re_ok][:8].tolist()}); "
                           f"Settings.failed_gradient='raise'; {hint}")
    # stacklevel 3: the caller of lpgd_backward.
    warnings.warn(f"{what}; they get {'NaN' if policy == 'nan' else 'zero'} gradient ({hint})",
                  RuntimeWarning, stacklevel=3)


def _warn_if_perturbation_lost(resolved: _Resolved, g_sel: tuple, tau: float, settings: Settings,
                               dtype: torch.dtype) -> None:
    """Warn about re-solves that took no step although the perturbation tau |incoming| (g_sel:
    (S,n), (S,p), (S,m)) is well above the solver's tolerance."""
    # Such a re-solve accepted the forward's solution: the perturbation was within the solver's
    # tolerance, so the difference is zero, not a gradient. An incoming gradient at round-off
    # level (e.g. from a loss already at its minimum) is no reason to warn.
    eps_eff = resolve_tolerance(settings, dtype).activity
    size = _row_max(g_sel, g_sel[0].shape[0])
    re = resolved.solution
    still = (re.iterations.view(resolved.copies, -1) == 0).any(0) & resolved.ok & (tau * size > 10 * eps_eff)
    if bool(still.any()):
        # stacklevel 3: the caller of lpgd_backward.
        warnings.warn(f"LPGD: for {int(still.sum())} problem(s) the perturbation tau * dL/d(output) is "
                      "within the solver's tolerance (the re-solve accepted the forward's solution); "
                      "use a larger tau or a smaller Settings.eps_abs", RuntimeWarning, stacklevel=3)


def _finite_difference(P: QPProblem, start: tuple, resolved: _Resolved, rows: _ShiftedRows,
                       opts: LPGD) -> dict:
    """The variant's difference quotient of q = grad_theta L between the re-solve and the forward.

    Args:
        P: the S selected problems.  start: their forward (x, y, z).  resolved: their re-solve.
        rows: the forward's shifted rows of the selected problems.

    Returns:
        dict "H" (S,n,n), "g" (S,n), "A" (S,p,n), "b" (S,p), "C" (S,m,n), "l", "u" (S,m) in
        WORK_DTYPE (non-finite where a re-solve failed).
    """
    W, k, n, p, m = WORK_DTYPE, resolved.copies, P.n, P.p, P.m
    x0, y0, z0 = (t.to(W) for t in start)
    up0, lo0 = rows.above.to(W), rows.below.to(W)
    q_star = lagrangian_data_gradient(x0, y0, z0, up0, lo0)
    # The re-solve's multipliers are aligned to the forward's first (module docstring,
    # "Closest-feasible problems"); a no-op where no row is shifted.
    lam0 = torch.cat([y0, z0], -1)
    G0 = P.stacked_rows().to(W)
    rows0 = torch.cat([rows.eq, rows.above + rows.below], -1) > 0
    re = resolved.solution
    # The batch size is spelled out: with p + m = 0 (no constraints) a -1 would be ambiguous.
    S = x0.shape[0]
    xs = re.x.to(W).view(k, S, n)
    lam_re = torch.cat([re.y, re.z], -1).to(W).view(k, S, p + m)
    lams = [_align_multipliers(lam, lam0, G0, rows0) for lam in lam_re]
    q = [lagrangian_data_gradient(xs[i], lams[i][:, :p], lams[i][:, p:], up0, lo0) for i in range(k)]
    tau = float(opts.tau)
    if opts.variant == "right":
        return {name: (q[0][name] - q_star[name]) / tau for name in q_star}
    if opts.variant == "left":
        return {name: (q_star[name] - q[0][name]) / tau for name in q_star}
    return {name: (q[0][name] - q[1][name]) / (2 * tau) for name in q_star}


def _store(out: dict, idx: Tensor, diff: dict, re_ok: Tensor, policy: str) -> None:
    """out[name][idx] = diff[name], or the failure policy's value (NaN or 0) where re_ok (S,) is
    False."""
    for name, d in diff.items():
        # A failed re-solve's x may be non-finite: select, do not multiply.
        failed_value = torch.full_like(d, float("nan")) if policy == "nan" else torch.zeros_like(d)
        out[name][idx] = torch.where(re_ok.view(-1, *([1] * (d.dim() - 1))), d, failed_value)


def _add_shift_terms(out: dict, x: Tensor, ok: Tensor, incoming: _Incoming, rows: _ShiftedRows) -> None:
    """Add the explicit terms of the loss on the shift (s_eq = A x - b, s_in,V = C_V x - bound_V)
    at x (B,n), for the problems with a solution (ok (B,) bool); ``incoming.s_eq`` (B,p) and
    ``incoming.s_in`` (B,m) are already restricted to the shifted rows."""
    x_w = x.to(WORK_DTYPE)
    fin = lambda t: torch.where(ok.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))  # noqa: E731
    gse_w, gsi_w = fin(incoming.s_eq.to(WORK_DTYPE)), fin(incoming.s_in.to(WORK_DTYPE))
    out["A"] = out["A"] + _outer(gse_w, fin(x_w))
    out["b"] = out["b"] - gse_w
    out["C"] = out["C"] + _outer(gsi_w, fin(x_w))
    out["u"] = out["u"] - rows.above.to(WORK_DTYPE) * gsi_w
    out["l"] = out["l"] - rows.below.to(WORK_DTYPE) * gsi_w


def lpgd_backward(problem: QPProblem, solution: QPSolution, grad_x: Optional[Tensor] = None,
                  grad_y: Optional[Tensor] = None, grad_z: Optional[Tensor] = None,
                  grad_s_eq: Optional[Tensor] = None, grad_s_in: Optional[Tensor] = None,
                  settings: Optional[Settings] = None, tau: Optional[float] = None,
                  variant: Optional[str] = None, proximal: Optional[float] = None, factor=None) -> dict:
    """Gradients of a loss with respect to the QP data, by LPGD (see the module docstring).

    Args:
        problem: the canonical batch (:func:`alqp.problem.canonicalize`): H (B,n,n), g (B,n),
            A (B,p,n), b (B,p), C (B,m,n), l, u (B,m).
        solution: its batched :class:`QPSolution` from the forward.
        grad_x (B,n), grad_y (B,p), grad_z (B,m), grad_s_eq (B,p), grad_s_in (B,m): dL/d(output);
            None means zero.
        settings: the forward's :class:`Settings`, reused for the re-solve (defaults when None).
        tau, variant, proximal: see :class:`alqp.LPGD`; None takes the default.
        factor: the forward's :class:`alqp.active_set.LeastDistanceFactor` of ``problem``, or None.
            The re-solved QPs keep H, A and C (without the proximal term), so their least-distance
            form reuses it instead of factoring them again.

    Returns:
        dict with keys "H", "g", "A", "b", "C", "l", "u": gradients with the batched shapes above, in
        the problem's dtype and device; dL/dH is symmetric; dL/dl, dL/du are 0 at infinite bounds.
    """
    opts = _options(tau, variant, proximal)
    settings = settings or Settings()
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    given = (grad_x, grad_y, grad_z, grad_s_eq, grad_s_in)
    padded = (rows_or_zeros(t, B, k, problem.H) for t, k in zip(given, (n, p, m, p, m)))
    screened, nan_rows = screen_incoming(solution.status, tuple(padded), settings)
    incoming = _Incoming(*screened)
    ok = has_solution(solution.status)
    out = {name: torch.zeros_like(t, dtype=WORK_DTYPE) for name, t in problem.tensors().items()}

    # The shift is a function of x and the data (module docstring): its loss moves to x, plus the
    # explicit terms added at the end. Zero for SOLVED problems (their shift is identically 0).
    rows = _ShiftedRows(*violated_rows(problem, solution, settings))
    incoming = incoming._replace(s_eq=rows.eq * incoming.s_eq, s_in=(rows.above + rows.below) * incoming.s_in)
    gx_eff = incoming.x + vm(incoming.s_eq, problem.A) + vm(incoming.s_in, problem.C)

    # Only problems that have a solution and some incoming gradient are re-solved.
    nonzero = _row_max((gx_eff, incoming.y, incoming.z), B) > 0
    idx = (ok & nonzero).nonzero().squeeze(-1)
    if idx.numel() > 0:
        P, start = problem.select(idx), (solution.x[idx], solution.y[idx], solution.z[idx])
        g_sel = (gx_eff[idx], incoming.y[idx], incoming.z[idx])
        # The perturbation leaves H, A and C alone (unless proximal): the forward's factorization
        # of the selected problems, once per step, serves the re-solve.
        k = len(_steps(opts))
        re_factor = factor.select(idx, copies=k) if factor is not None and float(opts.proximal) == 0 else None
        resolved = _resolve(P, start, solution.status[idx] == int(Status.SOLVED), g_sel, opts, settings, re_factor)
        # A failed re-solve leaves its problem without a gradient, as a failed forward does.
        _report_failed_resolves(resolved, idx, settings.failed_gradient)
        _warn_if_perturbation_lost(resolved, g_sel, float(opts.tau), settings, problem.H.dtype)
        rows_sel = _ShiftedRows(rows.above[idx], rows.below[idx], rows.eq[idx])
        diff = _finite_difference(P, start, resolved, rows_sel, opts)
        _store(out, idx, diff, resolved.ok, settings.failed_gradient)

    _add_shift_terms(out, solution.x, ok, incoming, rows)
    out["l"] = torch.where(torch.isfinite(problem.l), out["l"], torch.zeros_like(out["l"]))
    out["u"] = torch.where(torch.isfinite(problem.u), out["u"], torch.zeros_like(out["u"]))
    return mark_nan({name: t.to(problem.H.dtype) for name, t in out.items()}, nan_rows)
