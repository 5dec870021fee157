"""Issue 17: exact closest-feasible gradients on multi-block infeasibility.

Instances come from :func:`families.multiblock_instance`: least-squares shifts over equality rows
and inequality rows at both bounds at once, multipliers in the hundreds to thousands, a shifted row
active at a zero multiplier (the one that fixes the multipliers' move along s), dependent and
duplicated rows, and a weakly active unshifted row (kind "weak"). Plus the issue's own instance,
``shared/data/closest_feasible_cases/multiblock1.npz``, where it exists.

The check is a directional derivative: for a random direction d of each input (H symmetric,
l and u zero at infinite bounds) and a random weight vector on each output o in (x, y, z, s_eq,
s_in), the analytic <dL_o/dtheta, d> against the central difference (L_o(theta + h d) -
L_o(theta - h d)) / 2h, for every (instance, input, output). Where the rows of V are dependent by
construction ("free", "*_dup", "weak"), a generic perturbation of A or C alone breaks the
dependency (the QP turns feasible: no derivative exists in such a direction), so A and C are
perturbed together as A0 (I + E), C0 (I + E) (every relation between their rows kept) and the
check is on <dL/dA, A0 E> + <dL/dC, C0 E>; for "pinned" instances A and C are checked separately
with generic directions.

Finite differences are taken at h = 1e-5 and 1e-6; an item where they disagree by more than 1e-2
(relative) (an active-set change within h, or round-off) is skipped from the assertion and
counted, and the test fails when more than 5% of the items are skipped. The reference is their
Richardson extrapolation (100 fd(h/10) - fd(h)) / 99, which removes the central difference's
h^2 term: derivatives of the multipliers reach 4e6 here, and at h = 1e-5 that term alone was
4.5e-3 of the derivative (pinned-6-2-9, member 6, loss on y along C: fd(1e-5) = 4.0128e6,
fd(1e-6) = 3.99505e6, fd(1e-7) = 3.994872e6, analytic 3.994870e6).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from alqp import Settings, Status, solve_qp

import families as F

DT = torch.float64
NAMES = ("H", "g", "A", "b", "C", "l", "u")
OUTPUTS = ("x", "y", "z", "s_eq", "s_in")
SETTINGS = Settings(eps_abs=1e-11)
H_FD = 1e-5
RTOL = 2e-3  # |analytic - fd| <= RTOL * scale (see _scale), fd the Richardson extrapolation. Measured
# worst: 5e-4, on derivatives that are 0 (x along g on "pinned": analytic 1e-23, fd round-off 1e-6)
MAX_SKIPPED = 0.05
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "closest_feasible_cases",
                    "multiblock1.npz")
DATA = os.environ.get("ALQP_MULTIBLOCK1",
                      DATA if os.path.exists(DATA) else "/work/shared/data/closest_feasible_cases/multiblock1.npz")

#: (kind, n, p, m, batch, seed): 240 instances, each checked by finite differences on every output
#: along every input (208 by central differences, the 32 "weak" ones by one-sided differences); the
#: 96 "pinned*" ones again in float32 (test_multiblock_float32_matches_float64).
CASES = [
    ("pinned", 4, 1, 7, 16, 11), ("pinned", 6, 2, 9, 16, 12), ("pinned", 8, 3, 12, 16, 13),
    ("pinned", 5, 2, 8, 16, 14), ("free_dup", 6, 1, 9, 16, 44),
    ("pinned_dup", 5, 1, 8, 16, 21), ("pinned_dup", 7, 2, 10, 16, 22),
    ("free", 5, 1, 8, 16, 31), ("free", 7, 2, 10, 16, 32), ("free", 8, 3, 12, 16, 33),
    ("free_dup", 5, 1, 8, 16, 41), ("free_dup", 7, 2, 10, 16, 42), ("free_dup", 8, 2, 11, 16, 43),
    ("weak", 6, 1, 9, 16, 51), ("weak", 8, 2, 11, 16, 52),
]
STATS = {}


def _directions(prob, gen, structured):
    """Random directions per input; with ``structured`` A and C get A0 E, C0 E for one E."""
    dirs = {}
    for k in NAMES:
        v = prob[k]
        d = torch.randn(v.shape, generator=gen, dtype=DT)
        if k in ("l", "u"):
            d = torch.where(torch.isfinite(v), d, torch.zeros_like(d))
        if k == "H":
            d = 0.5 * (d + d.transpose(-1, -2))
        dirs[k] = d
    if structured:
        n = prob["H"].shape[-1]
        E = torch.randn(prob["H"].shape[0], n, n, generator=gen, dtype=DT) / math.sqrt(n)
        dirs["A"], dirs["C"] = prob["A"] @ E, prob["C"] @ E
    return dirs


def _groups(structured):
    """The inputs perturbed together: one check per group."""
    return [("H",), ("g",), ("b",), ("l",), ("u",)] + ([("A", "C")] if structured else [("A",), ("C",)])


def _solve(prob, dirs=None, group=(), t=0.0):
    shifted = {k: (v + t * dirs[k] if k in group else v) for k, v in prob.items()}
    return solve_qp(**shifted, settings=SETTINGS)


def _outputs(sol):
    return {o: getattr(sol, o) for o in OUTPUTS}


def directional_errors(prob, seed, structured):
    """Per (instance, input group, output): analytic and central-difference directional
    derivatives of L_o = <weight_o, o>. Returns dict with 'an', 'fd', 'fd10' (B, groups, outputs),
    the analytic gradients and the solution."""
    gen = torch.Generator().manual_seed(seed)
    B = prob["H"].shape[0]
    dirs = _directions(prob, gen, structured)
    args = {k: v.clone().requires_grad_() for k, v in prob.items()}
    sol = solve_qp(**args, settings=SETTINGS)
    weights = {o: torch.randn(getattr(sol, o).shape, generator=gen, dtype=DT) for o in OUTPUTS}
    groups = _groups(structured)
    an = torch.zeros(B, len(groups), len(OUTPUTS), dtype=DT)
    grads = {}
    for j, o in enumerate(OUTPUTS):
        loss = (getattr(sol, o) * weights[o]).sum()
        gr = torch.autograd.grad(loss, [args[k] for k in NAMES], retain_graph=True)
        grads[o] = dict(zip(NAMES, gr))
        for i, group in enumerate(groups):
            an[:, i, j] = sum((grads[o][k] * dirs[k]).flatten(1).sum(-1) for k in group)
    fd = {}
    statuses = [sol.status]
    for h in (H_FD, H_FD / 10):
        out = torch.zeros(B, len(groups), len(OUTPUTS), dtype=DT)
        for i, group in enumerate(groups):
            plus, minus = _solve(prob, dirs, group, h), _solve(prob, dirs, group, -h)
            statuses += [plus.status, minus.status]
            for j, o in enumerate(OUTPUTS):
                out[:, i, j] = ((getattr(plus, o) - getattr(minus, o)) * weights[o]).sum(-1) / (2 * h)
        fd[h] = out
    same_status = torch.stack([s == Status.CLOSEST_FEASIBLE for s in statuses]).all(0)
    return dict(an=an, fd=fd[H_FD], fd10=fd[H_FD / 10], grads=grads, sol=sol, weights=weights, dirs=dirs,
                ok_status=same_status)


def _scale(r):
    """The size an error is measured against: the larger of |analytic|, |fd| and a floor for
    derivatives that vanish (e.g. d s / d g = 0): 1e-4 |weight_o|_1 (1 + max|o|), about the
    forward's round-off on L_o (1e-9 relative) over 2h at h = 1e-6."""
    floor = torch.stack([1e-4 * r["weights"][o].abs().sum(-1) * (1 + getattr(r["sol"], o).detach().abs().amax(-1))
                         if getattr(r["sol"], o).shape[-1] else torch.zeros(r["an"].shape[0], dtype=DT)
                         for o in OUTPUTS], -1).unsqueeze(1)
    return torch.maximum(torch.maximum(r["an"].abs(), r["fd"].abs()), floor.expand_as(r["an"]))


def _check(r, label):
    """Assert agreement on every stable item; return (max relative error, skipped, total)."""
    scale = _scale(r)
    unstable = (r["fd"] - r["fd10"]).abs() > 1e-2 * scale
    unstable |= ~r["ok_status"].view(-1, 1, 1)
    richardson = (100 * r["fd10"] - r["fd"]) / 99
    err = (r["an"] - richardson).abs() / scale
    bad = (err > RTOL) & ~unstable
    worst = float(err[~unstable].max()) if bool((~unstable).any()) else 0.0
    assert not bool(bad.any()), (label, bad.nonzero()[:10].tolist(), worst)
    return worst, int(unstable.sum()), unstable.numel()


@pytest.mark.parametrize("kind,n,p,m,batch,seed", [c for c in CASES if c[0] != "weak"])
def test_multiblock_directional_derivatives(kind, n, p, m, batch, seed):
    """Every output with respect to every input, against central differences, float64."""
    prob, ref = F.multiblock_instance(batch, n, p, m, seed=seed, kind=kind)
    sol = solve_qp(**prob, settings=SETTINGS)
    assert (sol.status == Status.CLOSEST_FEASIBLE).all()
    assert torch.allclose(sol.x, ref["x"], atol=1e-5) and torch.allclose(sol.s_in, ref["s_in"], atol=1e-7)
    r = directional_errors(prob, seed + 1000, structured=kind != "pinned")
    worst, skipped, total = _check(r, kind)
    STATS[(kind, n, p, m)] = (worst, skipped, total)
    assert skipped <= MAX_SKIPPED * total, (kind, skipped, total)
    # The shift depends on neither H nor g: its gradients there are 0 up to round-off.
    for o in ("s_eq", "s_in"):
        for k in ("H", "g"):
            assert float(r["grads"][o][k].abs().max()) <= 1e-9, (o, k, float(r["grads"][o][k].abs().max()))
    if kind.startswith("pinned"):  # x pinned by the shifted rows: x does not depend on H, g either
        for k in ("H", "g"):
            assert float(r["grads"]["x"][k].abs().max()) <= 1e-8


def test_multiblock_weakly_active_row_one_sided():
    """Kind "weak": an unshifted row on its bound with a zero multiplier makes a kink. The backward
    keeps such a row in the active set (alqp.backward, module docstring): its gradient is the
    derivative of the piece on which the row stays active, which is the one-sided derivative
    along d where that piece's d z_i has the sign of the row's bound (z_i >= 0 on an upper bound),
    and along -d otherwise. Checked against the one-sided difference of that side (h = 1e-6, and
    h = 1e-7 for the stability test).

    The check discriminates: on the items where the two one-sided differences differ (a real kink
    along d; measured: 553 of the 960 items), the analytic value must match the predicted side and
    not the other one (measured: it matches the predicted side on all 553, the other side on none,
    whose error is at least 2.6e-2). So the backward's element of the conservative Jacobian is the
    derivative of the piece on which the weakly active row stays active."""
    worst, skipped, total, kinks, other_side = 0.0, 0, 0, 0, 0
    for kind, n, p, m, batch, seed in [c for c in CASES if c[0] == "weak"]:
        prob, ref = F.multiblock_instance(batch, n, p, m, seed=seed, kind=kind)
        B = batch
        gen = torch.Generator().manual_seed(seed + 2000)
        dirs = _directions(prob, gen, structured=True)
        args = {k: v.clone().requires_grad_() for k, v in prob.items()}
        sol = solve_qp(**args, settings=SETTINGS)
        assert (sol.status == Status.CLOSEST_FEASIBLE).all()
        assert sol.z.gather(1, ref["weak"].unsqueeze(1)).abs().max() < 1e-8
        groups = _groups(True)
        weights = {o: torch.randn(getattr(sol, o).shape, generator=gen, dtype=DT) for o in OUTPUTS}
        # The weak row's d z_i along each direction: which side the backward's piece serves.
        wz = torch.zeros_like(sol.z).scatter_(1, ref["weak"].unsqueeze(1), 1.0)
        gz = torch.autograd.grad((sol.z * wz).sum(), [args[k] for k in NAMES], retain_graph=True)
        gz = dict(zip(NAMES, gz))
        C0x = (prob["C"] @ sol.x.detach().unsqueeze(-1)).squeeze(-1).gather(1, ref["weak"].unsqueeze(1))[:, 0]
        on_upper = (prob["u"].gather(1, ref["weak"].unsqueeze(1))[:, 0] - C0x).abs() < 1e-6
        base = _outputs(_solve(prob))
        for o in OUTPUTS:
            grads = dict(zip(NAMES, torch.autograd.grad((getattr(sol, o) * weights[o]).sum(),
                                                        [args[k] for k in NAMES], retain_graph=True)))
            for group in groups:
                an = sum((grads[k] * dirs[k]).flatten(1).sum(-1) for k in group)
                dz = sum((gz[k] * dirs[k]).flatten(1).sum(-1) for k in group)
                side = torch.where((dz >= 0) == on_upper, 1.0, -1.0).to(DT)  # +1: forward difference
                one_sided = {}
                for h in (1e-6, 1e-7):
                    moved = {}
                    for sgn in (1.0, -1.0):
                        moved[sgn] = _outputs(_solve(prob, dirs, group, sgn * h))
                    fwd = ((moved[1.0][o] - base[o]) * weights[o]).sum(-1) / h
                    bwd = ((base[o] - moved[-1.0][o]) * weights[o]).sum(-1) / h
                    one_sided[h] = torch.where(side > 0, fwd, bwd)
                    if h == 1e-6:
                        opposite = torch.where(side > 0, bwd, fwd)
                scale = torch.maximum(torch.maximum(an.abs(), one_sided[1e-6].abs()), torch.full_like(an, 1e-3))
                unstable = (one_sided[1e-6] - one_sided[1e-7]).abs() > 1e-3 * scale
                err = (an - one_sided[1e-6]).abs() / scale
                assert not bool((err[~unstable] > 1e-3).any()), (o, group, err.max().item())
                kink = ~unstable & ((one_sided[1e-6] - opposite).abs() > 1e-2 * scale)
                kinks += int(kink.sum())
                other_side += int((kink & ((an - opposite).abs() <= 1e-3 * scale)).sum())
                if bool((~unstable).any()):
                    worst = max(worst, float(err[~unstable].max()))
                skipped += int(unstable.sum())
                total += B
    STATS["weak"] = (worst, skipped, total, kinks)
    assert skipped <= MAX_SKIPPED * total, (skipped, total)
    # Enough kinks that the side matters, and the analytic value on none of them the other side's.
    assert kinks >= total // 4 and other_side == 0, (kinks, other_side, total)


def test_multiblock_float32_matches_float64():
    """float32 inputs, the kinds whose structure survives rounding ("pinned", "pinned_dup": any
    perturbation of the data keeps the QP infeasible with the same shifted rows, so the solution
    map is differentiable there): the float32 answer and the analytic gradient of a loss on every
    output agree with float64 on the same problem. 96 instances.

    What a float32 answer is: the data rounded to float32 (6e-8 relative), solved in float64
    (DAQP, or the ALM re-solved in float64: solver._solve_alm_certified) and rounded to float32;
    the backward then runs in float64 on the float32 data and that rounded answer. Measured on
    these instances against the float64 gradient of the original data: 7e-7 (relative to the
    gradient's size) for losses on x and the shift, 1.2e-4 for losses on y and z; against the
    float64 gradient of the float32-rounded data: at most 5e-7 for all outputs. So the gradient
    error is the rounding of the data (the multipliers, up to 1e3, move by 1e-4 of their size
    under it), not the rounding of the answer nor the backward: tolerances 1e-5 and 1e-3.

    The kinds with dependent shifted rows ("free", "*_dup" with "free", "weak") are left out: the
    rounding breaks the dependency, and the float32 QP is a different problem. Measured (8 of each,
    float32 gradient against float64's of the original data): "free" 2e-4 to 1.3e-3 (x moves by up
    to 3e-5), "free_dup" up to 1 (one member's rounded copy has another least-squares shift: s
    moves by 0.9), "weak" up to 50 (x agrees to 1e-7, but the rounding decides on which side of
    the weakly active row's kink the problem lies)."""
    worst = {}
    for kind, n, p, m, batch, seed in [c for c in CASES if c[0].startswith("pinned")]:
        prob, _ = F.multiblock_instance(batch, n, p, m, seed=seed + 7, kind=kind)
        grads, sols = {}, {}
        for dtype in (torch.float64, torch.float32):
            args = {k: v.to(dtype).clone().requires_grad_() for k, v in prob.items()}
            sol = solve_qp(**args, settings=SETTINGS if dtype == torch.float64 else Settings())
            assert (sol.status == Status.CLOSEST_FEASIBLE).all(), (kind, dtype, sol.status)
            grads[dtype], sols[dtype] = {}, sol
            g2 = torch.Generator().manual_seed(seed)
            for o in OUTPUTS:
                wgt = torch.randn(getattr(sol, o).shape, generator=g2, dtype=DT).to(dtype)
                gr = torch.autograd.grad((getattr(sol, o) * wgt).sum(), [args[k] for k in NAMES], retain_graph=True)
                grads[dtype][o] = torch.cat([t.double().flatten(1) for t in gr], 1)
        for o in OUTPUTS:
            a64, a32 = getattr(sols[torch.float64], o).detach(), getattr(sols[torch.float32], o).detach().double()
            forward = (float(((a32 - a64).abs().amax(-1) / a64.abs().amax(-1).clamp_min(1.0)).max())
                       if a64.numel() else 0.0)
            assert forward < (1e-5 if o in ("x", "s_eq", "s_in") else 1e-3), ("forward", o, forward)
            g64, g32 = grads[torch.float64][o], grads[torch.float32][o]
            finite = torch.isfinite(g64)
            err = ((g32 - g64).where(finite, torch.zeros_like(g64)).abs().amax(-1)
                   / g64.where(finite, torch.zeros_like(g64)).abs().amax(-1).clamp_min(1.0))
            worst[o] = max(worst.get(o, 0.0), float(err.max()))
    STATS["float32"] = worst
    for o, e in worst.items():
        assert e < (1e-5 if o in ("x", "s_eq", "s_in") else 1e-3), (o, e)


@pytest.mark.skipif(not os.path.exists(DATA), reason="shared/data/closest_feasible_cases not present")
def test_multiblock1_every_entry():
    """The issue's instance: every entry of every input's gradient, for losses sum(x), sum(y),
    sum(z), sum(s), against central differences (h = 1e-6), as in its README."""
    import numpy as np

    d = np.load(DATA)
    prob = {k: torch.tensor(d[k]).unsqueeze(0) for k in NAMES}
    h = 1e-6
    args = {k: v.clone().requires_grad_() for k, v in prob.items()}
    sol = solve_qp(**args, settings=SETTINGS)
    assert sol.status == Status.CLOSEST_FEASIBLE
    losses = {"x": lambda s: s.x.sum(-1), "y": lambda s: s.y.sum(-1), "z": lambda s: s.z.sum(-1),
              "s": lambda s: s.s_eq.sum(-1) + s.s_in.sum(-1)}
    # All perturbed problems in one batch: entry e of input k moved by +h and -h.
    items, batch = [], {k: [] for k in NAMES}
    for k in NAMES:
        v = prob[k][0]
        for idx in np.ndindex(*v.shape):
            if not math.isfinite(v[idx].item()) or (k == "H" and idx[0] > idx[1]):
                continue
            e = torch.zeros_like(v)
            e[idx] = h
            if k == "H":
                e[idx[::-1]] = h
            items.append((k, idx))
            for sgn in (1.0, -1.0):
                for kk in NAMES:
                    batch[kk].append(prob[kk][0] + sgn * e if kk == k else prob[kk][0])
    moved = solve_qp(**{k: torch.stack(v) for k, v in batch.items()}, settings=SETTINGS)
    assert (moved.status == Status.CLOSEST_FEASIBLE).all()
    worst = {}
    for name, L in losses.items():
        gr = dict(zip(NAMES, torch.autograd.grad(L(sol).sum(), [args[k] for k in NAMES], retain_graph=True)))
        vals = L(moved)
        fd = (vals[0::2] - vals[1::2]) / (2 * h)
        an = torch.tensor([gr[k][0][idx] + (gr[k][0][idx[::-1]] if k == "H" and idx[0] != idx[1] else 0.0)
                           for k, idx in items], dtype=DT)
        scale = max(1.0, float(fd.abs().max()))
        worst[name] = float((an - fd).abs().max()) / scale
        if name == "s":  # the shift does not depend on H, g
            assert all(abs(float(a)) <= 1e-10 for (k, _), a in zip(items, an) if k in ("H", "g"))
    STATS["multiblock1"] = worst
    # FD noise: the forward's x is accurate to ~1e-9 here, over 2h = 2e-6.
    for name, e in worst.items():
        assert e < 1e-5, (name, e)
