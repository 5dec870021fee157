"""Tests of the benchmark harness itself (benchmarks), on tiny sizes: they check that the harness runs,
writes its files, reports skipped peers and measures accuracy; they time nothing of interest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness, peers
from benchmarks.__main__ import main
from benchmarks.harness import Config, Preset, RunOptions, make_preset, run_preset
from benchmarks.peers import Method
from benchmarks.problems import random_qp_batch, reference_solution
from benchmarks.report import format_table

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = RunOptions(repeats=1, warmup=0, threads=1)


class ReferencePlusOffset(Method):
    """A deliberately wrong 'solver': the exact solution shifted by ``offset`` in every entry."""

    tolerance = "none (test double)"

    def __init__(self, offset: float, name: str = "offset"):
        super().__init__()
        self.offset = offset
        self.name = name

    def forward(self, params):
        H, g, A, b, C, l, u = params
        from benchmarks.problems import QPBatch

        x = reference_solution(QPBatch(*(t.detach() for t in params))).to(H.dtype)
        # A term through H keeps x in the autograd graph so that the backward can be timed too.
        return x + self.offset + 0.0 * H.sum(dim=(1, 2), keepdim=False).unsqueeze(-1)


def _tiny_preset(backward: bool) -> Preset:
    return Preset("tiny", "tiny test preset", [Config(3, 6, 2, 4, 1e-8)], backward=backward,
                  repeats=1, warmup=0)


def test_random_qp_batch_is_feasible_and_strictly_convex():
    qp = random_qp_batch(5, 7, 2, 4, seed=3, two_sided=True)
    assert qp.H.shape == (5, 7, 7) and qp.A.shape == (5, 2, 7) and qp.l.shape == (5, 4)
    assert torch.linalg.eigvalsh(qp.H).min() > 0
    x = reference_solution(qp)
    Cx = (qp.C @ x.unsqueeze(-1)).squeeze(-1)
    assert (Cx <= qp.u + 1e-8).all() and (Cx >= qp.l - 1e-8).all()
    assert torch.allclose((qp.A @ x.unsqueeze(-1)).squeeze(-1), qp.b, atol=1e-8)
    one_sided = random_qp_batch(5, 7, 2, 4, seed=3)
    assert torch.isinf(one_sided.l).all()


def test_end_to_end_quick_preset_writes_json_and_png(tmp_path, capsys):
    status = main(["--preset", "backward", "--quick", "--threads", "1", "--out", str(tmp_path),
                   "--peers", "alqp,alqp-lpgd,proxsuite,qpth", "--quiet"])
    assert status == 0
    out = capsys.readouterr().out
    assert "max|x-xref|" in out and "method" in out
    data = json.loads((tmp_path / "backward-quick.json").read_text())
    assert data["mode"] == "forward+backward"
    methods = {r["method"] for r in data["records"]}
    assert {"alqp", "proxsuite", "qpth"} <= methods
    for r in data["records"]:
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] == "ok":
            assert r["forward"]["median"] > 0 and r["total"]["median"] >= r["forward"]["median"]
            assert r["err_x"] < 1e-3
        else:
            assert r["reason"]  # every skip or failure says why
    png = tmp_path / "backward-quick.png"
    if any(r["status"] == "ok" for r in data["records"]):
        assert png.exists() and png.stat().st_size > 1000
    assert data["environment"]["allocator"] == (harness.ALLOCATOR_TUNED_LABEL if harness.allocator_tuned()
                                                 else "default")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator settings are for Linux (glibc, THP)")
@pytest.mark.parametrize("tuned", [False, True])
def test_command_line_reruns_itself_with_the_allocator_settings_only_when_asked(tmp_path, tuned):
    env = {k: v for k, v in __import__("os").environ.items() if k not in harness.ALLOCATOR_ENV}
    subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "forward", "--quick", "--peers", "alqp",
                    "--threads", "1", "--no-plot", "--quiet", "--out", str(tmp_path)]
                   + (["--tuned-allocator"] if tuned else []), check=True, env=env, cwd=REPO_ROOT,
                   capture_output=True, timeout=300)
    data = json.loads((tmp_path / "forward-quick.json").read_text())
    assert (data["environment"]["allocator"] == harness.ALLOCATOR_TUNED_LABEL) == tuned


def test_forward_mode_runs_alqp_and_skips_backward_only_methods():
    result = run_preset(_tiny_preset(backward=False), ["alqp", "alqp-lpgd"], TINY, log=lambda s: None)
    assert "alqp-lpgd" in result["skipped"]
    (rec,) = result["records"]
    assert rec["method"] == "alqp" and rec["status"] == "ok", rec["reason"]
    assert rec["backward"] is None and rec["err_x"] < 1e-5
    assert rec["ratio_vs_alqp"] == pytest.approx(1.0)


def test_missing_peer_is_skipped_with_its_reason(monkeypatch):
    real_import = peers._import

    def fake_import(module):
        if module.startswith("qpth"):
            raise ImportError("No module named 'qpth' (simulated)")
        return real_import(module)

    monkeypatch.setattr(peers, "_import", fake_import)
    lines = []
    result = run_preset(_tiny_preset(backward=False), ["qpth"], TINY, log=lines.append)
    assert "qpth" in result["skipped"]
    assert "simulated" in result["skipped"]["qpth"] and "pip install qpth" in result["skipped"]["qpth"]
    assert any(line.startswith("skip qpth:") for line in lines)
    assert "qpth" in format_table(result)  # the table lists the skipped method with its reason


def test_inapplicable_peer_is_skipped_per_point():
    # cvxpylayers is a bench extra, not a test one (its numpy pin conflicts with qpth's wheel).
    pytest.importorskip("cvxpylayers")
    method = peers.CvxpylayersMethod(max_batch=2)
    result = run_preset(_tiny_preset(backward=False), [], TINY, log=lambda s: None, extra_methods=[method])
    (rec,) = result["records"]
    assert rec["status"] == "skipped" and "capped" in rec["reason"]


def test_accuracy_column_catches_a_wrong_solver():
    good, bad = ReferencePlusOffset(0.0, "exact"), ReferencePlusOffset(1e-2, "offset")
    for backward in (False, True):
        result = run_preset(_tiny_preset(backward), [], TINY, log=lambda s: None, extra_methods=[good, bad])
        err = {r["method"]: r["err_x"] for r in result["records"]}
        assert err["exact"] < 1e-12
        assert err["offset"] >= 1e-2 * (1 - 1e-9)
        assert "1.0e-02" in format_table(result)


def test_failing_method_is_reported_not_fatal():
    class Broken(Method):
        name = "broken"

        def forward(self, params):
            raise RuntimeError("boom")

    result = run_preset(_tiny_preset(False), [], TINY, log=lambda s: None, extra_methods=[Broken()])
    (rec,) = result["records"]
    assert rec["status"] == "error" and "boom" in rec["reason"]


def test_presets_have_the_documented_sizes():
    t2 = make_preset("paper-table2")
    assert [(c.batch, c.n, c.p, c.m) for c in t2.configs] == [(100, 100, 50, 50)] * 3
    assert [c.eps for c in t2.configs] == [1e-1, 1e-2, 1e-3] and t2.backward
    assert {c.batch for c in make_preset("paper-table4").configs} == {1}
    fwd = make_preset("forward")
    assert [(c.batch, c.n, c.p, c.m) for c in fwd.configs] == [
        (1, 100, 50, 50), (100, 100, 50, 50), (1000, 100, 50, 50), (128, 50, 10, 50)]
    assert not fwd.backward and make_preset("backward").backward
    scaling = make_preset("scaling")
    assert max(c.batch for c in scaling.configs) == 4096 and max(c.n for c in scaling.configs) == 500
    with pytest.raises(ValueError):
        make_preset("nope")


def test_stats_are_median_and_quartiles():
    s = harness._stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0
    assert s["q25"] == 2.0 and s["q75"] == 4.0


def test_importing_alqp_and_the_benchmarks_imports_no_peer():
    code = ("import sys, alqp, benchmarks; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'proxsuite', 'qpth', 'cvxpy', 'cvxpylayers', 'diffcp', 'clarabel', 'matplotlib', 'benchmarks'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT).stdout
    assert out.strip() == "['benchmarks']"


def test_the_installed_library_holds_no_benchmark():
    import alqp

    assert not (Path(alqp.__file__).parent / "bench").exists()


def test_bad_arguments_exit_with_status_2(capsys):
    assert main(["--peers", "nosuchpeer", "--quick"]) == 2
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--quick"]) == 2


def test_peer_adapters_handle_two_sided_rows_and_no_equalities():
    preset = Preset("tiny2", "two-sided, p=0", [Config(2, 5, 0, 3, 1e-8)], backward=True, repeats=1,
                    warmup=0, two_sided=True)
    result = run_preset(preset, ["proxsuite", "qpth", "cvxpylayers"], TINY, log=lambda s: None)
    for r in result["records"]:
        if r["method"] in result["skipped"]:
            continue
        assert r["status"] == "ok", (r["method"], r["reason"])
        assert r["err_x"] < 1e-4, (r["method"], r["err_x"])


def test_tiny_and_threads_presets_have_the_documented_sizes():
    tiny = make_preset("tiny")
    points = {(c.batch, c.n, c.rows) for c in tiny.configs}
    assert {n for _, n, _ in points} == {2, 5, 10} and {b for b, _, _ in points} == {1, 5, 8}
    assert {r for _, _, r in points} == {"box", "random"} and tiny.backward
    assert all(c.p == 0 and c.m == c.n for c in tiny.configs if c.rows == "box")
    threads = make_preset("threads")
    assert {(c.batch, c.threads) for c in threads.configs} == {(b, k) for b in (64, 256, 1024) for k in (1, 2)}
    assert all((c.n, c.p, c.m) == (100, 50, 50) for c in threads.configs)
    assert tiny.peers == threads.peers == ("alqp", "proxsuite", "qpth", "daqp-raw")


def test_box_batches_are_box_constrained_with_active_bounds():
    from benchmarks.problems import box_qp_batch

    qp = box_qp_batch(6, 4, seed=1)
    assert qp.A.shape == (6, 0, 4) and torch.equal(qp.C[0], torch.eye(4, dtype=torch.float64))
    x = reference_solution(qp)
    assert (x.abs() <= 1 + 1e-9).all() and ((x.abs() - 1).abs() < 1e-9).any()


@pytest.mark.parametrize("preset", ["tiny", "threads"])
def test_speed_presets_run_and_write_json_with_ratios(tmp_path, preset):
    status = main(["--preset", preset, "--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot", "--quiet"])
    assert status == 0
    data = json.loads((tmp_path / f"{preset}-quick.json").read_text())
    methods = {r["method"] for r in data["records"]}
    assert {"alqp", "daqp-raw"} <= methods
    for r in data["records"]:
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] != "ok":
            assert r["reason"]
            continue
        assert r["err_x"] < 1e-3, (r["method"], r["err_x"])
        assert r["ratio_vs_alqp"] is not None and r["ratio_vs_alqp"] > 0
        if r["method"] == "daqp-raw":  # forward only, compared with alqp's forward
            assert r["backward"] is None and r["ratio_basis"] == "alqp forward"
    if preset == "threads":
        assert {r["config"]["threads"] for r in data["records"]} == {1, 2}


def test_layer_overhead_benchmark_runs_and_writes_json(tmp_path):
    from benchmarks import layer_overhead

    points = layer_overhead.main(["--repeats", "1", "--out", str(tmp_path)])
    assert set(points) == {"table2-batch1", "table2-batch100", "n2-box-batch1", "n2-box-batch5"}
    assert all(p["layer_ms"] > 0 and p["engine_ms"] > 0 for p in points.values())
    assert json.loads((tmp_path / "layer-overhead.json").read_text())["points"].keys() == points.keys()
