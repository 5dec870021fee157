"""The cart-pole example (examples/cartpole): the friction QP of equation 33 against independent
oracles (values and gradients), the dynamics' gradient against finite differences, and a smoke run."""
import importlib.util
import itertools
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cartpole")
sys.path.insert(0, _EXAMPLE)
import dynamics


def _load(name: str):
    """The example's script ``name``.py as module ``cartpole_<name>``: other examples have a
    ``train`` module too, and a bare ``import train`` would hand one test suite the other's."""
    spec = importlib.util.spec_from_file_location(f"cartpole_{name}", os.path.join(_EXAMPLE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load("train")
SOLVERS = [name for name in dynamics.SOLVERS if dynamics.available(name) is None]
# qpth's interior point stops at its own accuracy, ProxSuite's backward solves with eps 1e-4:
# their wrappers are checked at what they can deliver, alqp at its own tolerance.
TOL = {"alqp": 1e-7, "qpth": 1e-4, "proxsuite": 1e-4}


def _enumerate_friction(M_inv: np.ndarray, v_free: np.ndarray, eta: np.ndarray):
    """Exact solution of min 1/2 L'M^-1 L + v'L s.t. |L| <= eta by trying every active set.

    Each joint is free, at +eta or at -eta (3^n patterns); the pattern whose KKT solution is
    feasible with multipliers of the right sign is the answer (unique: M^-1 is positive definite).
    Returns (L, gap): gap is the smallest slack or multiplier of the pattern, how far the point is
    from a change of active set (finite differences are exact only well inside one).
    """
    n = len(v_free)
    for pattern in itertools.product((0, 1, -1), repeat=n):
        fixed = [j for j in range(n) if pattern[j]]
        free = [j for j in range(n) if not pattern[j]]
        L = np.zeros(n)
        L[fixed] = [pattern[j] * eta[j] for j in fixed]
        if free:
            rhs = -v_free[free] - M_inv[np.ix_(free, fixed)] @ L[fixed]
            L[free] = np.linalg.solve(M_inv[np.ix_(free, free)], rhs)
        velocity = M_inv @ L + v_free  # = -z: the joint's new velocity
        slack = [eta[j] - abs(L[j]) for j in free]
        sign_ok = [-pattern[j] * velocity[j] for j in fixed]  # a slipping joint moves against its impulse
        if all(s >= -1e-12 for s in slack) and all(m >= -1e-12 for m in sign_ok):
            return L, min(slack + sign_ok)
    raise AssertionError("no active set satisfies the KKT conditions")


def _random_cases(gen: np.random.Generator, count: int, diagonal: bool, margin: float = 0.05):
    """(M_inv (count,2,2), v_free (count,2), eta (2,)): friction QPs of the cart-pole, away from
    a change of active set by ``margin`` (relative), with stuck and slipping joints both present."""
    model = dynamics.CartPole()
    eta = model.eta().numpy()
    M_invs, v_frees = [], []
    while len(M_invs) < count:
        theta = torch.tensor([gen.uniform(-math.pi, math.pi)], dtype=torch.float64)
        M_inv = dynamics.mass_matrix(model, theta)[1][0].numpy()
        if diagonal:
            M_inv = np.diag(np.diag(M_inv))
        # The scale of v_free where each joint's stop impulse is about eta: sticking and slipping.
        v_free = gen.uniform(-3, 3, size=2) * eta * np.diag(M_inv)
        _, gap = _enumerate_friction(M_inv, v_free, eta)
        if gap > margin * eta.min():
            M_invs.append(M_inv)
            v_frees.append(v_free)
    return torch.tensor(np.array(M_invs)), torch.tensor(np.array(v_frees)), torch.tensor(eta)


def _central_difference(f, x: torch.Tensor, h: float) -> torch.Tensor:
    """d f / d x (f scalar) by central differences, entry by entry."""
    grad = torch.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        out[i] = (f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * h)
    return grad


@pytest.mark.parametrize("solver", SOLVERS)
def test_friction_qp_diagonal_matches_stick_slip_closed_form(solver):
    """With diagonal M^-1 each joint sticks (Lam_j = -v_j / M^-1_jj) or slips (Lam_j = -eta_j sign v_j)."""
    gen = np.random.default_rng(0)
    M_inv, v_free, eta = _random_cases(gen, 12, diagonal=True)
    d = torch.diagonal(M_inv, dim1=1, dim2=2).clone()
    closed = dynamics.friction_closed_form(d, v_free, eta)
    stuck = closed.abs() < eta
    assert stuck.any() and (~stuck).any(), "the cases must cover both sticking and slipping"

    weights = torch.tensor(gen.standard_normal((12, 2)))
    friction = dynamics.make_friction_solver(solver)
    d_, v_, eta_ = (t.clone().requires_grad_(True) for t in (d, v_free, eta))
    impulse = friction(torch.diag_embed(d_), v_, eta_)
    torch.testing.assert_close(impulse.detach(), closed, atol=TOL[solver], rtol=0)
    (impulse * weights).sum().backward()

    # Gradients of a linear loss against central differences of the closed form.
    h = 1e-6
    for got, wrt in ((d_.grad, 0), (v_.grad, 1), (eta_.grad, 2)):
        def loss(x, wrt=wrt):
            args = [d, v_free, eta]
            args[wrt] = x
            return (dynamics.friction_closed_form(*args) * weights).sum()
        expected = _central_difference(loss, [d, v_free, eta][wrt], h)
        torch.testing.assert_close(got, expected, atol=max(TOL[solver], 1e-6) * 10, rtol=1e-4)


@pytest.mark.parametrize("solver", SOLVERS)
def test_friction_qp_general_mass_matrix_matches_oracles(solver):
    """Coupled M^-1 of the cart-pole: values against Clarabel (through CVXPY) and an active-set
    enumeration, gradients against central differences of the enumeration."""
    cp = pytest.importorskip("cvxpy")
    gen = np.random.default_rng(1)
    M_inv, v_free, eta = _random_cases(gen, 10, diagonal=False)
    exact = torch.tensor(np.array([_enumerate_friction(Mi.numpy(), v.numpy(), eta.numpy())[0]
                                   for Mi, v in zip(M_inv, v_free)]))
    for Mi, v, L in zip(M_inv.numpy(), v_free.numpy(), exact.numpy()):
        x = cp.Variable(2)
        problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Mi)) + v @ x), [cp.abs(x) <= eta.numpy()])
        problem.solve(solver=cp.CLARABEL)
        np.testing.assert_allclose(x.value, L, atol=1e-6)

    friction = dynamics.make_friction_solver(solver)
    weights = torch.tensor(gen.standard_normal((10, 2)))
    M_, v_, eta_ = (t.clone().requires_grad_(True) for t in (M_inv, v_free, eta))
    impulse = friction(M_, v_, eta_)
    torch.testing.assert_close(impulse.detach(), exact, atol=TOL[solver], rtol=0)
    (impulse * weights).sum().backward()

    def enumerated(M, v, e):
        return torch.tensor(np.array([_enumerate_friction(Mi.numpy(), vi.numpy(), e.numpy())[0]
                                      for Mi, vi in zip(M, v)]))
    h = 1e-6
    expected_v = _central_difference(lambda x: (enumerated(M_inv, x, eta) * weights).sum(), v_free, h)
    expected_eta = _central_difference(lambda x: (enumerated(M_inv, v_free, x) * weights).sum(), eta, h)
    # H enters symmetrically: compare the symmetric part along symmetric perturbations.
    sym = torch.tensor(gen.standard_normal((10, 2, 2)))
    sym = sym + sym.transpose(1, 2)
    along_M = ((enumerated(M_inv + h * sym, v_free, eta) - enumerated(M_inv - h * sym, v_free, eta)) / (2 * h)
               * weights).sum()
    tol = max(TOL[solver], 1e-6) * 10
    torch.testing.assert_close(v_.grad, expected_v, atol=tol, rtol=1e-4)
    torch.testing.assert_close(eta_.grad, expected_eta, atol=tol, rtol=1e-4)
    torch.testing.assert_close((M_.grad * sym).sum(), along_M, atol=tol, rtol=1e-4)


def test_rollout_gradient_matches_finite_differences():
    """d loss / d forces through 8 steps of stick/slip dynamics (alqp's backward) against central
    differences of rollouts whose friction QPs the active-set enumeration solves."""
    model, cost = dynamics.CartPole(), dynamics.SwingUpCost()
    gen = torch.Generator().manual_seed(3)
    # Forces of a few newtons against 1 N of rail friction: joints stick on some steps, slip on others.
    forces = 3 * torch.randn(2, 8, generator=gen, dtype=torch.float64)

    def enumerated(M_inv, v_free, eta):
        return torch.tensor(np.array([_enumerate_friction(M.numpy(), v.numpy(), eta.numpy())[0]
                                      for M, v in zip(M_inv, v_free)]))

    def loss(f, friction):
        return cost(model, dynamics.rollout(model, f, friction), f).sum()

    f = forces.clone().requires_grad_(True)
    value = loss(f, dynamics.make_friction_solver("alqp"))
    value.backward()
    with torch.no_grad():
        torch.testing.assert_close(value, loss(forces, enumerated), atol=1e-9, rtol=0)
        expected = _central_difference(lambda x: loss(x, enumerated), forces, 1e-6)
    torch.testing.assert_close(f.grad, expected, atol=1e-6, rtol=1e-5)
    stuck = (dynamics.rollout(model, forces, enumerated)[:, 1:, 2:].abs() < 1e-12).sum((0, 1))
    assert (stuck > 0).all() and (stuck < 16).all(), "both joints must both stick and slip in this rollout"


def test_mass_matrix_inverse_and_closed_form_shapes():
    model = dynamics.CartPole()
    theta = torch.linspace(-4, 4, 9, dtype=torch.float64)
    M, M_inv = dynamics.mass_matrix(model, theta)
    torch.testing.assert_close(M @ M_inv, torch.eye(2, dtype=torch.float64).expand(9, 2, 2))
    assert torch.linalg.eigvalsh(M).min() > 0
    with pytest.raises(ValueError, match="name"):
        dynamics.make_friction_solver("cvxpy")
    with pytest.raises(ValueError, match="pole_length"):
        dynamics.CartPole(pole_length=0.0)
    with pytest.raises(ValueError, match="cart_friction"):
        dynamics.CartPole(cart_friction=-1.0)
    with pytest.raises(ValueError, match="forces"):
        dynamics.rollout(model, torch.zeros(20, dtype=torch.float64), dynamics.make_friction_solver("alqp"))


def test_bench_call_times_every_solver(tmp_path):
    summary = _load("bench_call").main(["--repeats", "2", "--out", str(tmp_path / "b.json")])
    assert list(summary) == SOLVERS
    assert all(t > 0 for s in summary.values() for t in s.values())
    assert (tmp_path / "b.json").stat().st_size > 0


def test_smoke_run_writes_json_and_plot(tmp_path):
    """A few iterations with every available solver: JSON and plot written, losses finite, and the
    solvers, fed the same noise, follow the same losses."""
    out = train.main(["--iterations", "2", "--solver", "all", "--out", str(tmp_path), "--no-progress"])
    with open(tmp_path / "cartpole.json") as f:
        saved = json.load(f)
    assert (tmp_path / "cartpole.png").stat().st_size > 0
    assert [s["solver"] for s in saved["summary"]] == SOLVERS
    for res in saved["results"].values():
        assert len(res["loss"]) == 2 and all(math.isfinite(v) for v in res["loss"])
        assert math.isfinite(res["clean_loss"]) and len(res["states"]) == 21
        assert all(t > 0 for t in res["forward_ms"] + res["backward_ms"])
    assert saved["results"]["alqp"]["unsolved_qps"] == 0
    assert saved["results"]["alqp"]["loss"][-1] < saved["results"]["alqp"]["loss"][0]  # Adam made progress
    for gap in out["config"].get("max_loss_gap_vs_alqp", {}).values():
        assert gap < 1e-5
