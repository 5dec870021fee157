"""The large-learning-rate study (examples/robustness/run.py): failure detection, aggregation, smoke run."""
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "examples", "robustness"))
import common
import run

for _shared in ("models", "data", "train", "run"):  # leave the names free for the other examples' tests
    sys.modules.pop(_shared, None)


class _Out:
    def __init__(self, value, status=None):
        self.value, self.status = value, status


class _ExplodingModel(torch.nn.Module):
    """A linear model whose output turns NaN once its weight passes ``limit`` (a stand-in for a solver NaN)."""

    def __init__(self, limit):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.limit = limit

    def forward(self, x):
        y = x * self.w
        return _Out(torch.where(self.w.abs() > self.limit, torch.full_like(y, math.nan), y))


def _loss(out, target):
    return (out.value - target).square().mean()


def test_train_loop_stops_and_fails_at_the_first_nan():
    x = torch.linspace(1, 2, 8, dtype=torch.float64)
    data = (x, 5 * x)
    model = _ExplodingModel(limit=3.0)
    result = common.train_loop(model, torch.optim.SGD(model.parameters(), lr=0.05), _loss, data, data,
                               batch=4, epochs=20, seed=0, progress=False)
    assert result["failed"] and "non-finite" in result["failure"]
    assert math.isnan(result["history"][-1]["test_loss"]) and len(result["history"]) < 21
    calm = _ExplodingModel(limit=1e9)
    ok = common.train_loop(calm, torch.optim.SGD(calm.parameters(), lr=0.05), _loss, data, data,
                           batch=4, epochs=3, seed=0, progress=False)
    assert not ok["failed"] and ok["history"][-1]["test_loss"] < ok["history"][0]["test_loss"]


def test_aggregate_counts_failed_and_unsolved_runs():
    def row(solver, loss, failed=False, unsolved=0):
        return {"task": "denoising", "lr": 1e-4, "solver": solver, "seed": 0, "failed": failed, "failure": None,
                "unsolved": unsolved, "final_test_loss": math.nan if failed else loss, "final_test_error": None,
                "test_loss_std_last": 0.0 if failed else loss / 10}
    table = run.aggregate([row("qpth", 1.0, failed=True), row("qpth", 2.0), row("qpth", 4.0),
                           row("alqp", 3.0, unsolved=2), row("alqp", 5.0)])
    qpth, alqp = (next(r for r in table if r["solver"] == s) for s in ("qpth", "alqp"))
    assert (qpth["failed_runs"], qpth["nan_or_raised"], qpth["runs"]) == (1, 1, 3)
    assert qpth["final_loss_mean"] == pytest.approx(3.0)  # the failed run's loss is left out
    assert qpth["final_loss_ci95"] == pytest.approx(1.96 * math.sqrt(2.0) / math.sqrt(2))
    assert (alqp["failed_runs"], alqp["nan_or_raised"], alqp["unsolved_qps"]) == (1, 0, 2)
    assert alqp["final_loss_mean"] == pytest.approx(4.0)


def test_smoke_run_writes_json_and_plot(tmp_path, monkeypatch):
    tiny = {"seeds": 1, "last": 2, "denoising": {"length": 6, "train": 20, "test": 10, "epochs": 2},
            "classification": {"train_limit": 64, "epochs": 2}}
    monkeypatch.setitem(run.SIZES, "reduced", tiny)
    monkeypatch.setitem(run.LEARNING_RATES, "denoising", [1e-6])
    monkeypatch.setitem(run.LEARNING_RATES, "classification", [1e-3])
    out = tmp_path / "rob"
    run.main(["--data", "synthetic", "--out", str(out), "--no-progress"])
    saved = json.loads((out / "robustness.json").read_text())
    assert {(r["task"], r["solver"]) for r in saved["table"]} == {
        (t, s) for t in ("denoising", "classification") for s in ("alqp", "qpth")}
    for r in saved["table"]:
        assert r["runs"] == 1 and r["failed_runs"] == 0 and math.isfinite(r["final_loss_mean"]), r
    assert all(len(r["history"]) == 3 for r in saved["runs"])  # epoch 0 and two epochs
    assert (out / "robustness.png").stat().st_size > 1000
