"""Seconds-long runs of the examples that have no test of their own (the Sudoku example's are in
test_sudoku.py): each runs through its command-line entry point at a tiny size and must show the
property it exists to show."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_gets_every_status_as_constructed(capsys):
    """Feasible members SOLVED, the infeasible third CLOSEST_FEASIBLE, in both dtypes."""
    demo = _load("demo")
    for dtype in ("float64", "float32"):
        assert demo.main(["--batch", "9", "--n", "9", "--dtype", dtype]) == 9, capsys.readouterr().out
    assert "CLOSEST_FEASIBLE" in capsys.readouterr().out


def test_lpgd_learning_gets_informative_gradients_where_ift_gets_none(tmp_path, capsys):
    """One epoch on 40 instances: the LP's implicit gradient is zero up to round-off at its vertex,
    LPGD's is not, and the JSON and plot are written."""
    _load("lpgd_learning").main(["--epochs", "1", "--train", "40", "--test", "10", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "lpgd_learning.json").read_text())["results"]
    assert results["lpgd"]["mean_grad_norm"] > 1e4 * results["ift"]["mean_grad_norm"]
    assert results["lpgd"]["train_loss"][-1] < results["lpgd"]["train_loss"][0]
    assert (tmp_path / "lpgd_learning.png").exists()


def test_table3_runs_a_task_and_sets_ours_beside_the_papers(tmp_path, monkeypatch):
    """examples/table3.py at a smoke size (the cart-pole with 2 iterations): the task's script runs,
    its JSON is read, and the table has a row per solver with the paper's numbers beside ours, and
    the peers that the task cannot run, with the reason."""
    table3 = _load("table3")
    monkeypatch.setitem(table3.COMMANDS, "cartpole",
                        (["cartpole/train.py", "--solver", "all", "--iterations", "2", "--horizon", "5"],) * 2)
    summary = table3.main(["--tasks", "cartpole", "--out", str(tmp_path), "--no-progress"])
    rows = summary["tasks"]["cartpole"]["rows"]
    assert [r[0] for r in rows] == ["alqp", "qpth (OptNet)", "ProxSuite QPLayer"]
    assert all(r[1] > 0 and r[2] > 0 and r[3] == r[3] for r in rows)
    text = (tmp_path / "table3.md").read_text()
    assert "55.2 / 39.27 / 0.02556 (QPLayer)" in text and "cvxpylayers | not run" in text
