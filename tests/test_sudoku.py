"""The Sudoku example (examples/sudoku): generator, rule checks, and that training lowers the loss."""
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "sudoku"))
import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402


def _all_4x4_boards():
    """Every valid 4x4 board, enumerated row by row from permutations (independent of data.solve_board)."""
    perms = list(itertools.permutations(range(1, 5)))
    boards = []

    def ok(rows):
        for c in range(4):
            if len({r[c] for r in rows}) != len(rows):
                return False
        if len(rows) in (2, 4):  # a band of boxes is complete
            top = rows[-2:]
            for bc in (0, 2):
                if len({top[i][bc + j] for i in range(2) for j in range(2)}) != 4:
                    return False
        return True

    def extend(rows):
        if len(rows) == 4:
            boards.append(rows)
            return
        for p in perms:
            if ok(rows + [p]):
                extend(rows + [p])

    extend([])
    return torch.tensor(boards)


def test_generator_puzzles_have_unique_solutions():
    boards = _all_4x4_boards()
    assert boards.shape == (288, 4, 4)  # the known count of 4x4 Sudoku grids
    d = data.generate(60, n=2, seed=1)
    givens = data.decode(d.puzzles, 2) * (d.puzzles.sum(-1) > 0)  # 0 where blank
    solutions = data.decode(d.solutions, 2)
    assert not data.board_errors(solutions, 2).any()
    for puzzle, solution in zip(givens, solutions):
        mask = puzzle > 0
        consistent = (boards[:, mask] == puzzle[mask]).all(1)
        assert int(consistent.sum()) == 1, "a puzzle must have exactly one completion"
        assert torch.equal(boards[consistent][0], solution)
        assert mask.sum() < 16  # something is left to solve


def test_generator_is_seeded_and_one_hot():
    a, b, c = data.generate(20, 2, seed=5), data.generate(20, 2, seed=5), data.generate(20, 2, seed=6)
    assert torch.equal(a.puzzles, b.puzzles) and torch.equal(a.solutions, b.solutions)
    assert not torch.equal(a.puzzles, c.puzzles)
    assert a.puzzles.shape == (20, 4, 4, 4) and a.solutions.shape == (20, 4, 4, 4)
    assert set(a.puzzles.sum(-1).unique().tolist()) <= {0.0, 1.0}  # givens one-hot, blanks zero
    assert (a.solutions.sum(-1) == 1).all()
    assert ((a.puzzles == 1) <= (a.solutions == 1)).all()  # givens agree with the solution


def test_9x9_generator_unique():
    d = data.generate(2, n=3, seed=0, max_blanks=45)
    for puzzle in data.decode(d.puzzles, 3) * (d.puzzles.sum(-1) > 0):
        assert data.count_solutions(puzzle.tolist(), 3, limit=2) == 1
        assert (puzzle == 0).sum() == 45


def test_rules_matrix_and_board_errors():
    A = data.sudoku_constraints(2)
    assert A.shape == (40, 64) and torch.linalg.matrix_rank(A) == 40  # OptNet's 40 rows for 4x4
    d = data.generate(10, 2, seed=2)
    x = d.solutions.reshape(10, -1)
    assert torch.allclose(x @ A.T, torch.ones(10, 40, dtype=torch.float64))
    boards = data.decode(d.solutions, 2)
    assert not data.board_errors(boards, 2).any()
    broken = boards.clone()
    broken[:, 0, [0, 1]] = broken[:, 0, [1, 0]]  # swapping two cells of a row breaks a column
    assert data.board_errors(broken, 2).all()


@pytest.fixture
def one_thread():
    """Tiny batches: a second thread only adds contention (the test is several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The LP starts with x summing to about 2 per board (A x = 1 with A uniform in [0, 1)) where the
# solution has 16 ones, and moves only as A's entries do: its loss falls slowly but steadily at a
# small learning rate. The OptNet models fall fast. Over seeds 0 to 3 the last three losses over
# the first measured 0.93 to 0.96 (LP) and 0.30 to 0.33 (both OptNet models).
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,lr,steps,factor", [("lp", 0.01, 12, 0.98), ("optnet", 0.05, 8, 0.6),
                                                  ("qpth", 0.05, 8, 0.6)])
def test_a_few_training_steps_lower_the_loss(name, lr, steps, factor, seed, one_thread):
    if name == "qpth":
        pytest.importorskip("qpth")
    torch.manual_seed(seed)
    d = data.generate(8, 2, seed=3 + seed)
    settings = train.alqp.Settings(mu_min=1e-5, rho=1e-4, max_iter=200, eps_abs=1e-6)
    model = models.build_model(name, 2, settings=settings, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(d.puzzles)
        loss = train.batch_loss(name, out, d.solutions, shift_weight=1.0)
        loss.backward()
        assert model.A.grad is not None and model.A.grad.abs().sum() > 0
        assert (out.status <= int(train.alqp.Status.CLOSEST_FEASIBLE)).all(), out.status
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < factor * losses[0], losses


def test_optnet_model_gradient_matches_finite_differences(one_thread):
    """The OptNet model's gradient (A and z0, through A and b = A exp(z0)) against central finite
    differences of the loss along random directions, on a few puzzles."""
    d = data.generate(4, 2, seed=7)
    settings = train.alqp.Settings(eps_abs=1e-11, max_iter=2000)
    model = models.build_model("optnet", 2, settings=settings, seed=0)
    train.batch_loss("optnet", model(d.puzzles), d.solutions, 1.0).backward()
    A0, z0 = model.A.detach().clone(), model.log_z0.detach().clone()
    gen = torch.Generator().manual_seed(1)

    def loss_at(A, z):
        with torch.no_grad():
            model.A.copy_(A)
            model.log_z0.copy_(z)
            return train.batch_loss("optnet", model(d.puzzles), d.solutions, 1.0).item()

    for _ in range(2):
        dA = torch.randn(A0.shape, generator=gen, dtype=torch.float64)
        dz = torch.randn(z0.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        fd = (loss_at(A0 + h * dA, z0 + h * dz) - loss_at(A0 - h * dA, z0 - h * dz)) / (2 * h)
        analytic = float((model.A.grad * dA).sum() + (model.log_z0.grad * dz).sum())
        assert abs(analytic - fd) <= 1e-5 * max(1.0, abs(fd)), (analytic, fd)


def test_ddp_example_runs_in_one_process(tmp_path):
    """examples/sudoku/train_ddp.py without torchrun (one process): a seconds-long smoke run that
    trains, evaluates and writes its JSON."""
    import train_ddp

    threads = torch.get_num_threads()
    try:
        result = train_ddp.main(["--train", "300", "--test", "100", "--epochs", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # (the example sets its process's share of the cores)
    assert result["world"] == 1 and len(result["history"]) == 1
    row = result["history"][0]
    assert 0 <= row["test_errors"] <= 100 and row["train_loss"] > 0
    assert (tmp_path / "sudoku-ddp.json").exists()


def test_clip_outlier_gradient_bounds_only_outliers():
    """--clip-outliers: a gradient norm beyond factor x the median of the recent ones is scaled down
    to that bound (direction kept); an ordinary one, and any during the warm-up, pass unchanged."""
    model = torch.nn.Linear(3, 2, dtype=torch.float64)

    def set_grad(scale):
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        return [p.grad.clone() for p in model.parameters()]

    def norm():
        return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())

    history = []
    set_grad(100.0)
    train.clip_outlier_gradient(model, history, factor=3.0, warmup=5)
    assert norm() == pytest.approx(100.0 * 8 ** 0.5)  # warm-up: nothing clipped yet
    history[:] = [1.0, 2.0, 3.0, 4.0, 5.0]  # median 3: the bound is 9
    ordinary = set_grad(1.0)  # norm sqrt(8) < 9
    train.clip_outlier_gradient(model, history, factor=3.0, warmup=5)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ordinary))
    outlier = set_grad(10.0)  # norm 10 sqrt(8) > 9
    train.clip_outlier_gradient(model, history, factor=3.0, warmup=5)
    assert norm() == pytest.approx(9.0)
    for p, g in zip(model.parameters(), outlier):
        assert torch.allclose(p.grad, g * 9.0 / (10.0 * 8 ** 0.5))
    assert history[-1] == pytest.approx(10.0 * 8 ** 0.5)  # the unclipped norm is remembered


def test_capture_and_diagnosis_agree_with_qpth(tmp_path, one_thread):
    """train.py --capture, then diagnose_jumps.py on it: the capture replays Adam exactly, and on the
    diagnosed steps qpth (the independent oracle) returns the same answers and the same gradient
    direction, B times smaller (its batch mean against alqp's sum); --loss-scale scales the gradient."""
    pytest.importorskip("qpth")
    import diagnose_jumps

    common = ["--models", "optnet", "--train", "40", "--test", "20", "--epochs", "2", "--batch", "20",
              "--no-progress", "--capture", "--data-cache", str(tmp_path / "cache")]
    train.main(common + ["--out", str(tmp_path / "run")])
    train.main(common + ["--epochs", "1", "--loss-scale", "0.5", "--out", str(tmp_path / "half")])
    full = torch.load(tmp_path / "run" / "capture-optnet.pt", weights_only=False)["steps"]
    half = torch.load(tmp_path / "half" / "capture-optnet.pt", weights_only=False)["steps"]
    assert len(full) == 4 and len(half) == 2
    assert torch.allclose(half[0]["grads"]["A"], 0.5 * full[0]["grads"]["A"], rtol=1e-9, atol=0)

    result = diagnose_jumps.main(["--capture", str(tmp_path / "run" / "capture-optnet.pt"), "--window", "3",
                                  "--fd-steps", "1e-5", "--out", str(tmp_path / "diag")])
    for where in ("at_trigger", "at_jump"):
        r = result[where]
        assert r["adam"]["replay_matches_capture"] < 1e-12
        assert r["forward"]["alqp_vs_qpth"]["max_abs_dx"] < 1e-5
        assert r["gradients"]["cosine"]["alqp_vs_qpth"] > 0.999
        assert r["gradients"]["norm_ratio_alqp_over_qpth"] == pytest.approx(20, rel=0.05)
        assert r["gradients"]["cosine"]["alqp_vs_captured"] > 1 - 1e-9
    assert (tmp_path / "diag" / "diagnose_jumps.json").exists() and (tmp_path / "diag" / "diagnose_jumps.png").exists()


@pytest.mark.parametrize("engine", ["active_set", "alm"])
@pytest.mark.parametrize("eps_abs", [1e-6, 1e-9])
def test_small_positive_slack_is_not_active_at_a_loose_tolerance(engine, eps_abs):
    """A bound x_i >= 0 with slack 5e-7, below eps_abs = 1e-6 but real (both engines answer to far
    better than that here), is inactive: dx_0/dg_0 is -1/H_00 as central finite differences say,
    not 0 as it was when the backward counted every row within eps_abs of its bound as active
    (OptNet's Sudoku QP had such an x_i, see docs/results/sudoku-jumps.md)."""
    H = 0.1 * torch.eye(2, dtype=torch.float64)
    C, l = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    u = torch.full((2,), float("inf"), dtype=torch.float64)
    settings = train.alqp.Settings(eps_abs=eps_abs, engine=engine)

    def x0(g):
        return train.alqp.solve_qp(H, g, None, None, C, l, u, settings=settings).x[0]

    g = torch.tensor([-0.1 * 5e-7, -0.1], dtype=torch.float64, requires_grad=True)
    x0(g).backward()
    h = 1e-9  # moves x_0 by 1e-8: its bound stays inactive
    with torch.no_grad():
        step = torch.tensor([h, 0.0], dtype=torch.float64)
        fd = (x0(g + step) - x0(g - step)) / (2 * h)
    assert float(fd) == pytest.approx(-10.0, rel=1e-3)
    assert float(g.grad[0]) == pytest.approx(float(fd), rel=1e-3)
