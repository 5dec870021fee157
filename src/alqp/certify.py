"""The one certification every answer is judged by, whatever the engine.

A status of SOLVED is a promise: the primal, dual and duality-gap residuals of the returned
(x, y, z), recomputed on the caller's data, each meet the tolerance

    residual <= eps_abs + eps_rel * (size of its terms)          (infinity norms)

(the form of ProxSuite, OSQP and Clarabel). With the defaults (``eps_abs = 0``, ``eps_rel = 1e-9``)
the test is scale-free: a QP and its copy with all seven tensors multiplied by 10^k pass or fail
together. The three residuals, with y, z signed as in ProxSuite (H x + g + A'y + C'z = 0,
z_i > 0 only at u_i, z_i < 0 only at l_i):

    primal   |G x - clip(G x, lo, hi)|                          terms: |G||x|, b
    dual     |H x + g + A'y + C'z|                              terms: H x, g, |G'||w|
    gap      |x'Hx + g'x + sum_i bound_i(w_i) w_i|              terms: the products it sums
             (G = [A; C], lo = [b; l], hi = [b; u], w = [y; z], bound_i(w_i) = hi_i where w_i > 0,
             lo_i where w_i < 0: the gap is b'y + u'[z]+ + l'[z]- plus x'Hx + g'x)

At an exact KKT point the gap is the sum of the complementarity products z_i (bound_i - C_i x),
each of them non-negative, so a small gap is complementarity, row by row, in the same units.
A multiplier on an infinite bound counts, by its size, in the dual residual.

A closest-feasible answer is certified on its shifted QP (lo + s, hi + s), and its shift by the
optimality conditions of min |s|^2: s is the violation of the original rows and G's = 0, both at
:meth:`Tolerance.closest_feasible` (100 times the tolerance: such an answer is found where the
multipliers' round-off is largest).

Round-off: a residual computed in floating point cannot be trusted below about eps times the
magnitude of what it sums (|H||x| + |g| + |G'||w| for the dual). Where that floor lies above the
asked tolerance no answer can be certified, and the engines say so with Status.INACCURATE instead
of widening the test (:func:`roundoff_floor`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alqp.linalg import inf_norm, vm


#: How much looser a closest-feasible answer's certification is (:meth:`Tolerance.closest_feasible`).
CLOSEST_FEASIBLE_FACTOR = 100.0


class Tolerance(NamedTuple):
    """The tolerances of :class:`alqp.Settings` resolved for a dtype (:func:`resolve_tolerance`).

    Attributes:
        abs: absolute tolerance, in the units of each residual.
        rel: relative tolerance, times the size of each residual's terms.
    """

    abs: float
    rel: float

    @property
    def activity(self) -> float:
        """The relative tolerance that tells active (and shifted) rows from the others
        (:func:`alqp.activity.row_tolerance`): the solver's relative accuracy."""
        return max(self.abs, self.rel)

    def closest_feasible(self) -> "Tolerance":
        """The tolerance a closest-feasible answer is certified at: ``CLOSEST_FEASIBLE_FACTOR``
        times this one (in float32 that covers the rounding of an answer computed in float64,
        which is how the ALM answers closest-feasible float32 problems). Its QP is found at the
        penalty floor, where the ALM's multipliers carry round-off amplified by 1/mu_min, and its
        shifted rows are dependent: measured on the test families, a right answer's residuals
        reach 1e-9 to 3e-8 relative where 1e-9 is asked (a fixed factor: no allowance that
        grows)."""
        return Tolerance(self.abs * CLOSEST_FEASIBLE_FACTOR, self.rel * CLOSEST_FEASIBLE_FACTOR)

    def bound(self, scale: Tensor) -> Tensor:
        """(B,) the tolerance of a residual whose terms have size ``scale`` (B,)."""
        return self.abs + self.rel * scale


def roundoff_accuracy(dtype: torch.dtype) -> float:
    """``100 * finfo(dtype).eps``: the accuracy a computed residual (or a computed slack) can reach
    in ``dtype``, 2.2e-14 in float64 and 1.2e-5 in float32."""
    return 100 * torch.finfo(dtype).eps


def resolve_tolerance(settings, dtype: torch.dtype) -> Tolerance:
    """The tolerances of ``settings`` for data of ``dtype``: each nonzero one is raised to at
    least ``100 * finfo(dtype).eps`` (1.2e-5 in float32), the accuracy a computed residual can
    reach; a zero one stays zero."""
    floor = roundoff_accuracy(dtype)
    eps_abs = max(settings.eps_abs, floor) if settings.eps_abs > 0 else 0.0
    eps_rel = max(settings.eps_rel, floor) if settings.eps_rel > 0 else 0.0
    return Tolerance(eps_abs, eps_rel)


class Residuals(NamedTuple):
    """The residuals of a batch of answers (each (B,), caller units), and the sizes of their terms."""

    primal: Tensor
    dual: Tensor
    gap: Tensor
    primal_scale: Tensor
    dual_scale: Tensor
    gap_scale: Tensor

    def meets(self, tol: Tolerance) -> Tensor:
        """(B,) True where all three residuals are finite and meet ``tol``."""
        finite = torch.isfinite(self.primal) & torch.isfinite(self.dual) & torch.isfinite(self.gap)
        return (finite & (self.primal <= tol.bound(self.primal_scale)) & (self.dual <= tol.bound(self.dual_scale))
                & (self.gap <= tol.bound(self.gap_scale)))


def measure(x: Tensor, Hx: Tensor, g: Tensor, Gx: Tensor, Gtw: Tensor, lo: Tensor, hi: Tensor, w: Tensor,
            p: int, Gx_size: Tensor, Gtw_size: Tensor) -> Residuals:
    """The residuals from the products an engine has at hand, all in the caller's units.

    Args:
        x (B,n), Hx (B,n) = H x, g (B,n), Gx (B,k) = [A; C] x, Gtw (B,n) = [A; C]' w,
        lo, hi (B,k) = [b; l], [b; u] (of the shifted QP for a closest-feasible answer; entries of
        l, u may be infinite), w (B,k) = [y; z], p: the number of equality rows (the first p),
        Gx_size (B,k) = |[A; C]| |x|: the size of G x's summands, a term of the primal residual
        (A x = b = 0 has |A x| of round-off size only: HS52 of Maros-Meszaros).
        Gtw_size (B,n) = |[A; C]|' |w|: the size of G'w's summands, a term of the dual residual (the
        multipliers of a closest-feasible QP's dependent rows are large and cancel in G'w).

    Returns:
        :class:`Residuals`.
    """
    zero = torch.zeros_like(lo)
    primal = inf_norm(Gx - torch.clamp(Gx, lo, hi))
    # |b| (the finite bound of an equality row) is a term of the primal residual too.
    primal_scale = torch.maximum(inf_norm(Gx_size), inf_norm(lo[:, :p]))
    # A multiplier that pushes on an infinite bound (w_i > 0 where hi_i = inf, or w_i < 0 where
    # lo_i = -inf) violates dual feasibility by its size: it joins the dual residual and adds 0
    # to the gap (solvers leave values like 1e-80 there, which change nothing).
    bound = torch.where(w > 0, hi, torch.where(w < 0, lo, zero))
    unbounded_side = (w != 0) & ~torch.isfinite(bound)
    dual = torch.maximum(inf_norm(Hx + g + Gtw), inf_norm(torch.where(unbounded_side, w, zero)))
    dual_scale = torch.maximum(torch.maximum(inf_norm(Hx), inf_norm(g)), inf_norm(Gtw_size))
    bound_terms = torch.where((w != 0) & ~unbounded_side, bound * w, zero)
    xHx, gx = x * Hx, g * x
    gap = (xHx.sum(-1) + gx.sum(-1) + bound_terms.sum(-1)).abs()
    # The gap's terms are the products it adds up (x_i (H x)_i, g_i x_i, bound_i w_i): at the
    # solution they cancel by design, and each sum alone can be far smaller than its products.
    gap_scale = torch.stack([xHx.abs().sum(-1), gx.abs().sum(-1), bound_terms.abs().sum(-1)]).amax(0)
    return Residuals(primal, dual, gap, primal_scale, dual_scale, gap_scale)


def residuals(H: Tensor, g: Tensor, G: Tensor, lo: Tensor, hi: Tensor, p: int, x: Tensor, w: Tensor) -> Residuals:
    """:func:`measure` from the data: H (B,n,n), g (B,n), G (B,k,n) = [A; C], lo, hi (B,k),
    x (B,n), w (B,k); any of the data may have batch size 1 (shared)."""
    # (The matrix-vector products as row vector times transposed matrix, alqp.linalg.vm: on the
    # CPU a (B,r,k) @ (B,k,1) product took four times as long at batch 100.)
    Hx = vm(x, H.mT)
    Gx = vm(x, G.mT)
    Gtw = torch.matmul(w.unsqueeze(-2), G).squeeze(-2)
    absG = G.abs()
    Gx_size = vm(x.abs(), absG.mT)
    Gtw_size = torch.matmul(w.abs().unsqueeze(-2), absG).squeeze(-2)
    B = x.shape[0]
    return measure(x, Hx, g.expand(B, -1), Gx, Gtw, lo.expand(B, -1), hi.expand(B, -1), w, p, Gx_size, Gtw_size)


def shift_optimal(G: Tensor, lo: Tensor, hi: Tensor, x: Tensor, s: Tensor, tol: Tolerance) -> Tensor:
    """(B,) True where the shift s (B,k) is the least-squares shift of the rows G (B,k,n),
    lo, hi (B,k) at x (B,n): s is x's violation of the original rows (within the primal
    tolerance) and G's = 0 (stationarity of |s|^2)."""
    Gx = torch.matmul(G, x.unsqueeze(-1)).squeeze(-1)
    violation = Gx - torch.clamp(Gx, lo, hi)
    scale = torch.maximum(inf_norm(Gx), inf_norm(s))
    Gts = torch.matmul(s.unsqueeze(-2), G).squeeze(-2)
    # Each row's shift is known to the primal tolerance of its row, relative to |G x|: G's is
    # then known to |G|'(|s| + |G x|) times that tolerance.
    Gts_scale = inf_norm(torch.matmul((s.abs() + Gx.abs()).unsqueeze(-2), G.abs()).squeeze(-2))
    return (inf_norm(violation - s) <= tol.bound(scale)) & (inf_norm(Gts) <= tol.bound(Gts_scale))


def roundoff_floor(H: Tensor, g: Tensor, G: Tensor, lo: Tensor, hi: Tensor, p: int, x: Tensor, w: Tensor,
                   dtype: torch.dtype) -> Tensor:
    """(B,) True where the residuals of (x, w) are within what round-off in ``dtype`` allows to
    compute: each residual at most ``10 * n_terms * eps`` times the sum of the magnitudes it adds
    up (|H||x| + |g| + |G'||w| for the dual, |G||x| + |lo, hi| for the primal). Bounded by the data
    and the answer, never by a penalty. Used only to tell INACCURATE from a plain failure."""
    eps = torch.finfo(dtype).eps
    H, g, G, lo, hi, x, w = (t.double() for t in (H, g, G, lo, hi, x, w))
    res = residuals(H, g, G, lo, hi, p, x, w)
    n, k = x.shape[-1], w.shape[-1]
    ax, aw = x.abs(), w.abs()
    dual_mag = inf_norm(torch.matmul(H.abs(), ax.unsqueeze(-1)).squeeze(-1) + g.abs()
                        + torch.matmul(aw.unsqueeze(-2), G.abs()).squeeze(-2))
    finite = lambda t: torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))  # noqa: E731
    primal_mag = inf_norm(torch.matmul(G.abs(), ax.unsqueeze(-1)).squeeze(-1) + torch.maximum(finite(lo), finite(hi)))
    gap_mag = (ax * torch.matmul(H.abs(), ax.unsqueeze(-1)).squeeze(-1)).sum(-1) + (g.abs() * ax).sum(-1) \
        + (aw * torch.maximum(finite(lo), finite(hi))).sum(-1)
    floor = lambda terms, mag: 10 * (terms + 1) * eps * mag  # noqa: E731
    return ((res.primal <= floor(n, primal_mag)) & (res.dual <= floor(n + k, dual_mag))
            & (res.gap <= floor(n + k, gap_mag)))


def solution_meets(problem, solution, tol: Tolerance) -> Tensor:
    """(B,) True where a solution meets ``tol`` as the caller gets it: the residuals of its QP,
    shifted by its closest-feasible shift (zero unless CLOSEST_FEASIBLE), and the optimality of
    that shift (:func:`shift_optimal`). Computed in float64.

    Args:
        problem: the canonical batch (:class:`alqp.problem.QPProblem`: H (B,n,n), g (B,n),
            A (B,p,n), b (B,p), C (B,m,n), l, u (B,m)).
        solution: x (B,n), y (B,p), z (B,m), s_eq (B,p), s_in (B,m) (a :class:`alqp.QPSolution`).
    """
    f64 = lambda t: t.double()  # noqa: E731
    H, g, A, b, C, l, u = (f64(getattr(problem, name)) for name in ("H", "g", "A", "b", "C", "l", "u"))
    x, w = f64(solution.x), f64(torch.cat([solution.y, solution.z], -1))
    s = f64(torch.cat([solution.s_eq, solution.s_in], -1))
    G = torch.cat([A, C], -2)
    lo, hi = torch.cat([b, l], -1), torch.cat([b, u], -1)
    res = residuals(H, g, G, lo + s, hi + s, problem.A.shape[-2], x, w)
    shifted = (s != 0).any(-1)
    if not bool(shifted.any()):
        return res.meets(tol)
    loose = tol.closest_feasible()
    return torch.where(shifted, res.meets(loose) & shift_optimal(G, lo, hi, x, s, loose), res.meets(tol))
