"""Random QP batches in the style of the QPLayer paper's timing benchmark, and their reference solutions.

The QPLayer paper (ICLR 2024, appendix C.2.1) times random feasible QPs with n = 100 variables,
p = 50 equalities and m = 50 inequalities. We build each problem of a batch independently:

    H = M M' / n + alpha I        M (n,n) standard normal; strictly convex, eigenvalues in ~[alpha, 4+alpha]
    g ~ N(0, I)
    A ~ N(0, 1) (p,n),  b = A x0              x0 ~ N(0, I): a feasible point, so the QP is feasible
    C ~ N(0, 1) (m,n),  u = C x0 + margin,    margin ~ U(0, 1) per row
                        l = -inf (one-sided, as in the paper and ProxSuite's generator), or
                        l = C x0 - margin' (two_sided=True)

With a random g, the unconstrained minimizer lies far outside {C x <= u}, so a fair share of the
inequality rows is active at the solution: the solvers are not timed on a trivial problem.

The reference solution x_ref is computed problem by problem in float64 and certified by the KKT
conditions: a solver at tolerance 1e-12 (ProxSuite's dense ProxQP, or Clarabel when ProxSuite is
missing) proposes the active set, the KKT system of that set is solved exactly, and the set is
corrected until the result is primal feasible with multipliers of the right signs (to 1e-9
relative). The reference is therefore exact to rounding whatever the accuracy of the proposing
solver, and it is not biased toward the peer that proposed the set (an interior point alone leaves
~1e-8 errors in x on these problems).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from alqp.problem import BatchShape

# Tolerance of the reference solve: far below every tolerance that a benchmark asks of the methods.
REF_TOL = 1e-12


@dataclass
class QPBatch(BatchShape):
    """A batch of QPs ``min 1/2 x'Hx + g'x  s.t.  A x = b,  l <= C x <= u``.

    Attributes:
        H: (B,n,n).  g: (B,n).  A: (B,p,n).  b: (B,p).  C: (B,m,n).  l, u: (B,m), l may hold -inf.
        seed: the seed that generated the batch (reference solutions are cached per seed and size).
        two_sided: whether l is finite.
    """

    H: Tensor
    g: Tensor
    A: Tensor
    b: Tensor
    C: Tensor
    l: Tensor
    u: Tensor
    seed: int = 0
    two_sided: bool = False

    def tensors(self) -> tuple[Tensor, ...]:
        """(H, g, A, b, C, l, u) in the order every adapter takes them."""
        return (self.H, self.g, self.A, self.b, self.C, self.l, self.u)

    def to(self, device=None, dtype=None) -> "QPBatch":
        """A copy on ``device`` with floating tensors cast to ``dtype``."""
        H, g, A, b, C, l, u = (t.to(device=device, dtype=dtype) for t in self.tensors())
        return replace(self, H=H, g=g, A=A, b=b, C=C, l=l, u=u)

    def head(self, k: int) -> "QPBatch":
        """The first ``k`` problems of the batch."""
        H, g, A, b, C, l, u = (t[:k] for t in self.tensors())
        return replace(self, H=H, g=g, A=A, b=b, C=C, l=l, u=u)


def random_qp_batch(batch: int, n: int, p: int, m: int, seed: int = 0, two_sided: bool = False,
                    alpha: float = 1e-2) -> QPBatch:
    """Generate ``batch`` random feasible, strictly convex QPs (float64, CPU).

    Args:
        batch: B, number of problems.
        n, p, m: variables, equality rows, inequality rows.
        seed: seed of a private generator (the global torch RNG is left alone).
        two_sided: finite lower bounds l = C x0 - margin as well (default one-sided, l = -inf).
        alpha: the multiple of the identity added to M M'/n; the smallest eigenvalue of H is >= alpha.

    Returns:
        :class:`QPBatch` with H (B,n,n), g (B,n), A (B,p,n), b (B,p), C (B,m,n), l, u (B,m).
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    M = randn(batch, n, n)
    H = M @ M.transpose(1, 2) / max(n, 1) + alpha * torch.eye(n, dtype=f64)
    H = 0.5 * (H + H.transpose(1, 2))  # exact symmetry: some peers check it bit for bit
    g = randn(batch, n)
    x0 = randn(batch, n)
    A = randn(batch, p, n)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    C = randn(batch, m, n)
    Cx0 = (C @ x0.unsqueeze(-1)).squeeze(-1)
    u = Cx0 + torch.rand(batch, m, generator=gen, dtype=f64)
    if two_sided:
        l = Cx0 - torch.rand(batch, m, generator=gen, dtype=f64)
    else:
        l = torch.full((batch, m), -float("inf"), dtype=f64)
    return QPBatch(H, g, A, b, C, l, u, seed=seed, two_sided=two_sided)


def box_qp_batch(batch: int, n: int, seed: int = 0, alpha: float = 1e-1, spread: float = 3.0) -> QPBatch:
    """A batch of box-constrained QPs, the shape of a controller's input limits: H = M M'/n + alpha I,
    no equality rows, C = I (m = n), -1 <= x <= 1, and g = -H x_u with the unconstrained minimizer
    x_u ~ N(0, spread^2) mostly outside the box, so that some bounds are active.

    Returns:
        :class:`QPBatch` (float64, CPU), A (B,0,n), b (B,0), C (B,n,n), l = -1, u = 1 (B,n).
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    M = torch.randn(batch, n, n, generator=gen, dtype=f64)
    H = M @ M.transpose(1, 2) / max(n, 1) + alpha * torch.eye(n, dtype=f64)
    H = 0.5 * (H + H.transpose(1, 2))
    x_u = spread * torch.randn(batch, n, generator=gen, dtype=f64)
    g = -(H @ x_u.unsqueeze(-1)).squeeze(-1)
    C = torch.eye(n, dtype=f64).repeat(batch, 1, 1)
    ones = torch.ones(batch, n, dtype=f64)
    return QPBatch(H, g, torch.zeros(batch, 0, n, dtype=f64), torch.zeros(batch, 0, dtype=f64), C, -ones, ones,
                   seed=seed, two_sided=True)


def _polish(H, g, A, b, C, l, u, upper: np.ndarray, lower: np.ndarray, max_rounds: int = 20):
    """x of the QP from a guess of its active set, exact to rounding, or None.

    Interior-point solutions stop at a gap tolerance, which for an ill-conditioned H still leaves
    errors of ~1e-8 in x. Once the active set is known, the solution is that of one linear KKT
    system. Solve it; while the result violates a bound (add that row) or an active row has a
    multiplier of the wrong sign (drop it), correct the guess and solve again (a primal-dual
    active-set iteration started next to the answer, so it takes one or two rounds).

    Args:
        H (n,n), g (n,), A (p,n), b (p,), C (m,n), l, u (m,): one QP, numpy float64.
        upper, lower: (m,) bool, rows guessed at their upper / lower bound.

    Returns:
        x (n,) satisfying the KKT conditions to 1e-9 (relative), or None.
    """
    n, p = H.shape[0], A.shape[0]
    upper, lower = upper.copy(), lower.copy()
    scale = 1.0 + max(np.abs(g).max(initial=0), np.abs(b).max(initial=0),
                      np.abs(u[np.isfinite(u)]).max(initial=0), np.abs(l[np.isfinite(l)]).max(initial=0))
    tol = 1e-9 * scale
    for _ in range(max_rounds):
        E = np.vstack([A, C[upper], C[lower]])
        k = E.shape[0]
        K = np.block([[H, E.T], [E, np.zeros((k, k))]])
        rhs = np.concatenate([-g, b, u[upper], l[lower]])
        try:
            sol = np.linalg.solve(K, rhs)
        except np.linalg.LinAlgError:
            return None
        x = sol[:n]
        if not np.all(np.isfinite(x)):
            return None
        # Multipliers in ProxSuite's signs: z >= 0 on rows at their upper bound, z <= 0 at the lower.
        z = np.zeros(C.shape[0])
        n_up = int(upper.sum())
        z[upper] = sol[n + p: n + p + n_up]
        z[lower] = sol[n + p + n_up:]
        Cx = C @ x
        over, under = Cx > u + tol, Cx < l - tol
        bad_up, bad_lo = upper & (z < -tol), lower & (z > tol)
        if not (over.any() or under.any() or bad_up.any() or bad_lo.any()):
            return x
        upper = (upper & ~bad_up) | over
        lower = (lower & ~bad_lo) | under
    return None


def _guess_clarabel(H, g, A, b, C, l, u):
    """Solve one QP with Clarabel (cone form K x + s = k, s in cones) at REF_TOL.

    Returns:
        x (n,), and the rows it finds at their upper and lower bounds ((m,) bool each).
    """
    import clarabel
    import scipy.sparse as sp

    n, p = H.shape[0], A.shape[0]
    fin_u, fin_l = np.isfinite(u), np.isfinite(l)
    rows = [A, C[fin_u], -C[fin_l]]
    rhs = [b, u[fin_u], -l[fin_l]]
    K = sp.csc_matrix(np.vstack(rows)) if sum(r.shape[0] for r in rows) else sp.csc_matrix((0, n))
    cones = []
    if p:
        cones.append(clarabel.ZeroConeT(p))
    n_ineq = int(fin_u.sum() + fin_l.sum())
    if n_ineq:
        cones.append(clarabel.NonnegativeConeT(n_ineq))
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = REF_TOL
    settings.tol_ktratio = 1e-10
    settings.max_iter = 200
    sol = clarabel.DefaultSolver(sp.triu(sp.csc_matrix(H)).tocsc(), g, K, np.concatenate(rhs), cones,
                                 settings).solve()
    status = str(sol.status)
    # At tolerances this tight Clarabel may stop with InsufficientProgress next to the solution;
    # the polish decides whether its active set is right.
    if "Solved" not in status and "InsufficientProgress" not in status:
        raise RuntimeError(f"reference solver Clarabel failed: {status}")
    z, slack = np.asarray(sol.z)[p:], np.asarray(sol.s)[p:]
    active = z > slack  # complementarity: one of the two vanishes at the solution
    upper = np.zeros(len(u), bool)
    lower = np.zeros(len(l), bool)
    upper[np.flatnonzero(fin_u)] = active[: int(fin_u.sum())]
    lower[np.flatnonzero(fin_l)] = active[int(fin_u.sum()):]
    return np.asarray(sol.x), upper, lower


def _guess_proxsuite(H, g, A, b, C, l, u):
    """Solve one QP with ProxSuite's dense ProxQP at eps_abs = REF_TOL.

    Returns:
        x (n,), and the rows it finds at their upper and lower bounds ((m,) bool each).
    """
    import proxsuite

    n, p, m = H.shape[0], A.shape[0], C.shape[0]
    qp = proxsuite.proxqp.dense.QP(n, p, m)
    qp.settings.eps_abs = REF_TOL
    qp.settings.eps_rel = 0.0
    qp.settings.max_iter = 10_000
    # ProxSuite's infinity is 1e20.
    qp.init(H, g, A, b, C, np.maximum(l, -1e20), np.minimum(u, 1e20))
    qp.solve()
    x, z = np.asarray(qp.results.x), np.asarray(qp.results.z)
    Cx = C @ x
    # ProxSuite's signs: z > 0 at an upper bound, z < 0 at a lower one; compare with the slack as
    # for Clarabel, so that a tiny multiplier of an inactive row does not count.
    upper = (z > 0) & (u - Cx < z)
    lower = (z < 0) & (Cx - l < -z)
    return x, upper, lower


_GUESSERS = {"proxsuite": _guess_proxsuite, "clarabel": _guess_clarabel}


def reference_name() -> str:
    """The solver that guesses the active set for :func:`reference_solution` here."""
    for name, module in (("proxsuite", "proxsuite"), ("clarabel", "clarabel")):
        try:
            __import__(module)
            return name
        except ImportError:
            continue
    raise ImportError("the accuracy reference needs proxsuite or clarabel (pip install proxsuite)")


def reference_one(H, g, A, b, C, l, u, solver: str = "auto") -> np.ndarray:
    """The solution of one QP (numpy float64 arrays), certified by its KKT conditions.

    A solver run at tolerance 1e-12 proposes the active set; :func:`_polish` solves the KKT system
    of that set exactly and corrects the set until the KKT conditions hold. The result does not
    depend on the accuracy of the proposing solver, only on its active set being close.

    Returns:
        x (n,).
    """
    name = reference_name() if solver == "auto" else solver
    x, upper, lower = _GUESSERS[name](H, g, A, b, C, l, u)
    polished = _polish(H, g, A, b, C, l, u, upper, lower)
    if polished is None:
        raise RuntimeError(f"reference: the KKT polish of {name}'s active set failed")
    return polished


def reference_solution(qp: QPBatch, max_seconds: float = float("inf"), solver: str = "auto") -> Tensor:
    """Float64 reference solutions of the first problems of ``qp``, one certified solve each.

    Args:
        qp: the batch (any dtype and device; it is copied to float64 CPU).
        max_seconds: stop after the problem that crosses this budget (at least one is solved):
            dense reference solves cost ~n^3 each, so large n gets a sample of the batch.
        solver: "auto" (ProxSuite, else Clarabel), "proxsuite" or "clarabel": who proposes the
            active set (see :func:`reference_one`).

    Returns:
        x_ref (k,n) float64 CPU tensor for the first k <= B problems.
    """
    import time

    arrays = [t.detach().to("cpu", torch.float64).numpy() for t in qp.tensors()]
    start = time.perf_counter()
    xs = []
    for i in range(qp.batch_size):
        xs.append(reference_one(*(a[i] for a in arrays), solver=solver))
        if time.perf_counter() - start > max_seconds:
            break
    return torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, qp.n, dtype=torch.float64)
