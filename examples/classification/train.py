"""Train OptNet's classifier (FC layers, then a QP layer learning H, g, C, u) with alqp and qpth.

    python examples/classification/train.py                   # reduced: scikit-learn's 8x8 digits
    python examples/classification/train.py --data MNIST/     # the paper's size: MNIST's IDX files
    python examples/classification/train.py --data synthetic  # where scikit-learn is not installed

The reduced default is the data set (1497 training images of 8x8 pixels instead of MNIST's 60000 of
28x28); the schedule is the paper's in both: 30 epochs.

OptNet Sec. 4.3 / QPLayer paper App. C.2.2: batch 64, Adam lr 1e-3, negative log-likelihood loss.
Both solvers train the same model (:class:`models.OptNetClassifier`) from the same start on the same
batches. Writes ``<out>/classification.json`` (configuration, per-epoch test loss and error, ms per
batch) and ``<out>/classification.png`` (test loss and test error per epoch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common
import data
import models


def nll(out: models.ClassifierOutput, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the labels (B,) under the model's log-probabilities (B, 10)."""
    return F.nll_loss(out.log_probs, labels)


def error_rate(out: models.ClassifierOutput, labels: torch.Tensor) -> float:
    """Fraction of the batch whose most likely class is not its label."""
    return float((out.log_probs.argmax(1) != labels).double().mean())


def run_solver(
    solver: str,
    train: data.Digits,
    test: data.Digits,
    *,
    optimizer: str = "adam",
    lr: float = 1e-3,
    epochs: int = 10,
    batch: int = 64,
    hidden: int = 500,
    nineq: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> tuple:
    """Train a fresh :class:`models.OptNetClassifier` (initialized from ``seed``) with ``solver``.

    Returns ``(model, run)`` with ``run`` as :func:`common.train_loop` returns it.
    """
    model = models.OptNetClassifier(train.x.shape[1], hidden=hidden, nineq=nineq, solver=solver, seed=seed)
    opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr)
    run = common.train_loop(
        model,
        opt,
        nll,
        tuple(train),
        tuple(test),
        batch=batch,
        epochs=epochs,
        seed=seed,
        error_fn=error_rate,
        test_batch=max(batch, 500),
        desc=f"classification {solver}",
        progress=progress,
    )
    return model, run


def plot(results: dict, path: str) -> None:
    """Test loss and test error per epoch, one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for solver, res in results.items():
        hist = res["history"]
        epochs = [h["epoch"] for h in hist]
        ls = "--" if solver == "qpth" else "-"
        ax1.plot(epochs, [h["test_loss"] for h in hist], marker="o", ls=ls, label=solver)
        ax2.plot(
            epochs,
            [100 * h["test_error"] if h["test_error"] is not None else float("nan") for h in hist],
            marker="o",
            ls=ls,
            label=solver,
        )
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test loss (NLL, nats)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test error (%)")
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle("OptNet classifier: FC layers + QP layer (H, g, C, u learned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list | None = None):
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="all", help="alqp, qpth or all (default: all, in one process)")
    p.add_argument(
        "--data", default="digits", help="digits (scikit-learn's 8x8), synthetic, or a folder of MNIST IDX files"
    )
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30, the paper's)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images (smoke runs)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--hidden", type=int, default=500, help="width of the first FC layer (OptNet: 500)")
    p.add_argument("--nineq", type=int, default=10, help="inequality rows of the QP (OptNet: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="results/classification", help="folder of classification.json and .png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.solvers = common.parse_solvers(args.solver)
    return args


def main(argv: list | None = None) -> dict:
    """Run the example; returns what it writes to classification.json."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = data.load(args.data, args.seed)
    if args.train_limit:
        train = data.Digits(train.x[: args.train_limit], train.y[: args.train_limit])
    config = {k: v for k, v in vars(args).items() if k != "no_progress"}
    config.update(n_train=int(train.x.shape[0]), n_test=int(test.x.shape[0]), pixels=int(train.x.shape[1]))
    print(
        f"classification: {args.data}, {config['n_train']}/{config['n_test']} images of {config['pixels']} "
        f"pixels, batch {args.batch}, {args.epochs} epochs, {args.optimizer} lr {args.lr:g}, solvers {args.solvers}"
    )
    results, summary = {}, {}
    t0 = time.perf_counter()
    for solver in args.solvers:
        _, run = run_solver(
            solver,
            train,
            test,
            optimizer=args.optimizer,
            lr=args.lr,
            epochs=args.epochs,
            batch=args.batch,
            hidden=args.hidden,
            nineq=args.nineq,
            seed=args.seed,
            progress=not args.no_progress,
        )
        results[solver] = run
        summary[solver] = common.summarize_run(run)
    config["wall_s"] = time.perf_counter() - t0
    payload = {"config": config, "summary": summary, "results": results}
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, "classification.json"), payload)
    plot(results, os.path.join(args.out, "classification.png"))
    print(
        common.timing_table(
            [dict(solver=s, **v) for s, v in summary.items()],
            [
                ("solver", lambda r: r["solver"]),
                (
                    "final test loss",
                    lambda r: f"{r['final_test_loss']:.4f}" if r["final_test_loss"] is not None else "nan",
                ),
                (
                    "final test error",
                    lambda r: f"{100 * r['final_test_error']:.2f}%" if r["final_test_error"] is not None else "nan",
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
    print(f"wrote {args.out}/classification.json and classification.png ({config['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
