"""Bad-input and failure tests of the backward and of the forward's statuses (issue 17, items 5, 6).

- ``Settings.failed_gradient`` ("zero", "nan", "raise") on batches that mix a SOLVED problem with
  a failed one, on both backward engines: the SOLVED problem's gradient is that of solving it
  alone; the failed one's is zero (with a warning, once per process), NaN, or an error.
- A NaN or Inf in the incoming gradient gives NaN gradients, never zeros.
- A double backward (hessian, gradgradcheck, create_graph then a second backward) raises.
- An indefinite H that makes a solve fail is reported NON_CONVEX with a warning naming H and the
  estimate of its most negative eigenvalue; a slightly indefinite H that a certified KKT point
  solves (Maros-Meszaros VALUES) stays SOLVED.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch

import alqp.failure
from alqp import IFT, LPGD, Settings, Status, solve_qp
from alqp.settings import has_solution

import families as F

DT = torch.float64
INF = math.inf
NAMES = ("H", "g", "A", "b", "C", "l", "u")
BACKWARDS = [IFT(), LPGD(tau=1e-4)]
NOT_TWICE = "not differentiable twice"
VALUES = "/work/shared/data/maros_meszaros/VALUES.mat"


@pytest.fixture
def fresh_warning(monkeypatch):
    """The "zero" policy warns once per process: make this test the first."""
    monkeypatch.setattr(alqp.failure, "_zero_policy_warned", False)


def failure_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "alqp backward" in str(w.message)]


def mixed_batch():
    """Problem 0: a strictly convex box QP (SOLVED, one bound active). Problem 1: an LP with
    cost -1 and only lower bounds, unbounded below (DUAL_INFEASIBLE). C and l are shared."""
    n = 3
    H = torch.stack([torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=DT),
                     torch.zeros(n, n, dtype=DT)])
    g = torch.tensor([[-3.0, 0.5, 0.2], [-1.0, -1.0, -1.0]], dtype=DT)
    C = torch.eye(n, dtype=DT)
    l = -torch.ones(n, dtype=DT)
    u = torch.tensor([[1.0, 1.0, 1.0], [INF, INF, INF]], dtype=DT)
    return dict(H=H, g=g, C=C, l=l, u=u)


def leaves(prob: dict) -> dict:
    return {k: v.clone().requires_grad_() for k, v in prob.items()}


def member(prob: dict, i: int) -> dict:
    """Problem i alone, batched (B = 1); shared tensors stay shared."""
    core = {"H": 2, "g": 1, "A": 2, "b": 1, "C": 2, "l": 1, "u": 1}
    return {k: v[i:i + 1] if v.dim() > core[k] else v for k, v in prob.items()}


def loss_of(sol, weight=None):
    w = torch.ones_like(sol.x) if weight is None else weight
    return (w * sol.x).sum() + 0.5 * sol.z.sum()


def grads(prob: dict, backward, settings: Settings, weight=None):
    args = leaves(prob)
    sol = solve_qp(**args, settings=settings, backward=backward)
    loss_of(sol, weight).backward()
    return sol, {k: args[k].grad for k in args}


# ------------------------------------------------------------------------------------------------
# failed_gradient

def test_has_solution_and_settings_validation():
    assert has_solution(Status.SOLVED) and has_solution(Status.CLOSEST_FEASIBLE)
    for s in Status:
        if s not in (Status.SOLVED, Status.CLOSEST_FEASIBLE):
            assert not has_solution(s), s.name
    status = torch.tensor([int(s) for s in Status])
    assert has_solution(status).tolist() == [s in (Status.SOLVED, Status.CLOSEST_FEASIBLE) for s in Status]
    assert Status.NON_CONVEX == 8
    for value in ("zero", "nan", "raise"):
        Settings(failed_gradient=value)
    with pytest.raises(ValueError, match=r"Settings\.failed_gradient must be one of .*'ignore'"):
        Settings(failed_gradient="ignore")


@pytest.mark.parametrize("backward", BACKWARDS, ids=["ift", "lpgd"])
@pytest.mark.parametrize("policy", ["zero", "nan", "raise"])
def test_failed_gradient_policy_on_a_mixed_batch(policy, backward, fresh_warning):
    prob = mixed_batch()
    settings = Settings(eps_abs=1e-10, failed_gradient=policy)
    _, alone = grads(member(prob, 0), backward, settings)
    args = leaves(prob)
    sol = solve_qp(**args, settings=settings, backward=backward)
    assert sol.status.tolist() == [Status.SOLVED, Status.DUAL_INFEASIBLE]
    loss = loss_of(sol)
    if policy == "raise":
        with pytest.raises(RuntimeError, match=r"indices \[1\] with statuses \['DUAL_INFEASIBLE'\]"):
            loss.backward()
        return
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss.backward()
    found = failure_warnings(record)
    if policy == "zero":
        assert len(found) == 1
        assert "DUAL_INFEASIBLE" in str(found[0].message) and "1 problem(s)" in str(found[0].message)
    else:
        assert not found
    # Per-problem inputs: problem 0's row is its gradient alone, problem 1's is zero / NaN.
    for k in ("H", "g", "u"):
        assert torch.allclose(args[k].grad[0], alone[k][0], rtol=1e-9, atol=1e-12), k
        assert (args[k].grad[1] == 0).all() if policy == "zero" else args[k].grad[1].isnan().all(), k
    # Shared inputs: the sum over the batch, so problem 1 adds zero / makes it NaN.
    for k in ("C", "l"):
        if policy == "zero":
            assert torch.allclose(args[k].grad, alone[k], rtol=1e-9, atol=1e-12), k
        else:
            assert args[k].grad.isnan().all(), k


@pytest.mark.parametrize("backward", BACKWARDS, ids=["ift", "lpgd"])
def test_zero_policy_warns_once_per_process(backward, fresh_warning):
    prob = mixed_batch()
    counts = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            grads(prob, backward, Settings())
        counts.append(len(failure_warnings(record)))
    assert counts == [1, 0]


@pytest.mark.parametrize("policy", ["nan", "raise"])
def test_failed_problem_without_incoming_gradient_contributes_zero(policy):
    """The loss does not depend on the failed problem: zero is its exact contribution, so no
    policy applies (no NaN, no error)."""
    prob = mixed_batch()
    weight = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=DT)
    args = leaves(prob)
    sol = solve_qp(**args, settings=Settings(failed_gradient=policy))
    (weight * sol.x).sum().backward()
    for k in args:
        assert torch.isfinite(args[k].grad).all(), k
    assert (args["g"].grad[1] == 0).all() and args["g"].grad[0].abs().max() > 0


def test_max_iter_batch_zero_gradient_and_nan_policy(fresh_warning):
    """MAX_ITER (the ALM stopped after one outer iteration) on a whole batch."""
    prob = F.strictly_convex(2, 4, 1, 4, seed=21)
    for policy in ("zero", "nan"):
        args = leaves(prob)
        sol = solve_qp(**args, settings=Settings(max_iter=1, engine="alm", failed_gradient=policy))
        assert (sol.status == Status.MAX_ITER).all()
        with pytest.warns(RuntimeWarning, match="MAX_ITER") if policy == "zero" else warnings.catch_warnings():
            (sol.x.sum() + sol.y.sum() + sol.z.sum()).backward()
        for k in NAMES:
            assert ((args[k].grad == 0).all() if policy == "zero" else args[k].grad.isnan().all()), (policy, k)


@pytest.mark.parametrize("backward", BACKWARDS, ids=["ift", "lpgd"])
def test_primal_infeasible_member_gets_zero_gradient(backward):
    """min 1/2|x|^2 + x1 + x2 s.t. theta <= x1 + x2, 0 <= x <= 1 (docs/design.md section 2): theta = 1 is
    solved with dx_i/dtheta = 1/2; theta = 3 is infeasible, PRIMAL_INFEASIBLE without closest
    feasible mode, and gets zero gradient."""
    H = torch.eye(2, dtype=DT)
    g = torch.ones(2, dtype=DT)
    C = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    theta = torch.tensor([1.0, 3.0], dtype=DT, requires_grad=True)
    l = torch.stack([theta, torch.zeros(2, dtype=DT), torch.zeros(2, dtype=DT)], -1)
    u = torch.tensor([INF, 1.0, 1.0], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = solve_qp(H.expand(2, 2, 2), g, C=C, l=l, u=u,
                       settings=Settings(closest_feasible=False, eps_abs=1e-10), backward=backward)
        assert sol.status.tolist() == [Status.SOLVED, Status.PRIMAL_INFEASIBLE]
        sol.x.sum().backward()
    assert theta.grad[1] == 0
    assert abs(float(theta.grad[0]) - 1.0) < 1e-4  # d(x1 + x2)/dtheta = 1


def test_stalled_member_gets_zero_gradient(fresh_warning):
    """A tolerance below what round-off allows (as in test_forward's stall-guard test) makes one
    member STALLED; its gradient is zero (with the warning), the other's is unchanged."""
    gen = torch.Generator().manual_seed(1)
    prob = F.strictly_convex(2, 20, 5, 10, seed=30)
    x0 = 1e4 * torch.randn(20, generator=gen, dtype=DT)
    bad = {k: v[0].clone() for k, v in prob.items()}
    bad["b"] = bad["A"] @ x0
    bad["l"], bad["u"] = bad["C"] @ x0 - 1, bad["C"] @ x0 + 1
    bad["g"] = -bad["H"] @ x0 + 1e3 * torch.randn(20, generator=gen, dtype=DT)
    for k in prob:
        prob[k] = prob[k].clone()
        prob[k][0] = bad[k]
    # (An absolute 1e-12: out of reach of member 0, |x| ~ 1e4, and within reach of member 1.)
    settings = Settings(eps_abs=1e-12, eps_rel=0.0, max_iter=100_000, engine="alm")
    args = leaves(prob)
    sol = solve_qp(**args, settings=settings)
    assert int(sol.status[0]) == Status.STALLED, Status(int(sol.status[0])).name
    with pytest.warns(RuntimeWarning, match="STALLED"):
        sol.x.sum().backward()
    for k in NAMES:
        assert (args[k].grad[0] == 0).all(), k
    assert args["g"].grad[1].abs().max() > 0


@pytest.mark.parametrize("engine", ["alm", "active_set"])
def test_numerical_error_member_gets_zero_gradient_and_finite_outputs(fresh_warning, engine):
    """Data at the edge of float64 (entries 1e308: every product overflows) end NUMERICAL_ERROR on
    both engines, with finite outputs and a zero gradient (with the warning); the other member of
    the batch, an ordinary QP, is solved and keeps its gradient."""
    H = torch.eye(2, dtype=DT).expand(2, 2, 2).clone()
    g = torch.tensor([[1e308, -1e308], [1.0, -1.0]], dtype=DT)
    C = torch.tensor([[[1e308, 1e308]], [[1.0, 1.0]]], dtype=DT)
    u = torch.tensor([[1e308], [0.5]], dtype=DT)
    args = {k: v.requires_grad_() for k, v in dict(H=H, g=g, C=C, u=u).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the forward's overflow warnings, if any)
        sol = solve_qp(**args, settings=Settings(engine=engine))
    assert sol.status.tolist() == [Status.NUMERICAL_ERROR, Status.SOLVED]
    assert all(bool(torch.isfinite(t).all()) for t in sol[:5])
    with pytest.warns(RuntimeWarning, match="NUMERICAL_ERROR"):
        (sol.x * torch.tensor([1.0, 2.0], dtype=DT)).sum().backward()
    for k, v in args.items():
        assert (v.grad[0] == 0).all(), k
    assert args["g"].grad[1].abs().max() > 0


# ------------------------------------------------------------------------------------------------
# Non-finite incoming gradients

@pytest.mark.parametrize("backward", BACKWARDS, ids=["ift", "lpgd"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_incoming_gradient_gives_nan(backward, value):
    # Three copies of one problem with different costs; A and C shared (their summed gradient
    # must become NaN), the other inputs per problem.
    prob = {k: v[0] for k, v in F.strictly_convex(1, 4, 1, 4, seed=5).items()}
    for k in ("H", "g", "b", "l", "u"):
        prob[k] = prob[k].expand(3, *prob[k].shape).clone()
    prob["g"] += 0.1 * torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=DT)
    settings = Settings(eps_abs=1e-10, eps_rel=0.0)
    weight = torch.ones(3, 4, dtype=DT)
    sol, ref = grads(prob, backward, settings, weight * torch.tensor([[1.0], [0.0], [1.0]], dtype=DT))
    assert (sol.status == Status.SOLVED).all()
    weight[1, 2] = value
    _, got = grads(prob, backward, settings, weight)
    for k in ("H", "g", "b", "l", "u"):
        assert got[k][1].isnan().all(), k
        for i in (0, 2):  # the other problems' gradients are those of a finite loss
            assert torch.allclose(got[k][i], ref[k][i], rtol=1e-9, atol=1e-12), (k, i)
    assert got["A"].isnan().all() and got["C"].isnan().all()


def test_nan_incoming_gradient_of_a_failed_problem_is_nan_under_zero_policy(fresh_warning):
    prob = mixed_batch()
    weight = torch.tensor([[1.0, 1.0, 1.0], [math.nan, 1.0, 1.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, got = grads(prob, "ift", Settings(), weight)
    assert got["g"][1].isnan().all() and torch.isfinite(got["g"][0]).all()


# ------------------------------------------------------------------------------------------------
# Double backward

def box_qp(g):
    H = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=DT)
    C = torch.eye(3, dtype=DT)
    return solve_qp(H, g, C=C, l=-torch.ones(3, dtype=DT), u=torch.ones(3, dtype=DT))


G0 = torch.tensor([-3.0, 0.5, 0.2], dtype=DT)


def test_hessian_raises():
    with pytest.raises(RuntimeError, match=NOT_TWICE):
        torch.autograd.functional.hessian(lambda g: box_qp(g).x.sum(), G0.clone())


def test_gradgradcheck_raises():
    with pytest.raises(RuntimeError, match=NOT_TWICE):
        torch.autograd.gradgradcheck(lambda g: box_qp(g).x, (G0.clone().requires_grad_(),))


@pytest.mark.parametrize("backward", BACKWARDS, ids=["ift", "lpgd"])
@pytest.mark.parametrize("loss", ["linear", "quadratic"])
def test_second_backward_after_create_graph_raises(backward, loss):
    """The first-order gradient under create_graph=True is the usual one; differentiating it
    raises. A linear loss has constant incoming gradients (the case once_differentiable missed)."""
    f = (lambda x: x.sum()) if loss == "linear" else (lambda x: (x * x).sum())
    H = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    C, l, u = torch.eye(2, dtype=DT), -torch.ones(2, dtype=DT), torch.ones(2, dtype=DT)
    g = torch.tensor([-3.0, 0.5], dtype=DT, requires_grad=True)
    (plain,) = torch.autograd.grad(f(solve_qp(H, g, C=C, l=l, u=u, backward=backward).x), g)
    (first,) = torch.autograd.grad(f(solve_qp(H, g, C=C, l=l, u=u, backward=backward).x), g,
                                   create_graph=True)
    assert torch.equal(first.detach(), plain)
    with pytest.raises(RuntimeError, match=NOT_TWICE):
        first.sum().backward()


# ------------------------------------------------------------------------------------------------
# Non-convexity

def indefinite_batch():
    """Problem 0: PSD box QP. Problem 1: H with eigenvalues (-1, 0.5, 1, 2) and no finite bound.
    Problem 2: eigenvalues (-1e-6, 1, 1, 1), also unbounded."""
    n = 4
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(3, n, n, generator=gen, dtype=DT))
    ev = torch.tensor([[0.3, 0.5, 1.0, 2.0], [-1.0, 0.5, 1.0, 2.0], [-1e-6, 1.0, 1.0, 1.0]], dtype=DT)
    H = Q @ torch.diag_embed(ev) @ Q.mT
    H = 0.5 * (H + H.mT)
    g = torch.randn(3, n, generator=gen, dtype=DT)
    C = torch.eye(n, dtype=DT)
    l = torch.tensor([[-1.0] * n, [-INF] * n, [-INF] * n], dtype=DT)
    u = -l
    return dict(H=H, g=g, C=C, l=l, u=u)


@pytest.mark.parametrize("engine", ["alm", "active_set"])
def test_indefinite_H_is_reported_non_convex(engine):
    prob = indefinite_batch()
    settings = Settings(engine=engine)
    with pytest.warns(RuntimeWarning, match=r"H is not positive semi-definite") as record:
        sol = solve_qp(**prob, settings=settings)
    assert sol.status.tolist() == [Status.SOLVED, Status.NON_CONVEX, Status.NON_CONVEX]
    message = next(str(w.message) for w in record if "positive semi-definite" in str(w.message))
    assert "indices [1, 2]" in message
    estimates = [float(v) for v in re.search(r"estimate\(s\) ([-0-9.e, ]+)", message).group(1).split(", ")]
    assert estimates[0] == pytest.approx(-1.0, rel=1e-9) and estimates[1] == pytest.approx(-1e-6, rel=1e-6)
    for t in sol[:5]:
        assert torch.isfinite(t).all()
    assert (sol.x[1:] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the PSD problem alone: no warning
        alone = solve_qp(**member(prob, 0), settings=settings)
    assert torch.allclose(sol.x[0], alone.x[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backward", BACKWARDS, ids=["ift", "lpgd"])
def test_non_convex_goes_through_the_failure_policy(backward):
    prob = indefinite_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        args = leaves(prob)
        sol = solve_qp(**args, settings=Settings(failed_gradient="nan"), backward=backward)
        assert int(sol.status[1]) == Status.NON_CONVEX
        sol.x.sum().backward()
    assert args["g"].grad[1:].isnan().all() and torch.isfinite(args["g"].grad[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = solve_qp(**leaves(prob), settings=Settings(failed_gradient="raise"), backward=backward)
    with pytest.raises(RuntimeError, match="NON_CONVEX"):
        sol.x.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_failed_psd_problem_is_not_called_non_convex(dtype):
    """A rank-deficient H = L L' formed in the dtype has eigenvalues of about -eps |H| from rounding;
    a failed solve (MAX_ITER after one outer iteration) keeps its own status, with no warning."""
    gen = torch.Generator().manual_seed(4)
    L = torch.randn(4, 30, 10, generator=gen, dtype=DT).to(dtype)
    H = L @ L.mT
    H = 0.5 * (H + H.mT)
    assert float(torch.linalg.eigvalsh(H.double())[:, 0].min()) < 0  # rounding made it indefinite
    g = torch.randn(4, 30, generator=gen, dtype=DT).to(dtype)
    C = torch.eye(30, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_qp(H, g, C=C, l=-torch.ones(30, dtype=dtype), u=torch.ones(30, dtype=dtype),
                       settings=Settings(max_iter=1, engine="alm"))
    assert (sol.status == Status.MAX_ITER).all(), sol.status.tolist()


def _values_problem():
    io = pytest.importorskip("scipy.io")
    import numpy as np

    if not os.path.exists(VALUES):
        pytest.skip(f"{VALUES} not present")
    d = io.loadmat(VALUES)
    P = d["P"].toarray()
    P = 0.5 * (P + P.T)
    q, A = np.asarray(d["q"], float).ravel(), d["A"].toarray()
    l, u = np.asarray(d["l"], float).ravel(), np.asarray(d["u"], float).ravel()
    l[l <= -1e20], u[u >= 1e20] = -np.inf, np.inf
    keep = np.isfinite(l) | np.isfinite(u)
    A, l, u = A[keep], l[keep], u[keep]
    eq = np.isfinite(l) & (l == u)
    t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
    return dict(H=t(P), g=t(q), A=t(A[eq]), b=t(l[eq]), C=t(A[~eq]), l=t(l[~eq]), u=t(u[~eq]))


def test_values_slightly_indefinite_stays_solved():
    """Maros-Meszaros VALUES: smallest eigenvalue of P about -1.3e-5 (largest 10.8), solved by a
    certified KKT point on the default engine. A failed solve of it (the ALM's, at this writing)
    must say NON_CONVEX."""
    prob = _values_problem()
    lam = torch.linalg.eigvalsh(prob["H"])
    assert -2e-5 < float(lam[0]) < -1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_qp(**prob)
    assert int(sol.status) == Status.SOLVED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        alm = solve_qp(**prob, settings=Settings(engine="alm"))
    assert int(alm.status) in (Status.SOLVED, Status.NON_CONVEX), Status(int(alm.status)).name


@pytest.mark.parametrize("policy", ["zero", "nan", "raise"])
def test_lpgd_failed_resolve_follows_the_policy(policy):
    """Problem 0: min x s.t. x >= 0, whose right perturbation g + tau dL/dx = 1 - 5 is unbounded
    below, so its re-solve fails. Problem 1: min 1/2 x^2 + x/2 s.t. x <= 0.2 (x = -0.5, dL/dg = -1)."""
    H = torch.tensor([[[0.0]], [[1.0]]], dtype=DT)
    g = torch.tensor([[1.0], [0.5]], dtype=DT, requires_grad=True)
    C = torch.ones(2, 1, 1, dtype=DT)
    l = torch.tensor([[0.0], [-INF]], dtype=DT)
    u = torch.tensor([[INF], [0.2]], dtype=DT)
    sol = solve_qp(H, g, C=C, l=l, u=u, settings=Settings(failed_gradient=policy),
                   backward=LPGD(tau=1.0, variant="right"))
    assert (sol.status == Status.SOLVED).all()
    loss = (torch.tensor([[-5.0], [1.0]], dtype=DT) * sol.x).sum()
    if policy == "raise":
        with pytest.raises(RuntimeError, match=r"LPGD: the perturbed re-solve of 1 problem.*indices \[0\]"):
            loss.backward()
        return
    with pytest.warns(RuntimeWarning, match="NaN gradient" if policy == "nan" else "zero gradient"):
        loss.backward()
    assert (g.grad[0].isnan().all() if policy == "nan" else g.grad[0] == 0).all()
    assert abs(float(g.grad[1, 0]) + 1.0) < 1e-6
