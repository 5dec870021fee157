"""Oracle tests of the CPU active-set engine ``alqp.active_set.solve_active_set`` (DAQP).

Every feasible family of tests/families.py is solved and compared with CVXPY + Clarabel: x within
1e-6 relative where it is unique, the objective within 1e-7 relative where it is not (PSD H, LPs),
every problem certified, and the multipliers checked against alqp's KKT conditions and sign
convention (H x + g + A'y + C'z = 0, z_i > 0 only at u_i, z_i < 0 only at l_i). Infeasible and
unbounded problems must come back uncertified (the ALM solver answers them).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import daqp  # noqa: F401  (a hard dependency of the engine: fail loudly when it is missing)
import families as F
import oracles as O
from alqp import Settings, Status, solve_qp
from alqp.active_set import solve_active_set
from alqp.problem import canonicalize
from alqp.certify import Tolerance
from alqp.solver import auto_engine

FEASIBLE = {
    "strictly_convex": (F.strictly_convex, dict(batch=4, n=10, p=3, m=8), 11, "unique"),
    "psd_rank_deficient": (F.psd_rank_deficient, dict(batch=4, n=8, p=2, m=12), 12, "objective"),
    "lp": (F.lp, dict(batch=4, n=8, p=2, m=12), 13, "objective"),
    "equality_only": (F.equality_only, dict(batch=4, n=10, p=4), 14, "unique"),
    "inequality_only": (F.inequality_only, dict(batch=4, n=10, m=12), 15, "unique"),
    "one_sided": (F.one_sided, dict(batch=4, n=10, p=3, m=12), 16, "unique"),
    "equal_bounds": (F.equal_bounds, dict(batch=4, n=10, p=2, m=6), 17, "unique"),
    "bound_rows": (F.bound_rows, dict(batch=4, n=10, p=3, m=12), 23, "unique"),
}
UNCERTIFIED = {
    "infeasible_bound_rows": (F.infeasible_bound_rows, dict(batch=4, n=8, p=2, m=10), 24),
    "infeasible_eq_duplicated": (F.infeasible_eq_duplicated, dict(batch=4, n=10, p=4, m=6), 18),
    "infeasible_eq_overdetermined": (F.infeasible_eq_overdetermined, dict(batch=4, n=5, p=8, m=4), 19),
    "infeasible_ineq": (F.infeasible_ineq, dict(batch=4, n=10, p=2, m=9), 20),
    "infeasible_eq_vs_ineq": (F.infeasible_eq_vs_ineq, dict(batch=4, n=10, p=3, m=6), 21),
    "unbounded": (F.unbounded, dict(batch=4, n=8, p=2, m=5), 25),
    "unbounded_lp": (functools.partial(F.unbounded, lp_only=True), dict(batch=4, n=8, p=2, m=5), 26),
}
TOL_X, TOL_OBJ, TOL_KKT = 1e-6, 1e-7, 1e-8


DEFAULT_SETTINGS = Settings()

def _problem(table: dict, name: str, dtype=torch.float64) -> dict:
    fn, kwargs, seed = table[name][:3]
    return F.to_dtype(fn(**kwargs, seed=seed), dtype)


def _solve(prob: dict, settings: Settings = DEFAULT_SETTINGS):
    return solve_active_set(canonicalize(**prob), settings)[:2]


@functools.lru_cache(maxsize=None)
def _oracle(name: str) -> list:
    return O.solve_each(_problem(FEASIBLE, name), O.cvxpy_qp)


def _kkt_violation(member: dict, x, y, z) -> dict:
    """The KKT residuals of one problem in alqp's sign convention (infinity norms)."""
    H, g, A, b, C, l, u = O.normalize(**member)
    x, y, z = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
    Cx = C @ x
    at_u = np.abs(Cx - u) <= TOL_KKT * np.maximum(1.0, np.abs(u))
    at_l = np.abs(Cx - l) <= TOL_KKT * np.maximum(1.0, np.abs(l))
    return dict(
        stationarity=np.abs(H @ x + g + A.T @ y + C.T @ z).max(initial=0.0),
        equality=np.abs(A @ x - b).max(initial=0.0),
        bounds=np.maximum(np.maximum(l - Cx, Cx - u), 0.0).max(initial=0.0),
        # z_i > 0 only where C_i x = u_i, z_i < 0 only where C_i x = l_i.
        sign=np.abs(np.where(((z > 0) & ~at_u) | ((z < 0) & ~at_l), z, 0.0)).max(initial=0.0),
    )


@pytest.mark.parametrize("name", list(FEASIBLE))
def test_feasible_families_match_oracle(name):
    prob = _problem(FEASIBLE, name)
    sol, certified = _solve(prob)
    B = F.batch_size(prob)
    assert certified.dtype == torch.bool and certified.shape == (B,)
    assert bool(certified.all()), f"uncertified: {certified.tolist()}, status {sol.status.tolist()}"
    assert (sol.status == int(Status.SOLVED)).all()
    assert (sol.s_eq == 0).all() and (sol.s_in == 0).all()
    for i, ref in enumerate(_oracle(name)):
        member = F.member(prob, i)
        x = sol.x[i].numpy()
        if FEASIBLE[name][3] == "unique":
            assert np.abs(x - ref.x).max() <= TOL_X * max(1.0, np.abs(ref.x).max()), f"problem {i}"
        else:  # x need not be unique: the objective is
            H, g = O.normalize(**member)[:2]
            assert abs(O.objective(H, g, x) - ref.obj) <= TOL_OBJ * max(1.0, abs(ref.obj)), f"problem {i}"
        kkt = _kkt_violation(member, x, sol.y[i], sol.z[i])
        assert max(kkt.values()) <= TOL_KKT, f"problem {i}: {kkt}"


@pytest.mark.parametrize("name", [k for k, v in FEASIBLE.items() if v[3] == "unique"])
def test_multipliers_match_oracle_and_alm(name):
    """Unique multipliers (strictly convex, LICQ): the same as CVXPY's mapped ones and as the ALM's,
    so the IFT and LPGD backwards take them unchanged."""
    prob = _problem(FEASIBLE, name)
    sol, _ = _solve(prob)
    alm = solve_qp(**prob, settings=Settings(engine="alm"))
    assert (alm.status == Status.SOLVED).all()
    for i, ref in enumerate(_oracle(name)):
        scale = max(1.0, np.abs(ref.y).max(initial=0.0), np.abs(ref.z).max(initial=0.0))
        assert np.abs(sol.y[i].numpy() - ref.y).max(initial=0.0) <= 1e-6 * scale
        assert np.abs(sol.z[i].numpy() - ref.z).max(initial=0.0) <= 1e-6 * scale
    assert torch.allclose(sol.y, alm.y, atol=1e-6) and torch.allclose(sol.z, alm.z, atol=1e-6)


def test_sign_convention_by_hand():
    """min 1/2|x|^2 - 2 x1  s.t.  x3 = 2,  x1 <= 1,  x2 >= 0.5: x = (1, 0.5, 2) with y = -2,
    z = (+1 at the upper bound, -0.5 at the lower bound)."""
    H = torch.eye(3, dtype=torch.float64)
    g = torch.tensor([-2.0, 0.0, 0.0], dtype=torch.float64)
    A = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([2.0], dtype=torch.float64)
    C = torch.eye(3, dtype=torch.float64)[:2]
    l = torch.tensor([-10.0, 0.5], dtype=torch.float64)
    u = torch.tensor([1.0, 10.0], dtype=torch.float64)
    sol, certified, _ = solve_active_set(canonicalize(H, g, A, b, C, l, u), Settings())
    assert bool(certified.all())
    torch.testing.assert_close(sol.x[0], torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sol.y[0], torch.tensor([-2.0], dtype=torch.float64))
    torch.testing.assert_close(sol.z[0], torch.tensor([1.0, -0.5], dtype=torch.float64))
    assert int(sol.iterations[0]) > 0


@pytest.mark.parametrize("name", list(UNCERTIFIED))
def test_infeasible_and_unbounded(name):
    """Unbounded problems are never certified. An infeasible one is either left to the ALM
    (uncertified: e.g. dependent equality rows, which DAQP rejects) or certified CLOSEST_FEASIBLE,
    and then its x and shift are those of the two-stage closest-feasible oracle."""
    prob = _problem(UNCERTIFIED, name)
    sol, certified = _solve(prob)
    assert (sol.status != int(Status.SOLVED)).all()
    for t in (sol.x, sol.y, sol.z, sol.s_eq, sol.s_in):
        assert torch.isfinite(t).all()
    if name.startswith("unbounded"):
        assert not bool(certified.any())
        assert (sol.status == int(Status.DUAL_INFEASIBLE)).all()
        return
    assert (sol.status[certified] == int(Status.CLOSEST_FEASIBLE)).all()
    for i in certified.nonzero().squeeze(-1).tolist():
        r = O.cvxpy_closest_feasible(**F.member(prob, i))
        assert np.abs(sol.x[i].numpy() - r.x).max() < 1e-6, (name, i)
        assert np.abs(sol.s_eq[i].numpy() - r.s_eq).max(initial=0.0) < 1e-6, (name, i)
        assert np.abs(sol.s_in[i].numpy() - r.s_in).max(initial=0.0) < 1e-6, (name, i)


def test_closest_feasible_certified_where_daqp_can():
    """Infeasible families without dependent equality rows are solved to their closest feasible
    QP by the engine itself (phase 1: the least-squares shift; phase 2: the shifted QP)."""
    for name, make in (("infeasible_ineq", lambda: F.infeasible_ineq(6, 10, 2, 9, seed=20)),
                       ("infeasible_eq_vs_ineq", lambda: F.infeasible_eq_vs_ineq(6, 10, 3, 6, seed=21))):
        _, certified = _solve(make())
        assert bool(certified.all()), name


def test_mixed_batch_certifies_the_feasible_members():
    prob = F.mixed(batch=14, n=8, p=2, m=12, seed=22)
    sol, certified = _solve(prob)
    feasible = torch.tensor([not label.startswith("infeasible") for label in F.mixed_labels(14)])
    assert bool(certified[feasible].all())
    assert (sol.status[feasible & certified] == int(Status.SOLVED)).all()
    assert (sol.status[~feasible & certified] == int(Status.CLOSEST_FEASIBLE)).all()


@pytest.mark.parametrize("name", ["strictly_convex", "lp", "one_sided"])
def test_float32(name):
    prob = _problem(FEASIBLE, name, torch.float32)
    sol, certified = _solve(prob)
    assert sol.x.dtype == sol.y.dtype == sol.z.dtype == torch.float32
    assert bool(certified.all())
    for i, ref in enumerate(_oracle(name)):
        if FEASIBLE[name][3] == "unique":
            assert np.abs(sol.x[i].double().numpy() - ref.x).max() <= 1e-3 * max(1.0, np.abs(ref.x).max())
        else:
            H, g = O.normalize(**F.member(prob, i))[:2]
            obj = O.objective(H, g, sol.x[i].double().numpy())
            assert abs(obj - ref.obj) <= 1e-3 * max(1.0, abs(ref.obj))


def test_tolerance_is_checked():
    """The tolerance floor 100 * finfo.eps applies, as in the ALM (an eps_abs of 1e-30 still
    certifies), and an answer that does not solve the problem is rejected by the certification."""
    prob = _problem(FEASIBLE, "strictly_convex")
    _, certified = _solve(prob, Settings(eps_abs=1e-30, eps_rel=0.0))
    assert bool(certified.all())
    bad = dict(prob)
    bad["l"] = prob["l"].clone()
    bad["u"] = prob["u"].clone()
    bad["l"][0, 0] = bad["u"][0, 0] = 0.0  # a changed problem; certify the old answer against it
    sol, _ = _solve(prob)
    from alqp.active_set import _certify

    P = canonicalize(**bad)
    G = torch.cat([P.A, P.C], dim=-2).numpy()
    lo = torch.cat([P.b, P.l], dim=-1).numpy()
    hi = torch.cat([P.b, P.u], dim=-1).numpy()
    w = torch.cat([sol.y, sol.z], dim=-1).numpy()
    ok = _certify(P.H.numpy(), P.g.numpy(), G, lo, hi, P.p, sol.x.numpy(), w, Tolerance(1e-9, 0.0))
    assert not ok[0] and ok[1:].all()


@pytest.mark.parametrize("shared", [("H",), ("A", "b"), ("C", "l", "u"), ("H", "A", "C")])
def test_shared_tensors(shared):
    prob = F.shared_batch(batch=4, n=10, p=3, m=8, seed=31, shared=shared)
    sol, certified = _solve(prob)
    assert bool(certified.all())
    full = {k: (v.expand(4, *v.shape).contiguous() if k in shared else v) for k, v in prob.items()}
    ref, _ = _solve(full)
    torch.testing.assert_close(sol.x, ref.x)
    torch.testing.assert_close(sol.z, ref.z)


def test_unconstrained_and_unbatched():
    prob = _problem(FEASIBLE, "strictly_convex")
    sol, certified = _solve(dict(H=prob["H"], g=prob["g"]))
    assert bool(certified.all()) and sol.y.shape == (4, 0) and sol.z.shape == (4, 0)
    x = torch.linalg.solve(prob["H"], -prob["g"])
    torch.testing.assert_close(sol.x, x)
    one = F.member(prob, 0)
    sol1, certified1 = _solve(one)
    assert sol1.x.shape == (1, 10) and bool(certified1.all())


# ----------------------------------------------------------------------------------------------
# The engine setting and the dispatch in alqp.solver.solve_problem_factored
# ----------------------------------------------------------------------------------------------
def test_engine_setting_is_validated_and_auto_picks_active_set_on_cpu():
    with pytest.raises(ValueError, match="engine"):
        Settings(engine="daqp")
    problem = canonicalize(**F.strictly_convex(2, 5, 1, 3, seed=0))
    assert auto_engine(problem) == "active_set"


def test_engines_agree_on_a_mixed_batch():
    """A mixed batch on the active-set engine (its feasible members and some infeasible ones from
    DAQP, the members with dependent equality rows from the ALM) and on the ALM: same statuses, x
    and shifts to both engines' accuracy."""
    prob = F.mixed(14, 8, 2, 12, seed=22)
    both = {engine: solve_qp(**prob, settings=Settings(engine=engine)) for engine in ("active_set", "alm")}
    assert torch.equal(both["active_set"].status, both["alm"].status)
    shifted = both["alm"].status == Status.CLOSEST_FEASIBLE
    assert shifted.any() and (~shifted).any()
    for field in ("x", "s_eq", "s_in"):
        a, b = getattr(both["active_set"], field), getattr(both["alm"], field)
        assert (a - b)[shifted].abs().max() < 1e-7, field


# ----------------------------------------------------------------------------------------------
# The least-distance form (strictly convex problems, transformed in torch before DAQP)
# ----------------------------------------------------------------------------------------------
class _RecordingDaqp:
    """Stands in for the daqp module: calls the real solver and records whether each call got
    a least-distance problem (no Hessian, no linear term) or a problem in its own form."""

    def __init__(self):
        self.calls = []

    def solve(self, H, f, *args, **kwargs):
        self.calls.append("ldp" if H is None and f is None else "direct")
        return daqp.solve(H, f, *args, **kwargs)


def _routes(monkeypatch, prob, settings=DEFAULT_SETTINGS):
    import alqp.active_set as active_set

    recorder = _RecordingDaqp()
    monkeypatch.setattr(active_set, "_import_daqp", lambda: recorder)
    sol, certified = _solve(prob, settings)
    return sol, certified, recorder.calls


@pytest.mark.parametrize("name", ["strictly_convex", "inequality_only", "one_sided", "equal_bounds", "bound_rows"])
def test_least_distance_form_matches_own_form(monkeypatch, name):
    """Strictly convex problems go to DAQP as least-distance problems (one call each), and x, y, z
    agree with DAQP on the problem in its own form (the transformation turned off)."""
    import alqp.active_set as active_set

    prob = _problem(FEASIBLE, name)
    B = F.batch_size(prob)
    sol, certified, calls = _routes(monkeypatch, prob)
    assert calls == ["ldp"] * B
    assert bool(certified.all())
    monkeypatch.setattr(active_set._LeastDistanceForm, "build", classmethod(lambda cls, *args: None))
    own, own_certified, own_calls = _routes(monkeypatch, prob)
    assert own_calls == ["direct"] * B and bool(own_certified.all())
    for field in ("x", "y", "z"):
        a, b = getattr(sol, field).numpy(), getattr(own, field).numpy()
        assert np.abs(a - b).max(initial=0.0) <= 1e-8 * max(1.0, np.abs(b).max(initial=0.0)), field


def test_least_distance_form_leaves_singular_problems_to_daqp(monkeypatch):
    """LPs, singular H, an H with condition number 1e13 and nearly dependent equality rows (at an
    angle of 1e-6) fail the transformation's pivot test and go to DAQP in their own form; the
    feasible families and the ill-conditioned H are still answered and match the oracle."""
    gen = torch.Generator().manual_seed(41)
    for name in ("lp", "psd_rank_deficient"):
        prob = _problem(FEASIBLE, name)
        _, certified, calls = _routes(monkeypatch, prob)
        assert calls == ["direct"] * F.batch_size(prob) and bool(certified.all()), name

    n, p, m = 8, 2, 6
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    ill = dict(H=Q @ torch.diag(torch.logspace(-13, 0, n, dtype=torch.float64)) @ Q.T,
               g=torch.randn(n, generator=gen, dtype=torch.float64),
               A=torch.randn(p, n, generator=gen, dtype=torch.float64), b=torch.zeros(p, dtype=torch.float64),
               C=torch.eye(n, dtype=torch.float64)[:m], l=-torch.ones(m, dtype=torch.float64),
               u=torch.ones(m, dtype=torch.float64))
    ill["H"] = 0.5 * (ill["H"] + ill["H"].T)
    near = dict(ill, H=torch.eye(n, dtype=torch.float64))
    near["A"] = torch.stack([ill["A"][0], ill["A"][0] + 1e-6 * ill["A"][1]])
    _, _, calls = _routes(monkeypatch, near)
    assert calls and calls[0] == "direct"
    _, _, calls = _routes(monkeypatch, ill)
    assert calls and calls[0] == "direct"
    sol = solve_qp(**ill)
    ref = O.cvxpy_qp(**ill)
    assert int(sol.status) == int(Status.SOLVED)
    H, g = O.normalize(**ill)[:2]
    assert abs(O.objective(H, g, sol.x.numpy()) - ref.obj) <= 1e-6 * max(1.0, abs(ref.obj))


def test_least_distance_form_infeasible_and_mixed(monkeypatch):
    """An infeasible strictly convex problem is recognized on the least-distance form and gets its
    closest feasible QP from DAQP in its own form (the shift of the two-stage oracle); a batch
    mixing LDP-able and singular members answers each of them."""
    prob = F.infeasible_ineq(4, 10, 2, 9, seed=20)
    sol, certified, calls = _routes(monkeypatch, prob)
    assert calls[:4] == ["ldp"] * 4 and "direct" in calls[4:]
    assert bool(certified.all()) and (sol.status == int(Status.CLOSEST_FEASIBLE)).all()
    for i in range(4):
        r = O.cvxpy_closest_feasible(**F.member(prob, i))
        assert np.abs(sol.x[i].numpy() - r.x).max() < 1e-6
        assert np.abs(sol.s_in[i].numpy() - r.s_in).max() < 1e-6

    convex = F.strictly_convex(3, 8, 2, 12, seed=11)
    flat = F.lp(3, 8, 2, 12, seed=13)
    mixed = {k: torch.cat([convex[k], flat[k]]) for k in convex}
    sol, certified, calls = _routes(monkeypatch, mixed)
    assert sorted(calls) == ["direct"] * 3 + ["ldp"] * 3 and bool(certified.all())
    for i in range(6):
        member = F.member(mixed, i)
        kkt = _kkt_violation(member, sol.x[i].numpy(), sol.y[i], sol.z[i])
        assert max(kkt.values()) <= TOL_KKT, (i, kkt)


def test_closest_feasible_with_shared_rows_and_per_problem_bounds():
    """Per-problem b with shared C, l, u: numpy laid out the stacked bounds column by column, and
    DAQP, which reads each problem's row as a plain buffer, got another problem's bounds. The
    infeasible members (sum(x) = b beyond 0 <= x <= 1) were then left to the ALM; the engine's
    own closest-feasible phases now certify them, against the oracle's shift."""
    n, B = 4, 6
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = M @ M.T + 0.1 * torch.eye(n, dtype=torch.float64)
    g = torch.randn(B, n, generator=gen, dtype=torch.float64)
    A = torch.ones(1, n, dtype=torch.float64)
    b = torch.tensor([[1.0], [5.5], [2.0], [6.0], [0.5], [4.5]], dtype=torch.float64)
    C = torch.eye(n, dtype=torch.float64)
    l, u = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    sol, certified = _solve(dict(H=H, g=g, A=A, b=b, C=C, l=l, u=u))
    assert bool(certified.all()), certified
    infeasible = (b[:, 0] > n).tolist()
    assert sol.status.tolist() == [int(Status.CLOSEST_FEASIBLE if f else Status.SOLVED) for f in infeasible]
    for i in range(B):
        r = O.cvxpy_closest_feasible(H, g[i], A, b[i], C, l, u)
        assert np.abs(sol.x[i].numpy() - r.x).max() < 1e-6, i


def test_status_map_precedence():
    """The status phase alone (``_statuses``), against the rules of solve_active_set's docstring
    and DAQP's exit flags (daqp/include/constants.h: 1 optimal, -1 infeasible, -2 cycling,
    -3 unbounded, -4 iteration limit, -6 dependent equality rows): a certified closest-feasible
    answer beats everything, a certified answer is SOLVED whatever the flag, an optimal but
    uncertified answer missed the tolerance (MAX_ITER), and an unknown flag is a NUMERICAL_ERROR."""
    from alqp.active_set import _statuses

    flags = np.array([1, 1, -1, -2, -3, -4, -6, -1, -6, 1, -99])
    certified = np.array([True, False, False, False, False, False, False, False, False, True, False])
    shifted = np.array([False, False, False, False, False, False, False, True, True, False, False])
    expected = [Status.SOLVED, Status.MAX_ITER, Status.PRIMAL_INFEASIBLE, Status.MAX_ITER, Status.DUAL_INFEASIBLE,
                Status.MAX_ITER, Status.NUMERICAL_ERROR, Status.CLOSEST_FEASIBLE, Status.CLOSEST_FEASIBLE,
                Status.SOLVED, Status.NUMERICAL_ERROR]
    assert _statuses(flags, certified, shifted).tolist() == [int(s) for s in expected]


def test_result_fields_name_what_unpacking_gives():
    """solve_active_set returns an ActiveSetResult: its named fields are the (solution, certified,
    factor) that tuple unpacking gives, and the factor is that of the strictly convex batch (its L
    reproduces H)."""
    from alqp.active_set import ActiveSetResult

    prob = _problem(FEASIBLE, "strictly_convex")
    result = solve_active_set(canonicalize(**prob), Settings())
    assert isinstance(result, ActiveSetResult)
    solution, certified, factor = result
    assert solution is result.solution and certified is result.certified and factor is result.factor
    assert bool(certified.all()) and factor is not None
    torch.testing.assert_close(factor.L @ factor.L.mT, prob["H"].expand_as(factor.L))
