"""The forward solver: a batched proximal augmented-Lagrangian method (ProxQP family).

Read top to bottom: :func:`solve_problem_factored` picks the engine and sends what the active-set
engine does not certify to the ALM; :func:`solve_alm` runs the outer loop (docs/design.md section
3.1) as a sequence of phases, each a function of the typed working set :class:`_Work` (data, bounds,
iterate, penalties, progress, factorization): :func:`_measure` the residuals,
:func:`_infeasibility_signs` and :func:`_track_progress`, :func:`_undo_wrong_shifts`,
:func:`_decide_status`, :func:`_reshift` and :func:`_retire`, :func:`_inner_solve` (the proximal
augmented Lagrangian minimized by semi-smooth Newton steps, :func:`_newton_inner`, with an exact
line search, :func:`_exact_line_search`) and :func:`_update_penalties` (multiplier updates and the
BCL penalty schedule). Every problem of the batch steps in lock-step through tensor operations; a
problem whose status is decided leaves the working set, so the batch shrinks as it converges.

All iterates live in the scaled space of :func:`alqp.problem.ruiz_equilibrate`; residuals used for
stopping are measured in the caller's units.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from torch import Tensor

from alqp.activity import closest_feasible_output, polish_multipliers
from alqp.certify import Residuals, Tolerance, measure, resolve_tolerance, roundoff_floor, shift_optimal, solution_meets
from alqp.certify import residuals as certify_residuals
from alqp.linalg import cholesky_solve_rows, inf_norm, project_out_row_range, vm
from alqp.problem import QPProblem, ruiz_equilibrate
from alqp.settings import Settings
from alqp.types import QPSolution, Status, has_solution, unbatch  # noqa: F401  (unbatch: re-exported)

if TYPE_CHECKING:  # active_set imports numpy and daqp: only when the engine runs
    from alqp.active_set import LeastDistanceFactor


def _batched_warm_start(warm_start, problem: QPProblem):
    """(x, y, z) of a warm start, broadcast to the batch, or None."""
    if warm_start is None:
        return None
    x, y, z = warm_start[0], warm_start[1], warm_start[2]
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    out = []
    for name, t, k in (("x", x, n), ("y", y, p), ("z", z, m)):
        if not isinstance(t, Tensor):
            raise TypeError(f"warm_start.{name} must be a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to(dtype=problem.H.dtype, device=problem.H.device)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[-1] != k or t.shape[0] not in (1, B):
            raise ValueError(f"warm_start.{name} must have shape ({B},{k}) or ({k},), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"warm_start.{name} contains NaN or Inf")
        out.append(t.expand(B, k))
    return out


#: How far above its tolerance a feasible iterate's dual residual may be for _polish_multipliers to try a refit.
REFIT_WINDOW = 1e3


def auto_engine(problem: QPProblem) -> str:
    """The engine ``Settings(engine="auto")`` picks: the active-set engine for CPU tensors when
    its dependency (daqp) imports, else the ALM."""
    if problem.H.device.type != "cpu":
        return "alm"
    try:
        import daqp  # noqa: F401
    except ImportError:
        return "alm"
    return "active_set"


def solve_problem_factored(problem: QPProblem, settings: Settings, warm_start=None,
                           factor: Optional["LeastDistanceFactor"] = None, fast_path: bool = True
                           ) -> tuple[QPSolution, Optional["LeastDistanceFactor"]]:
    """Solve a canonical batch (every tensor with its batch dimension); no autograd.

    With the active-set engine (``Settings.engine``), the problems it does not certify as
    SOLVED (infeasible, unbounded, dependent equality rows, a tolerance missed) are re-solved by
    the ALM, so every status means what it means for the ALM.

    Args:
        problem: :class:`QPProblem` from :func:`alqp.problem.canonicalize`.
        settings: :class:`Settings`.
        warm_start: None, a :class:`QPSolution` or a tuple (x, y, z) in the caller's units (the
            ALM's; the active-set engine starts cold).
        factor: see below.
        fast_path: whether :mod:`alqp.small` may answer first (False where the caller's host lane
            has tried this very batch already and it needs the general path).

    Returns:
        The batched :class:`QPSolution`, and the factorization of the batch's strictly convex problems that
    the active-set engine computed on the way (:class:`alqp.active_set.LeastDistanceFactor`, a
    function of H, A and C only; None on the ALM engine or when no problem is strictly convex),
    which the implicit backward reuses. A ``factor`` given (of the same H, A and C: the LPGD
    backward's re-solve) is used instead of computing it.

    The failed problems of either engine go through :func:`report_non_convex`."""
    engine = auto_engine(problem) if settings.engine == "auto" else settings.engine
    if engine == "active_set":
        # --- alqp.small: per-call fast path for small CPU batches (None: not taken) ---
        if fast_path and warm_start is None and factor is None:
            from alqp.small import solve_small
            fast = solve_small(problem, settings)
            if fast is not None:
                return fast, None
        # --- end alqp.small ---
        from alqp.active_set import solve_active_set  # numpy and daqp only when used
        ws = _batched_warm_start(warm_start, problem)  # (validated even where it is not needed)
        solution, certified, factor = solve_active_set(problem, settings, factor)
        if bool(certified.all()):
            return solution, factor
        rest = (~certified).nonzero().squeeze(-1)
        ws = None if ws is None else [t.index_select(0, rest) for t in ws]
        fallback = _solve_alm_certified(problem.select(rest), settings, ws)
        solution = QPSolution(*(t.index_copy(0, rest, f) for t, f in zip(solution, fallback)))
        return report_non_convex(problem, solution), factor
    return report_non_convex(problem, _solve_alm_certified(problem, settings, warm_start)), None


def _solve_alm_certified(problem: QPProblem, settings: Settings, warm_start=None) -> QPSolution:
    """The ALM on a canonical batch, its answers certified as the caller gets them
    (:func:`_certified`); in a dtype below float64, the problems it could not certify and its
    closest-feasible ones are solved again in float64 and certified, rounded, in their own dtype
    (the ALM's multipliers, residuals over the penalty, lose the digits float32 has at the penalty
    floor of an infeasible QP: a float32 closest-feasible x was off by 2e-2). The float64 solve
    takes rows as dependent at the data's precision (``data_dtype``): without that, 6 of the 8
    float32-rounded copies of the test family infeasible_ineq stalled or ran out of iterations."""
    solution = _solve_alm_with_retries(problem, settings, warm_start)
    if problem.H.dtype == torch.float64:
        return solution
    status = solution.status
    certain = (status == int(Status.PRIMAL_INFEASIBLE)) | (status == int(Status.DUAL_INFEASIBLE))
    retry = (~has_solution(status) & ~certain) | (status == int(Status.CLOSEST_FEASIBLE))
    if not bool(retry.any()):
        return solution
    idx = retry.nonzero().squeeze(-1)
    sub = problem.select(idx)
    wide = replace(sub, **{name: t.double() for name, t in sub.tensors().items()})
    again = solve_alm(wide, settings, data_dtype=problem.H.dtype)
    again = QPSolution(*(t.to(problem.H.dtype) for t in again[:5]), again.status, again.iterations)
    again = _certified(sub, again, settings)
    # (A float32 closest-feasible answer is replaced whatever the float64 one's status: it was
    # not trusted.)
    better = has_solution(again.status) | (status[idx] == int(Status.CLOSEST_FEASIBLE))
    if not bool(better.any()):
        return solution
    keep = idx[better]
    return QPSolution(*(t.index_copy(0, keep, a[better]) for t, a in zip(solution, again)))


#: The second chances of a problem that closest-feasible mode leaves without a solution, tried in
#: order on the problems still without one: (closest_feasible, factor on Settings.rho).
RETRY_LADDER = ((False, 1.0), (True, 1e-2), (False, 1e-2))


def _solve_alm_with_retries(problem: QPProblem, settings: Settings, warm_start=None) -> QPSolution:
    """The ALM on a canonical batch, certified (:func:`_certified`), with second chances
    (:data:`RETRY_LADDER`) for the problems that closest-feasible mode leaves without a solution.

    - Rows equilibrated: closest-feasible mode leaves the rows unscaled (a row scaling would change
      the metric in which the shift is the least-squares one), and on badly scaled feasible QPs
      that costs the ALM its accuracy: Maros-Meszaros PRIMALC1 and PRIMALC2 stall and PRIMALC5
      ends wrongly unbounded with unscaled rows; all three solve in 12 to 80 Newton steps with them.
    - A proximal weight 100 times smaller: the weight keeps every Newton system positive definite,
      and it also damps each step toward the previous iterate; on degenerate LP-like problems the
      outer loop then drifts at its round-off floor. QBEACONF and QBORE3D (rows unscaled) and
      QSCAGR7 and QSHARE1B (rows equilibrated) stall at rho = 1e-6 and solve at 1e-8.

    A feasible QP's solution depends on neither, so each retry, from a cold start, replaces the
    answer only where it is SOLVED; ``iterations`` counts the work of every solve. The retries run
    only in closest-feasible mode (the default), and cost time only on problems that fail.

    Returns:
        :class:`QPSolution`, batched, certified.
    """
    solution = _certified(problem, solve_alm(problem, settings, warm_start), settings)
    if not settings.closest_feasible:
        return solution
    for closest_feasible, rho_factor in RETRY_LADDER:
        retry = ~has_solution(solution.status)
        if not bool(retry.any()):
            break
        idx = retry.nonzero().squeeze(-1)
        sub = problem.select(idx)
        step = replace(settings, closest_feasible=closest_feasible, rho=settings.rho * rho_factor)
        again = _certified(sub, solve_alm(sub, step), settings)
        better = again.status == int(Status.SOLVED)
        iterations = solution.iterations.index_add(0, idx, again.iterations)
        keep = idx[better]
        solution = QPSolution(*(t.index_copy(0, keep, a[better]) for t, a in zip(solution[:6], again[:6])),
                              iterations)
    return solution


def _certified(problem: QPProblem, solution: QPSolution, settings: Settings) -> QPSolution:
    """The ALM's answers as the caller gets them, re-checked by :func:`alqp.certify.solution_meets`
    (the ALM stops on the same residuals, but its answer is then unscaled, rounded and, for a
    closest-feasible QP, given alqp's choice of multipliers): a SOLVED or CLOSEST_FEASIBLE answer
    that misses the tolerance becomes INACCURATE where round-off explains it, else MAX_ITER."""
    tol = resolve_tolerance(settings, problem.H.dtype)
    ok = solution_meets(problem, solution, tol)
    wrong = has_solution(solution.status) & ~ok
    if not bool(wrong.any()):
        return solution
    status = torch.where(wrong, int(Status.MAX_ITER), solution.status)
    _mark_inaccurate(problem, solution.x, torch.cat([solution.y, solution.z], -1), status, problem.H.dtype)
    return solution._replace(status=status)


def report_non_convex(problem: QPProblem, solution: QPSolution) -> QPSolution:
    """Tell non-convexity where it is the cause of a failed solve; keep failed answers finite.

    Both engines assume H positive semi-definite: on an indefinite H the ALM's Newton matrix is
    indefinite (a factorization fails) or its iterates diverge, and DAQP's factorization fails,
    so the status they report (NUMERICAL_ERROR, DUAL_INFEASIBLE, MAX_ITER, ...) hides the cause.
    A problem that failed (status without a solution, :func:`alqp.settings.has_solution`, except
    PRIMAL_INFEASIBLE: a statement about the constraints that H does not change) is reported
    NON_CONVEX where the smallest eigenvalue of its symmetrized H lies below
    ``-100 n eps |lambda|_max`` (eps of the problem's dtype), with a RuntimeWarning naming H, the
    problems and the estimates of their most negative eigenvalues; its x, y, z and shift are
    returned as zeros. The eigenvalues are those of the failed problems only (failures are rare:
    one batched eigvalsh of them, in float64). A problem that a certified KKT point solves keeps
    its status, however indefinite its H.

    Every other failed answer keeps its last iterate, except that a problem with a NaN or Inf in
    its outputs gets zeros there too (no finite iterate is at hand).

    Returns:
        ``solution``, with those problems' statuses and outputs changed.
    """
    status = solution.status
    failed = ~has_solution(status) & (status != int(Status.PRIMAL_INFEASIBLE))
    if not bool(failed.any()):
        return solution
    index = failed.nonzero().squeeze(-1)
    H = problem.H.index_select(0, index).to(torch.float64)
    lam = torch.linalg.eigvalsh(0.5 * (H + H.mT)) if H.shape[-1] else H.new_zeros(index.numel(), 1)
    lam_min, lam_size = lam[:, 0], lam.abs().amax(-1)
    # The eigenvalues of H as the caller holds it are known to about n eps |H| (eps of its dtype):
    # that is the size both of the eigensolver's backward error and of the negative eigenvalues
    # that rounding leaves in a PSD H formed in that dtype (e.g. H = L L' summed over n terms).
    # The factor 100 keeps such round-off from being called non-convexity; an indefiniteness
    # smaller than that is not what broke a solve whose Newton matrices carry rho >= 1e-6 anyway.
    tol = 100 * problem.n * torch.finfo(problem.H.dtype).eps
    negative = lam_min < -tol * lam_size
    nonfinite = failed & ~torch.stack([torch.isfinite(t).all(-1) if t.shape[-1] else torch.ones_like(failed)
                                       for t in solution[:5]]).all(0)
    if not bool(negative.any()) and not bool(nonfinite.any()):
        return solution
    non_convex = torch.zeros_like(failed)
    non_convex[index[negative]] = True
    if bool(negative.any()):
        shown = index[negative][:8].tolist()
        estimates = ", ".join(f"{v:.3g}" for v in lam_min[negative][:8].tolist())
        more = f" and {int(negative.sum()) - len(shown)} more" if int(negative.sum()) > len(shown) else ""
        warnings.warn(f"alqp: H is not positive semi-definite in {int(negative.sum())} problem(s) of the batch "
                      f"(indices {shown}{more}): most negative eigenvalue estimate(s) {estimates} "
                      f"(largest |eigenvalue| {float(lam_size[negative].max()):.3g}); their solves failed, status "
                      "NON_CONVEX, outputs zero. alqp solves convex QPs: make H positive semi-definite "
                      "(e.g. H = L L' + delta I).", RuntimeWarning, stacklevel=3)
    zero = (non_convex | nonfinite).unsqueeze(-1)
    outputs = [torch.where(zero, torch.zeros_like(t), t) for t in solution[:5]]
    status = torch.where(non_convex, int(Status.NON_CONVEX), status)
    return QPSolution(*outputs, status, solution.iterations)

# --- The ALM's state -------------------------------------------------------------------------------
# The working set is the undecided problems, all their tensors indexed alike along dim 0. The
# constraints are stacked as rows G = [A; C] (k = p + m) with bounds lo <= G x <= hi, an equality row
# having lo = hi = b, so that one code path serves both kinds; ``is_eq`` (k,) tells them apart where
# the penalty or the line search must.


class _Rows:
    """A dataclass of batched tensors (batch along dim 0) that can be narrowed to some problems."""

    def select(self, index: Tensor):
        """A copy holding the problems ``index`` (a (b,) int64 index into the batch)."""
        # (index_select: on CPU several times faster than t[index] on (B,n,n) tensors.)
        return type(self)(**{f.name: getattr(self, f.name).index_select(0, index) for f in fields(self)})


@dataclass
class _Data(_Rows):
    """The working problems in the scaled space of :func:`alqp.problem.ruiz_equilibrate`; fixed while they run."""

    H: Tensor  # (B,n,n)
    g: Tensor  # (B,n)
    G: Tensor  # (B,k,n) [A; C]
    GT: Tensor  # (B,n,k) G', contiguous
    absG: Tensor  # (B,k,n) |G|
    absGT: Tensor  # (B,n,k) |G|'
    D: Tensor  # (B,n) column scaling: x (caller units) = D x (scaled)
    R: Tensor  # (B,k) row scaling: G = diag(R) [A; C] diag(D)
    c: Tensor  # (B,) cost scaling
    index: Tensor  # (B,) int64: each problem's position in the caller's batch
    bound_col: Tensor  # (B,m) int64 (bound_rows only): the column of C_i's one nonzero
    bound_val2: Tensor  # (B,m) (bound_rows only): that nonzero squared


@dataclass
class _Bounds(_Rows):
    """The row bounds the working problems are solved with: their own, or those of their closest feasible QP."""

    lo: Tensor  # (B,k) [b; l] + shift
    hi: Tensor  # (B,k) [b; u] + shift
    shift: Tensor  # (B,k) the closest-feasible shift taken so far (scaled), already in lo and hi


@dataclass
class _Iterate(_Rows):
    """The primal iterate and the multipliers."""

    x: Tensor  # (B,n)
    mult: Tensor  # (B,k) the accepted multipliers [y; z], centres of the proximal terms
    mult_cur: Tensor  # (B,k) the multipliers implied by x (equal to mult once converged)


def _bcl_start(count: int, like: Tensor, settings: Settings) -> dict:
    """The BCL schedule's starting values for ``count`` problems (dtype and device of ``like``)."""
    one = like.new_ones(count)
    return dict(
        mu_eq=one * settings.mu_eq, mu_in=one * settings.mu_in,
        eta_ext=one * 1e-1 * settings.mu_in ** 0.1,  # BCL target on the primal residual
        eta_in=one,  # inner (Newton) tolerance
    )


@dataclass
class _Penalties(_Rows):
    """The penalty parameters of the proximal augmented Lagrangian and the BCL targets, (B,) each."""

    mu_eq: Tensor
    mu_in: Tensor
    eta_ext: Tensor  # BCL target on the primal residual
    eta_in: Tensor  # inner (Newton) tolerance on the gradient
    # The proximal weight: settings.rho, raised for a problem whose H + rho I is not positive
    # definite (a slightly indefinite H), so that its inner problems stay strongly convex.
    rho: Tensor

    def restart(self, index: Tensor, settings: Settings) -> None:
        """Put the problems ``index`` back at the start of the BCL schedule (in place; rho stays)."""
        for name, v in _bcl_start(index.numel(), self.rho, settings).items():
            getattr(self, name)[index] = v

    def at_floor(self, mu_min: float) -> Tensor:
        """(B,) True where both penalties have reached mu_min (up to its rounding)."""
        return (self.mu_eq <= mu_min * 1.0001) & (self.mu_in <= mu_min * 1.0001)


@dataclass
class _Progress(_Rows):
    """Where each working problem stands: answered or not, iterations, and the stall guard."""

    done: Tensor  # (B,) bool: answered, left in until a compaction
    iterations: Tensor  # (B,) int64 Newton steps so far
    primal_prev: Tensor  # (B,) primal residual one outer iteration ago
    # The best residuals (primal, dual, closest-feasible) so far, (B,3), and the outer iterations
    # since one of them last halved (or the penalties or the shift changed), (B,).
    best: Tensor
    since_progress: Tensor


@dataclass
class _Factorization(_Rows):
    """The Cholesky factor of the last Newton matrix and what it was built for: while the active set
    and the penalties stay, Newton steps reuse it."""

    factor: Tensor  # (B,n,n) lower triangular
    factor_rows: Tensor  # (B,k) bool: the rows in that matrix
    factor_mu: Tensor  # (B,2) its (mu_eq, mu_in)
    factor_valid: Tensor  # (B,) bool
    # The part of the Newton matrix that only the equality penalty changes, H + rho I + A'A / mu_eq,
    # (B,n,n), and the mu_eq it holds (B,) (nan: not built yet).
    newton_eq: Tensor
    newton_eq_mu: Tensor

    def fits(self, rows: Tensor, mu_pair: Tensor) -> Tensor:
        """(B,) True where the factor is of the Newton matrix with these rows (B,k) and penalties (B,2)."""
        return self.factor_valid & (self.factor_rows == rows).all(-1) & (self.factor_mu == mu_pair).all(-1)

    def put(self, index: Tensor, part: "_Factorization") -> None:
        """Write ``part`` (the factorizations of the problems ``index``) back, in place."""
        for f in fields(self):
            getattr(self, f.name).index_copy_(0, index, getattr(part, f.name))


@dataclass
class _Work:
    """The working set: the undecided problems, their data, iterates and solver state."""

    data: _Data
    bounds: _Bounds
    it: _Iterate
    pen: _Penalties
    prog: _Progress
    fac: _Factorization

    def keep(self, mask: Tensor) -> "_Work":
        """A copy holding the problems where ``mask`` (B,) is True."""
        index = mask.nonzero().squeeze(-1)
        return _Work(*(getattr(self, f.name).select(index) for f in fields(self)))


class _Setup(NamedTuple):
    """What the outer iterations share and never change."""

    problem: QPProblem  # the caller's canonical batch
    settings: Settings
    tol: Tolerance
    mu_min: float
    p: int
    k: int
    is_eq: Tensor  # (k,) bool: the p equality rows come first
    structure: "_Structure"
    eye: Tensor  # (n,n)
    # The relative precision of the data, for the reshift's rank decisions: the machine epsilon of
    # the dtype they were given in (see solve_alm's data_dtype).
    data_eps: float


@dataclass
class _Outputs:
    """The answers in caller units, filled as problems leave the working set."""

    x: Tensor  # (B,n)
    mult: Tensor  # (B,k) [y; z]
    shift: Tensor  # (B,k) [s_eq; s_in]
    status: Tensor  # (B,) int64
    iterations: Tensor  # (B,) int64

    @staticmethod
    def empty(problem: QPProblem) -> "_Outputs":
        B, n, k = problem.batch_size, problem.n, problem.p + problem.m
        device = problem.H.device
        return _Outputs(problem.H.new_zeros(B, n), problem.H.new_zeros(B, k), problem.H.new_zeros(B, k),
                        torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=device),
                        torch.zeros(B, dtype=torch.int64, device=device))

    def solution(self, problem: QPProblem) -> QPSolution:
        """The batched :class:`QPSolution` (after :func:`_mark_inaccurate`)."""
        p = problem.p
        _mark_inaccurate(problem, self.x, self.mult, self.status, problem.H.dtype)
        return QPSolution(self.x, self.mult[:, :p], self.mult[:, p:], self.shift[:, :p], self.shift[:, p:],
                          self.status, self.iterations)


def _start(problem: QPProblem, settings: Settings, warm_start,
           data_dtype: Optional[torch.dtype] = None) -> tuple[_Setup, _Work]:
    """Equilibrate the batch and build the working set at the starting point."""
    dtype, device = problem.H.dtype, problem.H.device
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    k = p + m
    mu_min = settings.mu_min if settings.mu_min is not None else (1e-9 if dtype == torch.float64 else 1e-6)
    scaled, scaling = ruiz_equilibrate(problem, settings.scaling_iter, scale_rows=not settings.closest_feasible)
    G = scaled.stacked_rows()
    GT = G.transpose(-1, -2).contiguous()
    R = torch.cat([scaling.E, scaling.F], dim=-1)
    # When every row of C has one nonzero (bounds on single variables: x >= 0 in an LP, a box),
    # its share of the Newton matrix, C'WC, is diagonal: a step adds a diagonal, not a product.
    bound_rows = m > 0 and n > 0 and bool(((scaled.C != 0).sum(-1) == 1).all())
    bound_col = scaled.C.abs().argmax(-1) if bound_rows else torch.zeros(B, m, dtype=torch.int64, device=device)
    bound_val2 = (scaled.C.gather(-1, bound_col.unsqueeze(-1)).squeeze(-1) ** 2 if bound_rows
                  else scaled.H.new_zeros(B, m))
    setup = _Setup(problem, settings, resolve_tolerance(settings, dtype), mu_min, p, k,
                   torch.arange(k, device=device) < p,
                   _Structure(zero_H=not bool(scaled.H.any()), bound_rows=bound_rows),
                   torch.eye(n, dtype=dtype, device=device), torch.finfo(data_dtype or dtype).eps)
    ws = _batched_warm_start(warm_start, problem)
    if ws is None:
        x = scaled.H.new_zeros(B, n)
        w0 = scaled.H.new_zeros(B, k)
    else:
        x = ws[0] / scaling.D
        w0 = torch.cat([ws[1], ws[2]], dim=-1) * scaling.c.unsqueeze(-1) / R
    work = _Work(
        data=_Data(H=scaled.H, g=scaled.g, G=G, GT=GT, absG=G.abs(), absGT=GT.abs(), D=scaling.D, R=R, c=scaling.c,
                   index=torch.arange(B, device=device), bound_col=bound_col, bound_val2=bound_val2),
        bounds=_Bounds(lo=torch.cat([scaled.b, scaled.l], dim=-1), hi=torch.cat([scaled.b, scaled.u], dim=-1),
                       shift=scaled.H.new_zeros(B, k)),
        it=_Iterate(x=x, mult=w0, mult_cur=w0),
        pen=_Penalties(rho=scaled.H.new_full((B,), settings.rho), **_bcl_start(B, scaled.H, settings)),
        prog=_Progress(done=torch.zeros(B, dtype=torch.bool, device=device),
                       iterations=torch.zeros(B, dtype=torch.int64, device=device),
                       primal_prev=scaled.H.new_full((B,), float("inf")),
                       best=scaled.H.new_full((B, 3), float("inf")),
                       since_progress=torch.zeros(B, dtype=torch.int64, device=device)),
        fac=_Factorization(factor=scaled.H.new_zeros(B, n, n),
                           factor_rows=torch.zeros(B, k, dtype=torch.bool, device=device),
                           factor_mu=scaled.H.new_zeros(B, 2),
                           factor_valid=torch.zeros(B, dtype=torch.bool, device=device),
                           newton_eq=scaled.H.new_zeros(B, n, n),
                           newton_eq_mu=scaled.H.new_full((B,), float("nan"))),
    )
    return setup, work


def solve_alm(problem: QPProblem, settings: Settings, warm_start=None,
              data_dtype: Optional[torch.dtype] = None) -> QPSolution:
    """The proximal augmented-Lagrangian engine on a canonical batch (see :func:`solve_problem_factored`).

    Each outer iteration measures the residuals, decides the statuses, moves infeasible problems onto
    their closest feasible QP, retires the decided problems, minimizes the proximal augmented
    Lagrangian by Newton steps and updates the multipliers and penalties (BCL).

    ``data_dtype``: the dtype the data were rounded to before they were widened to the problem's
    (float32 data solved in float64: :func:`_solve_alm_certified`); None: the problem's own. Rows
    that are dependent up to that rounding are taken as dependent when a shift is projected
    (:func:`_reshift`): float32 copies of a row, each rounded its own way, differ in float64 by a
    tilt of about 1e-7, which a projection at float64's precision partly resolves; the shift it
    gave was off by about 1e-3 relative, failed the shift's optimality test and was undone and
    taken again until the problem stalled."""
    setup, w = _start(problem, settings, warm_start, data_dtype)
    out = _Outputs.empty(problem)
    for outer in range(settings.max_iter + 1):
        meas = _measure(w, setup)
        solved = meas.res.meets(setup.tol)
        solved = solved | _polish_multipliers(w, problem, meas.res, solved, meas.eps_p, meas.eps_d, setup.tol)
        signs = _infeasibility_signs(w, setup, meas, solved)
        _track_progress(w.prog, meas)
        solved, was_shifted = _undo_wrong_shifts(w, setup, meas.Gx, solved)
        decision = _decide_status(solved, was_shifted, w.it.x, meas.res, signs, w.prog, settings,
                                  last=outer == settings.max_iter)
        if settings.verbose:
            primal, dual = meas.res.primal, meas.res.dual
            print(f"alqp outer {outer:4d}: working {int((~w.prog.done).sum()):6d}  "
                  f"max primal {float(primal.max()) if primal.numel() else 0:.2e}"
                  f"  max dual {float(dual.max()) if dual.numel() else 0:.2e}")
        moving = decision.infeasible & ~decision.leaving & ~w.prog.done
        if settings.closest_feasible and moving.any():
            # A problem moves only when its shift is a real part of its violation (with a loose
            # eps_abs, `stationary` can hold on a problem that is merely slow to become feasible).
            _reshift(w, setup, moving, meas.violation, 0.1 * meas.res.primal)
        if decision.leaving.any():
            w, kept = _retire(w, setup, out, decision.leaving, decision.status)
            if bool(w.prog.done.all()):
                break
            if kept is not None:
                meas = meas._replace(Hx=meas.Hx[kept], Gx=meas.Gx[kept], floor_p=meas.floor_p[kept],
                                     floor_d=meas.floor_d[kept])
        inner = _inner_solve(w, setup, meas.Hx, meas.Gx)
        # Unboundedness certificate: a step along which the cost decreases while H and the
        # equality rows vanish and the inequality rows stay in the recession cone of [l, u].
        unbounded = _dual_infeasible(w.data, w.bounds, inner.dx, settings.eps_dual_inf, setup.structure)
        _update_penalties(w, setup, inner.Gx, meas.floor_p, meas.floor_d)
        unbounded = unbounded & ~w.prog.done
        broken = ~inner.ok & ~w.prog.done
        if (unbounded | broken).any():
            status = torch.where(unbounded, int(Status.DUAL_INFEASIBLE), int(Status.NUMERICAL_ERROR))
            w, _ = _retire(w, setup, out, unbounded | broken, status)
            if bool(w.prog.done.all()):
                break
    return out.solution(problem)


class _Measurement(NamedTuple):
    """The residuals of the working problems at the start of an outer iteration."""

    Hx: Tensor  # (B,n) H x (scaled)
    Gx: Tensor  # (B,k) G x (scaled)
    res: Residuals  # the one certification (alqp.certify): primal, dual and duality gap, caller units
    infeas: Tensor  # (B,) stationarity of the squared violation (see _residuals)
    violation: Tensor  # (B,k) the violation of each row, caller units
    eps_p: Tensor  # (B,) the primal tolerance, caller units
    eps_d: Tensor  # (B,) the dual tolerance, caller units
    floor_p: Tensor  # (B,) the floor of the BCL target, scaled units
    floor_d: Tensor  # (B,) the floor of the inner tolerance, scaled units


def _measure(w: _Work, setup: _Setup) -> _Measurement:
    """Measure the working problems at their iterate (:func:`_residuals`) and the tolerances that follow."""
    Hx, Gx = _H_times(w.it.x, w.data.H, setup.structure), vm(w.it.x, w.data.GT)
    res, infeas, violation, cost_scale = _residuals(w, setup.p, Hx, Gx)
    eps_p, eps_d = setup.tol.bound(res.primal_scale), setup.tol.bound(res.dual_scale)
    # The tolerances in scaled units (a primal residual r is r R there, a dual one r c D), the
    # floors of the BCL target and of the inner tolerance below. The inner floor is relative to
    # the cost's terms only: |G'w| grows without bound on an infeasible QP, and a floor that
    # grew with it stopped the inner solves short of the closest feasible point.
    floor_p = 0.1 * eps_p * w.data.R.amin(-1) if setup.k else 0.1 * eps_p
    floor_d = 0.1 * setup.tol.bound(cost_scale) * w.data.c * w.data.D.amin(-1)
    return _Measurement(Hx, Gx, res, infeas, violation, eps_p, eps_d, floor_p, floor_d)


class _Infeasibility(NamedTuple):
    """Signs that a working problem is infeasible, (B,) bool each."""

    infeasible: Tensor  # at the penalty floor, violated, and stationary or stalled
    stationary: Tensor  # the violation is (nearly) stationary: x is near its closest feasible point


def _infeasibility_signs(w: _Work, setup: _Setup, meas: _Measurement, solved: Tensor) -> _Infeasibility:
    """Which unsolved problems look infeasible (reads ``w.prog.primal_prev``: call before _track_progress).

    Infeasibility is detected by heuristics calibrated on data of size one, with the tolerance as an
    absolute threshold (`detect`): they decide when to look for a shift, never a status (a shifted
    answer is certified like any other)."""
    primal, dual = meas.res.primal, meas.res.dual
    at_floor = w.pen.at_floor(setup.mu_min)
    detect = setup.tol.activity
    # At the floor the stationarity of the shift holds to O(mu) (the penalty bias); the
    # projection in _reshift() removes what is left, so a relative test suffices here.
    stationary = meas.infeas <= detect + 1e-6 * primal
    # At a floor mu that is not tiny the O(mu) bias can keep `infeas` above that test for ever;
    # a primal residual that no longer falls at the floor is the other sign of infeasibility.
    # (Only once the violation is nearly stationary: a stall far from the closest feasible
    # point would project a wrong shift.)
    stalled = (primal > detect) & (primal >= 0.9 * w.prog.primal_prev) & (meas.infeas <= 0.1 * primal)
    infeasible = ~solved & at_floor & (primal > detect) & (stationary | stalled)
    if bool(infeasible.any()):
        # Dual stationarity of an infeasible QP at the penalty floor: its multipliers are
        # residuals over mu and grow without bound, so its dual residual is only known up
        # to their round-off (_multiplier_roundoff). This decides only that the problem is
        # infeasible; its answer is certified later, on the shifted QP, without this allowance.
        allowance = detect + 10 * torch.finfo(primal.dtype).eps * _multiplier_roundoff(w, setup.is_eq)
        infeasible = infeasible & (dual <= 10 * allowance)
    return _Infeasibility(infeasible, stationary)


def _track_progress(prog: _Progress, meas: _Measurement) -> None:
    """Record this iteration's residuals in the stall guard (in place)."""
    primal, dual = meas.res.primal, meas.res.dual
    prog.primal_prev = primal
    residuals = torch.stack([primal, dual, meas.infeas], -1)
    progress = (residuals < 0.5 * prog.best).any(-1)
    prog.best = torch.where(progress.unsqueeze(-1), torch.minimum(prog.best, residuals), prog.best)
    prog.since_progress = torch.where(progress, 0, prog.since_progress + 1)


def _undo_wrong_shifts(w: _Work, setup: _Setup, Gx: Tensor, solved: Tensor) -> tuple[Tensor, Tensor]:
    """Send back the shifted problems that solved a QP shifted by a shift that is not the least-squares one.

    A shift taken before x reached the closest feasible point is not the least-squares one, and its
    QP then solves to a wrong answer: that problem goes back to its own constraints, from where it
    is, and looks for its shift again.

    Returns:
        solved (B,) without those problems, and was_shifted (B,): the problems solving a shifted QP.
    """
    b = w.bounds
    was_shifted = (b.shift != 0).any(-1)
    wrong_shift = solved & was_shifted
    if not bool(wrong_shift.any()):
        return solved, was_shifted
    idx = wrong_shift.nonzero().squeeze(-1)
    lo0, hi0 = b.lo[idx] - b.shift[idx], b.hi[idx] - b.shift[idx]
    Gx0 = Gx[idx]
    wrong_shift[idx] = ~shift_optimal(w.data.G[idx], lo0, hi0, w.it.x[idx], Gx0 - torch.clamp(Gx0, lo0, hi0),
                                      setup.tol.closest_feasible())
    if not bool(wrong_shift.any()):
        return solved, was_shifted
    undo = wrong_shift.nonzero().squeeze(-1)
    b.lo[undo] -= b.shift[undo]
    b.hi[undo] -= b.shift[undo]
    b.shift[undo] = 0.0
    w.prog.primal_prev = w.prog.primal_prev.index_fill(0, undo, float("inf"))  # (not in place: it is `primal`)
    w.prog.best[undo] = float("inf")
    w.prog.since_progress[undo] = 0
    w.pen.restart(undo, setup.settings)
    return solved & ~wrong_shift, was_shifted & ~wrong_shift


class _Decision(NamedTuple):
    """The outer iteration's verdict on each working problem, (B,) each."""

    status: Tensor  # int64 Status, meaningful where leaving
    leaving: Tensor  # bool: the problem leaves the working set with that status
    infeasible: Tensor  # bool: the problem looks infeasible (closest-feasible mode: to be shifted)


def _decide_status(solved: Tensor, was_shifted: Tensor, x: Tensor, res: Residuals, signs: _Infeasibility,
                   prog: _Progress, settings: Settings, last: bool) -> _Decision:
    """The status of each working problem at this outer iteration, and which ones leave.

    Args:
        solved (B,): the certification holds (on the shifted QP of a shifted problem);
        was_shifted (B,): the problem is solved as its closest feasible QP;
        x (B,n): the iterate; res: its residuals (primal and dual (B,) are read);
        signs: :func:`_infeasibility_signs`; prog: since_progress and done (B,) are read;
        last: this is the last outer iteration allowed.
    """
    status = torch.where(solved & ~was_shifted, int(Status.SOLVED), int(Status.CLOSEST_FEASIBLE))
    bad = ~(torch.isfinite(x).all(-1) & torch.isfinite(res.primal) & torch.isfinite(res.dual))
    status = torch.where(bad, int(Status.NUMERICAL_ERROR), status)
    infeasible = signs.infeasible
    stalled_out = ~solved & ~bad & ~infeasible & (prog.since_progress >= settings.stall_iter)
    status = torch.where(stalled_out, int(Status.STALLED), status)
    leaving = solved | bad | stalled_out
    if not settings.closest_feasible:
        infeasible = infeasible & signs.stationary
        status = torch.where(infeasible & ~solved & ~bad, int(Status.PRIMAL_INFEASIBLE), status)
        leaving = leaving | infeasible
    if last:
        status = torch.where(leaving, status, int(Status.MAX_ITER))
        leaving = torch.ones_like(leaving)
    return _Decision(status, leaving & ~prog.done, infeasible)


def _reshift(w: _Work, setup: _Setup, mask: Tensor, violation: Tensor, min_shift: Tensor) -> None:
    """Move the problems in ``mask`` onto their closest feasible QP and restart them there (in place).

    At the penalty floor x is the closest-feasible point up to round-off amplified by 1/mu; its
    violation (B,k) is the least-squares shift plus an error in the range of the violated rows G_V.
    Projecting that range out gives the shift to working precision; the shifted QP is feasible, so
    the ALM then converges with bounded multipliers and full accuracy. A problem whose shift is
    below ``min_shift`` (B,) stays.
    """
    idx = mask.nonzero().squeeze(-1)
    d, b = w.data, w.bounds
    r_s = violation[idx] * d.R[idx]
    rows = setup.is_eq | (r_s != 0)
    s = project_out_row_range(d.G[idx], rows, r_s, eps=setup.data_eps)
    # A problem that is only slow to become feasible has its violation in the range of the
    # violated rows, so its projected shift is (nearly) zero: it is not moved.
    big = inf_norm(s / d.R[idx]) >= min_shift[idx]
    idx, r_s, s = idx[big], r_s[big], s[big]
    # (Not in place: primal_prev is this iteration's primal residual, which the caller holds.)
    w.prog.primal_prev = w.prog.primal_prev.index_fill(0, idx, float("inf"))
    b.shift[idx] += s
    b.lo[idx] += s
    b.hi[idx] += s
    # The multipliers grew without bound along null(G_V') of the shifted rows V (by different
    # penalties on equality and inequality rows, so not along s alone): restart the shifted,
    # now feasible, QP from their bounded part.
    moved = s.abs() > 1e-6 * inf_norm(s).unsqueeze(-1)
    mult = w.it.mult_cur[idx]
    mult = mult - project_out_row_range(d.G[idx], moved, mult, eps=setup.data_eps)
    w.it.mult[idx], w.it.mult_cur[idx] = mult, mult
    w.prog.since_progress[idx] = 0
    w.prog.best[idx] = float("inf")
    w.pen.restart(idx, setup.settings)


def _retire(w: _Work, setup: _Setup, out: _Outputs, leaving: Tensor,
            status: Tensor) -> tuple[_Work, Optional[Tensor]]:
    """Write the leaving problems' answers (in caller units) to ``out`` and mark them done.
    ``leaving`` (B,) holds problems not done yet; ``status`` (B,) their statuses.

    The working set is compacted only once a quarter of it is done: a compaction copies all of
    its (B,n,n) tensors, which costs more than carrying a few finished problems along.

    Returns:
        The working set and, when it was compacted, the mask of the rows it kept (else None).
    """
    d, b = w.data, w.bounds
    idx = d.index[leaving]
    mult = w.it.mult_cur[leaving] * d.R[leaving] / d.c[leaving].unsqueeze(-1)
    x = w.it.x[leaving] * d.D[leaving]
    st = status[leaving]
    out.x[idx] = x
    out.mult[idx] = mult
    shifted = (st == Status.CLOSEST_FEASIBLE) | (st == Status.PRIMAL_INFEASIBLE)
    if bool(shifted.any()):
        sidx, x = idx[shifted], x[shifted]
        # The violation of the original constraints (docs/design.md section 2: s = G x - clip(G x));
        # on the rows that are not really shifted that is round-off, reported as 0. (Not the shift
        # applied plus what remains: a row left just inside its shifted bound has a violation a
        # little smaller than that shift.)
        Gx_l = vm(w.it.x[leaving], d.GT[leaving])
        lo0, hi0 = b.lo[leaving] - b.shift[leaving], b.hi[leaving] - b.shift[leaving]
        s = ((Gx_l - torch.clamp(Gx_l, lo0, hi0)) / d.R[leaving])[shifted]
        # The multipliers of the shifted rows are not unique: report alqp's choice, which the
        # backward differentiates (alqp.activity).
        sub = setup.problem.select(sidx)
        out.shift[sidx], out.mult[sidx] = closest_feasible_output(
            sub.H, sub.g, sub.A, sub.b, sub.C, sub.l, sub.u, x, mult[shifted], s, setup.tol.activity,
            polish=True)
    out.status[idx] = st
    out.iterations[idx] = w.prog.iterations[leaving]
    w.prog.done = w.prog.done | leaving
    finished = int(w.prog.done.sum())
    if finished == w.prog.done.numel() or 4 * finished < w.prog.done.numel():
        return w, None
    keep = ~w.prog.done
    return w.keep(keep), keep


class _InnerStep(NamedTuple):
    """What an inner solve did to the working problems."""

    dx: Tensor  # (B,n) the change of x
    Gx: Tensor  # (B,k) G x at the new x (scaled)
    ok: Tensor  # (B,) False where a factorization failed for good


def _inner_solve(w: _Work, setup: _Setup, Hx: Tensor, Gx: Tensor) -> _InnerStep:
    """Minimize the proximal augmented Lagrangian at fixed multipliers (:func:`_newton_inner`) and move
    the iterate and ``w.it.mult_cur`` there (in place); ``Hx`` (B,n), ``Gx`` (B,k) at the current x."""
    x_prev = w.it.x
    start = _NewtonStart(x_prev, Hx, Gx, torch.zeros(x_prev.shape[0], dtype=torch.bool, device=x_prev.device),
                         torch.zeros_like(w.bounds.lo, dtype=torch.bool))
    inner = _newton_inner(_NewtonProblem.of(w), w.fac, start, ~w.prog.done, setup, setup.settings.max_inner_iter)
    x_new, mult_new, Gx_new, inner_ok = inner.x, inner.mult, inner.Gx, inner.ok
    w.prog.iterations = w.prog.iterations + inner.steps
    broken = ~inner_ok & ~w.prog.done
    if bool(broken.any()):
        # A factorization that failed on an indefinite H: such a problem starts the outer
        # iteration again from x_k with a proximal weight that makes its inner problems
        # strongly convex (a KKT point may still solve it: it is certified like any other).
        raised = _raise_proximal_weight(w, broken)
        if bool(raised.any()):
            keep_old = raised.unsqueeze(-1)
            x_new = torch.where(keep_old, x_prev, x_new)
            mult_new = torch.where(keep_old, w.it.mult_cur, mult_new)
            Gx_new = torch.where(keep_old, Gx, Gx_new)
            inner_ok = inner_ok | raised
    w.it.x, w.it.mult_cur = x_new, mult_new
    return _InnerStep(x_new - x_prev, Gx_new, inner_ok)


def _update_penalties(w: _Work, setup: _Setup, Gx: Tensor, floor_p: Tensor, floor_d: Tensor) -> None:
    """BCL, in place: accept the multipliers where the primal residual at the new x (``Gx`` (B,k))
    met its target, else stiffen the penalties; ``floor_p``, ``floor_d`` (B,) floor the targets."""
    settings, pen, mu_min = setup.settings, w.pen, setup.mu_min
    primal_new = inf_norm(Gx - torch.clamp(Gx, w.bounds.lo, w.bounds.hi))
    # At the floor a rejection would leave the next inner problem identical to this one (x and
    # the multipliers could never move again), so the plain method of multipliers takes over.
    accept = (primal_new <= pen.eta_ext) | pen.at_floor(mu_min)
    w.it.mult = torch.where(accept.unsqueeze(-1), w.it.mult_cur, w.it.mult)
    mu_in_next = torch.where(accept, pen.mu_in, (pen.mu_in * settings.mu_update_factor).clamp_min(mu_min))
    mu_eq_next = torch.where(accept, pen.mu_eq, (pen.mu_eq * settings.mu_update_factor).clamp_min(mu_min))
    # The floors keep a target that the certification already meets from stiffening the penalties.
    pen.eta_ext = torch.maximum(torch.where(accept, pen.eta_ext * pen.mu_in ** 0.9, 1e-1 * mu_in_next ** 0.1),
                                floor_p)
    pen.eta_in = torch.maximum(torch.where(accept, pen.eta_in * pen.mu_in, mu_in_next), floor_d)
    w.prog.since_progress = torch.where((mu_in_next != pen.mu_in) | (mu_eq_next != pen.mu_eq), 0,
                                        w.prog.since_progress)
    pen.mu_in, pen.mu_eq = mu_in_next, mu_eq_next


#: The largest indefiniteness, |most negative eigenvalue of H| / max |H_ij| (scaled data), that the
#: ALM meets by raising its proximal weight; beyond it a failed factorization stays a failure.
MAX_INDEFINITENESS = 1e-3


def _raise_proximal_weight(w: _Work, broken: Tensor) -> Tensor:
    """(B,) True where a problem in ``broken`` (its Newton matrix failed to factor) got a larger
    proximal weight ``w.pen.rho``, with its cached Newton matrices invalidated.

    phi = f + rho/2 |x - x_k|^2 + penalties is strongly convex once rho exceeds the most negative
    eigenvalue of H in size, and the proximal point method then converges on a weakly convex
    problem; the weight becomes max(10 rho, 2 |lambda_min|). Only where H (scaled) is indefinite
    by at most MAX_INDEFINITENESS of its size: a PSD H whose factorization failed for another
    reason, or a clearly non-convex one, is left to fail (and to :func:`report_non_convex`)."""
    idx = broken.nonzero().squeeze(-1)
    H = w.data.H.index_select(0, idx)
    lam_min = torch.linalg.eigvalsh(H.double())[:, 0].to(H.dtype) if H.shape[-1] else H.new_zeros(idx.numel())
    size = H.abs().amax((-2, -1)) if H.shape[-1] else lam_min
    can = (lam_min < 0) & (-lam_min <= MAX_INDEFINITENESS * size)
    out = torch.zeros_like(broken)
    if not bool(can.any()):
        return out
    idx, lam_min = idx[can], lam_min[can]
    w.pen.rho[idx] = torch.maximum(10 * w.pen.rho[idx], -2 * lam_min)
    w.fac.factor_valid[idx] = False
    w.fac.newton_eq_mu[idx] = float("nan")
    out[idx] = True
    return out


def _polish_multipliers(w: _Work, problem: QPProblem, res: Residuals, solved: Tensor, eps_p: Tensor,
                        eps_d: Tensor, tol: Tolerance) -> Tensor:
    """(B,) True where refitted multipliers certify a working problem that x already solves.

    The ALM's multipliers are residuals over the penalty, so their round-off grows as 1/mu: in
    float32 a feasible x with the right active set left a dual residual of 1e-3 relative where
    1.2e-5 was asked. For problems whose x is feasible and whose dual residual is within a factor
    1e3 of the tolerance, the multipliers are refitted on their active rows
    (:func:`alqp.activity.polish_multipliers`, float64) and kept, in ``w.it.mult_cur``, where the
    refit passes the one certification (on the shifted QP of a shifted problem, whose multipliers
    get alqp's choice when it leaves)."""
    candidates = ~solved & ~w.prog.done & (res.primal <= eps_p) & (res.dual <= REFIT_WINDOW * eps_d)
    out = torch.zeros_like(solved)
    if not bool(candidates.any()):
        return out
    d = w.data
    idx = candidates.nonzero().squeeze(-1)
    sub = problem.select(d.index[idx])
    p = sub.p
    G = sub.stacked_rows()
    is_eq = torch.arange(G.shape[-2], device=G.device) < p
    R, c = d.R[idx], d.c[idx].unsqueeze(-1)
    x = w.it.x[idx] * d.D[idx]
    lo, hi = w.bounds.lo[idx] / R, w.bounds.hi[idx] / R  # caller units, with the shift of a shifted problem
    refit = polish_multipliers(sub.H, sub.g, G, x, w.it.mult_cur[idx] * R / c, is_eq, lo, hi, tol.activity)
    # (At the asked tolerance for shifted problems too: the looser one of the final certification
    # covers round-off, and a problem let go at it would leave with x less accurate than it can be.)
    ok = certify_residuals(sub.H.double(), sub.g.double(), G.double(), lo.double(), hi.double(), p, x.double(),
                           refit.double()).meets(tol)
    if bool(ok.any()):
        keep = idx[ok]
        w.it.mult_cur[keep] = refit[ok] * c[ok] / R[ok]
        out[keep] = True
    return out


def _mark_inaccurate(problem: QPProblem, x: Tensor, w: Tensor, status: Tensor, dtype: torch.dtype) -> None:
    """Problems that ran out of iterations or stalled with an answer already at the round-off floor
    of its residuals (:func:`alqp.certify.roundoff_floor`) get INACCURATE, in place: their tolerance
    was unreachable, not unreached."""
    candidates = ((status == int(Status.MAX_ITER)) | (status == int(Status.STALLED))).nonzero().squeeze(-1)
    if candidates.numel() == 0:
        return
    sub = problem.select(candidates)
    G = sub.stacked_rows()
    floor = roundoff_floor(sub.H, sub.g, G, torch.cat([sub.b, sub.l], -1), torch.cat([sub.b, sub.u], -1), sub.p,
                           x[candidates], w[candidates], dtype)
    status[candidates[floor]] = int(Status.INACCURATE)


class _Structure(NamedTuple):
    """What holds for every problem of the batch, so that the solver may skip work."""

    zero_H: bool  # H = 0 (an LP): products with H are zero
    bound_rows: bool  # every row of C has one nonzero: C'WC is diagonal (w.bound_col, w.bound_val2)


def _H_times(v: Tensor, H: Tensor, structure: _Structure) -> Tensor:
    """(B,n) x (B,n,n) -> (B,n): v'H = H v (H symmetric), without the product when H = 0."""
    return torch.zeros_like(v) if structure.zero_H else vm(v, H)



class _Residuals(NamedTuple):
    """What :func:`_residuals` measures of the working problems."""

    certify: Residuals  # alqp.certify.Residuals (of their shifted QPs once shifted)
    infeas: Tensor  # (B,) |A'(A x - b) + C'(C x - clip)|: zero at the closest feasible point
    violation: Tensor  # (B,k) the violation of each row, caller units
    cost_scale: Tensor  # (B,) max(|H x|, |g|), caller units


def _residuals(w: _Work, p: int, Hx: Tensor, Gx: Tensor) -> _Residuals:
    """Residuals in the caller's units (not the scaled ones), at (x, mult_cur), by the one
    certification every engine uses; ``Hx`` (B,n) and ``Gx`` (B,k) at x (scaled)."""
    d, b = w.data, w.bounds
    mult = w.it.mult_cur
    r = (Gx - torch.clamp(Gx, b.lo, b.hi)) / d.R
    GTm = vm(mult, d.G)
    unscale = 1.0 / (d.c.unsqueeze(-1) * d.D)
    # Caller units: x = D x_s, H x = (H_s x_s) / (c D), G x = (G_s x_s) / R, w = R w_s / c.
    res = measure(w.it.x * d.D, Hx * unscale, d.g * unscale, Gx / d.R, GTm * unscale, b.lo / d.R, b.hi / d.R,
                  mult * d.R / d.c.unsqueeze(-1), p, vm(w.it.x.abs(), d.absGT) / d.R, vm(mult.abs(), d.absG) * unscale)
    # Stationarity of the squared violation in the metric the iterations minimize (the scaled
    # rows; the caller's metric up to one factor whenever closest_feasible is on).
    infeas = inf_norm(vm(r * d.R, d.G) / d.D)
    cost_scale = torch.maximum(inf_norm(Hx * unscale), inf_norm(d.g * unscale))
    return _Residuals(res, infeas, r, cost_scale)


def _multiplier_roundoff(w: _Work, is_eq: Tensor) -> Tensor:
    """(B,) a bound on the round-off of the computed dual residual (caller units) while the
    multipliers are residuals divided by the penalties, y = y_k + (A x - b) / mu_eq: the round-off
    of G x and of the bounds is amplified by 1/mu, and |mult| is large while the multipliers of an
    infeasible QP grow."""
    d, b = w.data, w.bounds
    mult = w.it.mult_cur
    mu = torch.where(is_eq, w.pen.mu_eq.unsqueeze(-1), w.pen.mu_in.unsqueeze(-1))
    bound = torch.where(mult > 0, b.hi, torch.where(mult < 0, b.lo, torch.zeros_like(b.lo)))
    mult_err = mult.abs() + (vm(w.it.x.abs(), d.absGT) + bound.abs().nan_to_num(0.0, 0.0, 0.0)) / mu
    return inf_norm(vm(mult_err, d.absG) / (d.c.unsqueeze(-1) * d.D))


def _dual_infeasible(data: _Data, bounds: _Bounds, dx: Tensor, tol: float, structure: _Structure) -> Tensor:
    """(B,) True where the step dx (B,n) certifies that the QP is unbounded below."""
    size = inf_norm(dx)
    nonzero = size > 0
    d = dx / torch.where(nonzero, size, torch.ones_like(size)).unsqueeze(-1)
    Hd = inf_norm(_H_times(d, data.H, structure))
    Gd = vm(d, data.GT)
    # Where hi is finite, G d may not grow; where lo is finite, it may not shrink.
    up = torch.where(torch.isfinite(bounds.hi), Gd.clamp_min(0), torch.zeros_like(Gd))
    down = torch.where(torch.isfinite(bounds.lo), (-Gd).clamp_min(0), torch.zeros_like(Gd))
    cone = torch.maximum(inf_norm(up), inf_norm(down))
    gd = (data.g * d).sum(-1)
    gscale = inf_norm(data.g).clamp_min(1.0)
    certified = nonzero & (cone <= tol) & (gd < -tol * gscale)
    if bool(certified.any()):
        # H d is measured against H's size: the cost scaling makes a scaled H small when g is
        # large, and an absolute test would take a strictly convex QP for an unbounded one. (The
        # size is taken only for the rare candidates: a pass over H.)
        idx = certified.nonzero().squeeze(-1)
        H_size = data.H.index_select(0, idx).abs().amax((-2, -1)) if data.H.shape[-1] else Hd[idx]
        certified[idx] = Hd[idx] <= tol * H_size.clamp_min(torch.finfo(d.dtype).tiny)
    return certified


# --- The inner solve: semi-smooth Newton on the proximal augmented Lagrangian ----------------------


class _NewtonProblem(NamedTuple):
    """The inner problem of each working problem: its data at fixed multipliers and penalties."""

    H: Tensor  # (B,n,n)
    g: Tensor  # (B,n)
    G: Tensor  # (B,k,n)
    GT: Tensor  # (B,n,k)
    lo: Tensor  # (B,k)
    hi: Tensor  # (B,k)
    x_k: Tensor  # (B,n) the proximal centre
    mult_k: Tensor  # (B,k) the accepted multipliers
    rho: Tensor  # (B,) proximal weight
    mu_eq: Tensor  # (B,)
    mu_in: Tensor  # (B,)
    eta_in: Tensor  # (B,) the tolerance on the gradient
    bound_col: Tensor  # (B,m) (bound_rows only)
    bound_val2: Tensor  # (B,m) (bound_rows only)

    @staticmethod
    def of(w: _Work) -> "_NewtonProblem":
        d, pen = w.data, w.pen
        return _NewtonProblem(d.H, d.g, d.G, d.GT, w.bounds.lo, w.bounds.hi, w.it.x, w.it.mult, pen.rho, pen.mu_eq,
                              pen.mu_in, pen.eta_in, d.bound_col, d.bound_val2)

    def select(self, index: Tensor) -> "_NewtonProblem":
        return _NewtonProblem(*(t.index_select(0, index) for t in self))


class _NewtonStart(NamedTuple):
    """Where a Newton loop starts (or a compacted copy continues its parent's loop)."""

    x: Tensor  # (B,n)
    Hx: Tensor  # (B,n) H x
    Gx: Tensor  # (B,k) G x
    # A full Newton step that leaves the active set unchanged lands on the minimizer of phi up to
    # round-off; these stop the loop where the gradient cannot reach eta_in (stiff penalties).
    full_step: Tensor  # (B,) bool: the last step was a full one
    last_rows: Tensor  # (B,k) bool: the rows in the last Newton matrix


class _NewtonResult(NamedTuple):
    x: Tensor  # (B,n) the minimizer reached
    mult: Tensor  # (B,k) the multipliers it implies
    Gx: Tensor  # (B,k) G x
    ok: Tensor  # (B,) False where a factorization failed
    steps: Tensor  # (B,) int64 Newton steps taken


def _newton_inner(prob: _NewtonProblem, fac: _Factorization, start: _NewtonStart, active: Tensor,
                  setup: _Setup, max_steps: int) -> _NewtonResult:
    """Minimize the proximal augmented Lagrangian of every problem in ``active`` (B,) over x.

        phi(x) = 1/2 x'Hx + g'x + rho/2 |x - x_k|^2
                 + sum_i 1/(2 mu_i) dist(G_i x + mu_i w_k,i, [lo_i, hi_i])^2

    (mu_i is mu_eq on equality rows, mu_in on inequality rows; x_k and w_k = mult_k are the proximal
    centre and the accepted multipliers). phi is convex, piecewise quadratic and once
    differentiable; semi-smooth Newton with an exact line search reaches its minimizer in finitely
    many steps. ``fac`` is updated in place (the next outer iteration may reuse its factors).

    The batch steps whole, the problems that are done with dx = 0, while at least half of it
    still steps; then the rest goes on in a compacted copy (:func:`_newton_compacted`).
    """
    x_k, mult_k, is_eq = prob.x_k, prob.mult_k, setup.is_eq
    rho = prob.rho.unsqueeze(-1)  # (B,1)
    Bw = x_k.shape[0]
    mu = torch.where(is_eq, prob.mu_eq.unsqueeze(-1), prob.mu_in.unsqueeze(-1))
    mu_pair = torch.stack([prob.mu_eq, prob.mu_in], dim=-1)
    x, Hx, Gx, full_step, last_rows = start
    ok = torch.ones(Bw, dtype=torch.bool, device=x.device)
    steps = torch.zeros(Bw, dtype=torch.int64, device=x.device)
    for it in range(max_steps + 1):
        v = Gx + mu * mult_k
        dist = v - torch.clamp(v, prob.lo, prob.hi)
        mult = dist / mu
        if it == max_steps:
            break
        grad = Hx + prob.g + rho * (x - x_k) + vm(mult, prob.G)
        rows = (dist != 0) | is_eq
        settled = full_step & (rows == last_rows).all(-1)
        active = active & ok & (inf_norm(grad) > prob.eta_in) & ~settled
        stepping = int(active.sum())
        if stepping == 0:
            break
        if 2 * stepping < Bw:
            return _newton_compacted(prob, fac, _NewtonStart(x, Hx, Gx, full_step, last_rows), active, mult, ok,
                                     steps, setup, max_steps - it)
        # Refactor only where the active set or the penalties changed since the last factorization.
        stale = active & ~fac.fits(rows, mu_pair)
        if bool(stale.any()):
            sidx = stale.nonzero().squeeze(-1)
            good = _refactor(prob, fac, rows, mu_pair, sidx, setup)
            ok[sidx] = ok[sidx] & good
        moving = (ok & active).unsqueeze(-1)
        dx = cholesky_solve_rows(fac.factor, -grad)
        dx = torch.where(moving, dx, torch.zeros_like(dx))
        Hdx = _H_times(dx, prob.H, setup.structure)
        Gdx = vm(dx, prob.GT)
        alpha = _exact_line_search(
            prob.lo, prob.hi, is_eq, v, Gdx, mu,
            a0=(dx * (Hx + prob.g + rho * (x - x_k))).sum(-1),
            a1=(dx * Hdx).sum(-1) + prob.rho * (dx * dx).sum(-1),
        )
        step = torch.where(moving, alpha.unsqueeze(-1), torch.zeros_like(dx[:, :1]))
        x, Hx, Gx = x + step * dx, Hx + step * Hdx, Gx + step * Gdx
        # (A problem that stopped never steps again, so its full_step and last_rows are moot.)
        full_step = (alpha - 1).abs() <= 1e-6
        last_rows = rows
        steps = steps + active.to(steps.dtype)
    return _NewtonResult(x, mult, Gx, ok, steps)


def _newton_compacted(prob: _NewtonProblem, fac: _Factorization, state: _NewtonStart, active: Tensor, mult: Tensor,
                      ok: Tensor, steps: Tensor, setup: _Setup, max_steps: int) -> _NewtonResult:
    """Continue the Newton loop of the problems in ``active`` (B,) on a compacted copy of them, for at
    most ``max_steps`` steps, and merge the result with the others' (``mult``, ``ok``, ``steps``, and
    ``state``'s x and Gx), whose loop stopped. So a long tail of slow problems neither drags the whole
    batch along nor re-gathers its matrices at every step (and so on, halving)."""
    idx = active.nonzero().squeeze(-1)
    sub_fac = fac.select(idx)
    sub = _newton_inner(prob.select(idx), sub_fac, _NewtonStart(*(t.index_select(0, idx) for t in state)),
                        torch.ones_like(idx, dtype=torch.bool), setup, max_steps)
    # The factors go back too: the next outer iteration may reuse them.
    fac.put(idx, sub_fac)
    return _NewtonResult(state.x.index_copy(0, idx, sub.x), mult.index_copy(0, idx, sub.mult),
                         state.Gx.index_copy(0, idx, sub.Gx), ok.index_copy(0, idx, sub.ok),
                         steps.index_copy(0, idx, steps.index_select(0, idx) + sub.steps))


def _take(t: Tensor, index: Optional[Tensor]) -> Tensor:
    """The rows ``index`` of t, or t itself when index is None (all rows)."""
    return t if index is None else t.index_select(0, index)


def _refactor(prob: _NewtonProblem, fac: _Factorization, rows: Tensor, mu_pair: Tensor, sidx: Tensor,
              setup: _Setup) -> Tensor:
    """Factor the Newton matrices H + rho I + G_rows' W G_rows of the problems ``sidx`` into ``fac`` (in
    place), for the rows ``rows`` (B,k) and penalties ``mu_pair`` (B,2); returns (len(sidx),) True
    where the factorization succeeded."""
    p, k = setup.p, setup.k
    # (B,n,n) passes cost about half a batched product here: gather only the stale problems'
    # matrices, and accumulate into that copy in place.
    all_stale = sidx.numel() == prob.x_k.shape[0]
    sel = None if all_stale else sidx
    _refresh_equality_part(prob, fac, sidx, sel, p)
    K = fac.newton_eq.clone() if all_stale else fac.newton_eq.index_select(0, sidx)
    if p < k:
        weights = _take(rows, sel)[:, p:].to(prob.x_k.dtype) / _take(prob.mu_in, sel).unsqueeze(-1)
        if setup.structure.bound_rows:
            K.diagonal(dim1=-2, dim2=-1).add_(torch.zeros_like(K[:, 0]).scatter_add_(
                1, _take(prob.bound_col, sel), weights * _take(prob.bound_val2, sel)))
        else:
            # (W^1/2 C)'(W^1/2 C): one gathered, scaled copy of C's rows serves both factors.
            root_w = weights.sqrt_().unsqueeze(-1)
            C_w = prob.G[:, p:] * root_w if all_stale else prob.G[:, p:].index_select(0, sidx).mul_(root_w)
            K.baddbmm_(C_w.transpose(-1, -2), C_w)
    L, good = _cholesky_with_shift(K, setup.eye)
    if all_stale:
        fac.factor = L
    else:
        fac.factor.index_copy_(0, sidx, L)
    fac.factor_rows[sidx] = rows[sidx]
    fac.factor_mu[sidx] = mu_pair[sidx]
    fac.factor_valid[sidx] = good
    return good


def _refresh_equality_part(prob: _NewtonProblem, fac: _Factorization, sidx: Tensor, sel: Optional[Tensor],
                           p: int) -> None:
    """Rebuild ``fac.newton_eq`` = H + rho I + A'A / mu_eq for the problems ``sidx`` whose mu_eq changed.

    The equality rows are always in the Newton matrix: their product is rebuilt only when mu_eq
    changes, and a step adds just the active inequality rows to it. ``sel`` is sidx, or None when
    sidx is the whole batch."""
    rebuild = _take(fac.newton_eq_mu, sel) != _take(prob.mu_eq, sel)
    if not bool(rebuild.any()):
        return
    ridx = sidx[rebuild]
    K_eq = prob.H.index_select(0, ridx)
    K_eq.diagonal(dim1=-2, dim2=-1).add_(prob.rho[ridx].unsqueeze(-1))
    if p:
        A_eq = prob.G[:, :p].index_select(0, ridx).mul_(prob.mu_eq[ridx, None, None].rsqrt())
        K_eq.baddbmm_(A_eq.transpose(-1, -2), A_eq)
    fac.newton_eq.index_copy_(0, ridx, K_eq)
    fac.newton_eq_mu[ridx] = prob.mu_eq[ridx]


def _cholesky_with_shift(K: Tensor, eye: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factors (b,n,n) of K (b,n,n) and (b,) True where K (or K shifted) factored; a failed
    factor is replaced by the identity."""
    L, info = torch.linalg.cholesky_ex(K)
    good = info == 0
    if not bool(good.all()):
        # rho I is below round-off against G'G/mu at a small penalty (LPs at the floor): a
        # shift of a few ulps of K's diagonal restores definiteness. The step is then an
        # inexact Newton step, still a descent direction for the exact line search.
        bad = (~good).nonzero().squeeze(-1)
        delta = 1e3 * torch.finfo(K.dtype).eps * K[bad].diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        L_bad, info_bad = torch.linalg.cholesky_ex(K[bad] + delta[:, None, None] * eye)
        L[bad] = L_bad
        good[bad] = info_bad == 0
    L = L if bool(good.all()) else torch.where(good[:, None, None], L, eye.expand_as(L))
    return L, good


def _exact_line_search(lo, hi, is_eq, v0, t, mu, a0, a1) -> Tensor:
    """Exact minimizer alpha (B,) of phi(x + alpha dx) for the piecewise-quadratic phi.

    With v0 = G x + mu w_k (B,k) and t = G dx (B,k), phi'(alpha) = a0 + a1 alpha +
    sum_i t_i dist_i(v0 + alpha t) / mu_i is piecewise linear and non-decreasing; it bends where
    an inequality row crosses lo or hi. A binary search over the sorted bends finds the segment
    where phi' changes sign; on that segment phi' is linear and its root is exact.
    """
    Bw = v0.shape[0]
    dtype, device = v0.dtype, v0.device

    def slope_at(alpha: Tensor) -> Tensor:
        vv = v0 + alpha.unsqueeze(-1) * t
        return a0 + a1 * alpha + (t * (vv - torch.clamp(vv, lo, hi)) / mu).sum(-1)

    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    safe_t = torch.where(t != 0, t, torch.ones_like(t))
    bends = torch.cat([(lo - v0) / safe_t, (hi - v0) / safe_t], dim=-1)
    valid = torch.cat([(t != 0) & ~is_eq, (t != 0) & ~is_eq], dim=-1) & torch.isfinite(bends) & (bends > 0)
    bends, _ = torch.sort(torch.where(valid, bends, inf), dim=-1)
    K = bends.shape[-1]
    # Binary search for the first bend where phi' >= 0 (phi'(0) < 0 along a descent direction).
    lo_i = torch.zeros(Bw, dtype=torch.int64, device=device)  # bends[:lo_i] have phi' < 0
    hi_i = torch.full((Bw,), K, dtype=torch.int64, device=device)
    for _ in range(max(K, 1).bit_length()):
        mid = (lo_i + hi_i) // 2
        searching = lo_i < hi_i
        a_mid = bends.gather(-1, mid.clamp_max(K - 1).unsqueeze(-1)).squeeze(-1) if K else torch.zeros_like(a0)
        finite = torch.isfinite(a_mid)
        neg = finite & (slope_at(torch.where(finite, a_mid, torch.zeros_like(a_mid))) < 0)
        lo_i = torch.where(searching & neg, mid + 1, lo_i)
        hi_i = torch.where(searching & ~neg, mid, hi_i)
    zero = torch.zeros_like(a0)
    if K > 0:
        a_lo = torch.where(lo_i > 0, bends.gather(-1, (lo_i - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1), zero)
        a_hi = torch.where(lo_i < K, bends.gather(-1, lo_i.clamp_max(K - 1).unsqueeze(-1)).squeeze(-1), inf)
    else:
        a_lo, a_hi = zero, inf.expand(Bw)
    # phi' is linear on [a_lo, a_hi]: its slope comes from the rows active inside the segment.
    a_mid = torch.where(torch.isfinite(a_hi), 0.5 * (a_lo + a_hi), a_lo + 1.0)
    vv = v0 + a_mid.unsqueeze(-1) * t
    inside = ((vv < lo) | (vv > hi) | is_eq).to(dtype)
    curvature = a1 + (inside * t * t / mu).sum(-1)
    alpha = a_lo - slope_at(a_lo) / curvature.clamp_min(torch.finfo(dtype).tiny)
    return torch.minimum(torch.maximum(alpha, a_lo), a_hi)
