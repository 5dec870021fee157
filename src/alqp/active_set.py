"""CPU forward engine: DAQP, a dual active-set QP solver, one problem of the batch at a time.

DAQP (Arnström, Bemporad, Axehill, "A dual active-set solver for embedded quadratic programming
using recursive LDL' updates", IEEE TAC 2022) solves

    minimize 1/2 x'Hx + f'x   subject to   blower <= A x <= bupper,

rows marked ``sense = 5`` being equalities. Its multipliers ``lam`` satisfy H x + f + A' lam = 0
with lam_i > 0 only at the upper bound and lam_i < 0 only at the lower one: alqp's own convention,
so the rows [A; C] of alqp's QP map to DAQP's rows one to one and lam splits into (y, z) unchanged.

An active-set answer is exact up to round-off once the active set is right, and wrong outright
when it is not, so DAQP's exit flag is not trusted alone: every answer is re-checked in the
caller's units by the one certification of both engines (:func:`alqp.certify.residuals`), and
only a problem that passes is *certified*. An infeasible problem gets two more DAQP solves for
its closest feasible QP (:func:`_closest_feasible_ladder`), certified the same way on the shifted
problem. The others (unbounded, dependent equality rows, a failure, a tolerance not met) are meant
to be re-solved by the ALM solver.

Strictly convex problems reach DAQP already in the form it works in, a least-distance problem with
inequality rows only (:class:`_LeastDistanceForm`): the Cholesky factorization of H and the
elimination of the equality rows run batched in torch, where DAQP would run them problem by problem
in plain C loops (most of its time on dense problems).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from alqp.activity import closest_feasible_output
from alqp.certify import Tolerance, residuals, resolve_tolerance, shift_optimal
from alqp.linalg import cholesky_solve_rows, vm
from alqp.pool import (chunk_threads, concat_rows, map_batch_chunks, one_torch_thread, run_chunked,  # alqp.pool
                       solve_threads)
from alqp.problem import QPProblem
from alqp.settings import Settings
from alqp.types import QPSolution, Status

# DAQP's constraint type of an equality row (its ``sense`` flags: 0 inequality, 5 equality).
_DAQP_EQUALITY = 5
# DAQP's exit flags (daqp/include/constants.h).
_DAQP_OPTIMAL = 1
_DAQP_INFEASIBLE = -1
_DAQP_DEPENDENT_EQUALITIES = -6  # DAQP_EXIT_OVERDETERMINED_INITIAL: its equality rows are dependent
_DAQP_STATUS = {
    -1: Status.PRIMAL_INFEASIBLE,  # DAQP_EXIT_INFEASIBLE
    -2: Status.MAX_ITER,  # DAQP_EXIT_CYCLE
    -3: Status.DUAL_INFEASIBLE,  # DAQP_EXIT_UNBOUNDED
    -4: Status.MAX_ITER,  # DAQP_EXIT_ITERLIMIT
}
# DAQP's primal tolerance (a row whose violation, on DAQP's normalized rows, exceeds it enters the
# active set) and proximal tolerance: a tenth of the finest certification tolerance, within DAQP's
# default (1e-6) and round-off. That made DAQP declare feasible Maros-Meszaros problems infeasible
# (QBEACONF, QBORE3D, QPCBOEI2 at 1e-10; all three solve at 1e-9), so an answer that misses the
# certification, or an infeasible verdict, is retried on a ladder of tolerances (_TOL_LADDER:
# tighter first for a missed answer, looser for an infeasible verdict).
_INNER_TOL_FACTOR = 0.1
_INNER_TOL_MAX = 1e-6
_INNER_TOL_MIN = 1e-13
_TOL_LADDER = {"tighter": (1e-2, 1e-4), "looser": (1e1, 1e2)}


def _ladder(base: float, *sides: str) -> list:
    """The primal tolerances to retry after ``base``, on the given sides of _TOL_LADDER, within
    [_INNER_TOL_MIN, _INNER_TOL_MAX], each once and none equal to ``base``."""
    steps = [min(max(base * f, _INNER_TOL_MIN), _INNER_TOL_MAX) for side in sides for f in _TOL_LADDER[side]]
    return [t for t in dict.fromkeys(steps) if t != base]
# The least-distance form (_LeastDistanceForm) takes a problem only where each Cholesky pivot of H
# (and of the equality rows' Gram matrix) keeps this fraction of its row's diagonal entry: a row
# within sin(angle) = 1e-5 of the span of the rows before it loses the digits the LDP needs, and
# DAQP's own form (with its proximal regularization) takes the problem instead.
_LDP_MIN_PIVOT = 1e-10


def _import_daqp():
    try:
        import daqp
    except ImportError as err:  # pragma: no cover - daqp is a dependency of alqp
        raise ImportError(
            "alqp's active-set engine (Settings(engine='active_set'), and 'auto' on CPU) needs the "
            "'daqp' package: pip install daqp"
        ) from err
    return daqp


def _cpu64(t: Tensor) -> Tensor:
    """t as a float64 CPU tensor, t itself when it already is (a no-op Tensor.to costs at batch 1).
    The engine's tensors come from canonicalize, detached."""
    return t if t.device.type == "cpu" and t.dtype == torch.float64 else t.to(device="cpu", dtype=torch.float64)


def _host(t: Tensor) -> np.ndarray:
    """t (B, ...) as a C-contiguous float64 numpy array on the CPU; a tensor shared by the whole
    batch (an expanded view, batch stride 0) is converted once and keeps a leading dimension of 1
    (numpy broadcasts it, and the solve loop indexes it at 0)."""
    if t.shape[0] > 1 and t.stride(0) == 0:
        t = t[:1]
    t = _cpu64(t)
    return np.ascontiguousarray((t.detach() if t.requires_grad else t).numpy())


def _device_tensor(a: np.ndarray, dtype: torch.dtype, device) -> Tensor:
    """A host array as a tensor of ``dtype`` on ``device``, without a copy where it already is."""
    t = torch.from_numpy(a)
    return t if t.dtype == dtype and t.device == device else t.to(dtype=dtype, device=device)


def _rows(blocks: list, batch: int) -> np.ndarray:
    """Concatenate host arrays along axis 1, broadcasting shared (leading 1) blocks to ``batch``
    only when another block is not shared. The result is C-contiguous: DAQP reads each problem's
    row as a plain buffer, and numpy lays out a concatenation of broadcast blocks column by column
    (a batch with per-problem b and shared l, u gave DAQP another problem's bounds, and its
    closest-feasible phase a wrong shift)."""
    if all(a.shape[0] == 1 for a in blocks):
        return np.ascontiguousarray(np.concatenate(blocks, axis=1))
    return np.ascontiguousarray(np.concatenate([np.broadcast_to(a, (batch,) + a.shape[1:]) for a in blocks], axis=1))


class ActiveSetResult(NamedTuple):
    """What :func:`solve_active_set` returns; unpacks as ``solution, certified, factor``.

    Attributes:
        solution: the :class:`alqp.QPSolution` (B problems) in the input's dtype and device.
        certified: (B,) bool, True where the answer passed the certification (SOLVED, or
            CLOSEST_FEASIBLE with its shift checked too); the caller re-solves the others.
        factor: the :class:`LeastDistanceFactor` of the batch's strictly convex problems, or None.
    """

    solution: QPSolution
    certified: Tensor
    factor: Optional["LeastDistanceFactor"]


class _HostBatch(NamedTuple):
    """The canonical batch as DAQP reads it: C-contiguous float64 numpy arrays, each of batch size
    B, or 1 where the whole batch shares it (its ``stride`` entry is then 0). DAQP's rows are
    [A; C] with bounds [b; l] <= . <= [b; u], the equalities first (as in the ALM's stacking), so
    its multipliers are [y; z].

    Attributes:
        H: (B|1,n,n).  g: (B|1,n).  G: (B|1,k,n) = [A; C].  lo, hi: (B|1,k) = [b; l], [b; u].
        sense: (k,) DAQP's row flags (the first p rows equalities).  p: the number of equality rows.
        H_zero: B bools (a list, indexed by problem), True where H is zero (an LP).
        strides: (sH, sg, sG, slo, shi), 1 for a batched array and 0 for a shared one.
    """

    H: np.ndarray
    g: np.ndarray
    G: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sense: np.ndarray
    p: int
    H_zero: list
    strides: tuple

    def problem(self, i: int) -> tuple:
        """Problem i in DAQP's own form: (H (n,n), or None for an LP, g, G, lo, hi)."""
        sH, sg, sG, sl, su = self.strides
        return (None if self.H_zero[i * sH] else self.H[i * sH], self.g[i * sg], self.G[i * sG],
                self.lo[i * sl], self.hi[i * su])

    def select(self, idx: np.ndarray, every: bool) -> tuple:
        """(H, g, G, lo, hi) of problems ``idx`` (shared arrays stay shared; ``every``: idx is the
        whole batch, so the arrays are returned as they are)."""
        def pick(a: np.ndarray) -> np.ndarray:
            return a if a.shape[0] == 1 or every else a[idx]
        return pick(self.H), pick(self.g), pick(self.G), pick(self.lo), pick(self.hi)


class _DaqpOptions(NamedTuple):
    """How each DAQP solve of a batch is run and judged.

    Attributes:
        solve: ``daqp.solve``.  options: its keyword options (primal_tol, eta_prox).
        tol: the certification tolerance of the input's dtype.  dtype: the input's dtype (answers
            are certified as rounded to it).
    """

    solve: Callable
    options: dict
    tol: Tolerance
    dtype: torch.dtype


@dataclass
class _Answers:
    """The per-problem answers, filled in place by the phases of :func:`solve_active_set`.

    Attributes:
        x: (B,n).  w: (B,k) = [y; z].  flags: (B,) DAQP's exit flag of the answer kept.
        iterations: (B,) active-set iterations summed over every solve of the problem.
        certified: (B,) bool, the answer passed the certification.
        shift: (B,k) the closest-feasible shift.  shifted: (B,) bool, a certified closest-feasible answer.
        status: (B,) int64 :class:`Status` values, set by :func:`_settle`.
    """

    x: np.ndarray
    w: np.ndarray
    flags: np.ndarray
    iterations: np.ndarray
    certified: np.ndarray
    shift: np.ndarray
    shifted: np.ndarray
    status: Optional[np.ndarray] = None

    @classmethod
    def empty(cls, B: int, n: int, k: int) -> "_Answers":
        """No answer yet: zeros, DAQP's optimal flag, nothing certified."""
        return cls(x=np.zeros((B, n)), w=np.zeros((B, k)), flags=np.full(B, _DAQP_OPTIMAL, dtype=np.int64),
                   iterations=np.zeros(B, dtype=np.int64), certified=np.zeros(B, dtype=bool),
                   shift=np.zeros((B, k)), shifted=np.zeros(B, dtype=bool))


@one_torch_thread  # alqp.pool: the thread policy
def solve_active_set(problem: QPProblem, settings: Settings, factor: Optional["LeastDistanceFactor"] = None
                     ) -> ActiveSetResult:
    """Solve a canonical batch with DAQP, problem by problem, in float64 on the CPU.

    Args:
        problem: :class:`alqp.problem.QPProblem` (every tensor with its batch dimension).
        settings: :class:`Settings`; ``eps_abs`` and ``eps_rel`` set the certification tolerance
            (never below ``100 * finfo(dtype).eps`` of the input's dtype, as in the ALM solver).
        factor: the batch's :class:`LeastDistanceFactor` when it is known already (it depends on
            H, A and C only); None: computed here.

    Returns:
        An :class:`ActiveSetResult` (solution, certified, factor). ``solution`` is the
        :class:`alqp.QPSolution` in the input's dtype and device; ``certified`` (B,) bool is True
        where the answer is verified (primal, dual and complementarity residuals within tolerance,
        see :func:`_certify`): SOLVED, or CLOSEST_FEASIBLE with the shift checked too. Where it is
        False the entries are finite but no answer, and the caller re-solves those problems with
        the ALM solver; their ``status`` tells what DAQP found: PRIMAL_INFEASIBLE, DUAL_INFEASIBLE,
        MAX_ITER (iteration limit, cycling, or an answer that missed the tolerance) or
        NUMERICAL_ERROR (anything else, e.g. linearly dependent equality rows).
        ``s_eq`` and ``s_in`` are zero except for CLOSEST_FEASIBLE problems, and ``iterations``
        counts DAQP's active-set iterations (summed over its proximal outer iterations when H is
        singular, and over all solves of a problem: its closest feasible QP, or a retry in its own
        form), plus one for the equality-constrained solve of a least-distance problem.
        ``factor`` is the :class:`LeastDistanceFactor` of the batch's strictly convex problems
        (None when there is none), for the backward.
    """
    # --- alqp.pool: a large CPU batch in contiguous chunks, each the whole engine, on threads ---
    threads = chunk_threads(problem.batch_size, problem.n) if problem.H.device.type == "cpu" else 0
    if threads:
        def solve_rows(start: int, stop: int) -> ActiveSetResult:
            return _solve_batch(problem_rows(problem, start, stop), settings,
                                None if factor is None else factor.rows(start, stop))
        return _concat_results(map_batch_chunks(solve_rows, problem.batch_size, threads), factor, threads)
    # --- end alqp.pool ---
    return _solve_batch(problem, settings, factor)


def _solve_batch(problem: QPProblem, settings: Settings, factor: Optional["LeastDistanceFactor"]
                 ) -> ActiveSetResult:
    """:func:`solve_active_set` on one batch, in the calling thread (its DAQP solves on the pool
    where :func:`alqp.pool.solve_threads` says so)."""
    daqp = _daqp_options(settings, problem.H.dtype)
    host = _to_host(problem)
    answers = _Answers.empty(problem.batch_size, problem.n, problem.p + problem.m)
    ldp = None
    if problem.n > 0:
        ldp = _solve_least_distance(problem, host, factor, daqp, answers)
        # Any miss, an infeasible verdict too, is retried in the problem's own form, on the ladder
        # of tolerances.
        _solve_direct_form(host, np.flatnonzero(~answers.certified), daqp, answers)
    all_certified = bool(answers.certified.all())
    if not all_certified and settings.closest_feasible and problem.n > 0:
        _solve_closest_feasible(host, daqp, answers)
    _settle(answers, daqp.dtype, all_certified)
    solution = _to_solution(problem, answers, daqp.tol)
    device = problem.H.device
    return ActiveSetResult(solution, _device_tensor(answers.certified, torch.bool, device),
                           None if ldp is None else ldp.factor)


def problem_rows(problem: QPProblem, start: int, stop: int) -> QPProblem:
    """Problems ``start:stop`` of a canonical batch, as views (shared tensors stay expanded)."""
    return replace(problem, **{name: t[start:stop] for name, t in problem.tensors().items()})


def _concat_results(parts: list, factor: Optional["LeastDistanceFactor"], threads: int) -> ActiveSetResult:
    """The :class:`ActiveSetResult` of a batch from those of its contiguous chunks, in order;
    ``factor``: the one given to :func:`solve_active_set` (returned as it is where given);
    ``threads``: pool threads for the copies."""
    # (y, z and s_eq, s_in as views of one (B, p+m) tensor each, as the serial engine returns them:
    # the backward's products round by the memory layout of their operands.)
    p = parts[0].solution.y.shape[-1]
    w = torch.cat([torch.cat([part.solution.y, part.solution.z], -1) for part in parts])
    shift = torch.cat([torch.cat([part.solution.s_eq, part.solution.s_in], -1) for part in parts])
    x, status, iterations = (torch.cat([getattr(part.solution, name) for part in parts])
                             for name in ("x", "status", "iterations"))
    solution = QPSolution(x=x, y=w[:, :p], z=w[:, p:], s_eq=shift[:, :p], s_in=shift[:, p:], status=status,
                          iterations=iterations)
    certified = torch.cat([part.certified for part in parts])
    if factor is None:
        factors = [part.factor for part in parts]
        if any(part is not None for part in factors):
            bounds = [0] + list(itertools.accumulate(part.certified.shape[0] for part in parts))
            factor = ChunkedFactor(factors, bounds, threads)
    elif any(part.factor is None for part in parts):
        factor = None  # (n = 0: as the serial engine, which returns no factor then)
    return ActiveSetResult(solution, certified, factor)


def _daqp_options(settings: Settings, dtype: torch.dtype) -> _DaqpOptions:
    """DAQP's solve and options for a batch of ``dtype``, and the certification tolerance."""
    tol = resolve_tolerance(settings, dtype)
    finest = min(t for t in tol if t > 0)
    inner_tol = min(max(_INNER_TOL_FACTOR * finest, _INNER_TOL_MIN), _INNER_TOL_MAX)
    # primal_tol: the violation (of DAQP's normalized rows) beyond which a row enters the active
    # set; DAQP's default 1e-6 would stop on answers that the certification rejects. eta_prox:
    # the proximal iterations of a singular H stop once x moves less than eta_prox / eps_prox,
    # which is also the error of their multipliers (DAQP's default cap: 1e-6).
    return _DaqpOptions(_import_daqp().solve, dict(primal_tol=inner_tol, eta_prox=inner_tol), tol, dtype)


def _to_host(problem: QPProblem) -> _HostBatch:
    """The canonical batch as DAQP's host arrays (:class:`_HostBatch`)."""
    B, p, m = problem.batch_size, problem.p, problem.m
    H = _host(problem.H)
    b = _host(problem.b)
    G = _rows([_host(problem.A), _host(problem.C)], B)
    lo = _rows([b, _host(problem.l)], B)
    hi = _rows([b, _host(problem.u)], B)
    g = _host(problem.g)
    sense = np.zeros(p + m, dtype=np.intc)
    sense[:p] = _DAQP_EQUALITY
    strides = tuple(int(a.shape[0] > 1) for a in (H, g, G, lo, hi))
    return _HostBatch(H, g, G, lo, hi, sense, p, _zero_hessians(H), strides)


def _zero_hessians(H: np.ndarray) -> list:
    """Which of the (B|1,n,n) Hessians are zero (LPs), as a list of bools.

    A strictly convex problem goes to DAQP as a least-distance problem (_LeastDistanceForm).
    An LP (H = 0) goes to DAQP without a Hessian: its LP mode returns exact multipliers, where a
    zero matrix would get the proximal iterations of a singular H, whose multipliers are only good
    to ~eta_prox. Any other H goes as it is, with DAQP's automatic proximal regularization (a
    negative eps_prox, its default): DAQP's own Cholesky factorization of H decides, so only a
    singular one gets the proximal outer iterations. (A zero diagonal first: for a positive
    semi-definite H only a zero H has one, and the test reads n entries instead of n^2; the full
    test confirms it.)
    """
    H_zero = ~np.diagonal(H, axis1=-2, axis2=-1).any(axis=-1)
    if H_zero.any():
        H_zero[H_zero] = ~H[H_zero].reshape(int(H_zero.sum()), -1).any(axis=1)
    return H_zero.tolist()


def _solve_least_distance(problem: QPProblem, host: _HostBatch, factor: Optional["LeastDistanceFactor"],
                          daqp: _DaqpOptions, answers: _Answers) -> "_LeastDistanceForm | None":
    """The strictly convex problems as least-distance problems (:class:`_LeastDistanceForm`): DAQP
    then skips its own factorizations, the most of its time on dense problems. Writes their
    answers, flags, iterations and certification into ``answers``; returns the form (None when no
    problem qualifies)."""
    ldp = _LeastDistanceForm.build(problem, host.H_zero, factor, host.G)
    if ldp is None:
        return None
    idx = np.flatnonzero(ldp.usable)
    x, w, flags, iters = ldp.solve(daqp.solve, idx, daqp.options)
    answers.x[idx], answers.w[idx], answers.flags[idx], answers.iterations[idx] = x, w, flags, iters
    H, g, G, lo, hi = host.select(idx, every=idx.size == answers.x.shape[0])
    ok = flags == _DAQP_OPTIMAL
    answers.certified[idx] = ok & _certify(H, g, G, lo, hi, host.p, _rounded(x, daqp.dtype),
                                           _rounded(w, daqp.dtype), daqp.tol)
    return ldp


def _solve_direct_form(host: _HostBatch, idx: np.ndarray, daqp: _DaqpOptions, answers: _Answers) -> None:
    """Problems ``idx`` in their own form, each on DAQP's tolerance ladder (:func:`_solve_direct`);
    their flag and certification replace the ones in ``answers``, their iterations add up, and an
    optimal answer replaces x and w."""
    for i in idx:
        x, w, flag, its, ok = _solve_direct(daqp.solve, host.problem(i), host.sense, host.p, daqp.options,
                                            daqp.tol, daqp.dtype)
        answers.flags[i], answers.certified[i] = flag, ok
        answers.iterations[i] += its
        if flag == _DAQP_OPTIMAL:
            answers.x[i], answers.w[i] = x, w


def _solve_closest_feasible(host: _HostBatch, daqp: _DaqpOptions, answers: _Answers) -> None:
    """Infeasible problems: the closest feasible QP, in two DAQP solves (see
    :func:`_closest_feasible_ladder`), written into ``answers`` (x, w, shift, ``shifted``, added
    iterations) only where certified.

    DAQP's verdict of dependent equality rows says nothing about feasibility: such rows may be
    inconsistent (a repeated row with another right-hand side, or one that float32's rounding
    tilted by 1e-7, which DAQP calls dependent at its tolerance), so those problems try the closest
    feasible QP too, kept only where the shift is more than round-off (a consistent dependent set
    stays the ALM's to solve).
    """
    flags = answers.flags
    for i in np.flatnonzero((flags == _DAQP_INFEASIBLE) | (flags == _DAQP_DEPENDENT_EQUALITIES)):
        found = _closest_feasible_ladder(daqp.solve, host.problem(i), host.sense, host.p, daqp.options, daqp.tol,
                                         daqp.dtype, require_shift=flags[i] == _DAQP_DEPENDENT_EQUALITIES)
        if found is not None:
            answers.x[i], answers.w[i], answers.shift[i], extra = found
            answers.iterations[i] += extra
            answers.shifted[i] = True


def _settle(answers: _Answers, dtype: torch.dtype, all_certified: bool) -> None:
    """The answers as returned, in place: non-finite ones zeroed and uncertified, x and w rounded
    to ``dtype`` (the values that were certified), the status set and shifted answers counted as
    certified. ``all_certified``: every problem was certified before the closest-feasible phase
    (the common case: every answer is then finite, and nothing is left to shift or recheck)."""
    a = answers
    if all_certified:
        a.x, a.w = _rounded(a.x, dtype), _rounded(a.w, dtype)
        a.status = np.full(a.x.shape[0], int(Status.SOLVED), dtype=np.int64)
        return
    finite = np.isfinite(a.x).all(-1) & np.isfinite(a.w).all(-1) & np.isfinite(a.shift).all(-1)
    a.x[~finite] = 0.0
    a.w[~finite] = 0.0
    a.shift[~finite] = 0.0
    a.shifted &= finite
    # The answer is checked as it is returned: rounded to the input's dtype.
    a.x, a.w = _rounded(a.x, dtype), _rounded(a.w, dtype)
    a.certified &= finite
    # (A shifted answer was certified as it was found, by _closest_feasible_ladder.)
    a.status = _statuses(a.flags, a.certified, a.shifted)
    a.certified = a.certified | a.shifted


def _statuses(flags: np.ndarray, certified: np.ndarray, shifted: np.ndarray) -> np.ndarray:
    """(B,) int64 :class:`Status` values from DAQP's exit flags (B,), the certification (B,) and
    the certified closest-feasible answers (B,)."""
    status = np.full(flags.shape[0], int(Status.NUMERICAL_ERROR), dtype=np.int64)
    for flag, st in _DAQP_STATUS.items():
        status[flags == flag] = int(st)
    status[(flags == _DAQP_OPTIMAL) & ~certified] = int(Status.MAX_ITER)  # DAQP's answer missed the tolerance
    status[certified] = int(Status.SOLVED)
    status[shifted] = int(Status.CLOSEST_FEASIBLE)
    return status


def _to_solution(problem: QPProblem, answers: _Answers, tol: Tolerance) -> QPSolution:
    """The settled answers as a :class:`QPSolution` in the problem's dtype and device."""
    dtype, device = problem.H.dtype, problem.H.device
    p, k = problem.p, answers.w.shape[-1]
    x = _device_tensor(answers.x, dtype, device)
    w = _device_tensor(answers.w, dtype, device)
    shift = torch.zeros(answers.x.shape[0], k, dtype=dtype, device=device)
    if answers.shifted.any():
        # The shift on the rows it really moves and alqp's choice among the shifted rows'
        # multipliers, as the ALM reports them (DAQP's are exact: no refit).
        idx = torch.from_numpy(np.flatnonzero(answers.shifted)).to(device)
        sub = problem.select(idx)
        shift[idx], w[idx] = closest_feasible_output(
            sub.H, sub.g, sub.A, sub.b, sub.C, sub.l, sub.u, x[idx], w[idx],
            torch.from_numpy(answers.shift).to(dtype=dtype, device=device).index_select(0, idx), tol.activity,
            polish=False)
    return QPSolution(
        x=x, y=w[:, :p], z=w[:, p:], s_eq=shift[:, :p], s_in=shift[:, p:],
        status=_device_tensor(answers.status, torch.int64, device),
        iterations=_device_tensor(answers.iterations, torch.int64, device),
    )


def _rounded(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """a (float64) rounded to ``dtype`` and back: the values the caller will get."""
    if dtype == torch.float64:
        return a
    if dtype == torch.float32:  # (numpy rounds as torch does, IEEE nearest-even, without a tensor round trip)
        return a.astype(np.float32).astype(np.float64)
    return torch.from_numpy(a).to(dtype).double().numpy()


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(0, index)`` (t (B, ...), index (B',) long) in t's layout: a batch of
    column-major matrices (LAPACK's factors) stays column-major, so that the products with a
    problem's factor round the same whatever its batch-mates (:mod:`alqp.pool` cuts batches into
    chunks, and a chunk has other batch-mates than the whole batch)."""
    if t.dim() == 3 and not t.is_contiguous() and t.mT.is_contiguous():
        return t.mT.index_select(0, index).mT
    return t.index_select(0, index)


class LeastDistanceFactor(NamedTuple):
    """The factorization behind the least-distance form (:class:`_LeastDistanceForm`), a function
    of H, A and C only. The backward reuses it for its KKT solves
    (:func:`alqp.backward.kkt_solve_factored`). Tensors are float64 on the CPU, with batch size B,
    or 1 when H, A and C are shared by the whole batch.

    Attributes:
        usable: (B,) bool, the problems whose factors below are valid (H safely positive definite,
            equality rows safely independent); the entries of the others are placeholders.
        L: (B,n,n) lower-triangular, H = L L'.
        Mt: (B,n,p+m) L^-1 [A; C]' = [M_A; M_C]' (M_A = A L^-T, M_C = C L^-T).
        S_factor: (B,p,p) lower-triangular Cholesky factor of S = M_A M_A'.
        K: (B,p,m) S^-1 M_A M_C'.
        W: (B,p,m) S_f^-1 M_A M_C' (K = S_f^-T W): with S_factor and the factor of R_J R_J' it makes
            the Cholesky factor of the Gram matrix of the equality and active rows M_J M_J' (the
            backward's KKT solve).
        R: (B,m,n) M_C - K' M_A = M_C P, the inequality rows on the null space of M_A.
        M_C_norm2: (B,m) |M_C,i|^2, the inequality rows' size in H's metric.
        scale: (B,) the largest |entry| of H, A and C.
    """

    usable: Tensor
    L: Tensor
    Mt: Tensor
    S_factor: Tensor
    K: Tensor
    W: Tensor
    R: Tensor
    M_C_norm2: Tensor
    scale: Tensor

    def select(self, index: Tensor, copies: int = 1) -> "LeastDistanceFactor":
        """The factor of problems ``index`` (B',) of the batch, the selection repeated ``copies``
        times along the batch (tensors shared by the batch, of batch size 1, stay shared)."""
        def pick(t: Tensor) -> Tensor:
            if t.shape[0] == 1 and self.usable.shape[0] != 1:
                return t
            chosen = take_rows(t, index.to(t.device))
            return chosen if copies == 1 else torch.cat([chosen] * copies)
        return LeastDistanceFactor(*(pick(t) for t in self))

    def rows(self, start: int, stop: int) -> "LeastDistanceFactor":
        """The factor of problems ``start:stop`` of the batch, as views (tensors shared by the
        batch, of batch size 1, stay shared)."""
        shared = self.usable.shape[0] != 1
        return LeastDistanceFactor(*(t if t.shape[0] == 1 and shared else t[start:stop] for t in self))

    @staticmethod
    def concat(parts: list, sizes: list, threads: int = 1) -> Optional["LeastDistanceFactor"]:
        """The factor of a batch from those of its contiguous chunks, in order.

        Args:
            parts: each chunk's factor, or None where no problem of the chunk qualified (its
                problems then get ``usable`` False and zero placeholders, never read).
            sizes: each chunk's number of problems.
            threads: pool threads for the copies (:func:`alqp.pool.concat_rows`).

        Returns:
            The factor (None when no chunk has one). A tensor that every chunk shares (batch size 1
            against a larger ``usable``: the same factor of the same shared data) stays shared.
        """
        present = [part for part in parts if part is not None]
        if not present:
            return None
        model = present[0]
        fields = []
        for f in range(len(LeastDistanceFactor._fields)):
            if (len(present) == len(parts) and all(part[f].shape[0] == 1 for part in parts)
                    and any(size > 1 for size in sizes)):
                fields.append(model[f])
                continue
            pieces = []
            for part, size in zip(parts, sizes):
                if part is None:
                    pieces.append(torch.zeros_like(model[f][:1]).expand(size, *model[f].shape[1:]))
                else:
                    t = part[f]
                    pieces.append(t.expand(size, *t.shape[1:]) if t.shape[0] != size else t)
            fields.append(concat_rows(pieces, threads))
        return LeastDistanceFactor(*fields)


class ChunkedFactor:
    """The :class:`LeastDistanceFactor` of a batch that :func:`solve_active_set` solved in
    contiguous chunks (:mod:`alqp.pool`), kept as the chunks' own factors: the implicit backward
    cuts the batch into the same chunks and takes each chunk's factor as it is
    (:meth:`rows`), where a concatenation would copy some 60 MB at Table-2 size, batch 256
    (a fifth of the chunked forward's time). It reads like a :class:`LeastDistanceFactor` (its
    fields, :meth:`select`, :meth:`rows`, iteration); any other use concatenates the chunks'
    factors once (:meth:`LeastDistanceFactor.concat`).

    Args:
        parts: each chunk's factor, or None where no problem of the chunk qualified.
        bounds: [0, ..., B], the chunks' first problems and the batch size.
        threads: pool threads for a concatenation.
    """

    _fields = LeastDistanceFactor._fields

    def __init__(self, parts: list, bounds: list, threads: int):
        self.parts, self.bounds, self.threads = list(parts), list(bounds), threads
        self._full: Optional[LeastDistanceFactor] = None

    def full(self) -> LeastDistanceFactor:
        """The batch's factor as one :class:`LeastDistanceFactor` (concatenated at the first call)."""
        if self._full is None:
            sizes = [stop - start for start, stop in zip(self.bounds, self.bounds[1:])]
            self._full = LeastDistanceFactor.concat(self.parts, sizes, self.threads)
        return self._full

    def __getattr__(self, name: str):
        if name in LeastDistanceFactor._fields:
            return getattr(self.full(), name)
        raise AttributeError(name)

    def __iter__(self):
        return iter(self.full())

    def __getitem__(self, item):
        return self.full()[item]

    def __len__(self) -> int:
        return len(LeastDistanceFactor._fields)

    def select(self, index: Tensor, copies: int = 1) -> LeastDistanceFactor:
        """:meth:`LeastDistanceFactor.select` of the batch's factor."""
        return self.full().select(index, copies)

    def rows(self, start: int, stop: int) -> Optional[LeastDistanceFactor]:
        """The factor of problems ``start:stop``: a chunk's own factor where the range is that
        chunk (None where no problem of the chunk qualified), views into one chunk's, else of the
        concatenation."""
        for c, (first, end) in enumerate(zip(self.bounds, self.bounds[1:])):
            if first <= start and stop <= end:
                part = self.parts[c]
                if part is None or (start, stop) == (first, end):
                    return part
                return part.rows(start - first, stop - first)
        return self.full().rows(start, stop)


class _LeastDistanceForm:
    """Strictly convex problems of a batch as least-distance problems, the form DAQP works in.

    DAQP turns every QP into min 1/2 |v|^2 s.t. bounds on M v (a least-distance problem, LDP)
    with its own Cholesky factorization of H and QR-like elimination of the equality rows: plain C
    loops that take most of its time on dense problems. Here the same transformation runs batched
    in torch (BLAS), and DAQP gets an LDP with inequality rows only (no Hessian, no linear term),
    which it solves directly.

    With H = L L' (a positive definite H) and v = L'x + h, h = L^-1 g, the cost is
    1/2 |v|^2 - 1/2 |h|^2 and the rows are G x = M v - M h with M = G L^-T = [M_A; M_C]. The
    equalities M_A v = b~ (b~ = b + M_A h) are removed by v = v_A + u with v_A = M_A' S^-1 b~, the
    smallest v on them (S = M_A M_A', positive definite for independent rows), and u in null(M_A):
    |v|^2 = |v_A|^2 + |u|^2, and the smallest u with R u in bounds, R = M_C P,
    P = I - M_A' S^-1 M_A, lies in range(R') inside null(M_A). So DAQP solves

        min 1/2 |u|^2   s.t.   l - c0 <= R u <= u - c0,   c0 = M_C (v_A - h),

    whose multipliers z satisfy u + R'z = 0. Then x = L^-T (v - h) and y = -S^-1 (b~ + M_A M_C' z)
    (= y_A - K z, y_A = -S^-1 b~, K = S^-1 M_A M_C' of the factor) satisfy
    H x + g + A'y + C'z = L (v + M_A'y + M_C'z) = 0: z is alqp's z unchanged.

    Problems whose H is not positive definite (LPs, singular H), or whose H or equality rows are
    near singular (a Cholesky pivot p_i with p_i^2 below ``_LDP_MIN_PIVOT`` times its diagonal entry,
    scale-free), stay out (``usable`` False) and go to DAQP in their own form, where its proximal
    iterations handle singular Hessians and its own elimination reports dependent equality rows.
    """

    def __init__(self, factor: "LeastDistanceFactor", h, v_A, y_A, lo, hi):
        self.factor, self.h, self.v_A, self.y_A, self.lo, self.hi = factor, h, v_A, y_A, lo, hi
        self.usable = factor.usable.numpy()
        self.R = factor.R.numpy()  # a view: R is C-contiguous

    @classmethod
    def build(cls, problem: QPProblem, H_zero: list, factor: Optional["LeastDistanceFactor"] = None,
              G: Optional[np.ndarray] = None) -> "_LeastDistanceForm | None":
        """The LDP of every problem of ``problem`` (canonical batch), or None when none qualifies.
        ``factor``: the problems' :class:`LeastDistanceFactor` when it is known already (the same H,
        A and C, e.g. the LPGD backward's re-solve), else it is computed (:func:`factorize`, which
        takes ``G``)."""
        if factor is None:
            factor = None if all(H_zero) else factorize(problem, G)
        if factor is None:
            return None
        p = problem.p
        g, b, l, u = (_cpu64(t) for t in (problem.g, problem.b, problem.l, problem.u))
        L, Mt = factor.L, factor.Mt
        M_A, M_C = Mt[..., :p].mT, Mt[..., p:].mT
        h = torch.linalg.solve_triangular(L, g.unsqueeze(-1), upper=False).squeeze(-1)
        y_A = -cholesky_solve_rows(factor.S_factor, b + vm(h, M_A.mT)) if p else b  # -S^-1 b~
        v_A = -vm(y_A, M_A) if p else torch.zeros_like(h)
        c0 = vm(v_A - h, M_C.mT)
        return cls(factor, h, v_A, y_A, (l - c0).numpy(), (u - c0).numpy())

    def solve(self, solve, idx: np.ndarray, options: dict):
        """DAQP on the LDPs of problems ``idx``; returns x (len, n), [y; z] (len, p + m), DAQP's
        exit flags and iterations (numpy). x, y, z are meaningful where the flag is optimal."""
        n = self.h.shape[-1]
        m = self.R.shape[-2]
        sR = int(self.R.shape[0] > 1)
        sense = np.zeros(m, dtype=np.intc)
        u_out = np.zeros((idx.size, n))
        z_out = np.zeros((idx.size, m))
        flags = np.full(idx.size, _DAQP_OPTIMAL, dtype=np.int64)
        # The direct solve of the equality-constrained problem (v_A) counts as one iteration.
        iters = np.ones(idx.size, dtype=np.int64)
        # (The scales of all problems in one pass: per problem, numpy's per-call cost dominated.)
        whole = idx.size == self.lo.shape[0]
        pick = lambda a: a if whole else a[idx]  # noqa: E731
        if m:
            lo, hi = pick(self.lo), pick(self.hi)
            kappas = _ldp_scales(self.R if sR == 0 else pick(self.R), lo, hi)[:, None]
            # (Each problem's bounds over its kappa, and below u and z times it, in one pass each.)
            lo_scaled, hi_scaled = lo / kappas, hi / kappas
        # --- alqp.pool: the solves in chunks, on threads for large batches (each j its own rows) ---
        def solve_chunk(chunk: range) -> None:
            for j in chunk:
                i = idx[j]
                # u = kappa v, z = kappa lam: DAQP solves for v, whose bounds (on its normalized
                # rows) have size one, so that its absolute tolerances are relative ones. (The
                # bounds scale as sqrt of the data's units here: an LDP of data times 1e-12 had
                # bounds of 1e-6 against a primal tolerance of 1e-9.)
                v_j, _, flag, info = solve(None, None, self.R[i * sR], hi_scaled[j], lo_scaled[j], sense, **options)
                flags[j] = flag
                iters[j] += info["iterations"]
                if flag == _DAQP_OPTIMAL:
                    u_out[j] = v_j
                    z_out[j] = info["lam"]

        if m:
            run_chunked(solve_chunk, idx.size, solve_threads(idx.size, n))
            u_out *= kappas
            z_out *= kappas
        # --- end alqp.pool ---
        every = idx.size == self.h.shape[0]
        rows = torch.from_numpy(idx)
        take = lambda t: t if t.shape[0] == 1 or every else take_rows(t, rows)  # noqa: E731
        f = self.factor
        u_t, z_t = torch.from_numpy(u_out), torch.from_numpy(z_out)
        v = take(self.v_A) + u_t
        x = torch.linalg.solve_triangular(take(f.L).mT, (v - take(self.h)).unsqueeze(-1), upper=True).squeeze(-1)
        # y = -S^-1 (b~ + M_A M_C'z) = y_A - K z.
        y = take(self.y_A) - vm(z_t, take(f.K).mT) if f.S_factor.shape[-1] else z_t.new_zeros(idx.size, 0)
        return x.numpy(), torch.cat([y, z_t], -1).numpy(), flags, iters


def _ldp_scales(R: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(B,) the size of each least-distance problem lo <= R u <= hi (R (B|1,m,n), lo, hi (B,m)):
    the largest finite bound over its row's norm (the distance of that bound's hyperplane from 0),
    1 when there is none."""
    norms = np.sqrt(np.einsum("bij,bij->bi", R, R))
    bound = np.maximum(np.where(np.isfinite(lo), np.abs(lo), 0.0), np.where(np.isfinite(hi), np.abs(hi), 0.0))
    ratio = np.where(norms > 0, bound / np.where(norms > 0, norms, 1.0), 0.0)
    kappa = ratio.max(axis=-1, initial=0.0)
    return np.where((kappa > 0) & np.isfinite(kappa), kappa, 1.0)


def factorize(problem: QPProblem, G: Optional[np.ndarray] = None) -> Optional[LeastDistanceFactor]:
    """The :class:`LeastDistanceFactor` of a canonical batch (a function of H, A and C only), or
    None when no problem qualifies for the least-distance form. H, A and C shared by the whole
    batch (batch stride 0) are factored once. ``G``: [A; C] where the caller has it already, as
    :func:`solve_active_set`'s host array (float64, batch size B, or 1 for shared A and C);
    None: concatenated here."""
    f64 = dict(dtype=torch.float64, device="cpu")
    B, n, p = problem.batch_size, problem.n, problem.p
    shared = all(t.shape[0] == 1 or t.stride(0) == 0 for t in (problem.H, problem.A, problem.C))
    first = (lambda t: t[:1]) if shared else (lambda t: t)  # noqa: E731
    H, A, C = (_cpu64(first(t)) for t in (problem.H, problem.A, problem.C))

    # (usable and the pivot tests on numpy views: a few small vectors, where torch's per-call cost
    # would dominate at batch 1.)
    # H.mT: the same matrix (a canonical H is symmetric bit for bit, canonicalize's (H + H')/2)
    # already in LAPACK's column-major layout, so torch skips its transposing copy of the batch.
    L, info = torch.linalg.cholesky_ex(H.mT)
    usable = (info.numpy() == 0) & _pivots_fine(L, H)
    if not usable.any():
        return None
    if not usable.all():
        # (In place: LAPACK's column-major layout stays, so that a problem's factor, and every
        # product with it, rounds the same whatever its batch-mates: alqp.pool cuts batches.)
        L[torch.from_numpy(~usable)] = torch.eye(n, **f64)
    # (A host G of batch size 1 broadcasts against a batched L.)
    G = torch.cat([A, C], -2) if G is None else torch.from_numpy(G)
    Mt = torch.linalg.solve_triangular(L, G.mT, upper=False)  # L^-1 [A; C]'
    M_A, M_C = Mt[..., :p].mT, Mt[..., p:].mT
    # R's buffer holds M_C's squares first (for |M_C,i|^2), then R itself, computed in place: one
    # fresh (B,m,n) buffer instead of two (each costs its page faults at every call).
    R = torch.empty(M_C.shape, dtype=M_C.dtype)
    M_C_norm2 = torch.square(M_C, out=R).sum(-1)
    R.copy_(M_C)
    if p:
        S = torch.bmm(M_A, M_A.mT)
        S_factor, info_s = torch.linalg.cholesky_ex(S)
        usable &= (info_s.numpy() == 0) & _pivots_fine(S_factor, S)
        if not usable.all():
            S_factor[torch.from_numpy(~usable)] = torch.eye(p, **f64)  # (in place: as L's)
        # W = S_f^-1 M_A M_C' and K = S_f^-T W (p, m): two triangular solves (torch.cholesky_solve
        # copies the factor, and W is kept for the backward).
        W = torch.linalg.solve_triangular(S_factor, torch.bmm(M_A, M_C.mT), upper=False)
        K = torch.linalg.solve_triangular(S_factor.mT, W, upper=True)
        R.baddbmm_(K.mT, M_A, alpha=-1.0)  # M_C - K'M_A = M_C P
    else:
        S_factor = L.new_zeros(L.shape[0], 0, 0)
        K = W = L.new_zeros(L.shape[0], 0, C.shape[-2])
    # |H_ij| <= max_i H_ii for a positive definite H: its scale without a pass over H.
    # (max |G| as max(max G, -min G): one fused min/max pass, no |G| temporary of the batch.)
    if G.shape[-2] * G.shape[-1]:
        G_low, G_high = torch.aminmax(G.reshape(G.shape[0], -1), dim=-1)
        G_size = np.maximum(G_high.numpy(), -G_low.numpy())
    else:
        G_size = np.zeros(G.shape[0])
    scale = torch.from_numpy(np.maximum(H.diagonal(dim1=-2, dim2=-1).numpy().max(-1, initial=0.0), G_size))
    usable = torch.from_numpy(usable)
    return LeastDistanceFactor(usable.expand(B) if shared else usable, L, Mt, S_factor, K, W,
                               R, M_C_norm2, scale)


def _pivots_fine(F: Tensor, K: Tensor) -> np.ndarray:
    """(B,) True where every pivot F_ii of the Cholesky factor F of K has F_ii^2 >= _LDP_MIN_PIVOT K_ii:
    no row of K is that close to the span of the ones before it (a scale-free test)."""
    if K.shape[-1] == 0:
        return np.ones(K.shape[0], dtype=bool)
    pivot = F.diagonal(dim1=-2, dim2=-1).numpy()
    return (pivot * pivot >= _LDP_MIN_PIVOT * K.diagonal(dim1=-2, dim2=-1).numpy()).all(-1)


def _closest_feasible_ladder(solve, data: tuple, sense: np.ndarray, p: int, options: dict, tol: Tolerance,
                             dtype: torch.dtype, require_shift: bool = False):
    """The closest feasible QP of one infeasible problem in two DAQP phases: the least-squares
    shift s (:func:`_least_squares_shift`), then the QP on the shifted bounds lo + s, hi + s
    (:func:`_shifted_qp`). Phase 1 runs on DAQP's ladder of primal tolerances (its own, then looser,
    then tighter), phase 2 on its own ladder after each (:func:`_phase2_ladder`): the first
    answer, rounded to ``dtype``, that its certification (on the shifted QP, and the shift's
    optimality, at :meth:`Tolerance.closest_feasible`) accepts, or None. (The
    two phases are sensitive to that tolerance: on the multi-block families of tests/families.py
    one in ten problems failed at 1e-10 and solved at 1e-9, and others the other way round.) A
    shifted set whose equality rows are dependent (DAQP's flag -6) fails every try, and the ALM
    takes the problem over.

    Args:
        data: (H (n,n) or None for an LP, g (n,), G (k,n) = [A; C], lo, hi (k,)), float64 numpy.
        sense: DAQP's row flags (k,).  p: the number of equality rows.  options: DAQP's options.
        tol: the problem's certification tolerance.  dtype: the dtype the answer is returned in.
        require_shift: return None where the least-squares shift is within the primal tolerance
            of zero (the problem is feasible as far as that tolerance tells).

    Returns:
        (x (n,), multipliers (k,), shift (k,), active-set iterations of all tries) or None.
    """
    H, g, G, lo, hi = data
    base = options["primal_tol"]
    loose = tol.closest_feasible()
    iterations = 0
    Hc = H[None] if H is not None else np.zeros((1, G.shape[1], G.shape[1]))
    t = torch.from_numpy
    for primal_tol in [base] + _ladder(base, "looser", "tighter"):
        phase_options = dict(options, primal_tol=primal_tol)
        shift, its = _least_squares_shift(solve, G, lo, hi, sense, phase_options)
        iterations += its
        if shift is None:
            continue
        if require_shift:
            # (The bounds' size is that of G x on the rows that hold them: the primal residual's.)
            bounds = np.concatenate([lo[np.isfinite(lo)], hi[np.isfinite(hi)]])
            size = float(np.abs(bounds).max(initial=0.0))
            if float(np.abs(shift).max(initial=0.0)) <= tol.abs + tol.rel * size:
                return None
        # Phase 2 on its own ladder, from the phase-1 tolerance upwards (see _PHASE2_LADDER).
        for phase2_tol in _phase2_ladder(primal_tol):
            x, w, flag, its = _shifted_qp(solve, H, g, G, lo + shift, hi + shift, sense,
                                          dict(options, primal_tol=phase2_tol))
            iterations += its
            if flag == _DAQP_INFEASIBLE:
                continue
            if flag != _DAQP_OPTIMAL:
                break  # (e.g. dependent equality rows: no tolerance changes that)
            x, w = _rounded(x[None], dtype), _rounded(np.asarray(w)[None], dtype)
            ok = (_certify(Hc, g[None], G[None], lo[None] + shift, hi[None] + shift, p, x, w, loose)[0]
                  and bool(shift_optimal(t(G[None]), t(lo[None]), t(hi[None]), t(x), t(shift[None]), loose)[0]))
            if ok:
                return x[0], w[0], shift, iterations
    return None


# The shifted QP of phase 2 is feasible only on the boundary: every shifted row is active at every
# feasible point (its violation there equals the unique least-squares shift), and the shifted rows
# are dependent, so the set they leave has no interior. The shift of phase 1 is exact only to
# round-off (1e-13 relative), so at a primal tolerance below that DAQP may call the shifted QP
# infeasible (issue 17: 2 of 16 'free' multi-block problems, at every tolerance of the ladder).
# Phase 2 then retries at looser tolerances: DAQP's answer stays exact on the rows it holds
# active (an equality-constrained solve), and the certification on the shifted QP still judges it.
_PHASE2_LADDER = (1.0, 1e1, 1e2, 1e3, 1e4)


def _phase2_ladder(primal_tol: float) -> list:
    """The primal tolerances phase 2 tries after a phase 1 at ``primal_tol``, each once, within
    [_INNER_TOL_MIN, _INNER_TOL_MAX]."""
    steps = [min(max(primal_tol * f, _INNER_TOL_MIN), _INNER_TOL_MAX) for f in _PHASE2_LADDER]
    return list(dict.fromkeys(steps))


def _least_squares_shift(solve, G, lo, hi, sense, options):
    """Phase 1: the least-squares shift s (k,) of the rows lo <= G x <= hi (G (k,n)), min 1/2 |s|^2
    over (x, s) with lo <= G x - s <= hi (DAQP's proximal iterations handle the Hessian that is
    singular in x), and DAQP's iterations; s is None where DAQP fails."""
    k, n = G.shape
    H1 = np.zeros((n + k, n + k))
    H1[n:, n:] = np.eye(k)
    G1 = np.concatenate([G, -np.eye(k)], axis=1)
    xs, _, flag, info = solve(H1, np.zeros(n + k), G1, hi, lo, sense, **options)
    return (xs[n:] if flag == _DAQP_OPTIMAL else None), info["iterations"]


def _shifted_qp(solve, H, g, G, lo, hi, sense, options):
    """Phase 2: the QP on the shifted bounds; returns x (n,), multipliers (k,), DAQP's flag and
    iterations."""
    x, _, flag, info = solve(H, g, G, hi, lo, sense, **options)
    return x, info["lam"], flag, info["iterations"]


def _certify(H: np.ndarray, g: np.ndarray, G: np.ndarray, lo: np.ndarray, hi: np.ndarray, p: int,
             x: np.ndarray, w: np.ndarray, tol: Tolerance) -> np.ndarray:
    """(B,) True where (x, w = [y; z]) meets ``tol`` on the problem: :mod:`alqp.certify`'s primal,
    dual and duality-gap residuals, on host arrays (float64, batched (B, ...) or shared (leading
    dimension 1); torch views of them, no copies)."""
    t = torch.from_numpy
    return residuals(t(H), t(g), t(G), t(lo), t(hi), p, t(x), t(w)).meets(tol).numpy()


def _solve_direct(solve, data: tuple, sense: np.ndarray, p: int, options: dict, tol: Tolerance,
                  dtype: torch.dtype) -> tuple:
    """One problem in its own form, (H or None for an LP, g, G, lo, hi), on DAQP's tolerance
    ladder: a certified answer ends it; an answer that misses the tolerance is retried with a
    tighter primal tolerance, an infeasible verdict with a looser one (DAQP's feasibility test at a
    tolerance near round-off can fail on a feasible problem). The data go to DAQP scaled
    (:func:`_direct_scaling`), so that its absolute tolerances mean the same at every scale.

    Returns:
        x (n,), w (k,), DAQP's flag of the answer kept, its iterations summed over the tries, and
        whether that answer is certified (on the unscaled data, as rounded to ``dtype``).
    """
    H, g, G, lo, hi = data
    Hs, gs, Gs, los, his, cost, rows = _direct_scaling(H, g, G, lo, hi)
    base = options["primal_tol"]
    iterations = 0
    first = None
    tries = [base]
    while tries:
        primal_tol = tries.pop(0)
        x, _, flag, info = solve(Hs, gs, Gs, his, los, sense, **dict(options, primal_tol=primal_tol))
        iterations += info["iterations"]
        ok = False
        if flag == _DAQP_OPTIMAL:
            x = _rounded(x[None], dtype)[0]
            w = _rounded((np.asarray(info["lam"]) * cost / rows)[None], dtype)[0]
            ok = bool(_certify(H[None] if H is not None else np.zeros((1,) + 2 * x.shape), g[None], G[None],
                               lo[None], hi[None], p, x[None], w[None], tol)[0]) and np.isfinite(w).all()
        answer = (x, w, flag) if flag == _DAQP_OPTIMAL else (None, None, flag)
        if first is None or ok:
            first = answer
        if ok:
            return x, w, flag, iterations, True
        if primal_tol == base:  # the ladder's direction is set by the first verdict
            side = "looser" if flag == _DAQP_INFEASIBLE else "tighter" if flag == _DAQP_OPTIMAL else None
            if side is not None:
                tries = _ladder(base, side)
    x, w, flag = first
    return x, w, flag, iterations, False


def _direct_scaling(H, g, G, lo, hi):
    """The problem as DAQP gets it in its own form: the cost divided by its size (H and g by
    max(|H|, |g|)) and each row by its largest entry, so that DAQP's absolute tolerances act on
    quantities of size one whatever the data's units (x is unchanged; the multipliers are
    w = lam * cost / rows).

    Returns:
        H, g, G, lo, hi scaled, and the factors ``cost`` (float) and ``rows`` (k,)."""
    cost = max(np.abs(H).max(initial=0.0) if H is not None else 0.0, np.abs(g).max(initial=0.0))
    cost = cost if cost > 0 else 1.0
    rows = np.abs(G).max(axis=-1, initial=0.0)
    rows = np.where(rows > 0, rows, 1.0)
    return (None if H is None else H / cost, g / cost, G / rows[:, None], lo / rows, hi / rows, cost, rows)
