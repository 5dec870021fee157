"""Each ALM setting that no other test varies takes a non-default value here, and the test checks
its effect: max_inner_iter, stall_iter, mu_eq, mu_in, mu_update_factor, eps_dual_inf.

Oracles: CVXPY + Clarabel for the solutions, closed forms for the nearly unbounded QP, and the
default settings' iteration counts and statuses on the same problems (what the setting changes).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from oracles import cvxpy_qp

from alqp import Settings, Status, solve_qp
from benchmarks.problems import random_qp_batch

DT = torch.float64
NAMES = ("H", "g", "A", "b", "C", "l", "u")
ALM = Settings(engine="alm", eps_abs=1e-9, eps_rel=0.0)


@pytest.fixture(scope="module")
def batch():
    """Four random feasible strictly convex QPs (n=20, 5 equalities, 10 inequalities) and their
    oracle solutions."""
    qp = random_qp_batch(4, 20, 5, 10, seed=1)
    prob = {k: getattr(qp, k) for k in NAMES}
    oracle = np.stack([cvxpy_qp(**{k: v[i].numpy() for k, v in prob.items()}).x for i in range(4)])
    return prob, torch.from_numpy(oracle)


def _solve(prob, **changes):
    return solve_qp(**prob, settings=dataclasses.replace(ALM, **changes))


def test_max_inner_iter_bounds_the_newton_steps_per_outer_iteration(batch):
    prob, _ = batch
    # Three outer iterations: with one Newton step each, at most three steps in all; with the
    # default 50 the same three iterations take more steps. (closest_feasible=False: in the
    # default mode a problem left without a solution is solved a second time with its rows
    # equilibrated, and ``iterations`` counts the work of both solves.)
    capped = _solve(prob, max_iter=3, max_inner_iter=1, closest_feasible=False)
    free = _solve(prob, max_iter=3, closest_feasible=False)
    assert (capped.status == Status.MAX_ITER).all()
    assert (capped.iterations <= 3).all()
    assert int(free.iterations.max()) > 3


@pytest.mark.parametrize("field, value", [("mu_eq", 1e-1), ("mu_in", 1e-4), ("mu_in", 10.0),
                                          ("mu_update_factor", 0.5), ("mu_update_factor", 0.01)])
def test_penalty_settings_change_the_path_not_the_answer(batch, field, value):
    prob, oracle = batch
    default = _solve(prob)
    changed = _solve(prob, **{field: value})
    assert (changed.status == Status.SOLVED).all()
    assert torch.allclose(changed.x, oracle, atol=1e-6, rtol=0)
    assert not torch.equal(changed.iterations, default.iterations)


def test_stall_iter_stops_problems_without_progress(batch):
    """With stall_iter=1 an outer iteration without progress ends a problem as STALLED (problems
    the default solves), and a STALLED problem's outputs get no gradient."""
    prob, oracle = batch
    default = _solve(prob)
    assert (default.status == Status.SOLVED).all()
    g = prob["g"].clone().requires_grad_()
    impatient = solve_qp(**{**prob, "g": g}, settings=dataclasses.replace(ALM, stall_iter=1))
    stalled = impatient.status == Status.STALLED
    assert bool(stalled.any()) and bool((impatient.status[~stalled] == Status.SOLVED).all())
    assert torch.allclose(impatient.x[~stalled], oracle[~stalled], atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the "zero" policy's warning
        impatient.x.sum().backward()
    assert float(g.grad[stalled].abs().max()) == 0.0
    assert float(g.grad[~stalled].abs().max()) > 0.0


def test_eps_dual_inf_is_the_tolerance_of_the_unboundedness_certificate():
    """min delta/2 x1^2 - x1 + 1/2 x2^2 + 0.3 x2 with -1 <= x2 <= 1 is bounded (x1 = 1/delta,
    x2 = -0.3), but along x1 its curvature delta = 1e-6 is below a tolerance of 1e-4: without
    scaling, the default eps_dual_inf takes it for unbounded, a tight one solves it."""
    delta = 1e-6
    H = torch.diag(torch.tensor([delta, 1.0], dtype=DT))
    g = torch.tensor([-1.0, 0.3], dtype=DT)
    C, l, u = torch.tensor([[0.0, 1.0]], dtype=DT), -torch.ones(1, dtype=DT), torch.ones(1, dtype=DT)
    unscaled = Settings(engine="alm", scaling_iter=0)  # (default, relative, tolerances)
    loose = solve_qp(H, g, C=C, l=l, u=u, settings=unscaled)
    assert int(loose.status) == Status.DUAL_INFEASIBLE
    tight = solve_qp(H, g, C=C, l=l, u=u, settings=dataclasses.replace(unscaled, eps_dual_inf=1e-10))
    assert int(tight.status) == Status.SOLVED
    assert torch.allclose(tight.x, torch.tensor([1.0 / delta, -0.3], dtype=DT), rtol=1e-8, atol=1e-8)
