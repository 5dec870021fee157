"""Tests of the differentiable layer (alqp.layer + alqp.backward).

Oracles: finite differences of the forward (``torch.autograd.gradcheck`` and explicit central
differences), QP instances built with a known exact solution, qpth and ProxSuite's QPLayer, the
QPLayer paper's closed-form unit test, and a learning task.

Gradient checks need instances where finite differences do not cross an active-set change, so the
generators below build them *from* their solution: strict complementarity (active rows have
|z| >= 0.5, inactive rows have slack >= 0.3) and independent active rows. Every test checks the
forward's status first, so a solver failure shows up as such instead of as a gradient mismatch.

Finite-difference step: the forward is accurate to about 1e-8 in x at eps_abs=1e-10 (active rows
can sit ~1e-8 inside their bounds, see test_forward_accuracy_of_instances), and tighter eps_abs
values are not reached reliably. So gradcheck runs with eps=1e-5 (forward noise / eps ~ 1e-3 in the
worst case, typically 1e-6) and atol=1e-4, rtol=1e-3; the solution map is piecewise affine in
g, b, l, u and smooth in H, A, C, so the O(eps^2) truncation error stays far below that.
"""
from __future__ import annotations

import math

import pytest
import torch

from alqp import QPLayer, Settings, Status, solve_qp
from alqp.backward import classify_rows, implicit_backward, lstsq_min_norm
from alqp.problem import canonicalize
from alqp.types import QPSolution

import families as F

DT = torch.float64
INF = float("inf")
NAMES = ("H", "g", "A", "b", "C", "l", "u")
SETTINGS = Settings(eps_abs=1e-10)
GC = dict(eps=1e-5, atol=1e-4, rtol=1e-3, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# Instances with a known solution
# ------------------------------------------------------------------------------------------------
def _mv(M, v):
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _mtv(M, v):
    return (M.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)


def _spd(gen, B, n):
    M = torch.randn(B, n, n, generator=gen, dtype=DT)
    H = M @ M.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=DT)
    return 0.5 * (H + H.transpose(-1, -2))


def _unif(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=DT)


def feasible_instance(B, n, p, m, n_up, n_lo, seed, infinite=True):
    """:func:`families.qp_from_solution`, every other row's unused side infinite when ``infinite``.
    Returns (problem dict, x*, y*, z*)."""
    return F.qp_from_solution(B, n, p, m, n_up, n_lo, seed, "alternate" if infinite else "none")


def infeasible_instance(B, n, p, n_viol, n_free, seed):
    """A closest-feasible QP batch in general position, built from its solution.

    The p equality rows and n_viol violated inequality rows number n + 1 (so they pin x*, and the
    shift s spans the one-dimensional null space of [A; C_I]'); n_free further rows are inactive.
    The shift s has |s_i| >= 0.2 on every shifted row, the multipliers are the solver's choice on
    their ray along s (orthogonal to s, or moved along s until every violated row has its sign),
    and finite differences in any input keep this structure.
    Returns (problem dict, x*, y*, z*, s_eq*, s_in*).
    """
    assert p + n_viol == n + 1
    gen = torch.Generator().manual_seed(seed)
    H = _spd(gen, B, n)
    x = torch.randn(B, n, generator=gen, dtype=DT)
    k = n + 1
    for _ in range(100):
        M = torch.randn(B, k, n, generator=gen, dtype=DT)
        # The null space of M' (one-dimensional): the last left singular vector.
        U, S, _ = torch.linalg.svd(M)
        s = U[..., -1]
        if s.abs().min() * math.sqrt(k) > 0.4:  # no shifted row close to unshifted
            break
    s = s * (_unif(gen, (B, 1), 0.8, 1.5) / s.abs().max(-1, keepdim=True).values)
    A, CI = M[:, :p], M[:, p:]
    s_eq, s_I = s[:, :p], s[:, p:]
    b = _mv(A, x) - s_eq
    CIx = _mv(CI, x)
    # A violated row sits beyond the bound named by the sign of its shift.
    u_I = torch.where(s_I > 0, CIx - s_I, torch.full_like(CIx, INF))
    l_I = torch.where(s_I < 0, CIx - s_I, torch.full_like(CIx, -INF))
    Cf = torch.randn(B, n_free, n, generator=gen, dtype=DT)
    Cfx = _mv(Cf, x)
    l_f = Cfx - _unif(gen, (B, n_free), 0.3, 1.0)
    u_f = Cfx + _unif(gen, (B, n_free), 0.3, 1.0)
    lam = torch.randn(B, k, generator=gen, dtype=DT)
    lam = lam - (lam * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True) * s
    # The solver's choice on the ray lam + t s: the orthogonal point (t = 0) unless a violated
    # inequality row's multiplier has the wrong sign there; then the smallest t that fixes every
    # row (z_i + t s_i must have the sign of s_i, i.e. t >= -z_i / s_i). g is the same for all t.
    t_min = torch.where(torch.arange(k) >= p, -lam / s, torch.full_like(s, -INF)).amax(-1, keepdim=True)
    lam = lam + t_min.clamp_min(0.0) * s
    C = torch.cat([CI, Cf], 1)
    z = torch.cat([lam[:, p:], torch.zeros(B, n_free, dtype=DT)], 1)
    y = lam[:, :p]
    g = -(_mv(H, x) + _mtv(A, y) + _mtv(C, z))
    prob = dict(H=H, g=g, A=A if p else None, b=b if p else None, C=C, l=torch.cat([l_I, l_f], 1),
                u=torch.cat([u_I, u_f], 1))
    s_in = torch.cat([s_I, torch.zeros(B, n_free, dtype=DT)], 1)
    return prob, x, y, z, s_eq, s_in


def _requires_grad(prob, names=NAMES):
    return {k: (None if v is None else v.clone().requires_grad_(k in names)) for k, v in prob.items()}


def _gradcheck(prob, outputs=("x", "y", "z", "s_eq", "s_in"), names=NAMES, settings=SETTINGS, **kw):
    """gradcheck of solve_qp on ``prob`` w.r.t. the present inputs in ``names``, for ``outputs``.

    H enters through 1/2 (H + H') so that finite differences stay symmetric. Fast mode checks every
    (output, input) pair separately with its own random projection.
    """
    keys = [k for k in NAMES if prob[k] is not None and k in names]
    fixed = {k: v for k, v in prob.items() if k not in keys}

    def fn(*args):
        d = dict(fixed, **dict(zip(keys, args)))
        if "H" in keys:
            d["H"] = 0.5 * (d["H"] + d["H"].transpose(-1, -2))
        sol = solve_qp(**d, settings=settings)
        return tuple(getattr(sol, o) for o in outputs)

    args = [prob[k].detach().clone().requires_grad_() for k in keys]
    return torch.autograd.gradcheck(fn, args, **dict(GC, **kw))


# ------------------------------------------------------------------------------------------------
# Forward sanity of the instances (so that gradient failures are not forward failures)
# ------------------------------------------------------------------------------------------------
def test_forward_accuracy_of_instances():
    prob, x, y, z = feasible_instance(2, 5, 1, 5, 1, 1, seed=0)
    sol = solve_qp(**prob, settings=SETTINGS)
    assert (sol.status == Status.SOLVED).all()
    assert torch.allclose(sol.x, x, atol=1e-7) and torch.allclose(sol.z, z, atol=1e-6)
    prob, x, y, z, s_eq, s_in = infeasible_instance(2, 3, 1, 3, 2, seed=0)
    sol = solve_qp(**prob, settings=SETTINGS)
    assert (sol.status == Status.CLOSEST_FEASIBLE).all()
    assert torch.allclose(sol.x, x, atol=1e-7)
    assert torch.allclose(sol.s_eq, s_eq, atol=1e-7) and torch.allclose(sol.s_in, s_in, atol=1e-7)
    assert torch.allclose(sol.y, y, atol=1e-6) and torch.allclose(sol.z, z, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# gradcheck: feasible
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["eq_only", "ineq_only", "both"])
def test_gradcheck_feasible(case):
    n, p, m, n_up, n_lo = {"eq_only": (4, 2, 0, 0, 0), "ineq_only": (4, 0, 5, 1, 2),
                           "both": (4, 1, 5, 1, 1)}[case]
    prob, *_ = feasible_instance(2, n, p, m, n_up, n_lo, seed=1)
    assert (solve_qp(**prob, settings=SETTINGS).status == Status.SOLVED).all()
    assert _gradcheck(prob)


def test_gradcheck_feasible_slow_mode_every_entry():
    """Full Jacobians (every input entry perturbed) on one small problem with +-inf bounds."""
    prob, *_ = feasible_instance(1, 3, 1, 3, 1, 1, seed=2)
    prob = {k: (None if v is None else v[0]) for k, v in prob.items()}  # unbatched
    assert _gradcheck(prob, outputs=("x", "y", "z"), fast_mode=False)


# ------------------------------------------------------------------------------------------------
# gradcheck: infeasible (closest feasible QP)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["eq_only", "ineq_only", "both"])
def test_gradcheck_infeasible_general_position(case):
    n, p, n_viol, n_free = {"eq_only": (2, 3, 0, 2), "ineq_only": (2, 0, 3, 1),
                            "both": (3, 1, 3, 1)}[case]
    prob, *_ = infeasible_instance(2, n, p, n_viol, n_free, seed=3)
    sol = solve_qp(**prob, settings=SETTINGS)
    assert (sol.status == Status.CLOSEST_FEASIBLE).all()
    assert _gradcheck(prob)


def test_gradcheck_infeasible_duplicated_equality():
    """x is not pinned by the shift: a duplicated equality row with two right-hand sides, a second
    equality and one active inequality row leave x a free direction, so x depends on H and g. A
    generic perturbation of A would break the duplication (the derivative does not exist there),
    so A is a function of its distinct rows."""
    gen = torch.Generator().manual_seed(4)
    n = 4
    H = _spd(gen, 1, n)[0]
    x = torch.randn(n, generator=gen, dtype=DT)
    a1, a2 = torch.randn(2, n, generator=gen, dtype=DT)
    C = torch.randn(4, n, generator=gen, dtype=DT)
    Cx = C @ x
    l = torch.tensor([-INF, Cx[1].item() - 0.5, Cx[2].item() - 0.6, -INF], dtype=DT)
    u = torch.tensor([Cx[0].item(), INF, Cx[2].item() + 0.5, Cx[3].item() + 0.4], dtype=DT)
    y = torch.tensor([0.7, 0.7, -0.4], dtype=DT)  # equal on the duplicated rows: orthogonal to s
    z = torch.tensor([0.9, 0.0, 0.0, 0.0], dtype=DT)
    A = torch.stack([a1, a1, a2])
    b = torch.stack([a1 @ x - 0.5, a1 @ x + 0.5, a2 @ x])
    g = -(H @ x + A.T @ y + C.T @ z)
    sol = solve_qp(H, g, A, b, C, l, u, settings=SETTINGS)
    assert sol.status == Status.CLOSEST_FEASIBLE
    assert torch.allclose(sol.x, x, atol=1e-7)
    assert torch.allclose(sol.s_eq, torch.tensor([0.5, -0.5, 0.0], dtype=DT), atol=1e-7)

    def fn(H, g, a1, a2, b, C, l, u):
        s = solve_qp(0.5 * (H + H.T), g, torch.stack([a1, a1, a2]), b, C, l, u, settings=SETTINGS)
        return s.x, s.y, s.z, s.s_eq, s.s_in

    args = [t.clone().requires_grad_() for t in (H, g, a1, a2, b, C, l, u)]
    assert torch.autograd.gradcheck(fn, args, **GC)


def test_gradcheck_infeasible_parallel_inequalities():
    """c'x >= beta1 and 2 c'x <= beta2 that contradict each other, plus an active row and an equality."""
    gen = torch.Generator().manual_seed(5)
    n = 3
    H = _spd(gen, 1, n)[0]
    x = torch.randn(n, generator=gen, dtype=DT)
    c, c2 = torch.randn(2, n, generator=gen, dtype=DT)
    a = torch.randn(1, n, generator=gen, dtype=DT)
    # Rows 0 and 1 are violated by -0.4 and +0.2, so that C's_in = (-0.4 + 2 * 0.2) c = 0.
    C = torch.stack([c, 2 * c, c2])
    l = torch.tensor([c @ x + 0.4, -INF, -INF], dtype=DT)
    u = torch.tensor([INF, 2 * (c @ x) - 0.2, c2 @ x], dtype=DT)
    s_in = torch.tensor([-0.4, 0.2, 0.0], dtype=DT)
    assert torch.allclose(C.T @ s_in, torch.zeros(n, dtype=DT), atol=1e-12)  # least-squares shift
    z = torch.tensor([0.3, 0.6, 0.5], dtype=DT)  # 0.3*(-0.4) + 0.6*0.2 = 0: orthogonal to s
    y = torch.tensor([-0.3], dtype=DT)
    b = a @ x
    g = -(H @ x + a.T @ y + C.T @ z)
    sol = solve_qp(H, g, a, b, C, l, u, settings=SETTINGS)
    assert sol.status == Status.CLOSEST_FEASIBLE
    assert torch.allclose(sol.x, x, atol=1e-7) and torch.allclose(sol.s_in, s_in, atol=1e-7)
    # Row 0 sits below its lower bound, so its multiplier must be <= 0: the orthogonal z breaks
    # that, and the solver moves along s by t = 0.75 (z_0 + t s_0 = 0): z = (0, 0.75, 0.5).
    assert torch.allclose(sol.z, z + 0.75 * s_in, atol=1e-6)

    def fn(H, g, a, b, c, c2, l, u):
        s = solve_qp(0.5 * (H + H.T), g, a, b, torch.stack([c, 2 * c, c2]), l, u, settings=SETTINGS)
        return s.x, s.y, s.z, s.s_eq, s.s_in

    args = [t.clone().requires_grad_() for t in (H, g, a, b, c, c2, l, u)]
    assert torch.autograd.gradcheck(fn, args, **GC)


def test_gradcheck_mixed_batch_with_shared_inputs():
    """One batch holding a feasible and an infeasible member, with H and u shared (unbatched)."""
    pf, xf, *_ = feasible_instance(1, 3, 1, 4, 1, 1, seed=6, infinite=False)
    pi, xi, *_ = infeasible_instance(1, 3, 1, 3, 1, seed=7)
    prob = {k: torch.cat([pf[k], pi[k]]) for k in NAMES}
    # Share H (the feasible member's) and shift g so that both members keep their solution:
    # H x* + g is unchanged.
    H = pf["H"][0]
    for i, (src, xs) in enumerate(((pf, xf), (pi, xi))):
        prob["g"][i] = src["g"][0] + (src["H"][0] - H) @ xs[0]
    prob["H"] = H
    # Share u, the infeasible member's. The feasible member's row i is rewritten on its equality
    # row a'x = b, an equivalent constraint: (c_i + d_i/b a)'x in [l_i + d_i, u_i + d_i] with d_i
    # the difference of the two u_i; where the shared u_i is infinite its upper bound goes (its
    # solution may move, and stays feasible).
    u_shared = pi["u"][0].clone()
    a, b = pf["A"][0, 0], pf["b"][0, 0]
    assert abs(float(b)) > 0.1
    for i in range(u_shared.shape[0]):
        if torch.isfinite(u_shared[i]):
            d = u_shared[i] - pf["u"][0, i]
            prob["C"][0, i] = pf["C"][0, i] + d / b * a
            prob["l"][0, i] = pf["l"][0, i] + d
    prob["u"] = u_shared
    assert prob["u"].dim() == 1 and prob["H"].dim() == 2
    sol = solve_qp(**prob, settings=SETTINGS)
    assert sol.status.tolist() == [Status.SOLVED, Status.CLOSEST_FEASIBLE]
    assert _gradcheck(prob)


# ------------------------------------------------------------------------------------------------
# Each output separately and together, against central differences (one set of forward solves)
# ------------------------------------------------------------------------------------------------
def test_each_output_and_their_sum_match_central_differences():
    prob, *_ = infeasible_instance(2, 3, 1, 3, 2, seed=8)
    gen = torch.Generator().manual_seed(9)
    keys = [k for k in NAMES if prob[k] is not None]
    dirs = {}
    for k in keys:
        d = torch.randn(prob[k].shape, generator=gen, dtype=DT)
        if k in ("l", "u"):
            d = torch.where(torch.isfinite(prob[k]), d, torch.zeros_like(d))
        if k == "H":
            d = 0.5 * (d + d.transpose(-1, -2))
        dirs[k] = d
    h = 1e-5

    def outputs(t):
        return solve_qp(**{k: (v + t * dirs[k] if k in dirs else v) for k, v in prob.items()}, settings=SETTINGS)

    plus, minus = outputs(h), outputs(-h)
    args = _requires_grad(prob)
    sol = solve_qp(**args, settings=SETTINGS)
    assert (sol.status == Status.CLOSEST_FEASIBLE).all() and (plus.status == sol.status).all()
    weights = {o: torch.randn(getattr(sol, o).shape, generator=gen, dtype=DT) for o in ("x", "y", "z", "s_eq", "s_in")}

    def check(outs):
        loss = sum((getattr(sol, o) * weights[o]).sum() for o in outs)
        grads = torch.autograd.grad(loss, [args[k] for k in keys], retain_graph=True)
        analytic = sum((gr * dirs[k]).sum() for gr, k in zip(grads, keys))
        fd = sum(((getattr(plus, o) - getattr(minus, o)) * weights[o]).sum() for o in outs) / (2 * h)
        assert abs(float(analytic - fd)) <= 1e-4 * (1 + abs(float(fd))), (outs, float(analytic), float(fd))
        return float(fd)

    for o in ("x", "y", "z", "s_eq", "s_in"):
        assert check((o,)) != 0.0  # every output does move along this direction
    check(("x", "y", "z", "s_eq", "s_in"))


def test_infeasible_backward_against_two_stage_cvxpy_oracle():
    """The closest-feasible backward alone, independent of our forward: solutions and central
    differences both come from the two-stage CVXPY/Clarabel oracle (tests/oracles.py), whose
    multipliers are the minimum-norm ones, i.e. orthogonal to the shift like ours."""
    import oracles  # tests/oracles.py (pytest puts tests/ on sys.path)
    prob, *_ = infeasible_instance(1, 3, 1, 3, 1, seed=26)
    one = {k: v[0] for k, v in prob.items()}
    gen = torch.Generator().manual_seed(27)
    ref = oracles.cvxpy_closest_feasible(**one)
    as_t = lambda a: torch.as_tensor(a, dtype=DT).unsqueeze(0)  # noqa: E731
    sol = QPSolution(*(as_t(v) for v in ref[:5]), torch.tensor([int(Status.CLOSEST_FEASIBLE)]),
                     torch.zeros(1, dtype=torch.long))
    # The oracle's stage-2 multipliers are one choice among many (tests/oracles.py), so the loss
    # weighs only the outputs that are unique: x and the shift.
    weights = [torch.randn(1, len(v), generator=gen, dtype=DT) * (0.0 if i in (1, 2) else 1.0)
               for i, v in enumerate(ref[:5])]
    grads = implicit_backward(canonicalize(**one), sol, *weights)

    def loss(p):
        r = oracles.cvxpy_closest_feasible(**p)
        return sum(float(w[0] @ torch.as_tensor(v, dtype=DT)) for w, v in zip(weights, r[:5]))

    h = 1e-5
    for k in NAMES:
        d = torch.randn(one[k].shape, generator=gen, dtype=DT)
        if k in ("l", "u"):
            d = torch.where(torch.isfinite(one[k]), d, torch.zeros_like(d))
        if k == "H":
            d = 0.5 * (d + d.T)
        fd = (loss({**one, k: one[k] + h * d}) - loss({**one, k: one[k] - h * d})) / (2 * h)
        an = float((grads[k][0] * d).sum())
        assert abs(an - fd) <= 1e-5 * (1 + abs(fd)), (k, an, fd)


# ------------------------------------------------------------------------------------------------
# The QPLayer paper's unit test (appendix C.1.3)
# ------------------------------------------------------------------------------------------------
def test_paper_lp_unit_test():
    """min x1 + x2 s.t. theta <= x1 + x2, 0 <= x <= 1: dx_i/dtheta = 1/2 for theta <= 2 (the
    least-squares answer for the degenerate LP), 1/3 for theta > 2 (closest feasible QP)."""
    thetas = torch.tensor([0.5, 1.0, 1.5, 2.2, 3.0], dtype=DT, requires_grad=True)
    B = thetas.shape[0]
    C = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    l = torch.cat([thetas.unsqueeze(-1), torch.zeros(B, 2, dtype=DT)], -1)
    u = torch.tensor([INF, 1.0, 1.0], dtype=DT)
    sol = solve_qp(torch.zeros(2, 2, dtype=DT), torch.ones(2, dtype=DT), C=C, l=l, u=u, settings=SETTINGS)
    feasible = thetas.detach() <= 2
    assert sol.status.tolist() == [Status.SOLVED if f else Status.CLOSEST_FEASIBLE for f in feasible]
    expected_x = torch.where(feasible, thetas.detach() / 2, (thetas.detach() + 1) / 3)
    assert torch.allclose(sol.x, expected_x.unsqueeze(-1).expand(B, 2), atol=1e-7)
    for i in range(2):
        (d,) = torch.autograd.grad(sol.x[:, i].sum(), thetas, retain_graph=True)
        assert torch.allclose(d, torch.where(feasible, 0.5, 1 / 3).to(DT), atol=1e-9), d


# ------------------------------------------------------------------------------------------------
# Agreement with peers
# ------------------------------------------------------------------------------------------------
def _peer_problem():
    prob, x, y, z = feasible_instance(3, 5, 1, 4, 1, 1, seed=10, infinite=False)
    return prob, x


def test_matches_qpth_on_strictly_convex_feasible():
    import qpth.qp as qpth  # a test dependency (pyproject [test]): fail loudly if missing
    prob, x_true = _peer_problem()
    w = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(11), dtype=DT)
    ours = _requires_grad(prob)
    sol = solve_qp(**ours, settings=SETTINGS)
    assert (sol.status == Status.SOLVED).all()
    g_ours = torch.autograd.grad((sol.x * w).sum(), [ours[k] for k in NAMES])

    theirs = _requires_grad(prob)
    # qpth's form: G x <= h, here [C; -C] x <= [u; -l] (all bounds finite in this instance).
    G = torch.cat([theirs["C"], -theirs["C"]], 1)
    h = torch.cat([theirs["u"], -theirs["l"]], 1)
    x = qpth.QPFunction(verbose=False, eps=1e-12, maxIter=50)(theirs["H"], theirs["g"], G, h, theirs["A"], theirs["b"])
    assert torch.allclose(x, x_true, atol=1e-9)
    g_qpth = torch.autograd.grad((x * w).sum(), [theirs[k] for k in NAMES])
    for k, a, b in zip(NAMES, g_ours, g_qpth):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (k, (a - b).abs().max())


def _proxsuite_grads(prob, loss_fn, **kw):
    from proxsuite.torch.qplayer import QPFunction

    args = _requires_grad(prob)
    # ProxSuite's layer allocates its gradients with the default dtype: make it float64.
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        out = QPFunction(eps=1e-12, maxIter=10000, eps_backward=1e-10, **kw)(*[args[k] for k in NAMES])
        return torch.autograd.grad(loss_fn(out), [args[k] for k in NAMES])
    finally:
        torch.set_default_dtype(old)


def test_matches_proxsuite_on_loss_of_x():
    prob, x_true = _peer_problem()
    w = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(12), dtype=DT)
    ours = _requires_grad(prob)
    sol = solve_qp(**ours, settings=SETTINGS)
    g_ours = torch.autograd.grad((sol.x * w).sum(), [ours[k] for k in NAMES])
    g_px = _proxsuite_grads(prob, lambda out: (out[0] * w).sum())
    for k, a, b in zip(NAMES, g_ours, g_px):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (k, (a - b).abs().max())


def _central_difference(prob, loss_of_solution, direction, h=1e-5):
    plus = solve_qp(**{k: (v + h * direction[k] if k in direction else v) for k, v in prob.items()}, settings=SETTINGS)
    minus = solve_qp(**{k: (v - h * direction[k] if k in direction else v) for k, v in prob.items()}, settings=SETTINGS)
    return float(loss_of_solution(plus) - loss_of_solution(minus)) / (2 * h)


def test_loss_on_z_matches_finite_differences_where_proxsuite_differs():
    """ProxSuite's backward for a loss on z differs from the derivative (it does not zero the
    inactive rows' dz); ours matches central differences of the forward."""
    prob, _ = _peer_problem()
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(3, 4, generator=gen, dtype=DT)
    ours = _requires_grad(prob)
    sol = solve_qp(**ours, settings=SETTINGS)
    g_ours = dict(zip(NAMES, torch.autograd.grad((sol.z * w).sum(), [ours[k] for k in NAMES])))
    g_px = dict(zip(NAMES, _proxsuite_grads(prob, lambda out: (out[2] * w).sum())))
    differs = 0
    for k in NAMES:
        d = torch.randn(prob[k].shape, generator=gen, dtype=DT)
        if k == "H":
            d = 0.5 * (d + d.transpose(-1, -2))
        fd = _central_difference(prob, lambda s: (s.z * w).sum(), {k: d})
        assert abs(float((g_ours[k] * d).sum()) - fd) <= 1e-4 * (1 + abs(fd)), k
        differs += abs(float((g_px[k] * d).sum()) - fd) > 1e-3 * (1 + abs(fd))
    assert differs > 0  # the comparison is informative: ProxSuite's answer is not the derivative


def test_loss_on_shift_matches_finite_differences():
    """Loss ||s||^2 on an infeasible batch, against central differences of the forward."""
    prob, *_ = infeasible_instance(2, 3, 1, 3, 1, seed=14)
    ours = _requires_grad(prob)
    sol = solve_qp(**ours, settings=SETTINGS)
    assert (sol.status == Status.CLOSEST_FEASIBLE).all()
    loss = lambda s: (s.s_eq ** 2).sum() + (s.s_in ** 2).sum()  # noqa: E731
    g_ours = dict(zip(NAMES, torch.autograd.grad(loss(sol), [ours[k] for k in NAMES])))
    gen = torch.Generator().manual_seed(15)
    for k in NAMES:
        d = torch.randn(prob[k].shape, generator=gen, dtype=DT)
        if k in ("l", "u"):
            d = torch.where(torch.isfinite(prob[k]), d, torch.zeros_like(d))
        if k == "H":
            d = 0.5 * (d + d.transpose(-1, -2))
        fd = _central_difference(prob, loss, {k: d})
        assert abs(float((g_ours[k] * d).sum()) - fd) <= 1e-4 * (1 + abs(fd)), k
    # ||s||^2 does not depend on the cost at all.
    assert g_ours["H"].abs().max() < 1e-9 and g_ours["g"].abs().max() < 1e-9


# ------------------------------------------------------------------------------------------------
# Batching, shared inputs, shapes, dtypes
# ------------------------------------------------------------------------------------------------
def test_shared_input_gradient_is_sum_over_batch():
    one, *_ = feasible_instance(1, 4, 1, 4, 1, 1, seed=16)
    gen = torch.Generator().manual_seed(17)
    # Three members with the same constraints and different costs.
    prob = {k: v[0] for k, v in one.items()}
    prob["g"] = one["g"] + 0.3 * torch.randn(3, 4, generator=gen, dtype=DT)
    w = torch.randn(3, 4, generator=gen, dtype=DT)
    loss = lambda s: (s.x * w).sum() + (s.z ** 2).sum()  # noqa: E731

    C_shared = prob["C"].clone().requires_grad_()
    s1 = solve_qp(**{**prob, "C": C_shared}, settings=SETTINGS)
    assert (s1.status == Status.SOLVED).all()
    (gs,) = torch.autograd.grad(loss(s1), C_shared)
    C_batched = prob["C"].expand(3, 4, 4).clone().requires_grad_()
    s2 = solve_qp(**{**prob, "C": C_batched}, settings=SETTINGS)
    (gb,) = torch.autograd.grad(loss(s2), C_batched)
    assert gs.shape == (4, 4) and gb.shape == (3, 4, 4)
    assert torch.allclose(gs, gb.sum(0), atol=1e-12)
    assert gb.abs().amax((1, 2)).min() > 1e-3  # every member contributes


@pytest.mark.engine_independent
def test_unbatched_in_unbatched_out_and_batch_one_broadcast():
    prob, *_ = feasible_instance(2, 3, 1, 3, 1, 1, seed=18)
    single = {k: v[0].clone().requires_grad_() for k, v in prob.items()}
    sol = solve_qp(**single, settings=SETTINGS)
    assert sol.x.shape == (3,) and sol.z.shape == (3,) and sol.status.shape == ()
    sol.x.sum().backward()
    assert all(single[k].grad.shape == single[k].shape for k in NAMES)
    # A (1, m) input broadcast against a batch of 2 gets a (1, m) gradient.
    u1 = prob["u"][:1].clone().requires_grad_()
    l2 = torch.minimum(prob["l"], u1.detach() - 0.1)
    sol = solve_qp(**{**prob, "u": u1, "l": l2}, settings=SETTINGS)
    sol.x.sum().backward()
    assert u1.grad.shape == (1, 3)


@pytest.mark.engine_independent
def test_float32_inputs_get_float32_gradients():
    prob, *_ = feasible_instance(2, 3, 1, 3, 1, 1, seed=19)
    p32 = {k: v.float().requires_grad_() for k, v in prob.items()}
    sol = solve_qp(**p32)
    assert (sol.status == Status.SOLVED).all() and sol.x.dtype == torch.float32
    sol.x.sum().backward()
    ref = {k: v.clone().requires_grad_() for k, v in prob.items()}
    solve_qp(**ref, settings=SETTINGS).x.sum().backward()
    overall = max(float(ref[k].grad.abs().max()) for k in NAMES)
    for k in NAMES:
        assert p32[k].grad.dtype == torch.float32
        # float32's forward is accurate to ~1e-5 relative (Settings' eps floor), which the KKT
        # solve amplifies by its conditioning: compare relative to the gradient's size (with a
        # floor: a gradient that is zero up to round-off, here dL/dH with x fixed by its n active
        # rows, is compared relative to the others).
        scale = max(float(ref[k].grad.abs().max()), 1e-6 * overall)
        assert (p32[k].grad.double() - ref[k].grad).abs().max() <= 1e-2 * scale, k


@pytest.mark.engine_independent
def test_missing_bound_side_gets_no_gradient():
    prob, *_ = feasible_instance(1, 3, 0, 3, 2, 0, seed=20)  # two rows active at u, one inactive
    u = prob["u"].clone().requires_grad_()
    sol = solve_qp(prob["H"], prob["g"], C=prob["C"], u=u, settings=SETTINGS)
    assert sol.status.item() == Status.SOLVED
    sol.x.sum().backward()
    assert u.grad[0, :2].abs().min() > 1e-6 and u.grad[0, 2] == 0
    # Through QPLayer with only l given: the mirrored problem (x -> -x, l = -u) has the solution -x,
    # so the loss -sum(x) has gradient w.r.t. l equal to the gradient of sum(x) w.r.t. u.
    l = (-prob["u"]).clone().requires_grad_()
    layer = QPLayer(settings=SETTINGS)
    out = layer(prob["H"], -prob["g"], C=prob["C"], l=l)
    assert out.status.item() == Status.SOLVED and torch.allclose(out.x, -sol.x, atol=1e-7)
    out.x.sum().backward()
    assert torch.allclose(l.grad, u.grad, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Non-converged problems and degenerate systems: zero / finite gradients, never NaN
# ------------------------------------------------------------------------------------------------
@pytest.mark.alm_only
def test_max_iter_and_unbounded_members_get_zero_gradient():
    prob, *_ = feasible_instance(2, 4, 1, 4, 1, 1, seed=21)
    args = _requires_grad(prob)
    sol = solve_qp(**args, settings=Settings(max_iter=1))
    assert (sol.status == Status.MAX_ITER).all()
    (sol.x.sum() + sol.y.sum() + sol.z.sum()).backward()
    for k in NAMES:
        assert torch.isfinite(args[k].grad).all() and (args[k].grad == 0).all(), k

    # A batch with an unbounded member (H = 0, g pushes x1 to -inf, x1 unconstrained) and a solved one.
    H = torch.zeros(2, 2, 2, dtype=DT)
    H[1] = torch.eye(2, dtype=DT)
    g = torch.tensor([[1.0, 0.0], [1.0, -1.0]], dtype=DT, requires_grad=True)
    C = torch.tensor([[0.0, 1.0]], dtype=DT).expand(2, 1, 2).clone().requires_grad_()
    u = torch.tensor([[0.5], [0.5]], dtype=DT, requires_grad=True)
    sol = solve_qp(H, g, C=C, u=u, settings=SETTINGS)
    assert sol.status.tolist() == [Status.DUAL_INFEASIBLE, Status.SOLVED]
    # (Weight 2 on z: for the solved member x2 = u and z = 1 - u, so x.sum() + z.sum() would not
    # depend on u at all.)
    (sol.x.sum() + 2 * sol.z.sum()).backward()
    for t in (g, C, u):
        assert torch.isfinite(t.grad).all() and (t.grad[0] == 0).all() and t.grad[1].abs().max() > 0


def test_degenerate_lp_and_psd_gradients_are_finite_and_least_squares():
    """An LP with a dependent (duplicated) active row and a PSD H: the KKT matrix is singular; the
    backward returns the minimum-norm least-squares answer, finite."""
    # min -x1 - x2 s.t. x1 + x2 <= 1 (twice), x >= 0: a degenerate vertex-free face.
    C = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    u = torch.tensor([1.0, 1.0, INF, INF], dtype=DT, requires_grad=True)
    l = torch.tensor([-INF, -INF, 0.0, 0.0], dtype=DT)
    g = torch.tensor([-1.0, -1.0], dtype=DT, requires_grad=True)
    sol = solve_qp(torch.zeros(2, 2, dtype=DT), g, C=C, l=l, u=u, settings=SETTINGS)
    assert sol.status.item() == Status.SOLVED
    (sol.x.sum()).backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(g.grad).all()
    # x1 + x2 = (u1 + u2) / 2 in the least-squares sense: each duplicate gets half, by symmetry.
    assert torch.allclose(u.grad[:2], torch.tensor([0.5, 0.5], dtype=DT), atol=1e-6)


@pytest.mark.engine_independent
def test_lstsq_min_norm_against_pinv():
    gen = torch.Generator().manual_seed(22)
    # Full column rank, consistent: the exact solution whatever the scaling.
    M = torch.randn(4, 7, 5, generator=gen, dtype=DT) * torch.logspace(-2, 2, 5, dtype=DT)
    w = torch.randn(4, 5, generator=gen, dtype=DT)
    assert torch.allclose(lstsq_min_norm(M, _mv(M, w)), w, atol=1e-8, rtol=1e-8)
    # Rank-deficient and inconsistent: the pinv solution in the equilibrated metric. Round-off
    # drifts along the null space by ~eps |M|^2 / delta (1e-6 here) per proximal step, hence atol.
    L = torch.randn(4, 6, 3, generator=gen, dtype=DT)
    R = torch.randn(4, 3, 5, generator=gen, dtype=DT)
    M = L @ R  # rank 3
    r = torch.randn(4, 6, generator=gen, dtype=DT)
    from alqp.backward import equilibrate
    Ms, d_r, d_c = equilibrate(M)
    expected = d_c * _mv(torch.linalg.pinv(Ms), d_r * r)
    got = lstsq_min_norm(M, r)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (_mv(M, got) - r).norm() <= (_mv(M, expected) - r).norm() + 1e-8  # least squares
    # Zero matrix: zero answer, no NaN.
    assert (lstsq_min_norm(torch.zeros(2, 3, 3, dtype=DT), torch.ones(2, 3, dtype=DT)) == 0).all()


@pytest.mark.engine_independent
def test_active_set_classification():
    prob, x, y, z = feasible_instance(1, 4, 1, 5, 1, 1, seed=23)
    P = canonicalize(**prob)
    act = classify_rows(P, x, y, z, torch.zeros_like(y), torch.zeros_like(z), torch.tensor([int(Status.SOLVED)]), 1e-6)
    assert act.active[0].tolist() == [1, 1, 0, 0, 0]
    assert act.upper[0].tolist() == [1, 0, 0, 0, 0] and act.lower[0].tolist() == [0, 1, 0, 0, 0]
    assert act.violated.sum() == 0


# ------------------------------------------------------------------------------------------------
# The backward selector
# ------------------------------------------------------------------------------------------------
@pytest.mark.engine_independent
def test_backward_selector():
    prob, *_ = feasible_instance(1, 2, 0, 1, 1, 0, seed=24)
    with pytest.raises(ValueError):
        solve_qp(**prob, backward="nope")
    try:
        import alqp.lpgd  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(NotImplementedError):
            solve_qp(**prob, backward="lpgd")
        with pytest.raises(NotImplementedError):
            QPLayer(backward="lpgd")


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------
def _fit_constraint_matrix(seed: int, iterations: int = 60) -> list:
    """Losses of Adam fitting a layer's C to a hidden polygon {C x <= 1} from the projections of
    16 random points onto it, from C_true perturbed by 0.3 (both drawn from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    n, m, B = 2, 4, 16
    angles = torch.arange(m, dtype=DT) * (2 * math.pi / m) + 0.3
    C_true = torch.stack([angles.cos(), angles.sin()], -1)
    u = torch.ones(m, dtype=DT)
    H = torch.eye(n, dtype=DT)
    points = 2.0 * torch.randn(B, n, generator=gen, dtype=DT)
    layer = QPLayer(Settings(eps_abs=1e-8, eps_rel=0.0))
    with torch.no_grad():
        target = layer(H, -points, C=C_true, u=u).x
    C = (C_true + 0.3 * torch.randn(m, n, generator=gen, dtype=DT)).requires_grad_()
    opt = torch.optim.Adam([C], lr=0.02)
    losses = []
    for _ in range(iterations):
        sol = layer(H, -points, C=C, u=u)
        assert (sol.status == Status.SOLVED).all()
        loss = ((sol.x - target) ** 2).sum(-1).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.mark.engine_independent
def test_learns_constraint_matrix():
    """Recover a hidden polygon from projections, over six seeds. The fit is not convex: from some
    starts Adam stops in a local minimum (seed 1 at 0.24 of its initial loss), so the property is
    that every seed's loss falls and most fall by two orders of magnitude."""
    ratios = [(lambda losses: losses[-1] / losses[0])(_fit_constraint_matrix(seed)) for seed in range(6)]
    assert max(ratios) < 0.5, ratios
    assert sum(r < 0.02 for r in ratios) >= 5, ratios


def test_small_positive_entries_stay_free_at_a_loose_tolerance():
    """x >= 0 with H = I: x_i = max(-g_i, 0), so dx_i/dg_i = -1 where x_i > 0, however small, and 0
    where x_i = 0. At eps_abs = 1e-6 the entries 1e-4 and 5e-4 are far above the solver's accuracy
    and must not be treated as sitting on their bound (a sqrt(eps) = 1e-3 activity test did)."""
    g = torch.tensor([-1e-4, -5e-4, 0.3, 0.5, -1.0, -2.0], dtype=DT, requires_grad=True)
    n = g.shape[0]
    weights = torch.arange(1.0, n + 1, dtype=DT)
    sol = solve_qp(torch.eye(n, dtype=DT), g, C=torch.eye(n, dtype=DT), l=torch.zeros(n, dtype=DT),
                   settings=Settings(eps_abs=1e-6, eps_rel=0.0))
    assert sol.status == Status.SOLVED
    (weights * sol.x).sum().backward()
    expected = torch.where(g.detach() < 0, -weights, torch.zeros_like(weights))
    assert torch.allclose(g.grad, expected, atol=1e-6), g.grad


# ------------------------------------------------------------------------------------------------
# Issue 12: repeated and dependent inconsistent rows in both blocks (tests/families.py)
# ------------------------------------------------------------------------------------------------
ISSUE12_FAMILIES = ["infeasible_repeated_both", "infeasible_dependent", "infeasible_repeated_both_lp",
                    "infeasible_scaled_copies", "infeasible_three_way"]


def _issue12_member(name, member=0, seed=0):
    fn, kw = F.ISSUE12[name]
    prob = F.member(fn(batch=4, seed=seed, **kw), member)
    return {k: (None if v is None else v.clone()) for k, v in prob.items()}


def _structured_fn(prob, settings, outputs=("x", "y", "z", "s_eq", "s_in")):
    """The solution map as a function of (H, g, E, b, l, u) with A = A0 (I + E), C = C0 (I + E):
    one E for both blocks keeps every relation between rows (copies, scaled copies, a = c1 + c2)
    that makes these QPs infeasible; a generic perturbation of A or C breaks them, and the QP
    becomes feasible far away (no derivative exists in those directions)."""
    A0, C0 = prob["A"], prob["C"]
    n = prob["g"].shape[-1]
    eye = torch.eye(n, dtype=DT)
    zero_H = not bool(prob["H"].any())

    def fn(H, g, E, b, l, u):
        T = eye + E
        H = torch.zeros_like(H) if zero_H else 0.5 * (H + H.T)
        sol = solve_qp(H, g, A0 @ T, b, C0 @ T, l, u, settings=settings)
        return tuple(getattr(sol, o) for o in outputs)

    args = (prob["H"], prob["g"], torch.zeros(n, n, dtype=DT), prob["b"], prob["l"], prob["u"])
    return fn, [t.detach().clone().requires_grad_() for t in args]


@pytest.mark.parametrize("name", ISSUE12_FAMILIES)
def test_gradcheck_dependent_inconsistent_rows(name):
    """Every output (x, y, z and the shift) of a QP made infeasible by repeated or dependent rows
    in both blocks, against finite differences (issue 12: the gradients of losses on y and z
    were wrong on such problems)."""
    prob = _issue12_member(name)
    settings = Settings(eps_abs=1e-11, eps_rel=0.0)
    sol = solve_qp(**prob, settings=settings)
    assert sol.status == Status.CLOSEST_FEASIBLE
    fn, args = _structured_fn(prob, settings)
    assert torch.autograd.gradcheck(fn, args, **GC)


@pytest.mark.parametrize("name", ISSUE12_FAMILIES)
def test_dependent_inconsistent_rows_float32_gradients(name):
    """float32 inputs: the gradient of a loss on x and on the shift agrees with float64's to about
    float32's accuracy (the multipliers of float32 closest-feasible QPs are good only to about 1e-2,
    so losses on them are not compared)."""
    prob = _issue12_member(name, member=1)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        d = {k: (None if v is None else v.detach().to(dtype).clone().requires_grad_()) for k, v in prob.items()}
        sol = solve_qp(**d)
        assert sol.status == Status.CLOSEST_FEASIBLE
        gen = torch.Generator().manual_seed(3)
        wx, ws = (torch.randn(sol.x.shape, generator=gen, dtype=DT).to(dtype),
                  torch.randn(sol.s_in.shape, generator=gen, dtype=DT).to(dtype))
        ((sol.x * wx).sum() + (sol.s_in * ws).sum()).backward()
        grads[dtype] = {k: d[k].grad.double() for k in ("g", "b", "l", "u")}
    for k, g64 in grads[torch.float64].items():
        g32 = grads[torch.float32][k]
        finite = torch.isfinite(prob[k]) if k in ("l", "u") else torch.ones_like(g64, dtype=torch.bool)
        err = (g32 - g64)[finite].abs().max() / max(1.0, float(g64.abs().max()))
        assert err < 1e-2, (name, k, float(err))


def _factored_setup(seed: int, B=5, n=9, p=3, m=7, shared=False):
    """Random strictly convex data, the forward's LeastDistanceFactor of it, an active set and
    right-hand sides."""
    from alqp.active_set import factorize

    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    lead = () if shared else (B,)  # shared: given without batch dimension
    Mh = rnd(*lead, n, n)
    H = Mh @ Mh.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    A, C = rnd(*lead, p, n), rnd(*lead, m, n)
    P = canonicalize(H, rnd(B, n), A, rnd(B, p), C, -torch.ones(B, m, dtype=torch.float64),
                     torch.ones(B, m, dtype=torch.float64))
    factor = factorize(P)
    active = (torch.rand(B, m, generator=gen, dtype=torch.float64) < 0.5).to(torch.float64)
    return P, factor, active, rnd(B, n), rnd(B, p), rnd(B, m)


@pytest.mark.engine_independent
@pytest.mark.parametrize("shared", [False, True])
def test_kkt_solve_factored_matches_direct(shared):
    """The KKT solve on the forward's factorization (Schur complement of the active rows on the
    null space of the equalities) gives the regularized direct solve's answer."""
    from alqp.backward import kkt_solve_direct, kkt_solve_factored

    P, factor, active, r1, r2, r3 = _factored_setup(7, shared=shared)
    assert factor.L.shape[0] == (1 if shared else 5) and bool(factor.usable.all())
    w1, w2, w3, solved = kkt_solve_factored(factor, P.H, P.A, P.C, active, r1, r2, r3)
    assert bool(solved.all())
    G = torch.cat([P.A, active.unsqueeze(-1) * P.C], -2)
    v1, v23, ok = kkt_solve_direct(P.H, G, r1, torch.cat([r2, active * r3], -1))
    assert bool(ok.all())
    torch.testing.assert_close(w1, v1, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.cat([w2, w3], -1), v23, rtol=1e-9, atol=1e-10)
    assert (w3[active == 0] == 0).all()


@pytest.mark.engine_independent
def test_kkt_solve_factored_reports_dependent_active_rows():
    """An active row that is a combination of an equality row and another active row makes the
    system singular: that problem is reported unsolved (the caller then takes the least-squares
    route), the others are solved."""
    from alqp.backward import kkt_solve_factored
    from alqp.active_set import factorize

    P, _, active, r1, r2, r3 = _factored_setup(8)
    C = P.C.clone()
    C[0, 1] = 2.0 * P.A[0, 0] - C[0, 0]
    active[0, :2] = 1.0
    P = canonicalize(P.H, P.g, P.A, P.b, C, P.l, P.u)
    factor = factorize(P)
    *_, solved = kkt_solve_factored(factor, P.H, P.A, P.C, active, r1, r2, r3)
    assert solved.tolist() == [False, True, True, True, True]
