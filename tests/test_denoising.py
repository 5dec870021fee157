"""The denoising example (examples/denoising): data, the QP model against qpth, and a smoke run."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
for _shared in ("models", "data", "train"):  # other examples' modules of the same names
    sys.modules.pop(_shared, None)
sys.path.insert(0, os.path.join(ROOT, "examples", "denoising"))
import models
import train

for _shared in ("models", "data", "train"):  # leave the names free for the other examples' tests
    sys.modules.pop(_shared, None)


def test_signals_are_seeded_piecewise_constant_with_gaussian_noise():
    a, b = models.make_signals(400, 40, seed=3), models.make_signals(400, 40, seed=3)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.clean, b.clean)
    assert not torch.equal(models.make_signals(400, 40, seed=4).clean, a.clean)
    jumps = (a.clean[:, 1:] != a.clean[:, :-1]).sum(1)
    assert int(jumps.max()) <= 8 and int(jumps.min()) >= 0  # at most 9 pieces
    assert bool((a.clean == a.clean.round()).all()) and a.clean.min() >= 10 and a.clean.max() < 100
    noise = (a.noisy - a.clean).flatten().numpy()
    assert abs(noise.mean()) < 0.3 and abs(noise.std() - 10.0) < 0.3


def _model_pair(n, seed=1):
    """The alqp and the qpth model with the same, generic parameters (bounds moved off zero)."""
    pair = [models.DenoisingQP(n, solver, seed=seed) for solver in ("alqp", "qpth")]
    gen = torch.Generator().manual_seed(seed + 100)
    upper, lower = 0.5 * torch.rand(n - 1, generator=gen).double(), -0.5 * torch.rand(n - 1, generator=gen).double()
    for m in pair:
        with torch.no_grad():
            m.upper.copy_(upper)
            m.lower.copy_(lower)
    return pair


def test_alqp_model_matches_cvxpy_forward():
    cp = pytest.importorskip("cvxpy")
    n = 7
    model, _ = _model_pair(n)
    signals = models.make_signals(3, n, seed=2)
    y = model(signals.noisy).y.detach()
    D, u, l = model.D.detach().numpy(), model.upper.detach().numpy(), model.lower.detach().numpy()
    for k in range(3):
        yv, tv = cp.Variable(n), cp.Variable(n - 1)
        objective = (0.5 * (1 + models.EPS) * cp.sum_squares(yv) - signals.noisy[k].numpy() @ yv
                     + models.LAM * cp.sum(tv) + 0.5 * (1e-8 + models.EPS) * cp.sum_squares(tv))
        cp.Problem(cp.Minimize(objective), [D @ yv - tv <= u, D @ yv + tv >= l]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(y[k].numpy(), yv.value, atol=1e-5 * (1 + np.abs(yv.value).max()))


def test_alqp_model_gradients_match_qpth():
    n = 8
    alqp_model, qpth_model = _model_pair(n)
    signals = models.make_signals(5, n, seed=6)
    grads, outs = [], []
    for m in (alqp_model, qpth_model):
        out = m(signals.noisy)
        assert out.status is None or bool((out.status == 0).all())
        train.mse(out, signals.clean).backward()
        outs.append(out.y.detach())
        grads.append([p.grad.clone() for p in (m.D, m.upper, m.lower)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for name, ga, gq in zip(("D", "upper", "lower"), *grads):
        scale = gq.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(ga, gq, rtol=0, atol=1e-5 * float(scale), msg=f"gradient of {name}")


def test_smoke_run_writes_json_and_plot(tmp_path):
    out = tmp_path / "dn"
    payload = train.main(["--length", "8", "--train", "20", "--test", "10", "--epochs", "1", "--batch", "10",
                          "--out", str(out), "--no-progress"])
    saved = json.loads((out / "denoising.json").read_text())
    assert set(saved["summary"]) == {"alqp", "qpth"}
    for solver, s in saved["summary"].items():
        assert np.isfinite(s["final_test_loss"]) and s["final_test_loss"] > 0, solver
        assert s["forward_ms"]["n"] == 2 and s["backward_ms"]["n"] == 2  # 20 signals, batch 10, one epoch
        assert not s["failed"]
    assert saved["summary"]["alqp"]["unsolved"] == 0
    assert payload["summary"]["alqp"]["final_test_loss"] == pytest.approx(saved["summary"]["alqp"]["final_test_loss"])
    assert (out / "denoising.png").stat().st_size > 1000
    assert len(saved["example"]["denoised"]["alqp"]) == 8
