"""The classification example (examples/classification): IDX reader, the QP model against qpth and
CVXPY/Clarabel, and a smoke run."""
import gzip
import json
import os
import struct
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
for _shared in ("models", "data", "train"):  # other examples' modules of the same names
    sys.modules.pop(_shared, None)
sys.path.insert(0, os.path.join(ROOT, "examples", "classification"))
import data
import models
import train

for _shared in ("models", "data", "train"):  # leave the names free for the other examples' tests
    sys.modules.pop(_shared, None)


def _idx_bytes(code: int, shape: tuple, payload: bytes) -> bytes:
    """An IDX file written by hand from the format's definition (not with the module under test)."""
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", s) for s in shape) + payload


def test_idx_folder_reads_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 3, 2), dtype=np.uint8)
    test_images = rng.integers(0, 256, (2, 3, 2), dtype=np.uint8)
    train_labels, test_labels = np.array([3, 1, 4, 1, 5], np.uint8), np.array([9, 2], np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(0x08, (5, 3, 2), train_images.tobytes()))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(0x08, (5,), train_labels.tobytes()))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:  # compressed files are read too
        f.write(_idx_bytes(0x08, (2, 3, 2), test_images.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(0x08, (2,), test_labels.tobytes()))
    tr, te = data.load(str(tmp_path))
    assert tr.x.shape == (5, 6) and te.x.shape == (2, 6) and tr.x.dtype == torch.float64
    np.testing.assert_array_equal(tr.x.numpy(), train_images.reshape(5, 6) / 255.0)
    np.testing.assert_array_equal(te.x.numpy(), test_images.reshape(2, 6) / 255.0)
    assert tr.y.tolist() == [3, 1, 4, 1, 5] and te.y.tolist() == [9, 2]


def test_idx_reader_big_endian_types_and_bad_files(tmp_path):
    values = np.array([[1.5, -2.25], [1e3, 7.0]])
    path = tmp_path / "f.idx"
    path.write_bytes(_idx_bytes(0x0E, (2, 2), values.astype(">f8").tobytes()))
    np.testing.assert_array_equal(data.read_idx(str(path)), values)
    ints = np.array([70000, -3], np.int64)
    path.write_bytes(_idx_bytes(0x0C, (2,), ints.astype(">i4").tobytes()))
    np.testing.assert_array_equal(data.read_idx(str(path)), ints)
    path.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(path))
    path.write_bytes(_idx_bytes(0x08, (4,), b"\x00\x01"))
    with pytest.raises(ValueError, match="expected 4 bytes"):
        data.read_idx(str(path))
    with pytest.raises(FileNotFoundError, match="train-images"):
        data.load(str(tmp_path))


def test_default_data_is_sklearn_digits_or_a_clear_error():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="scikit-learn"):
            data.load("digits")
        return
    tr, te = data.load("digits", seed=0)
    assert tr.x.shape == (1497, 64) and te.x.shape == (300, 64)
    assert float(tr.x.max()) <= 1.0 and set(tr.y.tolist()) == set(range(10))


def _model_pair(pixels=12, hidden=9, nineq=6, seed=3):
    pair = [models.OptNetClassifier(pixels, hidden=hidden, nineq=nineq, solver=s, seed=seed) for s in ("alqp", "qpth")]
    for p, q in zip(pair[0].parameters(), pair[1].parameters()):
        assert torch.equal(p, q)  # the same start for both solvers
    return pair


def test_alqp_model_matches_cvxpy_forward():
    cp = pytest.importorskip("cvxpy")
    model, _ = _model_pair()
    images = torch.rand(4, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        H, C, u = (t.numpy() for t in model.qp_data())
        g = torch.relu(model.fc2(torch.relu(model.fc1(images)))).numpy()
        probs = model(images).log_probs.exp().numpy()
    for k in range(4):
        v = cp.Variable(10)
        cp.Problem(cp.Minimize(0.5 * cp.quad_form(v, cp.psd_wrap(H)) + g[k] @ v), [C @ v <= u]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        expected = np.exp(v.value - v.value.max())
        np.testing.assert_allclose(probs[k], expected / expected.sum(), atol=1e-6)


def test_alqp_model_gradients_match_qpth():
    alqp_model, qpth_model = _model_pair()
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(7, 12, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (7,), generator=gen)
    grads, outs = [], []
    for m in (alqp_model, qpth_model):
        out = m(images)
        assert out.status is None or bool((out.status == 0).all())
        train.nll(out, labels).backward()
        outs.append(out.log_probs.detach())
        grads.append({name: p.grad.clone() for name, p in m.named_parameters() if not name.startswith("layer")})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-7, atol=1e-7)
    for name, gq in grads[1].items():
        scale = float(gq.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads[0][name], gq, rtol=0, atol=1e-6 * scale, msg=f"gradient of {name}")


def test_smoke_run_writes_json_and_plot(tmp_path):
    out = tmp_path / "cls"
    train.main(["--data", "synthetic", "--epochs", "1", "--train-limit", "64", "--batch", "32", "--hidden", "16",
                "--out", str(out), "--no-progress"])
    saved = json.loads((out / "classification.json").read_text())
    assert set(saved["summary"]) == {"alqp", "qpth"}
    for solver, s in saved["summary"].items():
        assert np.isfinite(s["final_test_loss"]) and 0 <= s["final_test_error"] <= 1, solver
        assert s["forward_ms"]["n"] == 2 and not s["failed"]
    assert saved["summary"]["alqp"]["unsolved"] == 0
    assert (out / "classification.png").stat().st_size > 1000
