"""Which rows of a solution are shifted, and with what tolerance: the one definition shared by the
forward (which reports the shift and picks the multipliers on the shifted rows), the implicit
backward and the LPGD backward (which differentiate through the same rows).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alqp.certify import resolve_tolerance, roundoff_accuracy
from alqp.linalg import inf_norm, project_out_row_range, vm
from alqp.settings import Settings


def activity_tol(dtype: torch.dtype, settings: Optional[Settings] = None) -> float:
    """Relative tolerance that separates active (or shifted) rows from the others: the solver's own
    accuracy (:attr:`alqp.certify.Tolerance.activity`: 1e-9 for the float64 default, 1.2e-5 in
    float32).

    A row the solver left within eps of a bound, or with a multiplier above eps, is active. A
    coarser tolerance (sqrt(eps) was tried) pins rows whose slack is small but real, e.g. the
    entries of x >= 0 that are small and positive in OptNet's Sudoku QP, and biases the gradient:
    53% relative error there at eps_abs = 1e-6, against 1.7e-5 with eps.
    """
    return resolve_tolerance(settings or Settings(), dtype).activity


def bound_activity_tol(tol: float, dtype: torch.dtype) -> float:
    """The tolerance within which a row *without* a multiplier counts as on its bound: round-off of
    the answer (100 eps of ``dtype``), not the requested ``tol``. An answer more accurate than the
    tolerance (the active-set engine's are exact) keeps a small but real slack, and counting that
    row as active returns the derivative of the neighbouring piece: OptNet's Sudoku QP at
    eps_abs 1e-6 had x_i = 8.75e-7 on a row so counted, and that puzzle's gradient at cosine 0.06
    with finite differences and qpth (docs/results/sudoku-jumps.md). A row truly at its bound with
    a multiplier is still found by its multiplier, at ``tol``. For SOLVED answers only: a
    closest-feasible answer is certified at 100 times the tolerance, and its rows keep ``tol``
    (:func:`alqp.backward.classify_rows`)."""
    return min(tol, roundoff_accuracy(dtype))


def row_tolerance(M: Tensor, lo: Tensor, hi: Tensor, x: Tensor, tol: float, abs_M: Optional[Tensor] = None,
                  finite: Optional[tuple] = None) -> Tensor:
    """(B,k) ``tol * (1 + |M_i||x| + |finite bound_i|)``: the absolute tolerance of each row
    lo <= M x <= hi, M (B,k,n), lo, hi (B,k) (entries may be infinite), x (B,n). A caller that
    has them already passes |M| (``abs_M``) and (isfinite(lo), isfinite(hi)) (``finite``)."""
    fin_lo, fin_hi = finite if finite is not None else (torch.isfinite(lo), torch.isfinite(hi))
    zero = torch.zeros_like(lo)
    bound = torch.maximum(torch.where(fin_lo, lo.abs(), zero), torch.where(fin_hi, hi.abs(), zero))
    return tol * (1.0 + vm(x.abs(), (M.abs() if abs_M is None else abs_M).transpose(-1, -2)) + bound)


def shifted_rows(A: Tensor, b: Tensor, C: Tensor, l: Tensor, u: Tensor, x: Tensor, s_eq: Tensor, s_in: Tensor,
                 shifted: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """The rows that the closest-feasible shift really moves.

    A row is shifted when its problem is (``shifted``) and |s_i| exceeds
    :func:`row_tolerance` (what is left is the solver's round-off on a row that is merely active).

    Args:
        A (B,p,n), b (B,p), C (B,m,n), l, u (B,m): the constraints (canonical batch).
        x (B,n), s_eq (B,p), s_in (B,m): the solution and its shift.
        shifted: (B,) bool, the problems solved to their closest feasible QP.
        tol: see :func:`activity_tol`.

    Returns:
        (B,p) and (B,m) bool masks of the shifted equality and inequality rows.
    """
    if not bool(shifted.any()):  # (the common case: skip the two passes over |A| and |C|)
        return torch.zeros_like(s_eq, dtype=torch.bool), torch.zeros_like(s_in, dtype=torch.bool)
    on = shifted.unsqueeze(-1)
    eq = on & (s_eq.abs() > row_tolerance(A, b, b, x, tol))
    ineq = on & (s_in.abs() > row_tolerance(C, l, u, x, tol))
    return eq, ineq


def closest_feasible_multipliers(G: Tensor, rows: Tensor, mult: Tensor, s: Tensor, is_eq: Tensor) -> Tensor:
    """The multipliers alqp reports for a closest-feasible QP.

    The shifted rows G_V are dependent (G_V's_V = 0 is what makes the QP infeasible), so any
    vector of null(G_V') can be added to their multipliers without changing H x + g + G'w: the
    multipliers are unique only up to that subspace, and the ALM's grow along it without bound.
    The choice: the part of mult_V in range(G_V) (the smallest one), then moved along s (which lies
    in null(G_V')) by the least t >= 0 that gives every shifted inequality row the sign of the bound
    it sits on (w_i >= 0 where s_i > 0, w_i <= 0 where s_i < 0). The backward differentiates this
    same choice (:mod:`alqp.backward`, R6).

    Args:
        G: (B,k,n) the rows [A; C].  rows: (B,k) bool, the shifted rows V.
        mult: (B,k) multipliers [y; z].  s: (B,k) shift [s_eq; s_in], zero off V.
        is_eq: (k,) bool, the equality rows.

    Returns:
        (B,k) the chosen multipliers (unchanged off V and where no row is shifted).
    """
    # (In float64: the projection's normal equations square G's condition number, too much for
    # float32; and only the few closest-feasible problems come here.)
    out_dtype = mult.dtype
    G, mult, s = G.double(), mult.double(), s.double()
    w = mult - project_out_row_range(G, rows, mult)
    sign_rows = rows & ~is_eq
    # Row i keeps its sign for t >= -w_i / s_i.
    limit = torch.where(sign_rows, -w / torch.where(sign_rows, s, torch.ones_like(s)), torch.zeros_like(s))
    t = limit.amax(-1).clamp_min(0.0) if s.shape[-1] else s.new_zeros(s.shape[0])
    w = w + t.unsqueeze(-1) * s
    # The row that fixed t sits at 0 up to round-off: make it exactly 0, not -1e-16.
    w = torch.where(sign_rows & (s > 0), w.clamp_min(0.0), torch.where(sign_rows & (s < 0), w.clamp_max(0.0), w))
    return w.to(out_dtype)


def polish_multipliers(H: Tensor, g: Tensor, G: Tensor, x: Tensor, mult: Tensor, is_eq: Tensor,
                       lo: Optional[Tensor] = None, hi: Optional[Tensor] = None, tol: float = 0.0) -> Tensor:
    """Multipliers refitted to stationarity in float64, on the rows that carry one: the smallest
    w with w_i = 0 where mult_i = 0 that minimizes |H x + g + G'w|, kept only where it lowers that
    residual and leaves every inequality multiplier's sign as it was. Given the rows' bounds
    ``lo``, ``hi`` (B,k) (of the shifted QP where it is shifted), only rows on a bound (within
    :func:`row_tolerance` at ``tol``) keep a multiplier: an ALM iterate short of its fixed point
    carries small multipliers on rows a little inside their bounds, and a least-squares refit that
    kept them spread the multipliers of an LP onto inactive rows (a duality gap of 2%).

    An ALM's multipliers are residuals divided by the penalty, so their round-off grows as
    1/mu: at the penalty floor of a closest-feasible float32 solve (mu 1e-6) stationarity held only
    to 1e-3..2.5 on the dependent-row families of tests/families.py. x is accurate there, and
    the refit recovers what x allows.

    Args:
        H (B,n,n), g (B,n), G (B,k,n) [A; C], x (B,n), mult (B,k) [y; z], is_eq (k,) bool.

    Returns:
        (B,k) in mult's dtype.
    """
    out_dtype = mult.dtype
    H, g, G, x, mult = (t.double() for t in (H, g, G, x, mult))
    rows = (mult != 0) | is_eq
    if lo is not None:
        lo, hi = lo.double(), hi.double()
        Gx = vm(x, G.transpose(-1, -2))
        slack = row_tolerance(G, lo, hi, x, tol)
        rows = rows & (is_eq | ((Gx - hi).abs() <= slack) | ((Gx - lo).abs() <= slack))
    r = vm(x, H.transpose(-1, -2)) + g
    before = inf_norm(r + vm(mult, G))
    best, best_res = mult, before
    for _ in range(3):
        # A row whose refitted multiplier changes sign is taken out and the rest refitted.
        GJt = (rows.unsqueeze(-1) * G).transpose(-1, -2)  # (B,n,k)
        refit = -vm(r, torch.linalg.pinv(GJt, rtol=1e-12).transpose(-1, -2))
        flipped = ~is_eq & (refit * mult < 0)
        after = inf_norm(r + vm(refit, G))
        better = ~flipped.any(-1) & (after < best_res)
        best = torch.where(better.unsqueeze(-1), refit, best)
        best_res = torch.where(better, after, best_res)
        rows = rows & ~flipped
    return best.to(out_dtype)


def closest_feasible_output(H: Tensor, g: Tensor, A: Tensor, b: Tensor, C: Tensor, l: Tensor, u: Tensor, x: Tensor,
                            mult: Tensor, s: Tensor, tol: float, polish: bool) -> tuple[Tensor, Tensor]:
    """What either engine reports for problems solved to their closest feasible QP: the shift on
    the rows it really moves (:func:`shifted_rows`; 0 elsewhere, where it is round-off) and the
    multipliers of :func:`closest_feasible_multipliers`, refitted first (:func:`polish_multipliers`)
    when ``polish`` (an ALM's multipliers carry round-off amplified by 1/mu).

    Args:
        H (B,n,n), g (B,n), A (B,p,n), b (B,p), C (B,m,n), l, u (B,m): the problems, caller units.
        x (B,n), mult (B,p+m) [y; z], s (B,p+m) [s_eq; s_in]: their solutions.
        tol: see :func:`activity_tol`.

    Returns:
        s (B,p+m) and mult (B,p+m).
    """
    p = A.shape[-2]
    everywhere = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    rows = torch.cat(shifted_rows(A, b, C, l, u, x, s[:, :p], s[:, p:], everywhere, tol), -1)
    s = torch.where(rows, s, torch.zeros_like(s))
    G = torch.cat([A, C], -2)
    is_eq = torch.arange(G.shape[-2], device=x.device) < p
    if polish:
        mult = polish_multipliers(H, g, G, x, mult, is_eq, torch.cat([b, l], -1) + s, torch.cat([b, u], -1) + s, tol)
    return s, closest_feasible_multipliers(G, rows, mult, s, is_eq)
