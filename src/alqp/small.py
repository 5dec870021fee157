"""A per-call fast path for small QPs on the CPU (control loops: n of a few, batch of a few).

At a few variables and a few problems the general path's time is the fixed cost of some hundred
small torch operations, not arithmetic (the README's Performance section has the numbers). This
module does the same work on numpy arrays, in a handful of calls, on a :class:`HostQP`: the
canonical batch (:func:`alqp.problem.canonicalize`'s meaning) as float64 host arrays.

* :func:`host_qp` builds it from the layer's own inputs (no torch operation, no repeated
  validation); it answers None wherever :func:`alqp.problem.canonicalize` could raise or the
  batch is not eligible, and then the general path runs and raises its error. :func:`host_qp_of`
  builds it from a canonical :class:`alqp.problem.QPProblem`.
* :func:`solve_host`: one DAQP solve per problem in its own form (scaled as the general path's
  direct form, :func:`alqp.active_set._direct_scaling`), then the certification of
  :mod:`alqp.certify`, evaluated on host arrays (:func:`host_residuals_meet`, the same formulas
  and tolerances as :func:`alqp.certify.residuals` and :meth:`alqp.certify.Residuals.meets`,
  checked equal by the tests). It answers only when *every* problem of the batch is certified
  SOLVED; anything else (an infeasible, unbounded or uncertified problem) returns None and the
  caller takes the general path for the whole batch, so every other status comes from the general
  path unchanged.
* :func:`kkt_grads_host`: for a batch whose problems are all SOLVED, the implicit derivative of
  :mod:`alqp.backward` (its feasible block, R1-R3) from one batched dense solve of the padded
  KKT systems [[H, A', C_J'], [A, 0, 0], [C_J, 0, I_off-J]]. The active rows J are classified as
  :func:`alqp.backward.classify_rows` does. A KKT system whose equilibrated condition number
  exceeds :data:`MAX_CONDITION` (LPs at a degenerate vertex, dependent or weakly active rows: the
  least-squares cases) or a NaN or Inf incoming gradient returns None, and the general backward
  runs.

Hooks (the only places that know about this module): the eager layer
(:class:`alqp.layer._EagerQPFunction`) tries :func:`host_qp` + :func:`solve_host` before anything
else and :func:`kkt_grads_host` in its backward; :func:`alqp.solver.solve_problem_factored`
calls :func:`solve_small` first on the active-set engine, and :func:`alqp.layer._implicit_grads`
calls :func:`backward_small` first (for the calls that do not take the host lane: compiled and
transformed graphs, and forwards whose backward is LPGD; not for a batch the host lane declined).
Set :data:`ENABLED` to False to compare with the general path.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from alqp.activity import activity_tol, bound_activity_tol
from alqp.certify import Tolerance
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
_INF = math.inf


class HostQP(NamedTuple):
    """A small canonical batch on the host: the meaning of :class:`alqp.problem.QPProblem`.

    Attributes:
        M: (B,n+p+m,n) float64, [H; A; C]: H (symmetrized in the caller's dtype) over the rows of
            the constraints, equalities first (the order of [y; z]). One array, so that H x and
            G x are one product.
        absM: |M|.
        g: (B,n) float64.
        lo, hi: (B,p+m) float64, [b; l] and [b; u] (-inf / +inf where a side is unbounded).
        n, p, m: the numbers of variables, equality and inequality rows.
        dtype: the caller's dtype (answers are rounded to it).
    """

    M: np.ndarray
    absM: np.ndarray
    g: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int
    p: int
    m: int
    dtype: torch.dtype

    @property
    def H(self) -> np.ndarray:
        """(B,n,n) the Hessians."""
        return self.M[:, :self.n]

    @property
    def G(self) -> np.ndarray:
        """(B,p+m,n) the constraint rows [A; C]."""
        return self.M[:, self.n:]


class HostSolution(NamedTuple):
    """The certified answers of :func:`solve_host`: x (B,n) and w = [y; z] (B,p+m), float64
    holding values of the caller's dtype; iterations (B,) int64, DAQP's active-set iterations;
    Mx (B,n+p+m) = M x and Gx_size (B,p+m) = |G| |x|, the certification's products."""

    x: np.ndarray
    w: np.ndarray
    iterations: np.ndarray
    Mx: np.ndarray
    Gx_size: np.ndarray


def _sizes_fit(B: int, n: int, k: int) -> bool:
    return 0 < n <= MAX_N and B <= MAX_BATCH and 0 < k <= MAX_ROWS


def eligible(problem: QPProblem) -> bool:
    """Whether the fast path may take the canonical batch ``problem``: CPU, float64 or float32,
    1 <= n <= MAX_N, batch <= MAX_BATCH, 1 <= p + m <= MAX_ROWS."""
    H = problem.H
    return (ENABLED and H.device.type == "cpu" and H.dtype in _DTYPES
            and _sizes_fit(problem.batch_size, problem.n, problem.p + problem.m))


def _assemble(B: int, n: int, p: int, m: int, H, g, A, b, C, l, u, dtype) -> HostQP:
    """The HostQP of host arrays in :func:`alqp.solve_qp`'s shapes (any dtype; each with or
    without its batch dimension, or None where absent), broadcast to B by the assignments."""
    k = p + m
    M = np.empty((B, n + k, n))
    M[:, :n] = H
    lo = np.empty((B, k))
    hi = np.empty((B, k))
    if p:
        M[:, n:n + p] = A
        lo[:, :p] = b
        hi[:, :p] = b
    if m:
        M[:, n + p:] = C
        lo[:, p:] = -_INF if l is None else l
        hi[:, p:] = _INF if u is None else u
    gb = np.empty((B, n))
    gb[:] = g
    return HostQP(M, np.abs(M), gb, lo, hi, n, p, m, dtype)


def host_qp_of(problem: QPProblem) -> Optional[HostQP]:
    """The canonical ``problem`` on the host, or None where it is not :func:`eligible`."""
    if not eligible(problem):
        return None
    return _assemble(problem.batch_size, problem.n, problem.p, problem.m,
                     *(t.numpy() for t in problem.tensors().values()), problem.H.dtype)


# The number of per-problem dimensions of the layer's inputs H, g, A, b, C, l, u.
_CORE = (2, 1, 2, 1, 2, 1, 1)


def _batch_size(tensors) -> Optional[int]:
    """The common batch size B of the inputs when they are one CPU float64/float32 dtype and their
    dimensions and batch sizes are consistent; None otherwise."""
    H = tensors[0]
    dtype = H.dtype
    if dtype not in _DTYPES or not H.is_cpu:
        return None
    B = 1
    for t, core in zip(tensors, _CORE):
        if t is None:
            continue
        if t.dtype != dtype or not t.is_cpu:
            return None
        d = t.dim()
        if d == core + 1:
            size = t.shape[0]
            if size != 1:
                if B == 1:
                    B = size
                elif size != B:
                    return None
        elif d != core:
            return None
    return B


def host_qp(H: Tensor, g: Tensor, A: Optional[Tensor], b: Optional[Tensor], C: Optional[Tensor],
            l: Optional[Tensor], u: Optional[Tensor]) -> Optional[HostQP]:
    """The layer's inputs (:func:`alqp.solve_qp`'s shapes) as a :class:`HostQP`, or None.

    None wherever :func:`alqp.problem.canonicalize` could raise (a missing block, a dtype, device,
    shape or batch mismatch, NaN or Inf in H, g, A, b, C, bad bounds, H not symmetric within its
    tolerance; near that tolerance's edge too) and wherever the batch is not eligible (see
    :func:`eligible`): the general path then runs and raises or solves. Where it answers, its
    arrays equal those of ``host_qp_of(canonicalize(...))``.
    """
    if not ENABLED or g is None or (A is None) != (b is None) or (C is None) != (l is None and u is None):
        return None
    tensors = (H, g, A, b, C, l, u)
    B = _batch_size(tensors)
    if B is None:
        return None
    n = H.shape[-1]
    p = 0 if A is None else A.shape[-2]
    m = 0 if C is None else C.shape[-2]
    if (not _sizes_fit(B, n, p + m) or H.shape[-2] != n or g.shape[-1] != n
            or (A is not None and (A.shape[-1] != n or b.shape[-1] != p))
            or (C is not None and (C.shape[-1] != n or (l is not None and l.shape[-1] != m)
                                   or (u is not None and u.shape[-1] != m)))):
        return None
    Hn, gn, An, bn, Cn, ln, un = (None if t is None else t.detach().numpy() for t in tensors)
    if not (Hn == Hn.swapaxes(-1, -2)).all():
        # canonicalize's test is max |(H + H') - 2H| <= sqrt(eps) max(max |H|, 1); accepted here
        # only with a factor 2 to spare, so that no rounding difference accepts what it rejects.
        H2 = Hn + Hn.swapaxes(-1, -2)
        limit = 0.5 * float(np.finfo(Hn.dtype).eps) ** 0.5 * max(float(np.abs(Hn).max()), 1.0)
        if not float(np.abs(H2 - 2 * Hn).max()) <= limit:  # (False on NaN too)
            return None
        Hn = H2 * Hn.dtype.type(0.5)  # (in the caller's dtype, as canonicalize symmetrizes)
    qp = _assemble(B, n, p, m, Hn, gn, An, bn, Cn, ln, un, H.dtype)
    # One sum for the finiteness of H, g, A, b, C (a NaN or Inf anywhere makes it non-finite; an
    # overflow of finite data only sends the batch to the general path, which checks them one by one).
    if not math.isfinite(float(qp.M.sum()) + float(qp.g.sum()) + float(qp.lo[:, :p].sum())):
        return None
    # l <= u (False on a NaN), l < +inf and u > -inf.
    if not ((qp.lo <= qp.hi).all() and qp.lo.max() < _INF and qp.hi.min() > -_INF):
        return None
    return qp


@lru_cache(maxsize=64)
def _options(settings, dtype: torch.dtype) -> tuple:
    """(DAQP's solve, options and certification tolerance, as the active-set engine runs it:
    :func:`alqp.active_set._daqp_options`; the activity tolerance; the bound activity tolerance)
    of ``settings`` in ``dtype`` (cached: Settings is immutable)."""
    from alqp.active_set import _daqp_options

    activity = activity_tol(dtype, settings)
    return _daqp_options(settings, dtype), activity, bound_activity_tol(activity, dtype)


@lru_cache(maxsize=256)
def _segments(n: int, p: int, k: int) -> tuple:
    """Start offsets of the residual vectors that :func:`_meets` concatenates (see there)."""
    dual_end = k + n + k
    return (np.array([0, k, dual_end, dual_end + k + max(p, 1)]), np.array([0, n, 2 * n]))


def _products(M: np.ndarray, absM: np.ndarray, n: int, x: np.ndarray) -> tuple:
    """M x (B,n+k) and |G| |x| (B,k) of M = [H; G] (B,n+k,n) and x (B,n)."""
    return (M @ x[..., None])[..., 0], (absM[:, n:] @ np.abs(x)[..., None])[..., 0]


def _meets(M: np.ndarray, absM: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int, p: int,
           x: np.ndarray, w: np.ndarray, tol: Tolerance) -> tuple:
    """Whether (x, w) meets ``tol``: :func:`alqp.certify.residuals` followed by
    :meth:`alqp.certify.Residuals.meets`, the same formulas on host arrays, with the
    infinity norms of each residual and scale taken in one segmented reduction.

    Args:
        M (B,n+k,n) = [H; A; C], absM = |M|, g (B,n), lo, hi (B,k) = [b; l], [b; u] (may be
        infinite), n, p: the numbers of variables and equality rows, x (B,n), w (B,k) = [y; z].

    Returns:
        (B,) True where it does, and the products M x (B,n+k) and |G| |x| (B,k) (the backward's
        row classification reuses them).
    """
    B, k = w.shape
    Mx, Gx_size = _products(M, absM, n, x)
    Hx, Gx = Mx[:, :n], Mx[:, n:]
    absG = absM[:, n:]
    wr = w[:, None, :]
    Gtw = (wr @ M[:, n:])[:, 0]
    Gtw_size = (np.abs(wr) @ absG)[:, 0]
    # (clip as maximum then minimum: np.clip's own call costs twice as much here)
    violation = Gx - np.minimum(np.maximum(Gx, lo), hi)
    bound = np.where(w > 0, hi, np.where(w < 0, lo, 0.0))
    # A multiplier on an infinite side (w = 0 gives bound 0, finite): a dual residual.
    unbounded_side = ~np.isfinite(bound)
    stationarity = Hx + g + Gtw
    eq_bounds = lo[:, :p] if p else np.zeros((B, 1))
    terms = np.abs(np.concatenate([violation, stationarity, np.where(unbounded_side, w, 0.0),
                                   Gx_size, eq_bounds, Hx, g, Gtw_size], 1))
    # Columns: primal, dual, primal scale, dual scale.
    norms = np.maximum.reduceat(terms, _segments(n, p, k)[0], axis=1)
    bound_terms = np.where(unbounded_side, 0.0, bound * w)
    gap_terms = np.concatenate([x * Hx, g * x, bound_terms], 1)
    starts = _segments(n, p, k)[1]
    gap = np.abs(np.add.reduceat(gap_terms, starts, axis=1).sum(1))
    gap_scale = np.add.reduceat(np.abs(gap_terms), starts, axis=1).max(1)
    # (A NaN fails every comparison; an infinite residual is rejected explicitly, as meets() does.)
    finite = np.isfinite(norms[:, 0] + norms[:, 1] + gap)
    meets = (finite & (norms[:, :2] <= tol.abs + tol.rel * norms[:, 2:]).all(1)
             & (gap <= tol.abs + tol.rel * gap_scale))
    return meets, Mx, Gx_size


def host_residuals_meet(H: np.ndarray, g: np.ndarray, G: np.ndarray, lo: np.ndarray, hi: np.ndarray, p: int,
                        x: np.ndarray, w: np.ndarray, tol: Tolerance) -> np.ndarray:
    """(B,) True where (x, w) meets ``tol``: :func:`alqp.certify.residuals` followed by
    :meth:`alqp.certify.Residuals.meets`, on host arrays.

    Args:
        H (B,n,n), g (B,n), G (B,k,n) = [A; C], lo, hi (B,k) = [b; l], [b; u] (may be infinite),
        p: the number of equality rows, x (B,n), w (B,k) = [y; z].
    """
    M = np.concatenate([H, G], 1)
    return _meets(M, np.abs(M), g, lo, hi, H.shape[-1], p, x, w, tol)[0]


def solve_host(qp: HostQP, settings) -> Optional[HostSolution]:
    """The batch solved and certified SOLVED in one numpy/DAQP pass, or None (general path).

    Args:
        qp: the batch (:func:`host_qp` or :func:`host_qp_of`).
        settings: :class:`alqp.Settings` (its tolerances; the engine must be the active-set one).

    Returns:
        A :class:`HostSolution` when every problem is certified; None otherwise.
    """
    M, absM, g, lo, hi, n, p = qp.M, qp.absM, qp.g, qp.lo, qp.hi, qp.n, qp.p
    B, k = lo.shape
    daqp = _options(settings, qp.dtype)[0]
    solve, options = daqp.solve, daqp.options
    sense = _sense(k, p)
    # The general path's direct form (alqp.active_set._direct_scaling), for the whole batch at
    # once: the cost divided by max(|H|, |g|), each row by its largest entry, so that DAQP's
    # absolute tolerances act on quantities of size one; the multipliers are lam * cost / rows.
    row_max = absM.max(axis=2)
    H_max = row_max[:, :n].max(axis=1)
    cost = np.maximum(H_max, np.abs(g).max(axis=1))
    cost[cost == 0] = 1.0
    rows = row_max[:, n:]
    rows[rows == 0] = 1.0
    Hs, gs = M[:, :n] / cost[:, None, None], g / cost[:, None]
    Gs, los, his = M[:, n:] / rows[:, :, None], lo / rows, hi / rows
    # An LP goes to DAQP without a Hessian (exact multipliers from its LP mode), as in the
    # general path's direct form.
    lp = (H_max == 0).tolist()
    x = np.empty((B, n))
    lam = np.empty((B, k))
    iters = np.empty(B, dtype=np.int64)
    for i in range(B):
        x_i, _, flag, info = solve(None if lp[i] else Hs[i], gs[i], Gs[i], his[i], los[i], sense, **options)
        if flag != _DAQP_OPTIMAL:
            counters["forward_fallback"] += 1
            return None
        x[i] = x_i
        lam[i] = info["lam"]
        iters[i] = info["iterations"]
    w = lam * (cost[:, None] / rows)
    if qp.dtype != torch.float64:
        from alqp.active_set import _rounded
        x, w = _rounded(x, qp.dtype), _rounded(w, qp.dtype)
    meets, Mx, Gx_size = _meets(M, absM, g, lo, hi, n, p, x, w, daqp.tol)
    if not meets.all():
        counters["forward_fallback"] += 1
        return None
    counters["forward"] += 1
    return HostSolution(x, w, iters, Mx, Gx_size)


def _sense(k: int, p: int) -> np.ndarray:
    """DAQP's row senses: the first p rows equalities. (A fresh array each call: DAQP keeps its
    working set in it.)"""
    sense = np.zeros(k, dtype=np.intc)
    sense[:p] = _DAQP_EQUALITY
    return sense


def solve_small(problem: QPProblem, settings) -> Optional[QPSolution]:
    """:func:`solve_host` on a canonical batch (:func:`alqp.problem.canonicalize`): a batched
    :class:`alqp.QPSolution` (x (B,n), y (B,p), z (B,m), zero shifts, status SOLVED,
    iterations) in the problem's dtype when every problem is certified, or None (nothing is
    changed, and the caller solves the batch as usual)."""
    qp = host_qp_of(problem)
    answer = None if qp is None else solve_host(qp, settings)
    return None if answer is None else solution_tensors(qp, answer)


def solution_tensors(qp: HostQP, answer: HostSolution) -> QPSolution:
    """The batched :class:`alqp.QPSolution` of a certified :class:`HostSolution`."""
    p, m = qp.p, qp.m
    B = answer.x.shape[0]
    # (numpy copies and zeros wrapped by from_numpy: a fraction of the cost of torch's own; y
    # and z contiguous, as the general path returns them)
    w = answer.w
    out = [torch.from_numpy(a) for a in (answer.x, np.ascontiguousarray(w[:, :p]), np.ascontiguousarray(w[:, p:]),
                                         np.zeros((B, p)), np.zeros((B, m)))]
    if qp.dtype != torch.float64:
        out = [t.to(qp.dtype) for t in out]
    return QPSolution(*out, torch.from_numpy(np.zeros(B, dtype=np.int64)),  # (Status.SOLVED == 0)
                      torch.from_numpy(answer.iterations))


def _classify_host(qp: HostQP, w: np.ndarray, Mx: np.ndarray, Gx_size: np.ndarray, tol: float, bound_tol: float):
    """The active inequality rows of SOLVED answers and the bound each sits on, as
    :func:`alqp.backward.classify_rows` decides them (its feasible case), on host arrays.

    Args:
        qp: the batch; w = [y; z] (B,p+m): its answers' multipliers; Mx (B,n+p+m) = M x and
            Gx_size (B,p+m) = |G| |x| at its x.
        tol: the multiplier tolerance; bound_tol: the tolerance of a row on its bound.

    Returns:
        active, upper, lower: (B,m) float 0/1 (upper / lower 0.5 each on a row with l_i = u_i and
        z_i = 0; 0 on an infinite bound).
    """
    n, p = qp.n, qp.p
    j = n + p
    C = qp.M[:, j:]
    l, u = qp.lo[:, p:], qp.hi[:, p:]
    y, z = w[:, :p], w[:, p:]
    abs_l, abs_u = np.abs(l), np.abs(u)
    # (l is never +inf nor u -inf: a finite side is one whose magnitude is finite)
    fin_l, fin_u = abs_l < _INF, abs_u < _INF
    bound = np.maximum(np.where(fin_l, abs_l, 0.0), np.where(fin_u, abs_u, 0.0))
    ptol = bound_tol * (1.0 + Gx_size[:, p:] + bound)
    r = Mx[:, j:]
    # (At an infinite bound |r - bound| is inf: never within the tolerance.)
    on_u = np.abs(r - u) <= ptol
    on_l = np.abs(r - l) <= ptol
    # (x'H is H x: H is symmetric)
    dual_terms = np.concatenate([Mx[:, :n], qp.g, (y[:, None] @ qp.M[:, n:j])[:, 0], (z[:, None] @ C)[:, 0]], 1)
    dual_scale = 1.0 + np.abs(dual_terms).max(1)
    z_tol = (tol * dual_scale)[:, None] / np.maximum(qp.absM[:, j:].max(2), _TINY)
    z_up, z_lo = z > z_tol, z < -z_tol
    z_nonzero = z_up | z_lo
    active = (z_nonzero | on_u | on_l).astype(np.float64)
    upper = np.where(z_nonzero, z_up, on_u * (1.0 - 0.5 * on_l)) * active
    lower = (active - upper) * fin_l
    return active, upper * fin_u, lower


_TINY = np.finfo(np.float64).tiny


@lru_cache(maxsize=256)
def _diagonal(N: int, j: int) -> np.ndarray:
    """Flat indices of the diagonal entries (i, i), i >= j, of an N x N matrix."""
    i = np.arange(j, N)
    return i * N + i


def kkt_grads_host(qp: HostQP, answer: HostSolution, incoming, settings) -> Optional[dict]:
    """The implicit backward of an all-SOLVED small batch in one batched KKT solve, or None.

    Args:
        qp: the batch; answer: its certified answers (:func:`solve_host`, or a
            :class:`HostSolution` built from a QPSolution).
        incoming: the gradients of x, y, z, s_eq, s_in ((B,n), (B,p), (B,m), (B,p), (B,m) float64
            arrays, or None for zero).
        settings: :class:`alqp.Settings`.

    Returns:
        The per-problem gradients (B, ...) float64 of "H", "g", "A", "b", "C", "l", "u" (A of
        shape (B,p,n) and C (B,m,n) even where absent), as :func:`alqp.backward.implicit_backward`
        gives them; None where the general backward must answer: a NaN or Inf incoming gradient,
        or a KKT system too ill-conditioned to solve directly.
    """
    x, w = answer.x, answer.w
    B, n = x.shape
    p, m = qp.p, qp.m
    k = p + m
    N = n + k
    j = n + p
    # (one sum per gradient: NaN or Inf anywhere makes it non-finite; an overflow of finite
    # gradients only sends the batch to the general backward)
    if not math.isfinite(sum(float(t.sum()) for t in incoming if t is not None)):
        counters["backward_fallback"] += 1
        return None
    M = qp.M
    _, tol, bound_tol = _options(settings, qp.dtype)
    active, upper, lower = _classify_host(qp, w, answer.Mx, answer.Gx_size, tol, bound_tol)

    # The padded KKT matrix [[H, G_J'], [G_J, I_off-J]], G_J = [A; C_J]: an inactive row i gets 1
    # on its diagonal and 0 on its right side, so its multiplier's derivative is exactly 0.
    rows_on = np.ones((B, k))
    rows_on[:, p:] = active
    G_J = M[:, n:] * rows_on[..., None]
    K = np.zeros((B, N, N))
    K[:, :n, :n] = M[:, :n]
    K[:, n:, :n] = G_J
    K[:, :n, n:] = G_J.transpose(0, 2, 1)
    K.reshape(B, N * N)[:, _diagonal(N, j)] = 1.0 - active
    rhs = np.zeros((B, N))
    gx, gy, gz = incoming[:3]  # (a SOLVED problem's shift is 0 with derivative 0: no s terms)
    if gx is not None:
        rhs[:, :n] = gx
    if gy is not None:
        rhs[:, n:j] = gy
    if gz is not None:
        rhs[:, j:] = active * gz
    # Symmetric equilibration (two Ruiz sweeps), so that the condition test is scale-free. (A zero
    # row, an LP's variable with no active row, keeps its scale: K is singular, and the condition
    # test below rejects it.)
    abs_K = np.abs(K)
    norms = abs_K.max(2)
    d = 1.0 / np.sqrt(np.where(norms > 0, norms, 1.0))
    norms = (abs_K * d[:, None, :]).max(2) * d
    d = d / np.sqrt(np.where(norms > 0, norms, 1.0))
    Ks = K * (d[:, :, None] * d[:, None, :])
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
    w1 = sol[:, :n]
    sol[:, j:] *= active
    w_rows = sol[:, n:]

    # dL/dH = -(w1 x' + x w1')/2, dL/d[A; C] = -([y; z] w1' + [w2; w3] x'), dL/d[b; l, u] = [w2; w3].
    outer = w1[:, :, None] * x[:, None, :]
    grad_G = -(w[:, :, None] * w1[:, None, :] + w_rows[:, :, None] * x[:, None, :])
    counters["backward"] += 1
    return {
        "H": -0.5 * (outer + outer.transpose(0, 2, 1)),
        "g": -w1,
        "A": grad_G[:, :p],
        "b": w_rows[:, :p],
        "C": grad_G[:, p:],
        "l": lower * w_rows[:, p:],
        "u": upper * w_rows[:, p:],
    }


def backward_small(problem: QPProblem, solution: QPSolution, grad_x, grad_y, grad_z, grad_s_eq, grad_s_in,
                   settings) -> Optional[dict]:
    """:func:`kkt_grads_host` on a canonical batch and its solution, or None.

    Same arguments and result as :func:`alqp.backward.implicit_backward` (gradients (B, ...) of
    "H", "g", "A", "b", "C", "l", "u" in the problem's dtype); None where the general backward
    must answer: ineligible batch, a status other than SOLVED, or :func:`kkt_grads_host`'s cases.
    """
    qp = host_qp_of(problem)
    if qp is None:
        return None
    if (solution.status.numpy() != int(Status.SOLVED)).any():
        counters["backward_fallback"] += 1
        return None
    B = qp.g.shape[0]
    incoming = [None if t is None else np.broadcast_to(t.double().numpy(), (B, t.shape[-1]))
                for t in (grad_x, grad_y, grad_z, grad_s_eq, grad_s_in)]
    x = solution.x.double().numpy()
    w = np.concatenate([solution.y.numpy(), solution.z.numpy()], 1).astype(np.float64, copy=False)
    answer = HostSolution(x, w, solution.iterations.numpy(), *_products(qp.M, qp.absM, qp.n, x))
    grads = kkt_grads_host(qp, answer, incoming, settings)
    if grads is None:
        return None
    dtype = qp.dtype
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in grads.items()}
