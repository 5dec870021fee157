"""The forward solver: a batched proximal augmented-Lagrangian method (ProxQP family).

Read top to bottom: :func:`solve_problem_factored` picks the engine and sends what the active-set
engine does not certify to the ALM; :func:`solve_alm` runs the outer loop (multiplier updates and
the BCL penalty schedule), :func:`_newton_inner` minimizes the proximal
augmented Lagrangian by semi-smooth Newton steps with an exact line search (:func:`_exact_line_search`).
Every problem of the batch steps in lock-step through tensor operations; a problem whose status is
decided leaves the working set, so the batch shrinks as it converges.

All iterates live in the scaled space of :func:`alqp.problem.ruiz_equilibrate`; residuals used for
stopping are measured in the caller's units.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from torch import Tensor

from alqp.activity import closest_feasible_output, polish_multipliers
from alqp.certify import measure, resolve_tolerance, roundoff_floor, shift_optimal, solution_meets
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


class _Work:
    """The working set: the undecided problems and their iterates, all indexed alike.

    The constraints are stacked as rows G = [A; C] (k = p + m) with bounds lo <= G x <= hi, an
    equality row having lo = hi = b, so that one code path serves both kinds; ``is_eq`` (k,) tells
    them apart where the penalty or the line search must.
    """

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def keep(self, mask: Tensor) -> "_Work":
        index = mask.nonzero().squeeze(-1)
        # (index_select: on CPU several times faster than t[index] on (B,n,n) tensors.)
        return _Work(**{k: v.index_select(0, index) for k, v in self.__dict__.items()})



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
                           factor: Optional["LeastDistanceFactor"] = None
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
        if warm_start is None and factor is None:
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
    floor of an infeasible QP: a float32 closest-feasible x was off by 2e-2)."""
    solution = _solve_alm_with_row_scaled_retry(problem, settings, warm_start)
    if problem.H.dtype == torch.float64:
        return solution
    status = solution.status
    retry = ((~has_solution(status) & (status != int(Status.PRIMAL_INFEASIBLE)) & (status != int(Status.DUAL_INFEASIBLE)))
             | (status == int(Status.CLOSEST_FEASIBLE)))
    if not bool(retry.any()):
        return solution
    idx = retry.nonzero().squeeze(-1)
    sub = problem.select(idx)
    wide = replace(sub, **{name: t.double() for name, t in sub.tensors().items()})
    again = solve_alm(wide, settings)
    again = QPSolution(*(t.to(problem.H.dtype) for t in again[:5]), again.status, again.iterations)
    again = _certified(sub, again, settings)
    # (A float32 closest-feasible answer is replaced whatever the float64 one's status: it was
    # not trusted.)
    better = has_solution(again.status) | (status[idx] == int(Status.CLOSEST_FEASIBLE))
    if not bool(better.any()):
        return solution
    keep = idx[better]
    return QPSolution(*(t.index_copy(0, keep, a[better]) for t, a in zip(solution, again)))


def _solve_alm_with_row_scaled_retry(problem: QPProblem, settings: Settings, warm_start=None) -> QPSolution:
    """The ALM on a canonical batch, certified (:func:`_certified`), with a second chance, rows
    equilibrated, for the problems that closest-feasible mode fails.

    Closest-feasible mode leaves the rows unscaled (a row scaling would change the metric in which
    the shift is the least-squares one), and on badly scaled feasible QPs that costs the ALM its
    accuracy: Maros-Meszaros PRIMALC1 and PRIMALC2 stall and PRIMALC5 ends wrongly unbounded with
    unscaled rows, and all three solve in 12 to 80 Newton steps with them. A feasible QP's
    solution does not depend on the row metric, so the problems that end without a solution
    (neither SOLVED nor CLOSEST_FEASIBLE) are solved again with their rows equilibrated and
    closest-feasible mode off, from a cold start; that answer replaces the first only where it
    is SOLVED.

    Returns:
        :class:`QPSolution`, batched, certified.
    """
    first = _certified(problem, solve_alm(problem, settings, warm_start), settings)
    if not settings.closest_feasible:
        return first
    retry = ~has_solution(first.status)
    if not bool(retry.any()):
        return first
    idx = retry.nonzero().squeeze(-1)
    sub = problem.select(idx)
    again = _certified(sub, solve_alm(sub, replace(settings, closest_feasible=False)), settings)
    better = again.status == int(Status.SOLVED)
    iterations = first.iterations.index_add(0, idx, again.iterations)
    if not bool(better.any()):
        return first._replace(iterations=iterations)
    keep = idx[better]
    merged = QPSolution(*(t.index_copy(0, keep, a[better]) for t, a in zip(first[:6], again[:6])), iterations)
    return merged


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


def solve_alm(problem: QPProblem, settings: Settings, warm_start=None) -> QPSolution:
    """The proximal augmented-Lagrangian engine on a canonical batch (see :func:`solve_problem_factored`)."""
    dtype, device = problem.H.dtype, problem.H.device
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    k = p + m
    tol = resolve_tolerance(settings, dtype)
    mu_min = settings.mu_min if settings.mu_min is not None else (1e-9 if dtype == torch.float64 else 1e-6)
    is_eq = torch.arange(k, device=device) < p

    scaled, scaling = ruiz_equilibrate(problem, settings.scaling_iter, scale_rows=not settings.closest_feasible)
    G = torch.cat([scaled.A, scaled.C], dim=-2)
    GT = G.transpose(-1, -2).contiguous()
    R = torch.cat([scaling.E, scaling.F], dim=-1)  # row scaling: G = diag(R) [A; C] diag(D)
    # When every row of C has one nonzero (bounds on single variables: x >= 0 in an LP, a box),
    # its share of the Newton matrix, C'WC, is diagonal: a step adds a diagonal, not a product.
    bound_rows = m > 0 and n > 0 and bool(((scaled.C != 0).sum(-1) == 1).all())
    bound_col = scaled.C.abs().argmax(-1) if bound_rows else torch.zeros(B, m, dtype=torch.int64, device=device)
    bound_val2 = scaled.C.gather(-1, bound_col.unsqueeze(-1)).squeeze(-1) ** 2 if bound_rows else scaled.H.new_zeros(B, m)
    structure = _Structure(zero_H=not bool(scaled.H.any()), bound_rows=bound_rows)
    ws = _batched_warm_start(warm_start, problem)
    if ws is None:
        x = scaled.H.new_zeros(B, n)
        w0 = scaled.H.new_zeros(B, k)
    else:
        x = ws[0] / scaling.D
        w0 = torch.cat([ws[1], ws[2]], dim=-1) * scaling.c.unsqueeze(-1) / R

    # Outputs, filled as problems leave the working set.
    out_x = problem.H.new_zeros(B, n)
    out_w = problem.H.new_zeros(B, k)
    out_s = problem.H.new_zeros(B, k)
    out_status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=device)
    out_iter = torch.zeros(B, dtype=torch.int64, device=device)

    def fresh_penalties(count: int, like: Tensor) -> dict:
        one = like.new_ones(count)
        return dict(
            mu_eq=one * settings.mu_eq, mu_in=one * settings.mu_in,
            eta_ext=one * 1e-1 * settings.mu_in ** 0.1,  # BCL target on the primal residual
            eta_in=one,  # inner (Newton) tolerance
        )

    w = _Work(
        H=scaled.H, g=scaled.g, G=G, GT=GT, absG=G.abs(), absGT=GT.abs(),
        lo=torch.cat([scaled.b, scaled.l], dim=-1), hi=torch.cat([scaled.b, scaled.u], dim=-1),
        D=scaling.D, R=R, c=scaling.c, index=torch.arange(B, device=device),
        done=torch.zeros(B, dtype=torch.bool, device=device),  # answered, left in until a compaction
        x=x,
        mult=w0,  # the accepted multipliers [y; z], centres of the proximal terms
        mult_cur=w0,  # the multipliers implied by x (equal to mult once converged)
        # The closest-feasible shift found so far (scaled), already added to lo and hi.
        shift=scaled.H.new_zeros(B, k),
        iterations=torch.zeros(B, dtype=torch.int64, device=device),
        primal_prev=scaled.H.new_full((B,), float("inf")),  # primal residual one outer iteration ago
        # The stall guard: the best residuals (primal, dual, closest-feasible) so far and the outer
        # iterations since one of them last halved (or the penalties or the shift changed).
        best=scaled.H.new_full((B, 3), float("inf")),
        since_progress=torch.zeros(B, dtype=torch.int64, device=device),
        # The Cholesky factor of the last Newton matrix and what it was built for: while the
        # active set and the penalties stay, Newton steps reuse it.
        factor=scaled.H.new_zeros(B, n, n),
        factor_rows=torch.zeros(B, k, dtype=torch.bool, device=device),
        factor_mu=scaled.H.new_zeros(B, 2),
        factor_valid=torch.zeros(B, dtype=torch.bool, device=device),
        # The part of the Newton matrix that only the equality penalty changes,
        # H + rho I + A'A / mu_eq, and the mu_eq it holds (nan: not built yet).
        newton_eq=scaled.H.new_zeros(B, n, n),
        newton_eq_mu=scaled.H.new_full((B,), float("nan")),
        bound_col=bound_col, bound_val2=bound_val2,  # (bound_rows only) C_i's column and C_ij^2
        # The proximal weight: settings.rho, raised for a problem whose H + rho I is not positive
        # definite (a slightly indefinite H), so that its inner problems stay strongly convex.
        rho=scaled.H.new_full((B,), settings.rho),
        **fresh_penalties(B, scaled.H),
    )
    eye = torch.eye(n, dtype=dtype, device=device)

    def finish(w: _Work, leaving: Tensor, status: Tensor, r: Tensor) -> tuple[_Work, Optional[Tensor]]:
        """Write the leaving problems' answers (in caller units) to the outputs and mark them done.
        ``leaving`` holds problems not done yet (the callers mask out ``w.done``).

        The working set is compacted only once a quarter of it is done: a compaction copies all of
        its (B,n,n) tensors, which costs more than carrying a few finished problems along.

        Returns:
            The working set and, when it was compacted, the mask of the rows it kept (else None).
        """
        idx = w.index[leaving]
        mult = w.mult_cur[leaving] * w.R[leaving] / w.c[leaving].unsqueeze(-1)
        x = w.x[leaving] * w.D[leaving]
        st = status[leaving]
        out_x[idx] = x
        out_w[idx] = mult
        shifted = (st == Status.CLOSEST_FEASIBLE) | (st == Status.PRIMAL_INFEASIBLE)
        if bool(shifted.any()):
            sidx, x = idx[shifted], x[shifted]
            # The violation of the original constraints (DESIGN section 2: s = G x - clip(G x));
            # on the rows that are not really shifted that is round-off, reported as 0. (Not the
            # shift applied plus what remains: a row left just inside its shifted bound has a
            # violation a little smaller than that shift.)
            Gx_l = vm(w.x[leaving], w.GT[leaving])
            lo0, hi0 = w.lo[leaving] - w.shift[leaving], w.hi[leaving] - w.shift[leaving]
            s = ((Gx_l - torch.clamp(Gx_l, lo0, hi0)) / w.R[leaving])[shifted]
            # The multipliers of the shifted rows are not unique: report alqp's choice, which the
            # backward differentiates (alqp.activity).
            sub = problem.select(sidx)
            out_s[sidx], out_w[sidx] = closest_feasible_output(
                sub.H, sub.g, sub.A, sub.b, sub.C, sub.l, sub.u, x, mult[shifted], s, tol.activity,
                polish=True)
        out_status[idx] = st
        out_iter[idx] = w.iterations[leaving]
        w.done = w.done | leaving
        finished = int(w.done.sum())
        if finished == w.done.numel() or 4 * finished < w.done.numel():
            return w, None
        keep = ~w.done
        return w.keep(keep), keep

    def reshift(w: _Work, mask: Tensor, r: Tensor, min_shift: Tensor) -> None:
        """Move the problems in ``mask`` onto their closest feasible QP and restart them there.

        At the penalty floor x is the closest-feasible point up to round-off amplified by 1/mu;
        its violation r is the least-squares shift plus an error in the range of the violated
        rows G_V. Projecting that range out gives the shift to working precision; the shifted QP
        is feasible, so the ALM then converges with bounded multipliers and full accuracy.
        """
        idx = mask.nonzero().squeeze(-1)
        r_s = r[idx] * w.R[idx]
        rows = is_eq | (r_s != 0)
        s = project_out_row_range(w.G[idx], rows, r_s)
        # A problem that is only slow to become feasible has its violation in the range of the
        # violated rows, so its projected shift is (nearly) zero: it is not moved.
        big = inf_norm(s / w.R[idx]) >= min_shift[idx]
        idx, r_s, s = idx[big], r_s[big], s[big]
        w.primal_prev[idx] = float("inf")
        w.shift[idx] += s
        w.lo[idx] += s
        w.hi[idx] += s
        # The multipliers grew without bound along null(G_V') of the shifted rows V (by different
        # penalties on equality and inequality rows, so not along s alone): restart the shifted,
        # now feasible, QP from their bounded part.
        moved = s.abs() > 1e-6 * inf_norm(s).unsqueeze(-1)
        mult = w.mult_cur[idx]
        mult = mult - project_out_row_range(w.G[idx], moved, mult)
        w.mult[idx], w.mult_cur[idx] = mult, mult
        w.since_progress[idx] = 0
        w.best[idx] = float("inf")
        for name, v in fresh_penalties(idx.numel(), w.x).items():
            getattr(w, name)[idx] = v

    def at_penalty_floor(w: _Work) -> Tensor:
        """(B,) True where both penalties have reached mu_min (up to its rounding)."""
        return (w.mu_eq <= mu_min * 1.0001) & (w.mu_in <= mu_min * 1.0001)

    for outer in range(settings.max_iter + 1):
        Hx, Gx = _H_times(w.x, w.H, structure), vm(w.x, w.GT)
        res, infeas, r, cost_scale = _residuals(w, p, Hx, Gx)
        primal, dual = res.primal, res.dual
        eps_p, eps_d = tol.bound(res.primal_scale), tol.bound(res.dual_scale)
        # The tolerances in scaled units (a primal residual r is r R there, a dual one r c D), the
        # floors of the BCL target and of the inner tolerance below. The inner floor is relative to
        # the cost's terms only: |G'w| grows without bound on an infeasible QP, and a floor that
        # grew with it stopped the inner solves short of the closest feasible point.
        floor_p = 0.1 * eps_p * w.R.amin(-1) if k else 0.1 * eps_p
        floor_d = 0.1 * tol.bound(cost_scale) * w.c * w.D.amin(-1)
        # The one certification (alqp.certify): primal, dual and duality gap, caller units.
        was_shifted = (w.shift != 0).any(-1)
        solved = res.meets(tol)
        solved = solved | _polish_multipliers(w, problem, res, solved, eps_p, eps_d, tol)
        at_floor = at_penalty_floor(w)
        # Infeasibility is detected by heuristics calibrated on data of size one, with the
        # tolerance as an absolute threshold (`detect`): they decide when to look for a shift,
        # never a status (a shifted answer is certified like any other).
        detect = tol.activity
        # At the floor the stationarity of the shift holds to O(mu) (the penalty bias); the
        # projection in reshift() removes what is left, so a relative test suffices here.
        stationary = infeas <= detect + 1e-6 * primal
        # At a floor mu that is not tiny the O(mu) bias can keep `infeas` above that test for ever;
        # a primal residual that no longer falls at the floor is the other sign of infeasibility.
        # (Only once the violation is nearly stationary: a stall far from the closest feasible
        # point would project a wrong shift.)
        stalled = (primal > detect) & (primal >= 0.9 * w.primal_prev) & (infeas <= 0.1 * primal)
        w.primal_prev = primal
        residuals = torch.stack([primal, dual, infeas], -1)
        progress = (residuals < 0.5 * w.best).any(-1)
        w.best = torch.where(progress.unsqueeze(-1), torch.minimum(w.best, residuals), w.best)
        w.since_progress = torch.where(progress, 0, w.since_progress + 1)
        infeasible = ~solved & at_floor & (primal > detect) & (stationary | stalled)
        if bool(infeasible.any()):
            # Dual stationarity of an infeasible QP at the penalty floor: its multipliers are
            # residuals over mu and grow without bound, so its dual residual is only known up
            # to their round-off (_multiplier_roundoff). This decides only that the problem is
            # infeasible; its answer is certified later, on the shifted QP, without this allowance.
            allowance = detect + 10 * torch.finfo(dtype).eps * _multiplier_roundoff(w, is_eq)
            infeasible = infeasible & (dual <= 10 * allowance)
        wrong_shift = solved & was_shifted
        if bool(wrong_shift.any()):
            # A shift taken before x reached the closest feasible point is not the least-squares
            # one, and its QP then solves to a wrong answer: that problem goes back to its own
            # constraints, from where it is, and looks for its shift again.
            idx = wrong_shift.nonzero().squeeze(-1)
            lo0, hi0 = w.lo[idx] - w.shift[idx], w.hi[idx] - w.shift[idx]
            Gx0 = Gx[idx]
            wrong_shift[idx] = ~shift_optimal(w.G[idx], lo0, hi0, w.x[idx], Gx0 - torch.clamp(Gx0, lo0, hi0),
                                              tol.closest_feasible())
            if bool(wrong_shift.any()):
                undo = wrong_shift.nonzero().squeeze(-1)
                w.lo[undo] -= w.shift[undo]
                w.hi[undo] -= w.shift[undo]
                w.shift[undo] = 0.0
                w.primal_prev = w.primal_prev.index_fill(0, undo, float("inf"))  # (not in place: it is `primal`)
                w.best[undo] = float("inf")
                w.since_progress[undo] = 0
                for name, v in fresh_penalties(undo.numel(), w.x).items():
                    getattr(w, name)[undo] = v
                solved = solved & ~wrong_shift
                was_shifted = was_shifted & ~wrong_shift
        status = torch.where(solved & ~was_shifted, int(Status.SOLVED), int(Status.CLOSEST_FEASIBLE))
        bad = ~(torch.isfinite(w.x).all(-1) & torch.isfinite(primal) & torch.isfinite(dual))
        status = torch.where(bad, int(Status.NUMERICAL_ERROR), status)
        stalled_out = ~solved & ~bad & ~infeasible & (w.since_progress >= settings.stall_iter)
        status = torch.where(stalled_out, int(Status.STALLED), status)
        leaving = solved | bad | stalled_out
        if not settings.closest_feasible:
            infeasible = infeasible & stationary
            status = torch.where(infeasible & ~solved & ~bad, int(Status.PRIMAL_INFEASIBLE), status)
            leaving = leaving | infeasible
        if outer == settings.max_iter:
            status = torch.where(leaving, status, int(Status.MAX_ITER))
            leaving = torch.ones_like(leaving)
        leaving = leaving & ~w.done
        if settings.verbose:
            print(f"alqp outer {outer:4d}: working {int((~w.done).sum()):6d}  max primal {float(primal.max()) if primal.numel() else 0:.2e}"
                  f"  max dual {float(dual.max()) if dual.numel() else 0:.2e}")
        if settings.closest_feasible and (infeasible & ~leaving & ~w.done).any():
            # A problem moves only when its shift is a real part of its violation (with a loose
            # eps_abs, `stationary` can hold on a problem that is merely slow to become feasible).
            reshift(w, infeasible & ~leaving & ~w.done, r, 0.1 * primal)
        if leaving.any():
            w, kept = finish(w, leaving, status, r)
            if bool(w.done.all()):
                break
            if kept is not None:
                Hx, Gx, floor_p, floor_d = Hx[kept], Gx[kept], floor_p[kept], floor_d[kept]

        # Inner problem: minimize the proximal augmented Lagrangian at fixed multipliers.
        x_prev = w.x
        x_new, mult_new, Gx_new, inner_ok, steps = _newton_inner(w, is_eq, Hx, Gx, eye, settings.max_inner_iter, structure)
        w.iterations = w.iterations + steps
        broken = ~inner_ok & ~w.done
        if bool(broken.any()):
            # A factorization that failed on an indefinite H: such a problem starts the outer
            # iteration again from x_k with a proximal weight that makes its inner problems
            # strongly convex (a KKT point may still solve it: it is certified like any other).
            raised = _raise_proximal_weight(w, broken)
            if bool(raised.any()):
                keep_old = raised.unsqueeze(-1)
                x_new = torch.where(keep_old, x_prev, x_new)
                mult_new = torch.where(keep_old, w.mult_cur, mult_new)
                Gx_new = torch.where(keep_old, Gx, Gx_new)
                inner_ok = inner_ok | raised
        dx = x_new - x_prev
        w.x, w.mult_cur = x_new, mult_new

        # Unboundedness certificate: a step along which the cost decreases while H and the
        # equality rows vanish and the inequality rows stay in the recession cone of [l, u].
        unbounded = _dual_infeasible(w, dx, settings.eps_dual_inf, structure)

        # BCL: accept the multipliers when the primal residual met its target, else stiffen.
        primal_new = inf_norm(Gx_new - torch.clamp(Gx_new, w.lo, w.hi))
        # At the floor a rejection would leave the next inner problem identical to this one (x and
        # the multipliers could never move again), so the plain method of multipliers takes over.
        accept = (primal_new <= w.eta_ext) | at_penalty_floor(w)
        w.mult = torch.where(accept.unsqueeze(-1), mult_new, w.mult)
        mu_in_next = torch.where(accept, w.mu_in, (w.mu_in * settings.mu_update_factor).clamp_min(mu_min))
        mu_eq_next = torch.where(accept, w.mu_eq, (w.mu_eq * settings.mu_update_factor).clamp_min(mu_min))
        # The floors keep a target that the certification already meets from stiffening the penalties.
        w.eta_ext = torch.maximum(torch.where(accept, w.eta_ext * w.mu_in ** 0.9, 1e-1 * mu_in_next ** 0.1), floor_p)
        w.eta_in = torch.maximum(torch.where(accept, w.eta_in * w.mu_in, mu_in_next), floor_d)
        w.since_progress = torch.where((mu_in_next != w.mu_in) | (mu_eq_next != w.mu_eq), 0, w.since_progress)
        w.mu_in, w.mu_eq = mu_in_next, mu_eq_next

        unbounded = unbounded & ~w.done
        broken = ~inner_ok & ~w.done
        if (unbounded | broken).any():
            Hx, Gx = _H_times(w.x, w.H, structure), vm(w.x, w.GT)
            r = _residuals(w, p, Hx, Gx)[2]
            status = torch.where(unbounded, int(Status.DUAL_INFEASIBLE), int(Status.NUMERICAL_ERROR))
            w, _ = finish(w, unbounded | broken, status, r)
            if bool(w.done.all()):
                break

    _mark_inaccurate(problem, out_x, out_w, out_status, dtype)
    return QPSolution(out_x, out_w[:, :p], out_w[:, p:], out_s[:, :p], out_s[:, p:], out_status, out_iter)


#: The largest indefiniteness, |most negative eigenvalue of H| / max |H_ij| (scaled data), that the
#: ALM meets by raising its proximal weight; beyond it a failed factorization stays a failure.
MAX_INDEFINITENESS = 1e-3


def _raise_proximal_weight(w: _Work, broken: Tensor) -> Tensor:
    """(B,) True where a problem in ``broken`` (its Newton matrix failed to factor) got a larger
    proximal weight ``w.rho``, with its cached Newton matrices invalidated.

    phi = f + rho/2 |x - x_k|^2 + penalties is strongly convex once rho exceeds the most negative
    eigenvalue of H in size, and the proximal point method then converges on a weakly convex
    problem; the weight becomes max(10 rho, 2 |lambda_min|). Only where H (scaled) is indefinite
    by at most MAX_INDEFINITENESS of its size: a PSD H whose factorization failed for another
    reason, or a clearly non-convex one, is left to fail (and to :func:`report_non_convex`)."""
    idx = broken.nonzero().squeeze(-1)
    H = w.H.index_select(0, idx)
    lam_min = torch.linalg.eigvalsh(H.double())[:, 0].to(H.dtype) if H.shape[-1] else H.new_zeros(idx.numel())
    size = H.abs().amax((-2, -1)) if H.shape[-1] else lam_min
    can = (lam_min < 0) & (-lam_min <= MAX_INDEFINITENESS * size)
    out = torch.zeros_like(broken)
    if not bool(can.any()):
        return out
    idx, lam_min = idx[can], lam_min[can]
    w.rho[idx] = torch.maximum(10 * w.rho[idx], -2 * lam_min)
    w.factor_valid[idx] = False
    w.newton_eq_mu[idx] = float("nan")
    out[idx] = True
    return out


def _polish_multipliers(w: _Work, problem: QPProblem, res, solved: Tensor, eps_p: Tensor, eps_d: Tensor,
                        tol) -> Tensor:
    """(B,) True where refitted multipliers certify a working problem that x already solves.

    The ALM's multipliers are residuals over the penalty, so their round-off grows as 1/mu: in
    float32 a feasible x with the right active set left a dual residual of 1e-3 relative where
    1.2e-5 was asked. For problems whose x is feasible and whose dual residual is within a factor
    1e3 of the tolerance, the multipliers are refitted on their active rows
    (:func:`alqp.activity.polish_multipliers`, float64) and kept, in ``w.mult_cur``, where the
    refit passes the one certification (on the shifted QP of a shifted problem, whose multipliers
    get alqp's choice when it leaves)."""
    candidates = ~solved & ~w.done & (res.primal <= eps_p) & (res.dual <= REFIT_WINDOW * eps_d)
    out = torch.zeros_like(solved)
    if not bool(candidates.any()):
        return out
    idx = candidates.nonzero().squeeze(-1)
    sub = problem.select(w.index[idx])
    p = sub.p
    G = torch.cat([sub.A, sub.C], -2)
    is_eq = torch.arange(G.shape[-2], device=G.device) < p
    R, c = w.R[idx], w.c[idx].unsqueeze(-1)
    x = w.x[idx] * w.D[idx]
    lo, hi = w.lo[idx] / R, w.hi[idx] / R  # caller units, with the shift of a shifted problem
    refit = polish_multipliers(sub.H, sub.g, G, x, w.mult_cur[idx] * R / c, is_eq, lo, hi, tol.activity)
    # (At the asked tolerance for shifted problems too: the looser one of the final certification
    # covers round-off, and a problem let go at it would leave with x less accurate than it can be.)
    ok = certify_residuals(sub.H.double(), sub.g.double(), G.double(), lo.double(), hi.double(), p, x.double(),
                           refit.double()).meets(tol)
    if bool(ok.any()):
        keep = idx[ok]
        w.mult_cur[keep] = refit[ok] * c[ok] / R[ok]
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
    G = torch.cat([sub.A, sub.C], -2)
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


def _residuals(w: _Work, p: int, Hx: Tensor, Gx: Tensor):
    """Residuals in the caller's units (not the scaled ones), at (x, mult_cur).

    Returns:
        :class:`alqp.certify.Residuals` of the working problems (of their shifted QPs once
        shifted), by the one certification every engine uses;
        infeas (B,): |A'(A x - b) + C'(C x - clip)|, the gradient of the squared violation (zero
            at the closest feasible point);
        r (B,k): the violation of each row (caller units);
        cost_scale (B,): max(|H x|, |g|), caller units.
    """
    mult = w.mult_cur
    r = (Gx - torch.clamp(Gx, w.lo, w.hi)) / w.R
    GTm = vm(mult, w.G)
    unscale = 1.0 / (w.c.unsqueeze(-1) * w.D)
    # Caller units: x = D x_s, H x = (H_s x_s) / (c D), G x = (G_s x_s) / R, w = R w_s / c.
    res = measure(w.x * w.D, Hx * unscale, w.g * unscale, Gx / w.R, GTm * unscale, w.lo / w.R, w.hi / w.R,
                  mult * w.R / w.c.unsqueeze(-1), p, vm(w.x.abs(), w.absGT) / w.R, vm(mult.abs(), w.absG) * unscale)
    # Stationarity of the squared violation in the metric the iterations minimize (the scaled
    # rows; the caller's metric up to one factor whenever closest_feasible is on).
    infeas = inf_norm(vm(r * w.R, w.G) / w.D)
    cost_scale = torch.maximum(inf_norm(Hx * unscale), inf_norm(w.g * unscale))
    return res, infeas, r, cost_scale


def _multiplier_roundoff(w: _Work, is_eq: Tensor) -> Tensor:
    """(B,) a bound on the round-off of the computed dual residual (caller units) while the
    multipliers are residuals divided by the penalties, y = y_k + (A x - b) / mu_eq: the round-off
    of G x and of the bounds is amplified by 1/mu, and |mult| is large while the multipliers of an
    infeasible QP grow."""
    mult = w.mult_cur
    mu = torch.where(is_eq, w.mu_eq.unsqueeze(-1), w.mu_in.unsqueeze(-1))
    bound = torch.where(mult > 0, w.hi, torch.where(mult < 0, w.lo, torch.zeros_like(w.lo)))
    mult_err = mult.abs() + (vm(w.x.abs(), w.absGT) + bound.abs().nan_to_num(0.0, 0.0, 0.0)) / mu
    return inf_norm(vm(mult_err, w.absG) / (w.c.unsqueeze(-1) * w.D))


def _dual_infeasible(w: _Work, dx: Tensor, tol: float, structure: "_Structure") -> Tensor:
    """(B,) True where the step dx certifies that the QP is unbounded below."""
    size = inf_norm(dx)
    nonzero = size > 0
    d = dx / torch.where(nonzero, size, torch.ones_like(size)).unsqueeze(-1)
    Hd = inf_norm(_H_times(d, w.H, structure))
    Gd = vm(d, w.GT)
    # Where hi is finite, G d may not grow; where lo is finite, it may not shrink.
    up = torch.where(torch.isfinite(w.hi), Gd.clamp_min(0), torch.zeros_like(Gd))
    down = torch.where(torch.isfinite(w.lo), (-Gd).clamp_min(0), torch.zeros_like(Gd))
    cone = torch.maximum(inf_norm(up), inf_norm(down))
    gd = (w.g * d).sum(-1)
    gscale = inf_norm(w.g).clamp_min(1.0)
    certified = nonzero & (cone <= tol) & (gd < -tol * gscale)
    if bool(certified.any()):
        # H d is measured against H's size: the cost scaling makes a scaled H small when g is
        # large, and an absolute test would take a strictly convex QP for an unbounded one. (The
        # size is taken only for the rare candidates: a pass over H.)
        idx = certified.nonzero().squeeze(-1)
        H_size = w.H.index_select(0, idx).abs().amax((-2, -1)) if w.H.shape[-1] else Hd[idx]
        certified[idx] = Hd[idx] <= tol * H_size.clamp_min(torch.finfo(d.dtype).tiny)
    return certified


# What _newton_inner reads and writes of the working set (the fields a compacted copy carries).
_NEWTON_FIELDS = ("H", "g", "G", "GT", "lo", "hi", "mu_eq", "mu_in", "eta_in", "x", "mult", "rho",
                  "factor", "factor_rows", "factor_mu", "factor_valid", "newton_eq", "newton_eq_mu",
                  "bound_col", "bound_val2")
_NEWTON_CACHES = ("factor", "factor_rows", "factor_mu", "factor_valid", "newton_eq", "newton_eq_mu")


def _newton_inner(w: _Work, is_eq: Tensor, Hx: Tensor, Gx: Tensor, eye: Tensor, max_steps: int,
                  structure: "_Structure", x: Optional[Tensor] = None, full_step: Optional[Tensor] = None,
                  last_rows: Optional[Tensor] = None):
    """Minimize the proximal augmented Lagrangian of every working problem over x.

        phi(x) = 1/2 x'Hx + g'x + rho/2 |x - x_k|^2
                 + sum_i 1/(2 mu_i) dist(G_i x + mu_i w_k,i, [lo_i, hi_i])^2

    (mu_i is mu_eq on equality rows, mu_in on inequality rows; x_k = w.x and w_k = w.mult are the
    proximal centre and the accepted multipliers). phi is convex, piecewise quadratic and once
    differentiable; semi-smooth Newton with an exact line search reaches its minimizer in finitely
    many steps.

    The batch steps whole, the problems that are done with dx = 0, while at least half of it
    still steps; then the rest goes on in a compacted copy (and so on, halving), so that a long
    tail of slow problems neither drags the whole batch along nor re-gathers its matrices at
    every step.

    Args:
        Hx (B,n), Gx (B,k): H x and G x at the starting point.
        structure: what the batch allows to skip (:class:`_Structure`).
        x, full_step, last_rows: the starting point (default x_k) and the loop's state, when a
            compacted copy continues its parent's loop.

    Returns:
        x (B,n), the multipliers it implies (B,k), G x (B,k), ok (B,): False where a factorization
        failed, steps (B,): Newton steps taken.
    """
    x_k, mult_k = w.x, w.mult
    rho = w.rho.unsqueeze(-1)  # (B,1)
    Bw = x_k.shape[0]
    k, p = is_eq.shape[0], int(is_eq.sum())  # the p equality rows come first
    mu = torch.where(is_eq, w.mu_eq.unsqueeze(-1), w.mu_in.unsqueeze(-1))
    mu_pair = torch.stack([w.mu_eq, w.mu_in], dim=-1)
    x = x_k if x is None else x
    active = ~w.done
    ok = torch.ones(Bw, dtype=torch.bool, device=x.device)
    steps = torch.zeros(Bw, dtype=torch.int64, device=x.device)
    # A full Newton step that leaves the active set unchanged lands on the minimizer of phi up to
    # round-off; this stops the loop where the gradient cannot reach eta_in (stiff penalties).
    last_rows = torch.zeros_like(w.lo, dtype=torch.bool) if last_rows is None else last_rows
    full_step = torch.zeros(Bw, dtype=torch.bool, device=x.device) if full_step is None else full_step
    for it in range(max_steps + 1):
        v = Gx + mu * mult_k
        dist = v - torch.clamp(v, w.lo, w.hi)
        mult = dist / mu
        if it == max_steps:
            break
        grad = Hx + w.g + rho * (x - x_k) + vm(mult, w.G)
        rows = (dist != 0) | is_eq
        settled = full_step & (rows == last_rows).all(-1)
        active = active & ok & (inf_norm(grad) > w.eta_in) & ~settled
        stepping = int(active.sum())
        if stepping == 0:
            break
        if 2 * stepping < Bw:
            idx = active.nonzero().squeeze(-1)
            sub = _Work(**{name: getattr(w, name).index_select(0, idx) for name in _NEWTON_FIELDS},
                        done=torch.zeros_like(idx, dtype=torch.bool))
            pick = lambda t: t.index_select(0, idx)  # noqa: E731
            x_s, mult_s, Gx_s, ok_s, steps_s = _newton_inner(
                sub, is_eq, pick(Hx), pick(Gx), eye, max_steps - it, structure, pick(x), pick(full_step),
                pick(last_rows))
            # The factors go back too: the next outer iteration may reuse them.
            for name in _NEWTON_CACHES:
                getattr(w, name).index_copy_(0, idx, getattr(sub, name))
            return (x.index_copy(0, idx, x_s), mult.index_copy(0, idx, mult_s), Gx.index_copy(0, idx, Gx_s),
                    ok.index_copy(0, idx, ok_s), steps.index_copy(0, idx, pick(steps) + steps_s))

        # Refactor only where the active set or the penalties changed since the last factorization.
        stale = active & ~(w.factor_valid & (w.factor_rows == rows).all(-1) & (w.factor_mu == mu_pair).all(-1))
        if bool(stale.any()):
            sidx = stale.nonzero().squeeze(-1)
            # (B,n,n) passes cost about half a batched product here: gather only the stale
            # problems' matrices, and accumulate into that copy in place.
            all_stale = sidx.numel() == Bw
            pick = (lambda t: t) if all_stale else (lambda t: t.index_select(0, sidx))
            # The equality rows are always in the Newton matrix: their product is rebuilt only
            # when mu_eq changes, and a step adds just the active inequality rows to it.
            rebuild = pick(w.newton_eq_mu) != pick(w.mu_eq)
            if bool(rebuild.any()):
                ridx = sidx[rebuild]
                K_eq = w.H.index_select(0, ridx)
                K_eq.diagonal(dim1=-2, dim2=-1).add_(w.rho[ridx].unsqueeze(-1))
                if p:
                    A_eq = w.G[:, :p].index_select(0, ridx).mul_(w.mu_eq[ridx, None, None].rsqrt())
                    K_eq.baddbmm_(A_eq.transpose(-1, -2), A_eq)
                w.newton_eq.index_copy_(0, ridx, K_eq)
                w.newton_eq_mu[ridx] = w.mu_eq[ridx]
            K = w.newton_eq.clone() if all_stale else w.newton_eq.index_select(0, sidx)
            if p < k:
                weights = pick(rows)[:, p:].to(x.dtype) / pick(w.mu_in).unsqueeze(-1)
                if structure.bound_rows:
                    K.diagonal(dim1=-2, dim2=-1).add_(torch.zeros_like(K[:, 0]).scatter_add_(
                        1, pick(w.bound_col), weights * pick(w.bound_val2)))
                else:
                    # (W^1/2 C)'(W^1/2 C): one gathered, scaled copy of C's rows serves both factors.
                    root_w = weights.sqrt_().unsqueeze(-1)
                    C_w = w.G[:, p:] * root_w if all_stale else w.G[:, p:].index_select(0, sidx).mul_(root_w)
                    K.baddbmm_(C_w.transpose(-1, -2), C_w)
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
            if all_stale:
                w.factor = L
            else:
                w.factor.index_copy_(0, sidx, L)
            w.factor_rows[sidx] = rows[sidx]
            w.factor_mu[sidx] = mu_pair[sidx]
            w.factor_valid[sidx] = good
            ok[sidx] = ok[sidx] & good
        moving = (ok & active).unsqueeze(-1)
        dx = cholesky_solve_rows(w.factor, -grad)
        dx = torch.where(moving, dx, torch.zeros_like(dx))
        Hdx = _H_times(dx, w.H, structure)
        Gdx = vm(dx, w.GT)
        alpha = _exact_line_search(
            w.lo, w.hi, is_eq, v, Gdx, mu,
            a0=(dx * (Hx + w.g + rho * (x - x_k))).sum(-1),
            a1=(dx * Hdx).sum(-1) + w.rho * (dx * dx).sum(-1),
        )
        step = torch.where(moving, alpha.unsqueeze(-1), torch.zeros_like(dx[:, :1]))
        x, Hx, Gx = x + step * dx, Hx + step * Hdx, Gx + step * Gdx
        # (A problem that stopped never steps again, so its full_step and last_rows are moot.)
        full_step = (alpha - 1).abs() <= 1e-6
        last_rows = rows
        steps = steps + active.to(steps.dtype)
    return x, mult, Gx, ok, steps


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
