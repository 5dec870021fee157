"""Bad input to ``alqp.solve_qp`` and ``alqp.Settings``: each raises ValueError or TypeError with a
message that names the offending argument."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from oracles import cvxpy_qp

from alqp import IFT, LPGD, Engine, QPLayer, Settings, Status, solve_qp

N, P, M, B = 4, 2, 3, 3
NAN, INF = float("nan"), float("inf")


def good(batch=True, dtype=torch.float64):
    """A valid feasible problem (batched by default)."""
    gen = torch.Generator().manual_seed(0)
    shape = (B,) if batch else ()
    Mx = torch.randn(*shape, N, N, generator=gen, dtype=dtype)
    H = Mx @ Mx.transpose(-1, -2) + torch.eye(N, dtype=dtype)
    H = 0.5 * (H + H.transpose(-1, -2))
    g = torch.randn(*shape, N, generator=gen, dtype=dtype)
    x0 = torch.randn(*shape, N, generator=gen, dtype=dtype)
    A = torch.randn(*shape, P, N, generator=gen, dtype=dtype)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    C = torch.randn(*shape, M, N, generator=gen, dtype=dtype)
    Cx = (C @ x0.unsqueeze(-1)).squeeze(-1)
    return dict(H=H, g=g, A=A, b=b, C=C, l=Cx - 1.0, u=Cx + 1.0)


def names_arg(msg: str, name: str) -> bool:
    """Whether the message names the argument as a word (``H``, ``l``, ``warm_start``, ...)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def check_raises(exc, name, **kwargs):
    with pytest.raises(exc) as info:
        solve_qp(**kwargs)
    msg = str(info.value)
    assert names_arg(msg, name), f"message does not name {name!r}: {msg!r}"
    return msg


def with_(prob, **changes):
    out = dict(prob)
    out.update(changes)
    return out


def _oracle_x(prob: dict, i=None) -> np.ndarray:
    """CVXPY + Clarabel's solution of member i of a batched problem (or of an unbatched one)."""
    member = {k: (v if i is None else v[i]).numpy() for k, v in prob.items()}
    return cvxpy_qp(**member).x


def test_good_problem_is_accepted():
    """The baseline that all the bad variants below are derived from is accepted, solved, and its
    answer is the oracle's, batched and unbatched."""
    prob = good()
    sol = solve_qp(**prob)
    assert sol.x.shape == (B, N) and (sol.status == Status.SOLVED).all()
    for i in range(B):
        assert np.allclose(sol.x[i].numpy(), _oracle_x(prob, i), atol=1e-6)
    one = good(batch=False)
    sol1 = solve_qp(**one)
    assert sol1.x.shape == (N,) and int(sol1.status) == Status.SOLVED
    assert np.allclose(sol1.x.numpy(), _oracle_x(one), atol=1e-6)


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("batch", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize(
    "name, make",
    [
        ("H", lambda p: p["H"][..., :, :-1]),  # not square
        ("g", lambda p: p["g"][..., :-1]),  # wrong length
        ("A", lambda p: p["A"][..., :-1]),  # wrong number of columns
        ("b", lambda p: p["b"][..., :-1]),  # wrong length
        ("C", lambda p: p["C"][..., :-1]),  # wrong number of columns
        ("l", lambda p: p["l"][..., :-1]),  # wrong length
        ("u", lambda p: p["u"][..., :-1]),  # wrong length
    ],
)
def test_wrong_shape(batch, name, make):
    prob = good(batch)
    check_raises(ValueError, name, **with_(prob, **{name: make(prob)}))


@pytest.mark.parametrize(
    "name, make",
    [
        ("H", lambda p: p["H"][0, 0]),  # 1-D
        ("g", lambda p: p["g"].unsqueeze(0).unsqueeze(0)),  # too many dims
        ("A", lambda p: p["A"].unsqueeze(0)),
        ("b", lambda p: p["b"][0, 0]),  # 0-D
        ("l", lambda p: p["l"].unsqueeze(-1)),
        ("H", lambda p: p["H"].unsqueeze(0)),  # 4-D
    ],
)
def test_wrong_number_of_dimensions(name, make):
    prob = good()
    check_raises(ValueError, name, **with_(prob, **{name: make(prob)}))


@pytest.mark.parametrize("name", ["g", "A", "b", "C", "l", "u"])
def test_batch_sizes_do_not_broadcast(name):
    prob = good()
    other = good()
    bad = torch.cat([other[name], other[name][:1]], dim=0)  # batch B + 1 against B
    msg = check_raises(ValueError, name, **with_(prob, **{name: bad}))
    assert "batch" in msg.lower()


# ---------------------------------------------------------------------------------------------- dtypes, devices, types
@pytest.mark.parametrize("name", ["H", "g", "A", "b", "C", "l", "u"])
def test_mixed_dtypes(name):
    prob = good()
    check_raises(TypeError, name, **with_(prob, **{name: prob[name].float()}))


@pytest.mark.parametrize("name", ["H", "g", "A", "b", "C", "l", "u"])
def test_integer_dtype(name):
    prob = good()
    check_raises(TypeError, name, **with_(prob, **{name: prob[name].round().to(torch.int64)}))


def test_all_integer_problem():
    prob = {k: v.round().to(torch.int32) for k, v in good().items()}
    check_raises(TypeError, "H", **prob)


@pytest.mark.parametrize("name", ["g", "A", "b", "C", "l", "u"])
def test_mixed_devices(name):
    # A 'meta' tensor is on a different device than the CPU ones, with no GPU needed.
    prob = good()
    check_raises(ValueError, name, **with_(prob, **{name: prob[name].to("meta")}))


@pytest.mark.parametrize("name", ["H", "g", "A", "b", "C", "l", "u"])
@pytest.mark.parametrize("kind", ["list", "numpy", "float"])
def test_non_tensor_input(name, kind):
    prob = good()
    t = prob[name]
    value = {"list": t.tolist(), "numpy": t.numpy(), "float": 1.0}[kind]
    check_raises(TypeError, name, **with_(prob, **{name: value}))


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", ["H", "g", "A", "b", "C"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_data(name, value):
    prob = good()
    t = prob[name].clone()
    t.view(-1)[0] = value
    if name == "H":  # keep H symmetric so that only the non-finite entry is wrong
        t[..., 0, 0] = value
    check_raises(ValueError, name, **with_(prob, **{name: t}))


@pytest.mark.parametrize("name", ["l", "u"])
def test_nan_bounds(name):
    prob = good()
    t = prob[name].clone()
    t[1, 2] = NAN
    check_raises(ValueError, name, **with_(prob, **{name: t}))


def test_lower_bound_plus_inf():
    prob = good()
    l = prob["l"].clone()
    l[0, 0] = INF
    u = prob["u"].clone()
    u[0, 0] = INF
    check_raises(ValueError, "l", **with_(prob, l=l, u=u))


def test_upper_bound_minus_inf():
    prob = good()
    u = prob["u"].clone()
    u[0, 1] = -INF
    l = prob["l"].clone()
    l[0, 1] = -INF
    check_raises(ValueError, "u", **with_(prob, l=l, u=u))


def test_l_greater_than_u():
    prob = good()
    l = prob["l"].clone()
    l[2, 1] = prob["u"][2, 1] + 1.0
    msg = check_raises(ValueError, "l", **with_(prob, l=l))
    assert names_arg(msg, "u"), msg


def test_infinite_bounds_are_accepted():
    """+-inf are valid bounds where they make sense (the negative of the two tests above): the
    problem is solved to the oracle's answer, and a row with an infinite side gets no gradient
    there."""
    prob = good()
    l, u = prob["l"].clone(), prob["u"].clone()
    l[:, 0] = -INF
    u[:, 1] = INF
    open_prob = with_(prob, l=l, u=u)
    u_leaf = u.clone().requires_grad_()
    sol = solve_qp(**with_(open_prob, u=u_leaf))
    assert (sol.status == Status.SOLVED).all()
    for i in range(B):
        assert np.allclose(sol.x[i].detach().numpy(), _oracle_x(open_prob, i), atol=1e-6)
    sol.x.sum().backward()
    assert float(u_leaf.grad[:, 1].abs().max()) == 0.0


def test_H_not_symmetric():
    prob = good()
    H = prob["H"].clone()
    H[1, 0, 2] += 0.5
    check_raises(ValueError, "H", **with_(prob, H=H))


def test_H_not_symmetric_unbatched():
    prob = good(batch=False)
    H = prob["H"].clone()
    H[0, 1] += 1e-3 * H.abs().max()
    check_raises(ValueError, "H", **with_(prob, H=H))


# ---------------------------------------------------------------------------------------------- missing partners
def test_A_without_b():
    prob = good()
    prob.pop("b")
    check_raises(ValueError, "b", **prob)


def test_b_without_A():
    prob = good()
    prob.pop("A")
    check_raises(ValueError, "A", **prob)


@pytest.mark.parametrize("given", [("l",), ("u",), ("l", "u")])
def test_bounds_without_C(given):
    prob = good()
    kwargs = {k: prob[k] for k in ("H", "g", "A", "b") + given}
    msg = check_raises(ValueError, "C", **kwargs)
    assert names_arg(msg, given[0]), msg


def test_C_without_bounds():
    prob = good()
    prob.pop("l")
    prob.pop("u")
    check_raises(ValueError, "C", **prob)


# ---------------------------------------------------------------------------------------------- warm start
def test_warm_start_wrong_shape():
    prob = good()
    x = torch.zeros(B, N + 1, dtype=torch.float64)
    y, z = torch.zeros(B, P, dtype=torch.float64), torch.zeros(B, M, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        solve_qp(**prob, warm_start=(x, y, z))
    assert "warm_start" in str(info.value)


def test_warm_start_not_tensor():
    prob = good()
    with pytest.raises(TypeError) as info:
        solve_qp(**prob, warm_start=([0.0] * N, torch.zeros(B, P), torch.zeros(B, M)))
    assert "warm_start" in str(info.value)


# ---------------------------------------------------------------------------------------------- Settings
@pytest.mark.parametrize(
    "field, value",
    [
        ("eps_abs", -1e-9),
        ("eps_rel", NAN),
        ("eps_rel", -1.0),
        ("rho", 0.0),
        ("rho", -1.0),
        ("mu_eq", 0.0),
        ("mu_in", -1.0),
        ("mu_min", 0.0),
        ("mu_min", -1e-9),
        ("mu_update_factor", 1.0),
        ("mu_update_factor", 0.0),
        ("max_iter", 0),
        ("max_inner_iter", 0),
        ("scaling_iter", -1),
        ("eps_dual_inf", 0.0),
        ("eps_abs", NAN),
        ("rho", NAN),
    ],
)
def test_invalid_settings(field, value):
    with pytest.raises((ValueError, TypeError)) as info:
        Settings(**{field: value})
    assert field in str(info.value), str(info.value)


def test_both_tolerances_zero_is_rejected():
    """eps_abs = 0 is the default (the tolerance is relative); with eps_rel = 0 too nothing could
    be certified, and the error names both."""
    Settings(eps_abs=0.0)
    Settings(eps_rel=0.0, eps_abs=1e-9)
    with pytest.raises(ValueError, match="eps_abs and Settings.eps_rel"):
        Settings(eps_abs=0.0, eps_rel=0.0)


def test_valid_settings_are_accepted():
    """Non-default valid values are kept as given and reach the solver: the answer meets the
    oracle to the asked tolerance, and closest_feasible=False turns an infeasible problem's status
    into PRIMAL_INFEASIBLE."""
    s = Settings(eps_abs=1e-6, eps_rel=1e-6, max_iter=50, rho=1e-5, mu_min=1e-8, scaling_iter=0,
                 closest_feasible=False, engine="alm")
    assert (s.eps_abs, s.eps_rel, s.max_iter, s.rho, s.mu_min, s.scaling_iter) == (1e-6, 1e-6, 50, 1e-5, 1e-8, 0)
    assert s.closest_feasible is False and s.engine is Engine.ALM
    prob = good()
    sol = solve_qp(**prob, settings=s)
    assert (sol.status == Status.SOLVED).all() and (sol.iterations > 0).all()
    for i in range(B):
        assert np.allclose(sol.x[i].numpy(), _oracle_x(prob, i), atol=1e-4)
    # b inconsistent with a duplicated row of A: infeasible.
    A = torch.cat([prob["A"], prob["A"][:, :1]], 1)
    b = torch.cat([prob["b"], prob["b"][:, :1] + 1.0], 1)
    infeasible = with_(prob, A=A, b=b)
    assert (solve_qp(**infeasible, settings=s).status == Status.PRIMAL_INFEASIBLE).all()
    closest = dataclasses.replace(s, closest_feasible=True)
    assert (solve_qp(**infeasible, settings=closest).status == Status.CLOSEST_FEASIBLE).all()


# ---------------------------------------------------------------------------------------------- Settings types
@pytest.mark.parametrize(
    "field, value",
    [
        ("max_iter", 1.5),
        ("max_iter", "10"),
        ("max_inner_iter", True),
        ("stall_iter", None),
        ("scaling_iter", 2.0),
        ("eps_abs", "1e-9"),
        ("rho", True),
        ("mu_min", "small"),
        ("closest_feasible", 1),
        ("verbose", "yes"),
    ],
)
def test_settings_wrong_type_names_the_field(field, value):
    with pytest.raises(TypeError, match=rf"Settings\.{field} must be"):
        Settings(**{field: value})


@pytest.mark.parametrize("field, value", [("engine", "daqp"), ("engine", 1), ("failed_gradient", "ignore"),
                                          ("rho", float("inf")), ("eps_dual_inf", -1e-4),
                                          ("stall_iter", 0)])
def test_settings_wrong_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Settings\.{field} must"):
        Settings(**{field: value})


def test_settings_are_frozen_and_replace_revalidates():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_iter = 5
    assert dataclasses.replace(s, max_iter=5).max_iter == 5 and s.max_iter == 1000
    with pytest.raises(ValueError, match="Settings.max_iter"):
        dataclasses.replace(s, max_iter=0)
    # Spellings of one value give one Settings (they key caches and compiled graphs).
    assert Settings(engine="alm", max_iter=np.int64(7), rho=np.float64(1e-6)) == \
        Settings(engine=Engine.ALM, max_iter=7, rho=1e-6)
    assert hash(Settings(engine="alm")) == hash(Settings(engine=Engine.ALM))
    assert Settings.coerce(Settings(**s.to_dict())) == s


def test_settings_as_dict():
    prob = good()
    sol = solve_qp(**prob, settings={"engine": "alm", "max_iter": 2, "eps_abs": 1e-14, "eps_rel": 0.0})
    assert (sol.status == Status.MAX_ITER).all()
    layer = QPLayer({"engine": "alm", "max_iter": 2})
    assert layer.settings == Settings(engine="alm", max_iter=2)


@pytest.mark.parametrize("call", ["solve_qp", "QPLayer"])
def test_settings_dict_with_unknown_key_is_an_error(call):
    with pytest.raises(ValueError, match=r"settings has unknown field\(s\) \['max_iters'\].*max_iter"):
        if call == "solve_qp":
            solve_qp(**good(), settings={"max_iters": 3})
        else:
            QPLayer({"max_iters": 3})


@pytest.mark.parametrize("call", ["solve_qp", "QPLayer"])
def test_settings_of_wrong_type_is_an_error(call):
    with pytest.raises(TypeError, match="settings must be an alqp.Settings, a dict"):
        if call == "solve_qp":
            solve_qp(**good(), settings=[("max_iter", 3)])
        else:
            QPLayer(settings="fast")


@pytest.mark.parametrize("bad", ["ifd", "LPGD", None, 3, LPGD])
def test_unknown_backward_is_an_error(bad):
    with pytest.raises(ValueError, match="backward must be alqp.IFT"):
        QPLayer(backward=bad)
    with pytest.raises(ValueError, match="backward must be alqp.IFT"):
        solve_qp(**good(), backward=bad)


def test_backward_choices_are_frozen_values():
    assert IFT() == IFT() and LPGD(tau=0.5) == LPGD(tau=0.5) and LPGD(tau=0.5) != LPGD(tau=0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LPGD().tau = 2.0
    assert QPLayer(backward="lpgd").backward_choice == LPGD()
    assert QPLayer().backward_choice == IFT()
