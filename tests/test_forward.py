"""Oracle tests of the forward solver ``alqp.solve_qp``.

Every random family of tests/families.py is solved by alqp (float64 and float32) and compared with
CVXPY + Clarabel (tests/oracles.py; the two-stage closest-feasible oracle for infeasible problems)
and with ProxSuite on the feasible families. Tolerances: float64 x within 1e-6 of the oracle (the
objective within 1e-7 relative where x is not unique), shifts within 1e-6; float32 within 1e-3.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import families as F
import oracles as O
import alqp.solver as alqp_solver
from alqp import QPSolution, Settings, Status, solve_qp
from alqp.problem import canonicalize

# ----------------------------------------------------------------------------------------------
# The families under test: generator, keyword arguments, seed.
# ----------------------------------------------------------------------------------------------
FAMILIES = {
    "strictly_convex": (F.strictly_convex, dict(batch=8, n=10, p=3, m=8), 11),
    "psd_rank_deficient": (F.psd_rank_deficient, dict(batch=8, n=8, p=2, m=12), 12),
    "lp": (F.lp, dict(batch=8, n=8, p=2, m=12), 13),
    "equality_only": (F.equality_only, dict(batch=8, n=10, p=4), 14),
    "inequality_only": (F.inequality_only, dict(batch=8, n=10, m=12), 15),
    "one_sided": (F.one_sided, dict(batch=8, n=10, p=3, m=12), 16),
    "equal_bounds": (F.equal_bounds, dict(batch=6, n=10, p=2, m=6), 17),
    "bound_rows": (F.bound_rows, dict(batch=8, n=10, p=3, m=12), 23),
    "infeasible_bound_rows": (F.infeasible_bound_rows, dict(batch=8, n=8, p=2, m=10), 24),
    "infeasible_eq_duplicated": (F.infeasible_eq_duplicated, dict(batch=8, n=10, p=4, m=6), 18),
    "infeasible_eq_overdetermined": (F.infeasible_eq_overdetermined, dict(batch=6, n=5, p=8, m=4), 19),
    "infeasible_ineq": (F.infeasible_ineq, dict(batch=8, n=10, p=2, m=9), 20),
    "infeasible_eq_vs_ineq": (F.infeasible_eq_vs_ineq, dict(batch=8, n=10, p=3, m=6), 21),
    "mixed": (F.mixed, dict(batch=14, n=8, p=2, m=12), 22),
    # Issue 12: repeated and dependent inconsistent rows, in both blocks at once.
    "infeasible_repeated_both": (F.infeasible_repeated_both, dict(batch=4, n=12, p=3, m=6), 25),
    "infeasible_dependent": (F.infeasible_dependent, dict(batch=4, n=10, p=2, m=8), 26),
    "infeasible_scaled_copies": (F.infeasible_scaled_copies, dict(batch=4, n=12, p=3, m=6), 28),
    "infeasible_three_way": (F.infeasible_three_way, dict(batch=4, n=10, p=3, m=6), 29),
}
# What each family's members are: "unique" (feasible, x unique), "objective" (feasible, x not
# unique: compare the objective and check feasibility), "infeasible" (closest feasible, x unique).
KIND = {
    "strictly_convex": "unique",
    "psd_rank_deficient": "objective",
    "lp": "objective",
    "equality_only": "unique",
    "inequality_only": "unique",
    "one_sided": "unique",
    "equal_bounds": "unique",
    "bound_rows": "unique",
    "infeasible_bound_rows": "infeasible",
    "infeasible_eq_duplicated": "infeasible",
    "infeasible_eq_overdetermined": "infeasible",
    "infeasible_ineq": "infeasible",
    "infeasible_eq_vs_ineq": "infeasible",
    "infeasible_repeated_both": "infeasible",
    "infeasible_dependent": "infeasible",
    "infeasible_scaled_copies": "infeasible",
    "infeasible_three_way": "infeasible",
}
ALL = list(FAMILIES)
FEASIBLE = [k for k in ALL if KIND.get(k) in ("unique", "objective")]
INFEASIBLE = [k for k in ALL if KIND.get(k) == "infeasible"]
# Feasible families whose multipliers are unique (strictly convex, LICQ holds generically).
UNIQUE_DUALS = [k for k in ALL if KIND.get(k) == "unique"]

TOL_X64, TOL_OBJ64, TOL_S64 = 1e-6, 1e-7, 1e-6
TOL_32 = 1e-3
TOL_FEAS64 = 1e-7  # primal feasibility of x where x is compared only through the objective
TOL_DUAL64 = 1e-7  # ||H x + g + A'y + C'z||_inf for SOLVED float64 problems


def member_kinds(name: str) -> list:
    B = FAMILIES[name][1]["batch"]
    if name == "mixed":
        return [KIND[label] for label in F.mixed_labels(B)]
    return [KIND[name]] * B


def expected_status(kind: str) -> int:
    return int(Status.CLOSEST_FEASIBLE if kind == "infeasible" else Status.SOLVED)


@functools.lru_cache(maxsize=None)
def problem(name: str) -> dict:
    fn, kwargs, seed = FAMILIES[name]
    return fn(seed=seed, **kwargs)


@functools.lru_cache(maxsize=None)
def oracle(name: str) -> tuple:
    prob = problem(name)
    out = []
    for i, kind in enumerate(member_kinds(name)):
        fn = O.cvxpy_closest_feasible if kind == "infeasible" else O.cvxpy_qp
        out.append(fn(**F.member(prob, i)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def proxsuite_oracle(name: str) -> tuple:
    prob = problem(name)
    return tuple(O.proxsuite_qp(**F.member(prob, i)) for i in range(F.batch_size(prob)))


def alqp(name: str, dtype: str = "float64") -> QPSolution:
    """alqp's solution of a family, on the engine that "auto" picks in this test (conftest pins it)."""
    prob = F.to_dtype(problem(name), getattr(torch, dtype))
    return _alqp_cached(name, dtype, alqp_solver.auto_engine(canonicalize(**prob)))


@functools.lru_cache(maxsize=None)
def _alqp_cached(name: str, dtype: str, engine: str) -> QPSolution:
    prob = F.to_dtype(problem(name), getattr(torch, dtype))
    return solve_qp(**prob, settings=Settings(engine=engine))


def np_member(prob: dict, i: int):
    """(H, g, A, b, C, l, u) of member i as float64 numpy, absent blocks as 0-row arrays."""
    return O.normalize(**F.member(prob, i))


def arr(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def fmt_fail(rows) -> str:
    return "; ".join(rows)


# ----------------------------------------------------------------------------------------------
# The oracles themselves (run without alqp): sign convention, two-stage consistency, ProxSuite.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FEASIBLE)
def test_oracle_kkt_and_signs(name):
    """CVXPY's duals mapped to alqp's convention satisfy H x + g + A'y + C'z = 0 with the right
    complementarity signs, and agree with ProxSuite (which uses the same convention)."""
    prob = problem(name)
    for i, (r, q) in enumerate(zip(oracle(name), proxsuite_oracle(name))):
        H, g, A, b, C, l, u = np_member(prob, i)
        assert np.abs(H @ r.x + g + A.T @ r.y + C.T @ r.z).max() < 1e-8, (name, i)
        Cx = C @ r.x
        assert np.all((r.z <= 1e-7) | (np.abs(Cx - u) < 1e-7)), (name, i, "z > 0 off the upper bound")
        assert np.all((r.z >= -1e-7) | (np.abs(Cx - l) < 1e-7)), (name, i, "z < 0 off the lower bound")
        assert np.abs(A @ r.x - b).max(initial=0.0) < 1e-8
        assert np.all(Cx >= l - 1e-8) and np.all(Cx <= u + 1e-8)
        assert abs(r.obj - q.obj) <= 1e-8 * max(1.0, abs(r.obj)), (name, i, r.obj, q.obj)
        if KIND[name] == "unique":
            assert np.abs(r.x - q.x).max() < 1e-7, (name, i)
            assert np.abs(r.y - q.y).max(initial=0.0) < 1e-6 * max(1.0, np.abs(q.y).max(initial=0)), (name, i)
            assert np.abs(r.z - q.z).max(initial=0.0) < 1e-6 * max(1.0, np.abs(q.z).max(initial=0)), (name, i)


@pytest.mark.parametrize("name", ALL)
def test_two_stage_oracle_consistency(name):
    """The two-stage oracle returns s = 0 and the plain QP solution on feasible problems; on
    infeasible ones its shift is nonzero, matches (A x - b, C x - clip(C x, l, u)) at its x, and is
    stationary for stage 1: A's_eq + C's_in = 0."""
    prob = problem(name)
    for i, kind in enumerate(member_kinds(name)):
        H, g, A, b, C, l, u = np_member(prob, i)
        r = O.cvxpy_closest_feasible(H, g, A, b, C, l, u) if kind != "infeasible" else oracle(name)[i]
        s_norm = max(np.abs(r.s_eq).max(initial=0.0), np.abs(r.s_in).max(initial=0.0))
        if kind == "infeasible":
            assert s_norm > 1e-3, (name, i, s_norm)
            se, si = O.shifts(A, b, C, l, u, r.x)
            assert np.abs(se - r.s_eq).max(initial=0.0) < 1e-8, (name, i)
            assert np.abs(si - r.s_in).max(initial=0.0) < 1e-8, (name, i)
            assert np.abs(A.T @ r.s_eq + C.T @ r.s_in).max() < 1e-8, (name, i)
            # Sign-consistent multipliers of the shifted QP exist (so test_closest_feasible_multipliers
            # asks for something attainable) and the oracle finds them.
            assert np.abs(H @ r.x + g + A.T @ r.y + C.T @ r.z).max() < 1e-7, (name, i)
            cx = np.clip(C @ r.x, l, u)
            assert np.all((r.z <= 1e-7) | (np.abs(cx - u) < 1e-7)), (name, i, "z > 0 off the upper bound")
            assert np.all((r.z >= -1e-7) | (np.abs(cx - l) < 1e-7)), (name, i, "z < 0 off the lower bound")
        else:
            assert s_norm == 0.0
            if kind == "unique":
                assert np.abs(r.x - oracle(name)[i].x).max() < 1e-8


# ----------------------------------------------------------------------------------------------
# alqp against the oracles, float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.engine_independent
@pytest.mark.parametrize("name", ALL)
def test_output_types_and_shapes(name):
    prob = problem(name)
    sol = alqp(name)
    B, n = prob["H"].shape[0], prob["H"].shape[-1]
    p = 0 if prob["A"] is None else prob["A"].shape[-2]
    m = 0 if prob["C"] is None else prob["C"].shape[-2]
    assert isinstance(sol, QPSolution)
    assert sol.x.shape == (B, n) and sol.x.dtype == torch.float64
    assert sol.y.shape == (B, p) and sol.s_eq.shape == (B, p)
    assert sol.z.shape == (B, m) and sol.s_in.shape == (B, m)
    assert sol.status.shape == (B,) and sol.status.dtype == torch.int64
    assert sol.iterations.shape == (B,) and sol.iterations.dtype == torch.int64
    assert (sol.iterations > 0).all()
    for t in (sol.x, sol.y, sol.z, sol.s_eq, sol.s_in):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", ALL)
def test_status(name):
    sol = alqp(name)
    expected = [expected_status(k) for k in member_kinds(name)]
    got = sol.status.tolist()
    bad = [f"member {i}: {Status(g).name} (expected {Status(e).name}, iters {int(sol.iterations[i])})"
           for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not bad, f"{name}: " + fmt_fail(bad)


@pytest.mark.parametrize("name", ALL)
def test_primal_against_oracle(name):
    """x within 1e-6 of the oracle where x is unique; otherwise the objective within 1e-7 relative
    and x feasible within 1e-7."""
    prob, sol = problem(name), alqp(name)
    bad = []
    for i, (kind, r) in enumerate(zip(member_kinds(name), oracle(name))):
        H, g, A, b, C, l, u = np_member(prob, i)
        x = arr(sol.x[i])
        st = Status(int(sol.status[i])).name
        if kind == "objective":
            f = O.objective(H, g, x)
            rel = abs(f - r.obj) / max(1.0, abs(r.obj))
            feas = max(np.abs(A @ x - b).max(initial=0.0),
                       np.maximum(C @ x - u, 0).max(initial=0.0),
                       np.maximum(l - C @ x, 0).max(initial=0.0))
            if rel > TOL_OBJ64 or feas > TOL_FEAS64:
                bad.append(f"member {i}: objective rel err {rel:.2e}, infeasibility {feas:.2e}, status {st}")
        else:
            err = np.abs(x - r.x).max()
            if err > TOL_X64:
                bad.append(f"member {i} ({kind}): |x - x_oracle|_inf = {err:.2e}, status {st}")
    assert not bad, f"{name}: " + fmt_fail(bad)


@pytest.mark.parametrize("name", ALL)
def test_shifts_against_oracle(name):
    """s_eq, s_in within 1e-6 of the oracle's least-squares shift; exactly zero for SOLVED; and equal
    to (A x - b, C x - clip(C x, l, u)) at alqp's x for CLOSEST_FEASIBLE."""
    prob, sol = problem(name), alqp(name)
    bad = []
    for i, (kind, r) in enumerate(zip(member_kinds(name), oracle(name))):
        H, g, A, b, C, l, u = np_member(prob, i)
        s_eq, s_in = arr(sol.s_eq[i]), arr(sol.s_in[i])
        err = max(np.abs(s_eq - r.s_eq).max(initial=0.0), np.abs(s_in - r.s_in).max(initial=0.0))
        if err > TOL_S64:
            bad.append(f"member {i} ({kind}): |s - s_oracle|_inf = {err:.2e}")
        if int(sol.status[i]) == Status.SOLVED:
            if not (torch.all(sol.s_eq[i] == 0) and torch.all(sol.s_in[i] == 0)):
                bad.append(f"member {i}: SOLVED but shift not exactly zero")
        elif int(sol.status[i]) == Status.CLOSEST_FEASIBLE:
            x = arr(sol.x[i])
            se, si = O.shifts(A, b, C, l, u, x)
            cons = max(np.abs(se - s_eq).max(initial=0.0), np.abs(si - s_in).max(initial=0.0))
            if cons > TOL_S64:
                bad.append(f"member {i}: shift differs from (Ax-b, Cx-clip(Cx)) by {cons:.2e}")
    assert not bad, f"{name}: " + fmt_fail(bad)


def _dual_checks(prob, sol, i, tol_abs):
    """Problems with member i's dual residual and complementarity signs (empty list if none)."""
    H, g, A, b, C, l, u = np_member(prob, i)
    x, y, z = arr(sol.x[i]), arr(sol.y[i]), arr(sol.z[i])
    status = int(sol.status[i])
    out = []
    terms = [H @ x, g, A.T @ y, C.T @ z]
    res = np.abs(sum(terms)).max()
    scale = max([1.0] + [np.abs(t).max(initial=0.0) for t in terms])
    # SOLVED: absolute tolerance. CLOSEST_FEASIBLE: the multipliers grow like s/mu_min along
    # null(A'), null(C') directions, so allow roundoff relative to the size of the terms.
    tol = tol_abs if status == Status.SOLVED else 1e-6 * scale
    if res > tol:
        out.append(f"member {i} ({Status(status).name}): dual residual {res:.2e} > {tol:.1e}")
    # Complementarity signs, at the (shifted) bounds: C x - s_in = clip(C x, l, u).
    cx = np.clip(C @ x, l, u)
    ztol = 1e-6 + 1e-9 * np.abs(z).max(initial=0.0)
    near_u = np.isfinite(u) & (np.abs(cx - u) <= 1e-6 * np.maximum(1.0, np.abs(u)))
    near_l = np.isfinite(l) & (np.abs(cx - l) <= 1e-6 * np.maximum(1.0, np.abs(l)))
    if np.any((z > ztol) & ~near_u):
        rows = np.nonzero((z > ztol) & ~near_u)[0].tolist()
        out.append(f"member {i}: z > 0 on rows not at their upper bound: {rows}")
    if np.any((z < -ztol) & ~near_l):
        rows = np.nonzero((z < -ztol) & ~near_l)[0].tolist()
        out.append(f"member {i}: z < 0 on rows not at their lower bound: {rows}")
    return out


@pytest.mark.parametrize("name", ALL)
def test_dual_residual_and_complementarity(name):
    """SOLVED members: ||H x + g + A'y + C'z||_inf <= 1e-7, and z_i > 0 only at u_i, z_i < 0 only
    at l_i (members with another status are left to test_status)."""
    prob, sol = problem(name), alqp(name)
    bad, checked = [], 0
    for i in range(F.batch_size(prob)):
        if int(sol.status[i]) == Status.SOLVED:
            bad += _dual_checks(prob, sol, i, TOL_DUAL64)
            checked += 1
    assert checked or "unique" not in member_kinds(name) and "objective" not in member_kinds(name)
    assert not bad, f"{name}: " + fmt_fail(bad)


@pytest.mark.parametrize("name", INFEASIBLE + ["mixed"])
def test_closest_feasible_multipliers(name):
    """CLOSEST_FEASIBLE members: (y, z) are multipliers of the shifted QP, so the dual residual
    vanishes (relative to the size of its terms, since the multipliers may grow like s/mu_min) and
    z has the complementarity signs at the shifted bounds, i.e. z_i > 0 only where
    clip(C x, l, u)_i = u_i and z_i < 0 only where it equals l_i."""
    prob, sol = problem(name), alqp(name)
    bad, checked = [], 0
    for i in range(F.batch_size(prob)):
        if int(sol.status[i]) == Status.CLOSEST_FEASIBLE:
            bad += _dual_checks(prob, sol, i, TOL_DUAL64)
            checked += 1
    assert checked, f"{name}: no member reported CLOSEST_FEASIBLE"
    assert not bad, f"{name}: " + fmt_fail(bad)


@pytest.mark.parametrize("name", UNIQUE_DUALS)
def test_multipliers_against_oracle(name):
    """Where the multipliers are unique (strictly convex, LICQ), y and z match the oracle's."""
    sol = alqp(name)
    bad = []
    for i, r in enumerate(oracle(name)):
        y, z = arr(sol.y[i]), arr(sol.z[i])
        scale = max(1.0, np.abs(r.y).max(initial=0.0), np.abs(r.z).max(initial=0.0))
        err = max(np.abs(y - r.y).max(initial=0.0), np.abs(z - r.z).max(initial=0.0))
        if err > 1e-5 * scale:
            bad.append(f"member {i}: |(y,z) - oracle|_inf = {err:.2e} (scale {scale:.1e})")
    assert not bad, f"{name}: " + fmt_fail(bad)


@pytest.mark.parametrize("name", FEASIBLE)
def test_agrees_with_proxsuite(name):
    prob, sol = problem(name), alqp(name)
    bad = []
    for i, q in enumerate(proxsuite_oracle(name)):
        H, g, *_ = np_member(prob, i)
        x = arr(sol.x[i])
        if KIND[name] == "unique":
            err = np.abs(x - q.x).max()
            if err > TOL_X64:
                bad.append(f"member {i}: |x - x_proxsuite|_inf = {err:.2e}")
        else:
            rel = abs(O.objective(H, g, x) - q.obj) / max(1.0, abs(q.obj))
            if rel > TOL_OBJ64:
                bad.append(f"member {i}: objective rel err vs proxsuite {rel:.2e}")
    assert not bad, f"{name}: " + fmt_fail(bad)


# ----------------------------------------------------------------------------------------------
# float32
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_float32(name):
    prob = problem(name)
    sol = alqp(name, "float32")
    assert sol.x.dtype == torch.float32 and sol.z.dtype == torch.float32
    bad = []
    for i, (kind, r) in enumerate(zip(member_kinds(name), oracle(name))):
        H, g, A, b, C, l, u = np_member(prob, i)
        st = int(sol.status[i])
        if st != expected_status(kind):
            bad.append(f"member {i}: status {Status(st).name} (expected {Status(expected_status(kind)).name})")
        x = arr(sol.x[i])
        if kind == "objective":
            rel = abs(O.objective(H, g, x) - r.obj) / max(1.0, abs(r.obj))
            feas = max(np.abs(A @ x - b).max(initial=0.0),
                       np.maximum(C @ x - u, 0).max(initial=0.0),
                       np.maximum(l - C @ x, 0).max(initial=0.0))
            if rel > TOL_32 or feas > TOL_32:
                bad.append(f"member {i}: objective rel err {rel:.2e}, infeasibility {feas:.2e}")
        else:
            err = np.abs(x - r.x).max()
            if err > TOL_32:
                bad.append(f"member {i} ({kind}): |x - x_oracle|_inf = {err:.2e}")
        serr = max(np.abs(arr(sol.s_eq[i]) - r.s_eq).max(initial=0.0),
                   np.abs(arr(sol.s_in[i]) - r.s_in).max(initial=0.0))
        if serr > TOL_32:
            bad.append(f"member {i}: |s - s_oracle|_inf = {serr:.2e}")
    assert not bad, f"{name} float32: " + fmt_fail(bad)


# ----------------------------------------------------------------------------------------------
# Batching: shared tensors, size-1 batch dims, unbatched input, absent constraint blocks
# ----------------------------------------------------------------------------------------------
SHARED_COMBOS = [
    ("H",), ("g",), ("A",), ("b",), ("A", "b"), ("C",), ("l", "u"), ("C", "l", "u"),
    ("H", "A", "C"), ("H", "A", "b", "C", "l", "u"),
]


def _assert_same_solution(s1, s2, atol=1e-7, what=""):
    assert torch.equal(s1.status, s2.status), (what, s1.status.tolist(), s2.status.tolist())
    for field in ("x", "y", "z", "s_eq", "s_in"):
        a, b = getattr(s1, field), getattr(s2, field)
        assert a.shape == b.shape, (what, field, a.shape, b.shape)
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= atol * max(1.0, b.abs().max().item() if b.numel() else 0.0), (what, field, err)


@pytest.mark.parametrize("shared", SHARED_COMBOS, ids=lambda s: "+".join(s))
def test_shared_vs_batched(shared):
    B = 5
    prob = F.shared_batch(B, 8, 3, 6, seed=31, shared=shared)
    for k in shared:
        assert prob[k].dim() == {"H": 2, "g": 1, "A": 2, "b": 1, "C": 2, "l": 1, "u": 1}[k]
    full = {k: v.unsqueeze(0).expand(B, *v.shape).contiguous() if k in shared else v for k, v in prob.items()}
    s_shared, s_full = solve_qp(**prob), solve_qp(**full)
    assert s_shared.x.shape == (B, 8)
    assert (s_full.status == Status.SOLVED).all(), s_full.status.tolist()
    _assert_same_solution(s_shared, s_full, what=str(shared))
    # and both agree with the oracle
    for i in range(B):
        r = O.cvxpy_qp(**F.member(full, i))
        assert np.abs(arr(s_shared.x[i]) - r.x).max() < TOL_X64, (shared, i)


@pytest.mark.engine_independent
def test_size_one_batch_dims_broadcast():
    """Tensors with a leading batch dimension of 1 broadcast against batch B like shared ones."""
    B = 4
    prob = F.shared_batch(B, 8, 3, 6, seed=32, shared=("H", "A", "C"))
    ones = {k: (v.unsqueeze(0) if k in ("H", "A", "C") else v) for k, v in prob.items()}
    _assert_same_solution(solve_qp(**ones), solve_qp(**prob), what="size-1 batch")
    assert solve_qp(**ones).x.shape == (B, 8)


@pytest.mark.engine_independent
def test_unbatched_input_gives_unbatched_output():
    prob = F.strictly_convex(1, 8, 3, 6, seed=33)
    single = F.member(prob, 0)
    sol = solve_qp(**single)
    assert sol.x.shape == (8,) and sol.y.shape == (3,) and sol.z.shape == (6,)
    assert sol.s_eq.shape == (3,) and sol.s_in.shape == (6,)
    assert sol.status.shape == () and sol.iterations.shape == ()
    assert int(sol.status) == Status.SOLVED
    batched = solve_qp(**prob)
    assert batched.x.shape == (1, 8)
    assert torch.allclose(sol.x, batched.x[0], atol=1e-10, rtol=0)
    r = O.cvxpy_qp(**single)
    assert np.abs(arr(sol.x) - r.x).max() < TOL_X64


@pytest.mark.engine_independent
def test_unbatched_infeasible_gives_unbatched_output():
    single = F.member(F.infeasible_ineq(1, 6, 2, 6, seed=34), 0)
    sol = solve_qp(**single)
    assert sol.x.shape == (6,) and sol.status.shape == ()
    assert int(sol.status) == Status.CLOSEST_FEASIBLE
    r = O.cvxpy_closest_feasible(**single)
    assert np.abs(arr(sol.x) - r.x).max() < TOL_X64
    assert np.abs(arr(sol.s_in) - r.s_in).max() < TOL_S64


def _absent_problem(case):
    base = F.strictly_convex(4, 8, 3, 6, seed=35)
    H, g = base["H"], base["g"]
    if case == "no_A":
        return dict(H=H, g=g, C=base["C"], l=base["l"], u=base["u"])
    if case == "no_C":
        return dict(H=H, g=g, A=base["A"], b=base["b"])
    if case == "only_l":
        return dict(H=H, g=g, A=base["A"], b=base["b"], C=base["C"], l=base["l"])
    if case == "only_u":
        return dict(H=H, g=g, A=base["A"], b=base["b"], C=base["C"], u=base["u"])
    if case == "unconstrained":
        return dict(H=H, g=g)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_A", "no_C", "only_l", "only_u", "unconstrained"])
def test_absent_constraint_blocks(case):
    prob = _absent_problem(case)
    sol = solve_qp(**prob)
    B, n = prob["g"].shape
    p = prob["A"].shape[-2] if "A" in prob else 0
    m = prob["C"].shape[-2] if "C" in prob else 0
    assert sol.y.shape == (B, p) and sol.s_eq.shape == (B, p)
    assert sol.z.shape == (B, m) and sol.s_in.shape == (B, m)
    assert (sol.status == Status.SOLVED).all(), sol.status.tolist()
    for i in range(B):
        r = O.cvxpy_qp(**F.member(prob, i))
        assert np.abs(arr(sol.x[i]) - r.x).max() < TOL_X64, (case, i)
    if case == "unconstrained":
        x_exact = torch.linalg.solve(prob["H"], -prob["g"])
        assert (sol.x - x_exact).abs().max() < TOL_X64


# ----------------------------------------------------------------------------------------------
# Statuses: dual infeasible, primal infeasible without closest-feasible mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lp_only", [True, False], ids=["LP", "PSD-QP"])
def test_dual_infeasible(lp_only):
    prob = F.unbounded(4, 6, 2, 5, seed=36, lp_only=lp_only)
    sol = solve_qp(**prob)
    assert (sol.status == Status.DUAL_INFEASIBLE).all(), [Status(s).name for s in sol.status.tolist()]


def test_dual_infeasible_member_does_not_spoil_batch():
    unb = F.unbounded(2, 6, 2, 5, seed=37, lp_only=True)
    ok = F.strictly_convex(2, 6, 2, 5, seed=38)
    prob = {k: torch.cat([unb[k], ok[k]]) for k in F.KEYS}
    sol = solve_qp(**prob)
    assert [Status(s).name for s in sol.status.tolist()] == ["DUAL_INFEASIBLE"] * 2 + ["SOLVED"] * 2
    for i in (2, 3):
        r = O.cvxpy_qp(**F.member(prob, i))
        assert np.abs(arr(sol.x[i]) - r.x).max() < TOL_X64


# One equality-infeasible family, one inequality-infeasible family, and the mixed batch (which holds
# members of every infeasible kind next to feasible ones).
@pytest.mark.parametrize("name", ["infeasible_eq_duplicated", "infeasible_ineq", "mixed"])
def test_primal_infeasible_without_closest_feasible(name):
    prob = problem(name)
    # max_iter=200 is ~10x the outer iterations the closest-feasible mode needs on these problems
    # (so a working detector has ample room); it bounds the runtime when detection fails.
    sol = solve_qp(**prob, settings=Settings(closest_feasible=False, max_iter=200))
    expected = [int(Status.PRIMAL_INFEASIBLE) if k == "infeasible" else int(Status.SOLVED)
                for k in member_kinds(name)]
    got = sol.status.tolist()
    assert got == expected, [(i, Status(g).name, Status(e).name)
                             for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    # The feasible members are still solved to the oracle's accuracy.
    for i, (kind, r) in enumerate(zip(member_kinds(name), oracle(name))):
        if kind == "unique":
            assert np.abs(arr(sol.x[i]) - r.x).max() < TOL_X64, (name, i)


# ----------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------
@pytest.mark.alm_only
@pytest.mark.parametrize("form", ["QPSolution", "tuple"])
def test_warm_start(form):
    B = 12
    prob = F.strictly_convex(B, 10, 3, 8, seed=39)
    gen = torch.Generator().manual_seed(40)
    first = solve_qp(**prob)
    assert (first.status == Status.SOLVED).all()
    pert = dict(prob)
    pert["g"] = prob["g"] + 1e-3 * torch.randn(prob["g"].shape, generator=gen, dtype=torch.float64)
    pert["b"] = prob["b"] + 1e-3 * torch.randn(prob["b"].shape, generator=gen, dtype=torch.float64)
    cold = solve_qp(**pert)
    ws = first if form == "QPSolution" else (first.x, first.y, first.z)
    warm = solve_qp(**pert, warm_start=ws)
    assert (cold.status == Status.SOLVED).all() and (warm.status == Status.SOLVED).all()
    assert (warm.x - cold.x).abs().max() < TOL_X64
    for i in range(B):
        r = O.cvxpy_qp(**F.member(pert, i))
        assert np.abs(arr(warm.x[i]) - r.x).max() < TOL_X64, i
    assert warm.iterations.sum() < cold.iterations.sum(), (warm.iterations.tolist(), cold.iterations.tolist())
    assert warm.iterations.median() <= cold.iterations.median(), (warm.iterations.tolist(), cold.iterations.tolist())


# ----------------------------------------------------------------------------------------------
# The reference unit test of docs/design.md section 2: min x1 + x2  s.t.  theta <= x1 + x2,  0 <= x <= 1
# ----------------------------------------------------------------------------------------------
THETAS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]


def _reference_problem(thetas, dtype=torch.float64):
    T = len(thetas)
    H = torch.zeros(2, 2, dtype=dtype)
    g = torch.ones(2, dtype=dtype)
    C = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    l = torch.zeros(T, 3, dtype=dtype)
    l[:, 0] = torch.tensor(thetas, dtype=dtype)
    u = torch.tensor([float("inf"), 1.0, 1.0], dtype=dtype).expand(T, 3).contiguous()
    return dict(H=H, g=g, C=C, l=l, u=u)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_design_reference_problem(dtype):
    dt = getattr(torch, dtype)
    tol = TOL_X64 if dtype == "float64" else TOL_32
    prob = _reference_problem(THETAS, dt)
    sol = solve_qp(**prob)
    assert sol.x.shape == (len(THETAS), 2)
    for i, th in enumerate(THETAS):
        st = Status(int(sol.status[i])).name
        x = arr(sol.x[i])
        if th <= 2:
            assert st == "SOLVED", (th, st)
            # Every x in the box with x1 + x2 = theta is optimal: the objective and feasibility are
            # what is determined. From x0 = 0 the iterates stay symmetric in exact arithmetic, and
            # float64 keeps docs/design.md's x = theta/2; float32's round-off may pick another optimum.
            assert abs(x.sum() - th) < tol and x.min() > -tol and x.max() < 1 + tol, (th, x)
            if dtype == "float64":
                assert np.abs(x - th / 2).max() < tol, (th, x)
            assert np.abs(arr(sol.s_in[i])).max() == 0.0
        else:
            assert st == "CLOSEST_FEASIBLE", (th, st)
            t = (th + 1) / 3  # closed form: shift (2-th)/3 on the sum row, (th-2)/3 on each box row
            assert np.abs(x - t).max() < tol, (th, x, t)
            s_exact = np.array([(2 - th) / 3, (th - 2) / 3, (th - 2) / 3])
            assert np.abs(arr(sol.s_in[i]) - s_exact).max() < tol, (th, arr(sol.s_in[i]))
            if dtype == "float64":
                r = O.cvxpy_closest_feasible(**F.member(F.to_dtype(prob, torch.float64), i))
                assert np.abs(r.x - t).max() < 1e-8 and np.abs(r.s_in - s_exact).max() < 1e-8
                assert np.abs(x - r.x).max() < tol and np.abs(arr(sol.s_in[i]) - r.s_in).max() < tol


# ----------------------------------------------------------------------------------------------
# CUDA (skipped on CPU-only machines)
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("name", ["strictly_convex", "infeasible_ineq", "mixed"])
def test_cuda_matches_oracle(name):
    prob = {k: (None if v is None else v.cuda()) for k, v in problem(name).items()}
    sol = solve_qp(**prob)
    assert sol.x.device.type == "cuda"
    assert sol.status.cpu().tolist() == [expected_status(k) for k in member_kinds(name)]
    for i, (kind, r) in enumerate(zip(member_kinds(name), oracle(name))):
        if kind != "objective":
            assert np.abs(arr(sol.x[i]) - r.x).max() < TOL_X64, (name, i)
        assert np.abs(arr(sol.s_in[i]) - r.s_in).max(initial=0.0) < TOL_S64, (name, i)


# ----------------------------------------------------------------------------------------------
# Issue 12: an LP variant (x not unique), and the stall guard
# ----------------------------------------------------------------------------------------------
def test_repeated_rows_lp_closest_feasible():
    """LPs on a box with repeated inconsistent rows in both blocks: the shift is unique (checked
    against the two-stage oracle), x is not, so its objective is compared; the multipliers are
    finite and satisfy the shifted QP's KKT conditions."""
    fn, kw = F.ISSUE12["infeasible_repeated_both_lp"]
    prob = fn(batch=4, seed=27, **kw)
    sol = solve_qp(**prob)
    assert (sol.status == Status.CLOSEST_FEASIBLE).all(), sol.status.tolist()
    for i in range(4):
        H, g, A, b, C, l, u = np_member(prob, i)
        r = O.cvxpy_closest_feasible(H, g, A, b, C, l, u)
        x, y, z = arr(sol.x[i]), arr(sol.y[i]), arr(sol.z[i])
        assert np.abs(arr(sol.s_eq[i]) - r.s_eq).max() < TOL_S64, i
        assert np.abs(arr(sol.s_in[i]) - r.s_in).max() < TOL_S64, i
        assert abs(O.objective(H, g, x) - r.obj) <= TOL_OBJ64 * max(1.0, abs(r.obj)), i
        assert np.abs(H @ x + g + A.T @ y + C.T @ z).max() < TOL_DUAL64, i
        assert max(np.abs(y).max(), np.abs(z).max()) < 1e3, i  # bounded: not the ALM's diverging ones


@pytest.mark.alm_only
def test_stall_guard_stops_a_problem_without_progress():
    """A tolerance below what round-off allows (eps_abs 1e-14 on a problem with |x| ~ 1e4): the
    residuals stop falling, and the problem ends STALLED after about ``stall_iter`` outer iterations
    instead of running up to max_iter (without the guard it took 100,008 Newton steps and 379 s
    here), while the other members of its batch are solved as usual."""
    gen = torch.Generator().manual_seed(1)
    prob = F.strictly_convex(3, 20, 5, 10, seed=30)
    x0 = 1e4 * torch.randn(20, generator=gen, dtype=torch.float64)
    bad = {k: v[0].clone() for k, v in prob.items()}
    bad["b"] = bad["A"] @ x0
    bad["l"], bad["u"] = bad["C"] @ x0 - 1, bad["C"] @ x0 + 1
    bad["g"] = -bad["H"] @ x0 + 1e3 * torch.randn(20, generator=gen, dtype=torch.float64)
    for k in prob:
        prob[k] = prob[k].clone()
        prob[k][0] = bad[k]
    settings = Settings(eps_abs=1e-14, eps_rel=0.0, max_iter=100_000, engine="alm")
    sol = solve_qp(**prob, settings=settings)
    assert int(sol.status[0]) == Status.STALLED, Status(int(sol.status[0])).name
    assert int(sol.iterations[0]) <= settings.stall_iter * settings.max_inner_iter
    # The well-scaled members reach round-off: solved, or stopped by the guard at an accurate
    # iterate; none runs to max_iter.
    assert (sol.status != Status.MAX_ITER).all()
    for i in (1, 2):
        r = O.cvxpy_qp(**F.member(prob, i))
        assert np.abs(arr(sol.x[i]) - r.x).max() < TOL_X64, i


@pytest.mark.parametrize("name", ["infeasible_repeated_both", "infeasible_dependent", "infeasible_scaled_copies",
                                  "infeasible_three_way"])
def test_float32_closest_feasible_multipliers(name):
    """float32: the reported multipliers of closest-feasible problems satisfy stationarity to about
    float32's accuracy of x (they were off by up to 2.5 on these families before their float64
    refit, activity.polish_multipliers) and have their bounds' signs on the shifted rows."""
    prob = problem(name)
    sol = alqp(name, "float32")
    bad = []
    for i, kind in enumerate(member_kinds(name)):
        if kind != "infeasible":
            continue
        H, g, A, b, C, l, u = np_member(prob, i)
        x, y, z, s_in = arr(sol.x[i]), arr(sol.y[i]), arr(sol.z[i]), arr(sol.s_in[i])
        dual = np.abs(H @ x + g + A.T @ y + C.T @ z).max() / max(1.0, np.abs(g).max())
        if dual > 5e-3:
            bad.append(f"member {i}: relative dual residual {dual:.1e}")
        if np.any((s_in > 0) & (z < 0)) or np.any((s_in < 0) & (z > 0)):
            bad.append(f"member {i}: a shifted row's multiplier has the wrong sign")
    assert not bad, f"{name} float32: " + fmt_fail(bad)
