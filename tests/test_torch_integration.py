"""alqp as a PyTorch-native op (issue 18): torch.compile without graph breaks, torch.func
transforms (vmap, jacrev; jacfwd's clear error), eager overhead of the op machinery, state_dict
round trips with weights_only loading, and warm starts through QPLayer.

Oracles: eager calls (for compiled ones), batched calls (for vmap), central finite differences of
the forward (for jacrev), cold starts (for warm starts), and the solver's engine functions called
directly, without the autograd and op layers (for the overhead).
"""
from __future__ import annotations

import dataclasses
import io
import time

import families as F
import pytest
import torch

import alqp
from alqp import IFT, LPGD, QPLayer, Settings, Status, solve_qp

DT = torch.float64
NAMES = ("H", "g", "A", "b", "C", "l", "u")
TIGHT = Settings(eps_abs=1e-12, eps_rel=0.0)


def strict_qp(B=1, n=4, p=1, m=3, seed=0):
    """QPs built from their solution with strict complementarity (active rows |z| >= 0.5,
    inactive rows with slack): the solution is differentiable and finite differences are exact
    to O(h^2)."""
    return F.qp_from_solution(B, n, p, m, 1, 1, seed, "odd_inactive")[0]


def unbatched(prob: dict) -> dict:
    return {k: (None if v is None else v[0]) for k, v in prob.items()}


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
class _QPNet(torch.nn.Module):
    """A linear map to the cost of a box-constrained QP layer."""

    def __init__(self, n=4, m=3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(n, n, dtype=DT)
        self.qp = QPLayer(Settings(eps_abs=1e-10, eps_rel=0.0))
        M = torch.randn(n, n, generator=gen, dtype=DT)
        self.register_buffer("H", M @ M.T + torch.eye(n, dtype=DT))
        self.register_buffer("C", torch.randn(m, n, generator=gen, dtype=DT))

    def forward(self, feats):
        g = 5.0 * self.lin(feats)
        u = torch.ones(feats.shape[0], self.C.shape[0], dtype=feats.dtype)
        return self.qp(self.H, g, C=self.C, l=-u, u=u).x


class _TrivialNet(torch.nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.lin = torch.nn.Linear(n, n, dtype=DT)

    def forward(self, feats):
        return torch.tanh(self.lin(feats))


def _first_compiled_step(model, feats) -> tuple:
    """(seconds of the first forward + backward of ``torch.compile(model, fullgraph=True)``, its
    output, the gradient of the linear layer's weight)."""
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    out = compiled(feats)
    (out * out).sum().backward()
    return time.perf_counter() - start, out.detach(), model.lin.weight.grad.clone()


def test_compile_fullgraph_no_graph_break_and_matches_eager(capsys):
    torch.manual_seed(0)
    feats = torch.randn(5, 4, dtype=DT)
    torch._dynamo.reset()
    # The same machine's plain compile cost, first (it also pays for importing the compiler).
    trivial_s, _, _ = _first_compiled_step(_TrivialNet(), feats)
    net = _QPNet()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(feats)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    qp_s, out, grad = _first_compiled_step(net, feats)
    net.zero_grad()
    ref = net(feats)
    (ref * ref).sum().backward()
    assert torch.allclose(out, ref.detach(), atol=1e-12, rtol=0)
    assert torch.allclose(grad, net.lin.weight.grad, atol=1e-10, rtol=0)
    # Some box rows are active and some not, so the gradient is not a trivial one.
    Cx = (ref.detach() @ net.C.T).abs()
    assert bool((Cx > 1 - 1e-8).any()) and bool((Cx < 1 - 1e-3).any()) and float(grad.abs().max()) > 0
    with capsys.disabled():
        print(f"\n[compile] first forward+backward with fullgraph=True: QP model {qp_s:.1f} s, "
              f"trivial model {trivial_s:.1f} s")
    assert qp_s < 30.0


def test_compiled_model_keeps_graph_with_a_new_batch_size():
    net = _QPNet()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for batch in (3, 6):
        feats = torch.randn(batch, 4, dtype=DT)
        assert torch.allclose(compiled(feats), net(feats), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# torch.func
# ------------------------------------------------------------------------------------------------
def test_vmap_over_the_cost_matches_the_batched_call():
    prob = unbatched(strict_qp(seed=1))
    G = prob["g"] + 0.1 * torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    rest = {k: v for k, v in prob.items() if k != "g"}

    def solve(g):
        sol = solve_qp(g=g, **rest, settings=TIGHT)
        return sol.x, sol.z, sol.status

    x, z, status = torch.func.vmap(solve)(G)
    ref = solve_qp(g=G, **rest, settings=TIGHT)
    assert x.shape == (6, 4) and z.shape == (6, 3)
    assert torch.equal(status, ref.status)
    assert torch.allclose(x, ref.x, atol=1e-10, rtol=0) and torch.allclose(z, ref.z, atol=1e-9, rtol=0)


def test_vmap_over_batched_problems_flattens_both_batches():
    """vmap over a dimension in front of the problems' own batch dimension, with C shared."""
    probs = [strict_qp(B=3, seed=s) for s in (3, 4)]
    stacked = {k: torch.stack([p[k] for p in probs]) for k in NAMES if k != "C"}
    C = probs[0]["C"][0]

    def solve(H, g, A, b, l, u):
        return solve_qp(H, g, A, b, C, l, u, settings=TIGHT).x

    x = torch.func.vmap(solve)(*(stacked[k] for k in ("H", "g", "A", "b", "l", "u")))
    ref = torch.stack([solve_qp(**{**p, "C": C}, settings=TIGHT).x for p in probs])
    assert x.shape == (2, 3, 4)
    assert torch.allclose(x, ref, atol=1e-10, rtol=0)


def _central_differences(f, v: torch.Tensor, h=1e-6) -> torch.Tensor:
    cols = []
    for i in range(v.numel()):
        e = torch.zeros_like(v).view(-1)
        e[i] = h
        e = e.view_as(v)
        cols.append((f(v + e) - f(v - e)) / (2 * h))
    return torch.stack(cols, -1)


@pytest.mark.parametrize("wrt", ["g", "b", "u", "l"])
@pytest.mark.parametrize("backward", [IFT(), LPGD(tau=1e-5)], ids=["ift", "lpgd"])
def test_jacrev_matches_finite_differences(wrt, backward):
    prob = unbatched(strict_qp(seed=5))

    def x_of(v):
        return solve_qp(**{**prob, wrt: v}, settings=TIGHT, backward=backward).x

    jac = torch.func.jacrev(x_of)(prob[wrt])
    fd = _central_differences(x_of, prob[wrt])
    assert jac.shape == (4, prob[wrt].shape[-1])
    assert float(fd.abs().max()) > 0.1  # the derivative is not trivially zero
    tol = 1e-6 if isinstance(backward, IFT) else 1e-4
    assert torch.allclose(jac, fd, atol=tol, rtol=0), (jac - fd).abs().max()


def test_vmap_of_jacrev_gives_per_sample_jacobians():
    prob = unbatched(strict_qp(seed=6))
    G = prob["g"] + 0.05 * torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=DT)
    rest = {k: v for k, v in prob.items() if k != "g"}

    def x_of(g):
        return solve_qp(g=g, **rest, settings=TIGHT).x

    jacs = torch.func.vmap(torch.func.jacrev(x_of))(G)
    ref = torch.stack([torch.func.jacrev(x_of)(g) for g in G])
    assert jacs.shape == (3, 4, 4)
    assert torch.allclose(jacs, ref, atol=1e-10, rtol=0)


def test_jacfwd_and_forward_ad_raise_a_clear_error():
    prob = unbatched(strict_qp(seed=8))
    rest = {k: v for k, v in prob.items() if k != "g"}
    with pytest.raises(NotImplementedError, match="no forward-mode derivative.*jacrev"):
        torch.func.jacfwd(lambda g: solve_qp(g=g, **rest).x)(prob["g"])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        solve_qp(g=fwAD.make_dual(prob["g"], torch.ones_like(prob["g"])), **rest)


def test_grad_transform_matches_backward():
    prob = unbatched(strict_qp(seed=9))
    w = torch.randn(4, generator=torch.Generator().manual_seed(10), dtype=DT)

    def loss(u):
        return (solve_qp(**{**prob, "u": u}, settings=TIGHT).x * w).sum()

    u = prob["u"].clone().requires_grad_()
    loss(u).backward()
    assert torch.allclose(torch.func.grad(loss)(prob["u"]), u.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# state_dict
# ------------------------------------------------------------------------------------------------
class _Model(torch.nn.Module):
    def __init__(self, layer: QPLayer):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=DT))
        self.qp = layer

    def forward(self, prob):
        return self.qp(**{**prob, "g": self.scale * prob["g"]}).x


@pytest.mark.parametrize("backward", [IFT(), LPGD(tau=0.25, variant="left", proximal=0.5)], ids=["ift", "lpgd"])
def test_state_dict_round_trip_with_weights_only(backward):
    settings = Settings(max_iter=77, eps_abs=1e-10, eps_rel=0.0, mu_min=1e-8, engine="alm",
                        failed_gradient="nan", closest_feasible=False)
    model = _Model(QPLayer(settings, backward=backward))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _Model(QPLayer())
    assert fresh.qp.settings != settings
    fresh.load_state_dict(state)
    assert fresh.qp.settings == settings and fresh.qp.settings.engine is alqp.Engine.ALM
    assert fresh.qp.backward_choice == backward
    assert float(fresh.scale.detach()) == 1.5
    prob = strict_qp(B=2, seed=11)
    assert torch.equal(fresh(prob), model(prob))


# ------------------------------------------------------------------------------------------------
# Warm starts through QPLayer
# ------------------------------------------------------------------------------------------------
def test_warm_start_through_qplayer_saves_iterations_and_keeps_answer_and_gradient():
    layer = QPLayer(Settings(engine="alm", eps_abs=1e-10, eps_rel=0.0))
    prob = strict_qp(B=3, n=6, p=2, m=4, seed=12)
    first = layer(**prob)
    nearby = {**prob, "g": prob["g"] + 1e-4 * torch.randn(3, 6, generator=torch.Generator().manual_seed(13),
                                                            dtype=DT)}
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(14), dtype=DT)
    results = {}
    for name, warm in (("cold", None), ("warm", first), ("tuple", (first.x, first.y, first.z))):
        leaves = {k: v.clone().requires_grad_() for k, v in nearby.items()}
        sol = layer(**leaves, warm_start=warm)
        (sol.x * w).sum().backward()
        results[name] = (sol, {k: v.grad for k, v in leaves.items()})
    cold, _ = results["cold"]
    assert (cold.status == Status.SOLVED).all()
    for name in ("warm", "tuple"):
        sol, grads = results[name]
        assert (sol.status == Status.SOLVED).all()
        assert (sol.iterations < cold.iterations).all(), (sol.iterations, cold.iterations)
        assert torch.allclose(sol.x, cold.x, atol=1e-8, rtol=0)
        for k in NAMES:
            assert torch.allclose(grads[k], results["cold"][1][k], atol=1e-6, rtol=0), k


def test_warm_start_of_the_wrong_size_through_qplayer_is_an_error():
    layer = QPLayer(Settings(engine="alm"))
    prob = strict_qp(B=2, seed=15)
    with pytest.raises(ValueError, match="warm_start"):
        layer(**prob, warm_start=(torch.zeros(2, 5, dtype=DT), torch.zeros(2, 1, dtype=DT),
                                  torch.zeros(2, 3, dtype=DT)))


def test_settings_dict_and_deprecated_keywords():
    prob = strict_qp(B=2, seed=16)
    as_dict = solve_qp(**prob, settings={"engine": "alm", "max_iter": 2})
    as_obj = solve_qp(**prob, settings=Settings(engine="alm", max_iter=2))
    assert torch.equal(as_dict.iterations, as_obj.iterations)
    with pytest.warns(DeprecationWarning, match="alqp.LPGD"):
        layer = QPLayer(backward="lpgd", tau=0.3)
    assert layer.backward_choice == LPGD(tau=0.3)
    assert dataclasses.replace(LPGD(), tau=0.3) == layer.backward_choice


def test_qplayer_attributes_are_converted_and_checked_on_assignment():
    layer = QPLayer()
    layer.settings = {"engine": "alm", "max_iter": 5}
    layer.backward_choice = "lpgd"
    assert layer.settings == Settings(engine="alm", max_iter=5) and layer.backward_choice == LPGD()
    with pytest.raises(ValueError, match="Settings.max_iter"):
        layer.settings = {"max_iter": 0}
    with pytest.raises(ValueError, match="backward must be"):
        layer.backward_choice = "adjoint"
