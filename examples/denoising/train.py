"""Train the TV-denoising QP layer (OptNet Sec. 4.2, QPLayer paper App. C.2.2) with alqp and qpth.

    python examples/denoising/train.py                # reduced: signals of 30, 1500/300 signals, 5 epochs
    python examples/denoising/train.py --full         # the paper's size: 100, 9000/1000, 20 epochs
    python examples/denoising/train.py --solver alqp  # one solver only (alqp | qpth | all)

Both solvers train the same model (:class:`models.DenoisingQP`) from the same start on the same
batches (batch 150, Adam, lr 1e-5, loss MSE + 0.1 ||D||_1 as in OptNet's learn-D run). Writes
``<out>/denoising.json`` (configuration, per-epoch test MSE, ms per batch) and
``<out>/denoising.png`` (test MSE per epoch; a noisy, a denoised and a true test signal).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common
import models

FULL = {"length": 100, "train": 9000, "test": 1000, "epochs": 20}
REDUCED = {"length": 30, "train": 1500, "test": 300, "epochs": 5}


def mse(out: models.DenoisingOutput, clean: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the denoised signals (B, n) against the clean ones."""
    return (out.y - clean).square().mean()


def make_data(length: int, n_train: int, n_test: int, seed: int) -> tuple:
    """(train, test) :class:`models.Signals` from one seeded generator (test drawn after train)."""
    both = models.make_signals(n_train + n_test, length, seed)
    return (
        models.Signals(both.noisy[:n_train], both.clean[:n_train]),
        models.Signals(both.noisy[n_train:], both.clean[n_train:]),
    )


def run_solver(
    solver: str,
    train: models.Signals,
    test: models.Signals,
    *,
    optimizer: str = "adam",
    lr: float = 1e-5,
    epochs: int = 5,
    batch: int = 150,
    d_penalty: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> tuple:
    """Train a fresh :class:`models.DenoisingQP` (D drawn from ``seed``) with ``solver``.

    Returns ``(model, run)`` with ``run`` as :func:`common.train_loop` returns it.
    """
    torch.manual_seed(seed)
    model = models.DenoisingQP(train.noisy.shape[1], solver, seed=seed)
    opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr)
    run = common.train_loop(
        model,
        opt,
        mse,
        tuple(train),
        tuple(test),
        batch=batch,
        epochs=epochs,
        seed=seed,
        penalty_fn=(lambda: d_penalty * model.D.abs().sum()) if d_penalty else None,
        test_batch=max(batch, 100),
        desc=f"denoising {solver}",
        progress=progress,
    )
    return model, run


def plot(results: dict, example: dict, path: str) -> None:
    """Test MSE per epoch for every solver, and one test signal: noisy, denoised (each solver), true."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for solver, res in results.items():
        hist = res["history"]
        ax1.plot(
            [h["epoch"] for h in hist],
            [h["test_loss"] for h in hist],
            marker="o",
            ls="--" if solver == "qpth" else "-",
            label=solver,
        )
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test MSE (signal units$^2$)")
    ax1.set_title("denoising: test MSE")
    ax1.legend()
    t = range(len(example["noisy"]))
    ax2.plot(t, example["noisy"], color="0.6", lw=1, label="noisy")
    ax2.plot(t, example["clean"], color="k", lw=2, label="true")
    for solver, y in example["denoised"].items():
        ax2.plot(t, y, lw=1.5, ls="--" if solver == "qpth" else "-", label=f"denoised ({solver})")
    ax2.set_xlabel("sample index")
    ax2.set_ylabel("signal value")
    ax2.set_title("a test signal")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list | None = None):
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="all", help="alqp, qpth or all (default: all, in one process)")
    p.add_argument("--full", action="store_true", help="the paper's size: length 100, 9000/1000 signals, 20 epochs")
    p.add_argument("--length", type=int, help="signal length (reduced default 30)")
    p.add_argument("--train", type=int, help="training signals (reduced default 1500)")
    p.add_argument("--test", type=int, help="test signals (reduced default 300)")
    p.add_argument("--epochs", type=int, help="epochs (reduced default 5)")
    p.add_argument("--batch", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--d-penalty", type=float, default=0.1, help="weight of ||D||_1 in the training loss (OptNet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="results/denoising", help="folder of denoising.json and denoising.png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    size = FULL if args.full else REDUCED
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.solvers = common.parse_solvers(args.solver)
    return args


def main(argv: list | None = None) -> dict:
    """Run the example; returns what it writes to denoising.json."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = make_data(args.length, args.train, args.test, args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    print(
        f"denoising: {args.train}/{args.test} signals of length {args.length}, batch {args.batch}, "
        f"{args.epochs} epochs, {args.optimizer} lr {args.lr:g}, solvers {args.solvers}"
    )
    results, summary, example = (
        {},
        {},
        {"noisy": test.noisy[0].tolist(), "clean": test.clean[0].tolist(), "denoised": {}},
    )
    t0 = time.perf_counter()
    for solver in args.solvers:
        model, run = run_solver(
            solver,
            train,
            test,
            optimizer=args.optimizer,
            lr=args.lr,
            epochs=args.epochs,
            batch=args.batch,
            d_penalty=args.d_penalty,
            seed=args.seed,
            progress=not args.no_progress,
        )
        results[solver] = run
        summary[solver] = common.summarize_run(run)
        with torch.no_grad():
            example["denoised"][solver] = model(test.noisy[:1]).y[0].tolist()
    config["wall_s"] = time.perf_counter() - t0
    payload = {
        "config": config,
        "summary": summary,
        "results": results,
        "example": example,
        "noisy_test_mse": float((test.noisy - test.clean).square().mean()),
    }
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, "denoising.json"), payload)
    plot(results, example, os.path.join(args.out, "denoising.png"))
    print(
        common.timing_table(
            [dict(solver=s, **v) for s, v in summary.items()],
            [
                ("solver", lambda r: r["solver"]),
                (
                    "final test MSE",
                    lambda r: f"{r['final_test_loss']:.2f}" if r["final_test_loss"] is not None else "nan",
                ),
                (
                    "forward ms (median, mean ± std)",
                    lambda r: (
                        f"{r['forward_ms']['median']:.1f}, {r['forward_ms']['mean']:.1f} ± {r['forward_ms']['std']:.1f}"
                    ),
                ),
                (
                    "backward ms (median, mean ± std)",
                    lambda r: (
                        f"{r['backward_ms']['median']:.1f}, "
                        f"{r['backward_ms']['mean']:.1f} ± {r['backward_ms']['std']:.1f}"
                    ),
                ),
                ("unsolved QPs", lambda r: str(r["unsolved"])),
                ("failed", lambda r: str(r["failure"] or "no")),
            ],
        )
    )
    print(
        f"noisy-input test MSE {payload['noisy_test_mse']:.2f}; wrote {args.out}/denoising.json and denoising.png "
        f"({config['wall_s']:.0f} s)"
    )
    return payload


if __name__ == "__main__":
    main()
