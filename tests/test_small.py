"""The per-call fast path for small problems (alqp.small) against the general path.

The oracle is the general path itself (alqp.small.ENABLED = False), which the other test files
check against independent solvers and finite differences: on every family the two must give the
same statuses, the same x, y, z and the same gradients of a random linear loss with respect to
all seven inputs; and the counters show which path answered.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import alqp
from alqp import small
from alqp.certify import Tolerance, residuals
from tests import families

NAMES = ("H", "g", "A", "b", "C", "l", "u")


def _run(data: dict, fast: bool, monkeypatch, dtype=torch.float64, settings=None):
    """Solve ``data`` through alqp.solve_qp with the fast path on or off; returns the solution
    and the gradients of a fixed random linear loss on (x, y, z) with respect to every input."""
    monkeypatch.setattr(small, "ENABLED", fast)
    params = {k: (None if v is None else v.detach().to(dtype).clone().requires_grad_(True)) for k, v in data.items()}
    sol = alqp.solve_qp(*(params[k] for k in NAMES), settings=settings)
    gen = torch.Generator().manual_seed(7)
    loss = sum((torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) * t).sum()
               for t in (sol.x, sol.y, sol.z) if t.numel())
    inputs = [params[k] for k in NAMES if params[k] is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
    return sol, dict(zip([k for k in NAMES if params[k] is not None], grads))


def _compare(data, monkeypatch, dtype=torch.float64, grad_tol=1e-10, sol_tol=1e-9):
    before = dict(small.counters)
    fast_sol, fast_grads = _run(data, True, monkeypatch, dtype)
    taken = {k: small.counters[k] - before[k] for k in before}
    slow_sol, slow_grads = _run(data, False, monkeypatch, dtype)
    assert torch.equal(fast_sol.status, slow_sol.status)
    for name in ("x", "y", "z", "s_eq", "s_in"):
        a, b = getattr(fast_sol, name).detach().double(), getattr(slow_sol, name).detach().double()
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        assert torch.allclose(a, b, atol=sol_tol * scale, rtol=0), (name, (a - b).abs().max())
    for name, g_slow in slow_grads.items():
        g_fast = fast_grads[name]
        if g_slow is None or g_slow.numel() == 0:
            assert g_fast is None or not g_fast.any()
            continue
        scale = max(1.0, float(g_slow.abs().max()))
        err = float((g_fast.double() - g_slow.double()).abs().max())
        assert err <= grad_tol * scale, (name, err)
    return taken


FEASIBLE = [
    ("strictly_convex", lambda s: families.strictly_convex(5, 4, 1, 6, seed=s)),
    ("one_sided", lambda s: families.one_sided(5, 5, 2, 4, seed=s)),
    ("bound_rows", lambda s: families.bound_rows(5, 3, 0, 3, seed=s)),
    ("inequality_only", lambda s: families.inequality_only(8, 10, 6, seed=s)),
    ("equality_only", lambda s: families.equality_only(3, 6, 2, seed=s)),
    ("lp", lambda s: families.lp(4, 3, 1, 6, seed=s)),
]


@pytest.mark.parametrize("name,make", FEASIBLE, ids=[f[0] for f in FEASIBLE])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_matches_general_path_on_feasible_families(name, make, seed, monkeypatch):
    taken = _compare(make(seed), monkeypatch)
    # The fast path answered the forward (every problem of these families is certified SOLVED).
    assert taken["forward"] == 1 and taken["forward_fallback"] == 0
    if name != "lp":  # an LP vertex may be degenerate: then the general backward answers
        assert taken["backward"] == 1


def test_box_qp_of_a_control_loop_takes_both_fast_paths(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    B, n = 5, 2
    M = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    data = dict(H=M @ M.mT + 0.1 * torch.eye(n, dtype=torch.float64), g=3 * torch.randn(B, n, generator=gen,
                dtype=torch.float64), A=None, b=None, C=torch.eye(n, dtype=torch.float64).expand(B, n, n),
                l=-torch.ones(B, n, dtype=torch.float64), u=torch.ones(B, n, dtype=torch.float64))
    taken = _compare(data, monkeypatch)
    assert taken["forward"] == 1 and taken["backward"] == 1


@pytest.mark.parametrize("make", [lambda: families.infeasible_ineq(4, 4, 1, 5, seed=0),
                                  lambda: families.infeasible_bound_rows(4, 4, 1, 4, seed=1)])
def test_infeasible_batches_fall_back_and_keep_their_statuses(make, monkeypatch):
    taken = _compare(make(), monkeypatch, grad_tol=1e-12, sol_tol=1e-12)
    assert taken["forward"] == 0 and taken["forward_fallback"] == 1


def test_singular_hessian_is_either_certified_or_left_to_the_general_path(monkeypatch):
    taken = _compare(families.psd_rank_deficient(4, 4, 1, 6, seed=2), monkeypatch, grad_tol=1e-8, sol_tol=1e-7)
    assert taken["forward"] + taken["forward_fallback"] == 1


def test_float32_matches_general_path(monkeypatch):
    taken = _compare(families.strictly_convex(5, 4, 1, 6, seed=4), monkeypatch, dtype=torch.float32,
                     grad_tol=1e-5, sol_tol=1e-5)
    assert taken["forward"] == 1 and taken["backward"] == 1


def test_large_batches_and_cuda_like_inputs_take_the_general_path(monkeypatch):
    data = families.strictly_convex(small.MAX_BATCH + 1, 4, 1, 6, seed=0)
    before = dict(small.counters)
    alqp.solve_qp(*(data[k] for k in NAMES))
    assert small.counters == before


def test_warm_start_takes_the_general_path(monkeypatch):
    data = families.strictly_convex(3, 4, 1, 6, seed=0)
    sol = alqp.solve_qp(*(data[k] for k in NAMES))
    before = dict(small.counters)
    again = alqp.solve_qp(*(data[k] for k in NAMES), warm_start=sol)
    assert small.counters == before
    assert torch.allclose(again.x, sol.x, atol=1e-9)


def test_nan_incoming_gradient_is_left_to_the_general_backward(monkeypatch):
    data = families.strictly_convex(3, 4, 1, 6, seed=0)
    g = data["g"].clone().requires_grad_(True)
    sol = alqp.solve_qp(data["H"], g, data["A"], data["b"], data["C"], data["l"], data["u"])
    before = dict(small.counters)
    w = torch.ones_like(sol.x)
    w[1, 0] = float("nan")
    (grad,) = torch.autograd.grad((w * sol.x).sum(), g)
    assert small.counters["backward_fallback"] == before["backward_fallback"] + 1
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[0]).all()


def test_host_certification_equals_certify_residuals():
    """host_residuals_meet is certify.residuals(...).meets(...) on host arrays: same verdict on
    answers spread across the tolerance boundary, with infinite bounds and zero multipliers."""
    rng = np.random.default_rng(0)
    B, n, p, m = 400, 4, 1, 5
    H = rng.standard_normal((B, n, n))
    H = H @ H.transpose(0, 2, 1)
    g = rng.standard_normal((B, n))
    G = rng.standard_normal((B, p + m, n))
    x = rng.standard_normal((B, n))
    Gx = np.einsum("bij,bj->bi", G, x)
    lo, hi = Gx - rng.uniform(0, 1, (B, p + m)), Gx + rng.uniform(0, 1, (B, p + m))
    lo[:, :p] = hi[:, :p] = Gx[:, :p]
    lo[:, p + 1], hi[:, p + 2] = -np.inf, np.inf
    # Multipliers making H x + g + G'w small by a factor that crosses the tolerance.
    w = np.linalg.lstsq(G[0].T, -(H[0] @ x[0] + g[0]), rcond=None)[0][None].repeat(B, 0)
    w[:, p + 3] = 0.0
    w = w * (1 + np.logspace(-12, -6, B))[:, None]
    x = x * (1 + rng.choice([0, 1e-11, 1e-9], B))[:, None]
    tol = Tolerance(0.0, 1e-9)
    t = torch.from_numpy
    expected = residuals(t(H), t(g), t(G), t(lo), t(hi), p, t(x), t(w)).meets(tol).numpy()
    got = small.host_residuals_meet(H, g, G, lo, hi, p, x, w, tol)
    assert np.array_equal(got, expected)
    # An answer right on a problem's data is certified by both (not a vacuous agreement).
    Hc = np.eye(n)[None]
    gc = np.ones((1, n))
    Gc = np.eye(n)[None]
    xc = -np.ones((1, n))
    assert small.host_residuals_meet(Hc, gc, Gc, np.full((1, n), -np.inf), np.full((1, n), np.inf), 0, xc,
                                     np.zeros((1, n)), tol).all()


def test_thread_pool_gives_the_serial_answers(monkeypatch):
    """The active-set engine's per-problem DAQP loop on the pool (alqp.pool) gives bit-identical
    answers to the serial loop."""
    from alqp import pool

    data = families.strictly_convex(40, 6, 2, 8, seed=5)
    monkeypatch.setattr(small, "ENABLED", False)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(pool, "ENABLED", False)
        serial = alqp.solve_qp(*(data[k] for k in NAMES))
        monkeypatch.setattr(pool, "ENABLED", True)
        monkeypatch.setattr(pool, "MIN_BATCH", 2)
        monkeypatch.setattr(pool, "MIN_N", 1)
        monkeypatch.setattr(pool, "_cores", lambda: 2)
        assert pool.solve_threads(40, 6) == 2
        threaded = alqp.solve_qp(*(data[k] for k in NAMES))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(serial, threaded):
        assert torch.equal(a, b)


def test_run_chunked_covers_every_index_once_and_raises_errors():
    from alqp import pool

    seen = np.zeros(103, dtype=np.int64)

    def body(chunk):
        for j in chunk:
            seen[j] += 1

    pool.run_chunked(body, 103, threads=3)
    assert (seen == 1).all()

    def broken(chunk):
        if 50 in chunk:
            raise ValueError("chunk failed")

    with pytest.raises(ValueError, match="chunk failed"):
        pool.run_chunked(broken, 103, threads=3)


def test_thread_policy_restores_the_callers_torch_threads(monkeypatch):
    from alqp import pool

    seen = []
    monkeypatch.setattr(pool, "_cores", lambda: 2)

    @pool.one_torch_thread
    def probe():
        seen.append((torch.get_num_threads(), pool.solve_threads(10 * pool.MIN_BATCH, pool.MIN_N)))
        raise RuntimeError("inside")

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="inside"):
            probe()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert seen == [(1, 2)]


def _random_inputs(seed: int, dtype=torch.float64):
    """Small QP inputs with a random mix of shared (no batch dimension), batch-1 and batched
    tensors, one-sided and infinite bounds, and an H symmetric only up to round-off."""
    gen = torch.Generator().manual_seed(seed)
    B, n, p, m = 3, 4, 1, 5
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    M = rnd(B, n, n)
    H = M @ M.mT + torch.eye(n, dtype=torch.float64)
    H = H + 1e-12 * rnd(B, n, n)  # (not symmetric bit for bit, well within canonicalize's tolerance)
    data = dict(H=H, g=rnd(B, n), A=rnd(p, n), b=rnd(1, p), C=rnd(B, m, n), l=-1 - rnd(m).abs(),
                u=1 + rnd(B, m).abs())
    data["l"][1] = -float("inf")
    data["u"][:, 2] = float("inf")
    if seed % 2:
        data["u"] = None
    return {k: None if v is None else v.to(dtype) for k, v in data.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_host_lane_data_equal_canonical_data(seed, dtype):
    """small.host_qp (the layer's inputs, validated on the host) builds the arrays that
    small.host_qp_of builds from canonicalize's problem: the same symmetrized H, broadcasting and
    infinite bounds, bit for bit."""
    from alqp.problem import canonicalize

    data = _random_inputs(seed, dtype)
    args = [data[k] for k in NAMES]
    lane = small.host_qp(*args)
    reference = small.host_qp_of(canonicalize(*args))
    assert lane is not None and reference is not None
    for name in ("M", "absM", "g", "lo", "hi"):
        assert np.array_equal(getattr(lane, name), getattr(reference, name)), name
    assert (lane.n, lane.p, lane.m, lane.dtype) == (reference.n, reference.p, reference.m, reference.dtype)


@pytest.mark.parametrize("seed", [0, 1])
def test_host_lane_gradients_of_shared_and_batch_one_inputs(seed, monkeypatch):
    """The lane's gradients of inputs given without a batch dimension (A, l) or with batch size 1
    (b) are the general path's sums over the batch, in their own shapes."""
    taken = _compare(_random_inputs(seed), monkeypatch)
    assert taken["forward"] == 1 and taken["backward"] == 1


BAD_INPUTS = {
    "nan in g": lambda d: d["g"].__setitem__((0, 0), float("nan")),
    "inf in C": lambda d: d["C"].__setitem__((1, 0, 0), float("inf")),
    "l > u": lambda d: d["l"].__setitem__(0, 5.0),
    "nan in l": lambda d: d["l"].__setitem__(0, float("nan")),
    "l = +inf": lambda d: d["l"].__setitem__(0, float("inf")),
    "H not symmetric": lambda d: d["H"].__setitem__((0, 0, 1), d["H"][0, 0, 1] + 1.0),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_host_lane_declines_bad_input_and_solve_qp_raises_the_general_error(name):
    data = _random_inputs(0)
    BAD_INPUTS[name](data)
    args = [data[k] for k in NAMES]
    assert small.host_qp(*args) is None
    with pytest.raises(ValueError) as fast:
        alqp.solve_qp(*args)
    from alqp.problem import canonicalize

    with pytest.raises(ValueError) as general:
        canonicalize(*args)
    assert str(fast.value) == str(general.value)


def test_shapes_the_host_lane_does_not_take_reach_the_general_errors():
    data = _random_inputs(0)
    args = [data[k] for k in NAMES]
    args[1] = args[1][:, :3]  # g of the wrong size
    assert small.host_qp(*args) is None
    with pytest.raises(ValueError, match="g must have 4 entries"):
        alqp.solve_qp(*args)
    args = [data[k] for k in NAMES]
    args[3] = None  # A without b
    assert small.host_qp(*args) is None
    with pytest.raises(ValueError, match="A and b must be given together"):
        alqp.solve_qp(*args)


def test_general_path_hooks_answer_where_the_host_lane_is_not_used(monkeypatch):
    """solve_small / backward_small (the hooks of the general path, for compiled and transformed
    calls) give the host lane's answers and gradients on a canonical problem."""
    from alqp.problem import canonicalize
    from alqp.solver import solve_problem_factored

    data = families.strictly_convex(4, 4, 1, 6, seed=1)
    problem = canonicalize(*(data[k] for k in NAMES))
    settings = alqp.Settings()
    before = dict(small.counters)
    solution, _ = solve_problem_factored(problem, settings)
    assert small.counters["forward"] == before["forward"] + 1
    lane_sol = alqp.solve_qp(*(data[k] for k in NAMES))
    assert torch.equal(solution.x, lane_sol.x) and torch.equal(solution.z, lane_sol.z)
    gx = torch.randn(solution.x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hook = small.backward_small(problem, solution, gx, None, None, None, None, settings)
    assert hook is not None
    g = data["g"].clone().requires_grad_(True)
    x = alqp.solve_qp(data["H"], g, data["A"], data["b"], data["C"], data["l"], data["u"]).x
    (grad,) = torch.autograd.grad((gx * x).sum(), g)
    assert torch.allclose(hook["g"], grad, atol=1e-13, rtol=0)


def test_host_lane_keeps_autograds_in_place_check_and_contiguous_outputs():
    """An input changed in place between the forward and the backward is caught (as on the
    general path, by the version counters of the saved tensors); y and z come out contiguous."""
    data = families.strictly_convex(3, 4, 1, 6, seed=0)
    g = data["g"].clone().requires_grad_(True)
    u = data["u"].clone()
    before = dict(small.counters)
    sol = alqp.solve_qp(data["H"], g, data["A"], data["b"], data["C"], data["l"], u)
    assert small.counters["forward"] == before["forward"] + 1
    assert sol.y.is_contiguous() and sol.z.is_contiguous()
    u.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sol.x.sum().backward()
