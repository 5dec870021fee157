"""alqp through alqp.compat against qpth's and ProxSuite's own QP layers on the same batches.

Each peer is the oracle: x, the multipliers (after the sign map of docs/migration.md) and the
gradients of a loss on x with respect to every input must agree, and for an input shared by the
batch the documented relation must hold: alqp and ProxSuite sum the per-problem gradients, qpth
averages them.
"""
from __future__ import annotations

import pytest
import torch

import alqp
from alqp.compat import from_proxsuite, from_qpth

qpth_qp = pytest.importorskip("qpth.qp")
qplayer = pytest.importorskip("proxsuite.torch.qplayer")

F64 = torch.float64
B, N, P, M = 4, 6, 2, 5
X_TOL = 1e-5
GRAD_TOL = 1e-4
NAMES_QPTH = ("Q", "p", "G", "h", "A", "b")
NAMES_PROXSUITE = ("Q", "p", "A", "b", "G", "l", "u")


def random_batch(seed: int, two_sided: bool, shared: tuple = ()) -> dict:
    """A batch of strictly convex, strictly feasible QPs with a few active rows each: b = A x0,
    bounds around G x0 (the upper bound tight, so that the solution sits on some rows). The
    matrices and vectors named in ``shared`` are problem 0's for every problem (the bounds are
    made from them, so that every problem stays feasible)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def share(name, t):
        return t[:1].expand_as(t).clone() if name in shared else t

    L = rand(B, N, N)
    Q = share("Q", L @ L.mT / N + torch.eye(N, dtype=F64))
    x0 = rand(B, N)
    A = share("A", rand(B, P, N))
    G = share("G", rand(B, M, N))
    Gx0 = (G @ x0.unsqueeze(-1)).squeeze(-1)
    data = {"Q": Q, "p": share("p", 3 * rand(B, N)), "A": A, "b": (A @ x0.unsqueeze(-1)).squeeze(-1), "G": G,
            "u": Gx0 + 0.1 * torch.rand(B, M, generator=gen, dtype=F64)}
    if two_sided:
        data["l"] = Gx0 - 0.1 - torch.rand(B, M, generator=gen, dtype=F64)
    return data


def leaves(data: dict, shared: tuple = ()) -> dict:
    """Fresh leaf tensors requiring grad; the names in ``shared`` keep problem 0's entry only,
    without the batch dimension."""
    return {k: (v[0] if k in shared else v).clone().requires_grad_() for k, v in data.items()}


def loss_on_x(x: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 2.0, x.shape[-1], dtype=x.dtype)
    return (x * weights).sum() + 0.5 * x.square().sum()


def grads(loss: torch.Tensor, inputs: dict) -> dict:
    values = torch.autograd.grad(loss, list(inputs.values()))
    return dict(zip(inputs, values))


def assert_grads_close(ours: dict, theirs: dict, names, factor: dict | None = None) -> None:
    """Each gradient within GRAD_TOL of the other, relative to the size of the gradient (its
    largest entry, at least 1): the peers' gradients carry their solvers' errors at that scale
    (ProxSuite stores them in float32), so a small entry may differ by more than 1e-4 of itself."""
    for name in names:
        expected = theirs[name] * (factor or {}).get(name, 1.0)
        size = max(float(expected.abs().max()), 1.0)
        error = float((ours[name] - expected).abs().max())
        assert error <= GRAD_TOL * size, f"gradient of {name}: max |difference| {error:.3g}, size {size:.3g}"


# ---------------------------------------------------------------- qpth


def qpth_solve(t: dict) -> torch.Tensor:
    return qpth_qp.QPFunction(verbose=-1)(t["Q"], t["p"], t["G"], t["u"], t["A"], t["b"])


def alqp_from_qpth(t: dict) -> alqp.QPSolution:
    return alqp.solve_qp(**from_qpth(t["Q"], t["p"], t["G"], t["u"], t["A"], t["b"]))


def test_qpth_solution_and_multipliers():
    data = random_batch(0, two_sided=False)
    x_qpth = qpth_solve(data)
    # qpth's QPFunction returns x only; its batched interior-point solver gives (x, nu, lam, slack).
    from qpth.solvers.pdipm import batch as pdipm
    Q_LU, S_LU, R = pdipm.pre_factor_kkt(data["Q"], data["G"], data["A"])
    _, nu, lam, _ = pdipm.forward(data["Q"], data["p"], data["G"], data["u"], data["A"], data["b"], Q_LU, S_LU, R,
                                  1e-12, -1, 3, 20)
    sol = alqp_from_qpth(data)
    assert (sol.status == int(alqp.Status.SOLVED)).all()
    torch.testing.assert_close(sol.x, x_qpth, atol=X_TOL, rtol=0)
    torch.testing.assert_close(sol.y, nu, atol=X_TOL, rtol=X_TOL)  # y = nu
    torch.testing.assert_close(sol.z, lam, atol=X_TOL, rtol=X_TOL)  # z = lam (>= 0: rows at their upper bound h)
    assert bool((sol.z > X_TOL).any()), "the batch should have active rows"


def test_qpth_gradients_batched():
    data = random_batch(1, two_sided=False)
    ours, theirs = leaves(data), leaves(data)
    g_ours = grads(loss_on_x(alqp_from_qpth(ours).x), ours)
    g_theirs = grads(loss_on_x(qpth_solve(theirs)), theirs)
    assert_grads_close(g_ours, g_theirs, ("Q", "p", "G", "u", "A", "b"))


def test_qpth_shared_inputs_get_the_mean():
    """qpth averages a shared input's per-problem gradients over the batch; alqp sums them."""
    shared = ("Q", "A", "p")
    data = random_batch(2, two_sided=False, shared=shared)
    ours, theirs = leaves(data, shared), leaves(data, shared)
    g_ours = grads(loss_on_x(alqp_from_qpth(ours).x), ours)
    g_theirs = grads(loss_on_x(qpth_solve(theirs)), theirs)
    assert_grads_close(g_ours, g_theirs, ("G", "u", "b"))
    assert_grads_close(g_ours, g_theirs, shared, factor={name: float(B) for name in shared})
    # The sum is the gradient of the loss: the shared input's gradient is that of its batched copy summed.
    batched = leaves({k: v[:1].expand_as(v) if k in shared else v for k, v in data.items()})
    g_batched = grads(loss_on_x(alqp_from_qpth(batched).x), batched)
    assert_grads_close(g_ours, {k: v.sum(0) for k, v in g_batched.items()}, shared)


def test_from_qpth_maps_empty_equalities_to_none():
    data = random_batch(3, two_sided=False)
    empty = torch.Tensor()
    kwargs = from_qpth(data["Q"], data["p"], data["G"], data["u"], empty, empty)
    assert kwargs["A"] is None and kwargs["b"] is None and kwargs["l"] is None
    assert kwargs["C"] is data["G"] and kwargs["u"] is data["u"]
    x_qpth = qpth_qp.QPFunction(verbose=-1)(data["Q"], data["p"], data["G"], data["u"], empty, empty)
    torch.testing.assert_close(alqp.solve_qp(**kwargs).x, x_qpth, atol=X_TOL, rtol=0)
    with pytest.raises(ValueError, match="A and b must be given together: b is absent"):
        from_qpth(data["Q"], data["p"], data["G"], data["u"], data["A"], empty)
    with pytest.raises(TypeError, match="G must be a torch.Tensor"):
        from_qpth(data["Q"], data["p"], data["G"].numpy(), data["u"])


# ---------------------------------------------------------------- ProxSuite


#: ProxSuite's backward regularizes its KKT solve by rho_backward = mu_backward = 1e-6 by default,
#: which biases its gradients by about 5e-5 of their size (measured against alqp and finite
#: differences on these batches); at 1e-9 the two agree to about 1e-7.
PROXSUITE_BACKWARD = {"rho_backward": 1e-9, "mu_backward": 1e-9}


def proxsuite_solve(t: dict):
    return qplayer.QPFunction(**PROXSUITE_BACKWARD)(*(t[name] for name in NAMES_PROXSUITE))


def alqp_from_proxsuite(t: dict) -> alqp.QPSolution:
    return alqp.solve_qp(**from_proxsuite(*(t[name] for name in NAMES_PROXSUITE)))


def test_proxsuite_solution_and_multipliers():
    data = random_batch(4, two_sided=True)
    x, lams, nus = proxsuite_solve(data)
    sol = alqp_from_proxsuite(data)
    assert (sol.status == int(alqp.Status.SOLVED)).all()
    torch.testing.assert_close(sol.x, x, atol=X_TOL, rtol=0)
    torch.testing.assert_close(sol.y, lams, atol=X_TOL, rtol=X_TOL)  # ProxSuite's "lams": equality rows
    torch.testing.assert_close(sol.z, nus, atol=X_TOL, rtol=X_TOL)  # its "nus": inequality rows, same signs
    assert bool((sol.z > X_TOL).any()), "the batch should have rows at their upper bound"


def test_proxsuite_gradients_batched():
    data = random_batch(5, two_sided=True)
    ours, theirs = leaves(data), leaves(data)
    g_ours = grads(loss_on_x(alqp_from_proxsuite(ours).x), ours)
    g_theirs = grads(loss_on_x(proxsuite_solve(theirs)[0]), theirs)
    assert_grads_close(g_ours, g_theirs, NAMES_PROXSUITE)


def test_proxsuite_shared_inputs_get_the_sum():
    """ProxSuite's QPLayer returns per-problem gradients and autograd sums them to a shared
    input's shape; alqp sums too."""
    shared = ("Q", "G", "p")
    data = random_batch(6, two_sided=True, shared=shared)
    ours, theirs = leaves(data, shared), leaves(data, shared)
    g_ours = grads(loss_on_x(alqp_from_proxsuite(ours).x), ours)
    g_theirs = grads(loss_on_x(proxsuite_solve(theirs)[0]), theirs)
    assert_grads_close(g_ours, g_theirs, NAMES_PROXSUITE)
    batched = leaves({k: v[:1].expand_as(v) if k in shared else v for k, v in data.items()})
    g_batched = grads(loss_on_x(alqp_from_proxsuite(batched).x), batched)
    assert_grads_close(g_ours, {k: v.sum(0) for k, v in g_batched.items()}, shared)


def test_from_proxsuite_reads_1e20_as_infinite():
    data = random_batch(7, two_sided=True)
    data["l"][:, 0] = -1e20
    data["u"][:, 1] = 1e20
    kwargs = from_proxsuite(*(data[name] for name in NAMES_PROXSUITE))
    assert bool(torch.isneginf(kwargs["l"][:, 0]).all()) and bool(torch.isposinf(kwargs["u"][:, 1]).all())
    assert torch.equal(kwargs["l"][:, 1:], data["l"][:, 1:])
    x = proxsuite_solve(data)[0]
    torch.testing.assert_close(alqp.solve_qp(**kwargs).x, x, atol=X_TOL, rtol=0)
    empty = torch.Tensor()
    no_eq = from_proxsuite(data["Q"], data["p"], empty, empty, data["G"], data["l"], data["u"])
    assert no_eq["A"] is None and no_eq["b"] is None
    with pytest.raises(ValueError, match="G given without l or u"):
        from_proxsuite(data["Q"], data["p"], None, None, data["G"], None, None)
