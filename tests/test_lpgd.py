"""Tests of the LPGD backward (alqp.lpgd) and its options in the layer.

Oracles: the implicit backward (alqp.backward, itself checked against finite differences in
test_backward.py) on QPs built from their solution, finite differences of the forward, closed-form
LP solutions, and the loss itself (a step along the LPGD gradient must lower it).

The instances are built from their solution with strict complementarity (active rows have
|z| >= 0.5, inactive rows slack >= 0.3), so the perturbed re-solves of the convergence test cross no
active-set change for tau <= 0.1 at the gradient scale used there. Sizes stay tiny (n <= 6, B <= 4):
the forward solver is being optimized and each LPGD backward is one more solve.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import alqp.lpgd as lpgd_mod
from alqp import LPGD, QPLayer, Settings, Status, solve_qp
from alqp.backward import implicit_backward
from alqp.lpgd import LPGDOptions, lpgd_backward
from alqp.problem import canonicalize
from alqp.solver import solve_problem_factored

import families as F

DT = torch.float64
INF = float("inf")
NAMES = ("H", "g", "A", "b", "C", "l", "u")
TAUS = (1e-1, 1e-2, 1e-3, 1e-4)
# Tight enough that the central variant's noise floor (solver error / tau) stays far below the
# one-sided variants' O(tau) error at tau = 1e-4.
SETTINGS = Settings(eps_abs=1e-11, eps_rel=0.0)


def _mv(M, v):
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _mtv(M, v):
    return (M.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)


def _unif(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=DT)


def _spd(gen, B, n):
    M = torch.randn(B, n, n, generator=gen, dtype=DT)
    H = M @ M.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=DT)
    return 0.5 * (H + H.transpose(-1, -2))


def feasible_qp(B, n, p, m, n_up, n_lo, seed):
    """:func:`families.qp_from_solution` with u dropped on every second inactive row; the problem
    dict only."""
    return F.qp_from_solution(B, n, p, m, n_up, n_lo, seed, "odd_inactive")[0]


def pinned_infeasible_qp(B, seed):
    """Closest-feasible QPs (n=3) whose x is pinned by its n+1 = 4 shifted rows: 2 equalities and
    2 violated inequalities (one above its upper bound, one below its lower bound), plus 1 inactive
    row. The shift spans the left null space of the 4 rows, with |s_i| >= 0.2."""
    gen = torch.Generator().manual_seed(seed)
    n, p = 3, 2
    H = _spd(gen, B, n)
    x = torch.randn(B, n, generator=gen, dtype=DT)
    for _ in range(100):
        M = torch.randn(B, n + 1, n, generator=gen, dtype=DT)
        s = torch.linalg.svd(M).U[..., -1]
        s = s * torch.sign(s[:, p:p + 1])  # the first inequality row is shifted upward
        if (s.abs().min(-1).values > 0.25).all() and (s[:, p + 1] < 0).all():
            break
    else:
        raise RuntimeError("no instance")
    A, CI = M[:, :p], M[:, p:]
    CIx = _mv(CI, x) - s[:, p:]
    Cf = torch.randn(B, 1, n, generator=gen, dtype=DT)
    Cfx = _mv(Cf, x)
    C = torch.cat([CI, Cf], 1)
    u = torch.cat([CIx[:, :1], torch.full((B, 1), INF, dtype=DT), Cfx + 0.5], 1)
    l = torch.cat([torch.full((B, 1), -INF, dtype=DT), CIx[:, 1:], Cfx - 0.5], 1)
    lam = torch.randn(B, n + 1, generator=gen, dtype=DT)
    lam = lam - (lam * s).sum(-1, keepdim=True) * s
    lam[:, p] = lam[:, p].abs() + 0.5
    lam[:, p + 1] = -lam[:, p + 1].abs() - 0.5
    z = torch.cat([lam[:, p:], torch.zeros(B, 1, dtype=DT)], 1)
    g = -(_mv(H, x) + _mtv(A, lam[:, :p]) + _mtv(C, z))
    return dict(H=H, g=g, A=A, b=_mv(A, x) - s[:, :p], C=C, l=l, u=u)


def duplicated_equality_qp(B, seed):
    """Closest-feasible QPs (n=4) with equality rows a, c*a, a2 whose right-hand sides disagree (a
    shift along (c, -1, 0) / norm), plus one active and one inactive inequality row: x is not
    pinned, so it depends on H and g."""
    gen = torch.Generator().manual_seed(seed)
    n = 4
    H = _spd(gen, B, n)
    x = torch.randn(B, n, generator=gen, dtype=DT)
    a = torch.randn(B, 1, n, generator=gen, dtype=DT)
    c = _unif(gen, (B, 1), 0.5, 2.0)
    A = torch.cat([a, c.unsqueeze(-1) * a, torch.randn(B, 1, n, generator=gen, dtype=DT)], 1)
    s_eq = torch.cat([c, -torch.ones(B, 1, dtype=DT), torch.zeros(B, 1, dtype=DT)], 1)
    s_eq = s_eq * (_unif(gen, (B, 1), 0.4, 1.0) / s_eq.norm(dim=-1, keepdim=True))
    y = torch.randn(B, 3, generator=gen, dtype=DT)
    y = y - (y * s_eq).sum(-1, keepdim=True) / (s_eq * s_eq).sum(-1, keepdim=True) * s_eq
    C = torch.randn(B, 2, n, generator=gen, dtype=DT)
    Cx = _mv(C, x)
    u = torch.stack([Cx[:, 0], Cx[:, 1] + 0.6], 1)
    l = torch.stack([torch.full((B,), -INF, dtype=DT), Cx[:, 1] - 0.6], 1)
    z = torch.stack([_unif(gen, (B,), 0.5, 1.5), torch.zeros(B, dtype=DT)], 1)
    g = -(_mv(H, x) + _mtv(A, y) + _mtv(C, z))
    return dict(H=H, g=g, A=A, b=_mv(A, x) - s_eq, C=C, l=l, u=u)


def _incoming(P, outputs, seed, scale=1.0):
    """Random incoming gradients (grad_x, grad_y, grad_z, grad_s_eq, grad_s_in) for ``outputs``."""
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(x=P.n, y=P.p, z=P.m, s_eq=P.p, s_in=P.m)
    return [scale * torch.randn(P.batch_size, sizes[k], generator=gen, dtype=DT) if k in outputs else None
            for k in ("x", "y", "z", "s_eq", "s_in")]


def _rel_err(grads, ref, names=NAMES):
    num = sum(float(((grads[k] - ref[k]) ** 2).sum()) for k in names)
    den = sum(float((ref[k] ** 2).sum()) for k in names)
    return math.sqrt(num / den)


def _solve(prob, settings=SETTINGS):
    P = canonicalize(**prob)
    sol, _ = solve_problem_factored(P, settings)
    return P, sol


# ------------------------------------------------------------------------------------------------
# Convergence to the implicit gradient
# ------------------------------------------------------------------------------------------------
def test_converges_to_implicit_gradient_as_tau_shrinks():
    """On smooth, nondegenerate QPs every variant tends to the IFT gradient of all seven inputs.

    x, y, z are affine in tau below the first active-set change and the Lagrangian's data-gradient
    q is quadratic in them, so the one-sided error is exactly tau times q's quadratic part (first
    order: about 10x smaller per decade) while the central difference cancels it and is left with
    the solver's error divided by tau.
    """
    P, sol = _solve(feasible_qp(4, 6, 2, 5, 2, 1, seed=3))
    assert (sol.status == Status.SOLVED).all()
    incoming = _incoming(P, ("x", "y", "z"), seed=1, scale=0.3)
    ift = implicit_backward(P, sol, *incoming, settings=SETTINGS)
    errs = {v: [_rel_err(lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=t, variant=v), ift)
                for t in TAUS] for v in ("right", "left", "central")}
    table = "\n".join(f"{v:8s}" + " ".join(f"{e:9.2e}" for e in row) for v, row in errs.items())
    for v in ("right", "left"):
        e = errs[v]
        assert all(e[i + 1] < e[i] for i in range(len(e) - 1)), table
        # First order: each decade of tau removes one decade of error.
        assert all(5 < e[i] / e[i + 1] < 20 for i in range(len(e) - 1)), table
        assert e[-1] < 1e-3, table
    e_c = errs["central"]
    for i in range(len(TAUS)):
        # Far below both one-sided errors at every tau, and below the noise bound eps-ish / tau.
        assert e_c[i] < 1e-2 * min(errs["right"][i], errs["left"][i]), table
        assert e_c[i] < 1e-9 / TAUS[i], table
    # Faster than first order: the gap to the one-sided variants is widest at the largest tau.
    assert e_c[0] / errs["right"][0] < e_c[-1] / errs["right"][-1], table


def test_each_output_separately_matches_implicit_gradient():
    """Losses on x, y and z alone (dual perturbations b - tau gy, l/u - tau gz checked separately)."""
    P, sol = _solve(feasible_qp(3, 5, 1, 4, 1, 1, seed=4))
    for out in ("x", "y", "z"):
        incoming = _incoming(P, (out,), seed=2)
        ift = implicit_backward(P, sol, *incoming, settings=SETTINGS)
        lp = lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=1e-3, variant="central")
        assert _rel_err(lp, ift) < 1e-5, out
        assert lp["H"].allclose(lp["H"].transpose(-1, -2))


def test_matches_finite_differences_of_the_forward():
    """Direct check of signs and factors (H's 1/2 included) against central differences of a
    linear loss w'x, for one entry of each input."""
    prob = feasible_qp(1, 4, 1, 3, 1, 1, seed=5)
    P, sol = _solve(prob)
    w = torch.randn(1, 4, generator=torch.Generator().manual_seed(6), dtype=DT)
    lp = lpgd_backward(P, sol, w, settings=SETTINGS, tau=1e-4, variant="central")
    h = 1e-5
    entries = dict(H=(0, 1, 2), g=(0, 3), A=(0, 0, 2), b=(0, 0), C=(0, 1, 0), l=(0, 1), u=(0, 0))
    for name, ij in entries.items():
        def loss(delta, name=name, ij=ij):
            d = {k: v.clone() for k, v in prob.items()}
            d[name][ij] += delta
            if name == "H":  # keep H symmetric: perturb both (i,j) and (j,i) by delta / 2
                d[name][ij] -= delta / 2
                d[name][(0, ij[2], ij[1])] += delta / 2
            return float((solve_qp(**d, settings=SETTINGS).x * w).sum())
        fd = (loss(h) - loss(-h)) / (2 * h)
        got = float(lp[name][ij]) if name != "H" else float(0.5 * (lp["H"][ij] + lp["H"][0, ij[2], ij[1]]))
        assert abs(fd) > 1e-3, (name, fd)  # a meaningful entry
        assert abs(got - fd) < 1e-5 * (1 + abs(fd)), (name, got, fd)


def test_proximal_term_gives_the_gradient_of_the_proximal_problem():
    """With proximal = rho the tau -> 0 limit is the implicit gradient of the QP with H + rho I and
    g - rho x* (same solution, same multipliers): this checks the proximal term's sign and factor."""
    P, sol = _solve(feasible_qp(2, 5, 1, 4, 1, 1, seed=7))
    rho = 2.0
    incoming = _incoming(P, ("x", "y", "z"), seed=3)
    lp = lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=1e-3, variant="central", proximal=rho)
    eye = torch.eye(P.n, dtype=DT)
    P_prox = canonicalize(P.H + rho * eye, P.g - rho * sol.x, P.A, P.b, P.C, P.l, P.u)
    ift_prox = implicit_backward(P_prox, sol, *incoming, settings=SETTINGS)
    ift = implicit_backward(P, sol, *incoming, settings=SETTINGS)
    assert _rel_err(lp, ift_prox) < 1e-5
    assert _rel_err(lp, ift) > 1e-2  # the proximal term does change the answer


# ------------------------------------------------------------------------------------------------
# LPs: where the implicit gradient vanishes
# ------------------------------------------------------------------------------------------------
def _lp_batch():
    """Two LPs at nondegenerate vertices: the box 0 <= x <= 1 (x_i = 1 where g_i < 0) and the
    simplex x >= 0, sum x = 1 written as a box plus one equality (x = e_argmin g); targets are
    other vertices, so a loss on x is not minimal."""
    n = 4
    H = torch.zeros(2, n, n, dtype=DT)
    g = torch.tensor([[0.3, -0.2, 0.25, -0.1], [0.1, 0.4, -0.2, 0.3]], dtype=DT)
    A = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]], dtype=DT)
    b = torch.tensor([[0.0], [1.0]], dtype=DT)
    C = torch.eye(n, dtype=DT).expand(2, n, n)
    l, u = torch.zeros(2, n, dtype=DT), torch.ones(2, n, dtype=DT)
    x_exact = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=DT)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=DT)
    return dict(H=H, g=g, A=A, b=b, C=C, l=l, u=u), x_exact, target


@pytest.mark.parametrize("variant", ["central", "right"])
def test_lp_vertex_lpgd_gradient_is_nonzero_descent_where_implicit_is_zero(variant):
    prob, x_exact, target = _lp_batch()
    settings = Settings(eps_abs=1e-9, eps_rel=0.0)

    def losses(g, backward="ift"):
        sol = solve_qp(**dict(prob, g=g), settings=settings, backward=backward)
        assert (sol.status == Status.SOLVED).all()
        return ((sol.x - target) ** 2).sum(-1), sol.x

    grads = {}
    for name, backward in (("ift", "ift"), ("lpgd", LPGD(tau=1.0, variant=variant))):
        g = prob["g"].clone().requires_grad_()
        loss, x = losses(g, backward)
        assert torch.allclose(x, x_exact, atol=1e-6)
        loss.sum().backward()
        grads[name] = g.grad
    assert grads["ift"].abs().max() < 1e-12  # exactly zero in exact arithmetic: x is locally constant
    step = grads["lpgd"]
    assert (step.abs().amax(-1) > 0.1).all()
    with torch.no_grad():
        before, _ = losses(prob["g"])
        # A step that changes no entry of g by more than 0.45 (the costs are up to 0.4 in size).
        alpha = 0.45 / float(step.abs().max())
        after, _ = losses(prob["g"] - alpha * step)
    assert (after < before - 0.5).all(), (before, after)


def test_lp_left_variant_stays_at_the_vertex():
    """The left perturbation g - tau dL/dx favours the current vertex even more, so on an LP it
    returns zero: documented reason why LPs want the right or central variant."""
    prob, _, target = _lp_batch()
    g = prob["g"].clone().requires_grad_()
    x = solve_qp(**dict(prob, g=g), settings=Settings(eps_abs=1e-9, eps_rel=0.0),
                 backward=LPGD(tau=1.0, variant="left")).x
    ((x - target) ** 2).sum().backward()
    assert g.grad.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------
# Closest-feasible problems and losses on the shift
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [pinned_infeasible_qp, duplicated_equality_qp])
@pytest.mark.parametrize("outputs", [("x",), ("s_eq", "s_in"), ("x", "s_eq", "s_in")])
def test_closest_feasible_losses_on_x_and_shift(make, outputs):
    """H, g, b, l, u agree with the implicit gradient; A and C differ exactly by a rank-one term
    s w' along the shift s = (s_eq, s_in) (the shift's own dependence on A and C, documented)."""
    P, sol = _solve(make(2, seed=11))
    assert (sol.status == Status.CLOSEST_FEASIBLE).all()
    incoming = _incoming(P, outputs, seed=12)
    ift = implicit_backward(P, sol, *incoming, settings=SETTINGS)
    lp = lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=1e-3, variant="central")
    assert _rel_err(lp, ift, ("H", "g", "b", "l", "u")) < 1e-5
    D = torch.cat([ift["A"] - lp["A"], ift["C"] - lp["C"]], 1)
    s = torch.cat([sol.s_eq, sol.s_in], 1)
    along_s = s.unsqueeze(-1) * (s.unsqueeze(-2) @ D) / (s * s).sum(-1)[:, None, None]
    scale = float(torch.cat([ift["A"], ift["C"]], 1).norm())
    assert float((D - along_s).norm()) < 1e-6 * scale


@pytest.mark.parametrize("make", [pinned_infeasible_qp, duplicated_equality_qp])
def test_closest_feasible_losses_on_multipliers_differ_only_along_the_shift(make):
    """Losses on y, z: H and g agree with the implicit gradient; b, l, u differ by a multiple of s
    and [A; C] by s w' (the multipliers' normalization along s, documented)."""
    P, sol = _solve(make(2, seed=11))
    incoming = _incoming(P, ("y", "z"), seed=13)
    ift = implicit_backward(P, sol, *incoming, settings=SETTINGS)
    lp = lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=1e-3, variant="central")
    assert _rel_err(lp, ift, ("H", "g")) < 1e-5
    s = torch.cat([sol.s_eq, sol.s_in], 1)
    d = torch.cat([ift["b"] - lp["b"], ift["l"] + ift["u"] - lp["l"] - lp["u"]], 1)
    d_off = d - s * (d * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True)
    assert float(d_off.norm()) < 1e-6 * float(torch.cat([ift["b"], ift["l"], ift["u"]], 1).norm())
    D = torch.cat([ift["A"] - lp["A"], ift["C"] - lp["C"]], 1)
    D_off = D - s.unsqueeze(-1) * (s.unsqueeze(-2) @ D) / (s * s).sum(-1)[:, None, None]
    assert float(D_off.norm()) < 1e-6 * float(torch.cat([ift["A"], ift["C"]], 1).norm())


def test_loss_on_shift_of_a_feasible_problem_contributes_nothing():
    P, sol = _solve(feasible_qp(2, 4, 1, 3, 1, 0, seed=13))
    incoming = _incoming(P, ("s_eq", "s_in"), seed=14)
    lp = lpgd_backward(P, sol, *incoming, settings=SETTINGS)
    assert all(float(t.abs().max()) == 0.0 for t in lp.values())


# ------------------------------------------------------------------------------------------------
# The re-solve: one batched call, warm-started, same settings, dtype and device
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,copies", [("right", 1), ("left", 1), ("central", 2)])
def test_one_batched_warm_started_resolve(monkeypatch, variant, copies):
    P, sol = _solve(feasible_qp(3, 4, 1, 3, 1, 1, seed=15))
    calls = []
    real = lpgd_mod.solve_problem_factored

    def spy(problem, settings, warm_start=None, factor=None):
        calls.append((problem, settings, warm_start))
        return real(problem, settings, warm_start, factor=factor)

    monkeypatch.setattr(lpgd_mod, "solve_problem_factored", spy)
    incoming = _incoming(P, ("x",), seed=16)
    incoming[0][1] = 0.0  # problem 1 has no incoming gradient: it is not re-solved
    lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=0.01, variant=variant)
    assert len(calls) == 1
    problem, settings, warm = calls[0]
    assert settings is SETTINGS
    assert problem.batch_size == 2 * copies
    assert problem.H.dtype == P.H.dtype and problem.H.device == P.H.device
    keep = torch.tensor([0, 2])
    assert torch.equal(warm[0], sol.x[keep].repeat(copies, 1))
    assert torch.equal(warm[1], sol.y[keep].repeat(copies, 1))
    assert torch.equal(warm[2], sol.z[keep].repeat(copies, 1))
    # The perturbation: g + tau gx on the first copy, b, l, u unchanged (no loss on y, z).
    sign = -1 if variant == "left" else 1
    assert torch.allclose(problem.g[:2], P.g[keep] + sign * 0.01 * incoming[0][keep])
    assert torch.equal(problem.b, P.b[keep].repeat(copies, 1))


def test_non_converged_forward_and_failed_resolve_get_zero_gradient():
    # Problem 0: an LP whose right perturbation is unbounded (g + tau gx < 0 on x >= 0).
    # Problem 1: a regular QP. Problem 2: a forward that ran out of iterations is not re-solved.
    H = torch.zeros(3, 1, 1, dtype=DT)
    H[1:] = 1.0
    g = torch.tensor([[1.0], [0.5], [1.0]], dtype=DT)
    C = torch.ones(3, 1, 1, dtype=DT)
    l = torch.tensor([[0.0], [-INF], [0.0]], dtype=DT)
    u = torch.tensor([[INF], [0.2], [INF]], dtype=DT)
    P, sol = _solve(dict(H=H, g=g, A=None, b=None, C=C, l=l, u=u), Settings(eps_abs=1e-9, eps_rel=0.0))
    assert (sol.status[:2] == Status.SOLVED).all()
    sol = sol._replace(status=torch.tensor([int(Status.SOLVED), int(Status.SOLVED), int(Status.MAX_ITER)]))
    gx = torch.tensor([[-5.0], [1.0], [1.0]], dtype=DT)
    with pytest.warns(RuntimeWarning, match="1 problem"):
        grads = lpgd_backward(P, sol, gx, settings=Settings(eps_abs=1e-9, eps_rel=0.0), tau=1.0, variant="right")
    assert float(grads["g"][0].abs().max()) == 0.0 and float(grads["l"][0].abs().max()) == 0.0
    assert float(grads["g"][2].abs().max()) == 0.0
    # Problem 1: x = clip(-0.5, -inf, 0.2) = -0.5 is unconstrained, so dL/dg = -gx / H = -1.
    assert abs(float(grads["g"][1, 0]) + 1.0) < 1e-6


def test_resolve_that_accepts_the_forward_solution_warns(monkeypatch):
    """A re-solve that takes no step although tau |dL/dx| is far above the tolerance returned the
    forward's solution (the float32 solver does this for tau ~ 1e-2): a warning, zero gradient.
    The same for an incoming gradient at round-off level is expected and stays silent."""
    P, sol = _solve(feasible_qp(2, 3, 1, 2, 1, 0, seed=24))
    def accept(problem, settings, warm_start=None, factor=None):
        return sol._replace(iterations=torch.zeros(2, dtype=torch.int64)), factor

    monkeypatch.setattr(lpgd_mod, "solve_problem_factored", accept)
    gx = torch.tensor([[1.0, 0.0, 0.0], [1e-12, 0.0, 0.0]], dtype=DT)
    with pytest.warns(RuntimeWarning, match="for 1 problem.*within the solver's tolerance"):
        grads = lpgd_backward(P, sol, gx, settings=SETTINGS, tau=0.1, variant="right")
    assert float(grads["g"].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------
# Through the layer: options, shapes, dtypes
# ------------------------------------------------------------------------------------------------
def test_options_reach_the_engine_through_solve_qp_and_qplayer():
    prob = feasible_qp(2, 4, 1, 3, 1, 1, seed=17)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(18), dtype=DT)
    opts = dict(tau=0.3, variant="left", proximal=0.5)
    P, sol = _solve(prob)
    direct = lpgd_backward(P, sol, w, settings=SETTINGS, **opts)
    default = lpgd_backward(P, sol, w, settings=SETTINGS)
    assert _rel_err(direct, default) > 1e-3  # the options matter on this instance
    for call in (lambda d: solve_qp(**d, settings=SETTINGS, backward=LPGD(**opts)),
                 lambda d: QPLayer(SETTINGS, backward=LPGD(**opts))(**d)):
        inputs = {k: v.clone().requires_grad_() for k, v in prob.items()}
        (call(inputs).x * w).sum().backward()
        assert _rel_err({k: v.grad for k, v in inputs.items()}, direct) < 1e-12
    assert "tau=0.3" in repr(QPLayer(backward=LPGD(tau=0.3)))


def test_deprecated_option_keywords_still_reach_the_engine():
    prob = feasible_qp(2, 4, 1, 3, 1, 1, seed=17)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(18), dtype=DT)
    grads = []
    for how in ("keywords", "object"):
        inputs = {k: v.clone().requires_grad_() for k, v in prob.items()}
        if how == "keywords":
            with pytest.warns(DeprecationWarning, match=r"backward=alqp\.LPGD\(tau=\.\.\."):
                sol = solve_qp(**inputs, settings=SETTINGS, backward="lpgd", tau=0.3, variant="left")
        else:
            sol = solve_qp(**inputs, settings=SETTINGS, backward=LPGD(tau=0.3, variant="left"))
        (sol.x * w).sum().backward()
        grads.append({k: v.grad for k, v in inputs.items()})
    assert _rel_err(grads[0], grads[1]) == 0.0


BAD_OPTIONS = [(dict(tau=0.0), ValueError, r"LPGD\.tau must be a positive finite number, got 0\.0"),
               (dict(tau=-1.0), ValueError, r"LPGD\.tau must be a positive finite number, got -1\.0"),
               (dict(tau=float("nan")), ValueError, r"LPGD\.tau must be a positive finite number, got nan"),
               (dict(tau=float("inf")), ValueError, r"LPGD\.tau must be a positive finite number, got inf"),
               (dict(variant="middle"), ValueError,
                r"LPGD\.variant must be one of \('right', 'left', 'central'\), got 'middle'"),
               (dict(proximal=-0.1), ValueError, r"LPGD\.proximal must be a non-negative finite number, got -0\.1"),
               (dict(proximal=float("inf")), ValueError,
                r"LPGD\.proximal must be a non-negative finite number, got inf"),
               (dict(tau="1"), TypeError, r"LPGD\.tau must be a real number, got str"),
               (dict(proximal=True), TypeError, r"LPGD\.proximal must be a real number, got bool")]


@pytest.mark.parametrize("bad,exc,message", BAD_OPTIONS)
def test_bad_options_fail_at_construction(bad, exc, message):
    with pytest.raises(exc, match=message):
        LPGD(**bad)
    with pytest.raises(exc, match=message):
        LPGDOptions(**bad)  # the former name
    with pytest.warns(DeprecationWarning), pytest.raises(exc, match=message):
        QPLayer(backward="lpgd", **bad)


def test_lpgd_options_with_ift_are_an_error():
    match = r"apply to backward='lpgd'.*got backward='ift'"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=match):
        QPLayer(backward="ift", tau=0.1)
    prob = feasible_qp(1, 3, 0, 2, 1, 0, seed=19)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"\['variant'\] apply to backward='lpgd'"):
        solve_qp(prob["H"], prob["g"], C=prob["C"], l=prob["l"], u=prob["u"], variant="right")


def test_shared_inputs_unbatched_and_float32():
    """Shared (unbatched) inputs get the sum of the per-problem gradients; float32 in, float32 out."""
    prob = feasible_qp(2, 4, 1, 3, 1, 1, seed=20)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(21), dtype=DT)
    shared_H = prob["H"][0].clone().requires_grad_()
    g = prob["g"].clone().requires_grad_()
    rest = {k: prob[k] for k in ("A", "b", "C", "l", "u")}
    x = solve_qp(shared_H, g, **rest, settings=SETTINGS, backward=LPGD(tau=1e-3)).x
    (x * w).sum().backward()
    Hb = prob["H"][0].expand(2, 4, 4).clone().requires_grad_()
    x_b = solve_qp(Hb, prob["g"], **rest, settings=SETTINGS, backward=LPGD(tau=1e-3)).x
    (x_b * w).sum().backward()
    assert shared_H.grad.shape == (4, 4)
    assert torch.allclose(shared_H.grad, Hb.grad.sum(0), atol=1e-10)

    p32 = {k: v[0].to(torch.float32).clone().requires_grad_() for k, v in prob.items()}
    # tau = 0.1: the float32 solver cannot resolve much smaller perturbations; the central variant
    # has no O(tau) error on a QP anyway.
    sol = solve_qp(**p32, settings=Settings(eps_abs=1e-6, eps_rel=0.0), backward=LPGD(tau=0.1))
    assert sol.x.dim() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (sol.x * w[0].float()).sum().backward()
    P, sol64 = _solve({k: v[:1] for k, v in prob.items()})
    ref = implicit_backward(P, sol64, w[:1], settings=SETTINGS)
    for k, v in p32.items():
        assert v.grad.dtype == torch.float32
        assert torch.allclose(v.grad.double(), ref[k][0], atol=2e-2 * (1 + float(ref[k].abs().max()))), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    prob = feasible_qp(2, 4, 1, 3, 1, 1, seed=22)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(23), dtype=DT)
    out = {}
    for dev in ("cpu", "cuda"):
        # (detach: on the CPU .to() returns the tensor itself, and requires_grad_ on it made the
        # CUDA copy a non-leaf without a .grad; found on the first GPU run)
        inputs = {k: v.detach().to(dev).requires_grad_() for k, v in prob.items()}
        (solve_qp(**inputs, settings=SETTINGS, backward=LPGD(tau=1e-3)).x * w.to(dev)).sum().backward()
        out[dev] = {k: v.grad for k, v in inputs.items()}
    for k in NAMES:
        assert out["cuda"][k].device.type == "cuda"
        assert torch.allclose(out["cuda"][k].cpu(), out["cpu"][k], atol=1e-6), k


@pytest.mark.parametrize("variant", ["right", "central"])
def test_resolve_reuses_the_forward_factorization(monkeypatch, variant):
    """Given the forward's LeastDistanceFactor, the re-solve of the perturbed QPs (same H, A, C)
    does not factor them again, and the gradients are those computed without it."""
    import alqp.active_set as active_set

    P, sol = _solve(feasible_qp(3, 4, 1, 3, 1, 1, seed=15))
    factor = active_set.factorize(P)
    assert factor is not None and bool(factor.usable.all())
    incoming = _incoming(P, ("x", "z"), seed=16)
    plain = lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=0.01, variant=variant)

    def no_factorize(problem):
        raise AssertionError("the re-solve factored H, A, C again")

    monkeypatch.setattr(active_set, "factorize", no_factorize)
    reused = lpgd_backward(P, sol, *incoming, settings=SETTINGS, tau=0.01, variant=variant, factor=factor)
    for name in plain:
        torch.testing.assert_close(reused[name], plain[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", ["right", "left", "central"])
def test_unconstrained_qp(variant):
    """No A, no C (p = m = 0): x = -H^-1 g is affine in g, so every variant's dL/dg is the implicit
    gradient -H^-1 dL/dx and the central one is exact for H too (was: a reshape error)."""
    gen = torch.Generator().manual_seed(31)
    H, g = _spd(gen, 3, 4), torch.randn(3, 4, generator=gen, dtype=DT)
    w = torch.randn(3, 4, generator=gen, dtype=DT)
    grads = {}
    for backward in ("ift", LPGD(tau=1e-3, variant=variant)):
        Hl, gl = H.clone().requires_grad_(True), g.clone().requires_grad_(True)
        (w * solve_qp(Hl, gl, settings=SETTINGS, backward=backward).x).sum().backward()
        grads[str(backward)] = (Hl.grad, gl.grad)
    (H_ift, g_ift), (H_lpgd, g_lpgd) = grads.values()
    assert torch.allclose(g_lpgd, g_ift, atol=1e-8, rtol=0)
    assert torch.allclose(g_ift, -torch.linalg.solve(H, w), atol=1e-10, rtol=0)
    if variant == "central":
        assert torch.allclose(H_lpgd, H_ift, atol=1e-8, rtol=0)
