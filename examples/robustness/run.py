"""Training with large learning rates (QPLayer paper, App. C.3, Figure 10): alqp against qpth.

    python examples/robustness/run.py            # reduced: 2 seeds, small data, a few epochs (~5 min here)
    python examples/robustness/run.py --denoising-lrs 1e-2,1e-3 --classification-lrs 1,0.1   # beyond the paper's
    python examples/robustness/run.py --full     # the paper's: 10 seeds, full-size tasks, 30 epochs
    python examples/robustness/run.py --task classification --seeds 5

Both tasks are trained with plain SGD (no momentum) at the paper's learning rates: denoising at
1e-4, 1e-5, 1e-6, 1e-7 and classification at 1e-2, 1e-3, 1e-4, each for every seed with alqp and
with qpth, from the same start on the same batches.

A run FAILS when its training loss or a gradient is not finite, when the solver raises (qpth does
on a singular system), or, for alqp, when any QP of the run ends with a status other than SOLVED.
For every learning rate and solver the output gives the number of failed runs, the mean final test
loss (with a 95% confidence interval over the runs that did not fail) and the mean over runs of the
standard deviation of the test loss over the last epochs. Writes ``<out>/robustness.json`` and
``<out>/robustness.png`` (grouped bars in the style of the paper's Figure 10).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.dirname(HERE)
sys.path.insert(0, EXAMPLES)
import common

LEARNING_RATES = {"denoising": [1e-4, 1e-5, 1e-6, 1e-7], "classification": [1e-2, 1e-3, 1e-4]}

#: Sizes. Denoising full: OptNet's data (length 100, 9000/1000); classification full: the data given
#: by --data for 30 epochs. The paper: 30 epochs, std over the last 10, 10 seeds.
SIZES = {
    "reduced": {
        "seeds": 2,
        "last": 3,
        "denoising": {"length": 20, "train": 600, "test": 150, "epochs": 4},
        "classification": {"train_limit": None, "epochs": 10},
    },
    "full": {
        "seeds": 10,
        "last": 10,
        "denoising": {"length": 100, "train": 9000, "test": 1000, "epochs": 30},
        "classification": {"train_limit": None, "epochs": 30},
    },
}


def load_task(name: str):
    """Import ``examples/<name>/train.py`` as a module of its own.

    The examples' modules share names (models, data, train); the ones already imported under those
    names (another example's) are put back afterwards, so this loader leaves sys.modules as it was.
    """
    shared = ("models", "data", "train")
    before = {k: sys.modules.pop(k) for k in shared if k in sys.modules}
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_train", os.path.join(EXAMPLES, name, "train.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k in shared:
            sys.modules.pop(k, None)
        sys.modules.update(before)
    return module


def run_task(
    task: str, lrs: list, solvers: list, seeds: int, size: dict, last: int, data_source: str, progress: bool
) -> list:
    """Every (learning rate in ``lrs``, solver, seed) run of ``task``; returns one summary dict per run."""
    from tqdm import tqdm

    module = load_task(task)
    cfg = size[task]
    if task == "denoising":
        train, test = module.make_data(cfg["length"], cfg["train"], cfg["test"], seed=0)
    else:
        train, test = module.data.load(data_source, seed=0)
        if cfg["train_limit"]:
            train = module.data.Digits(train.x[: cfg["train_limit"]], train.y[: cfg["train_limit"]])
    jobs = [(lr, solver, seed) for lr in lrs for solver in solvers for seed in range(seeds)]
    rows = []
    for lr, solver, seed in tqdm(jobs, desc=f"robustness {task}", disable=not progress, dynamic_ncols=True):
        kwargs = {"optimizer": "sgd", "lr": lr, "epochs": cfg["epochs"], "seed": seed, "progress": False}
        if task == "denoising":
            kwargs["d_penalty"] = 0.0  # the data loss only: the study is about the QP layer
        _, run = module.run_solver(solver, train, test, **kwargs)
        summary = common.summarize_run(run, last=last)
        rows.append({"task": task, "lr": lr, "solver": solver, "seed": seed, **summary, "history": run["history"]})
        tqdm.write(
            f"[{task}] lr {lr:g} {solver} seed {seed}: final test loss {summary['final_test_loss']:.4g}"
            f"  unsolved {summary['unsolved']}  {'FAILED: ' + summary['failure'] if summary['failure'] else ''}"
        )
    return rows


def aggregate(rows: list) -> list:
    """Per (task, lr, solver): failed runs, mean final loss with 95% CI, mean of last-epoch std with 95% CI."""
    out = []
    keys = sorted({(r["task"], r["lr"], r["solver"]) for r in rows}, key=lambda k: (k[0], -k[1], k[2]))
    for task, lr, solver in keys:
        group = [r for r in rows if (r["task"], r["lr"], r["solver"]) == (task, lr, solver)]
        failed = [r for r in group if r["failed"] or r["unsolved"] > 0]
        ok = [r for r in group if not r["failed"]]
        loss = common.stats(r["final_test_loss"] for r in ok)
        std = common.stats(r["test_loss_std_last"] for r in ok)

        def ci(s):
            return 1.96 * s["std"] / math.sqrt(s["n"]) if s["n"] > 1 else math.nan

        out.append(
            {
                "task": task,
                "lr": lr,
                "solver": solver,
                "runs": len(group),
                "failed_runs": len(failed),
                "nan_or_raised": sum(r["failed"] for r in group),
                "unsolved_qps": sum(r["unsolved"] for r in group),
                "final_loss_mean": loss["mean"],
                "final_loss_ci95": ci(loss),
                "std_last_mean": std["mean"],
                "std_last_ci95": ci(std),
                "final_error_mean": common.stats(
                    r["final_test_error"] for r in ok if r["final_test_error"] is not None
                )["mean"],
            }
        )
    return out


def plot(table: list, path: str) -> None:
    """Figure-10-style grouped bars per task: failed runs, mean final loss and mean std, qpth vs alqp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t in LEARNING_RATES if any(r["task"] == t for r in table)]
    rates = {t: sorted({r["lr"] for r in table if r["task"] == t}, reverse=True) for t in tasks}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5.2), squeeze=False)
    series = [
        ("failed_runs", None, "qpth", "qpth (OptNet) failed runs"),
        ("failed_runs", None, "alqp", "alqp failed runs"),
        ("final_loss_mean", "final_loss_ci95", "qpth", "qpth final loss mean"),
        ("final_loss_mean", "final_loss_ci95", "alqp", "alqp final loss mean"),
        ("std_last_mean", "std_last_ci95", "qpth", "qpth std (last epochs) mean"),
        ("std_last_mean", "std_last_ci95", "alqp", "alqp std (last epochs) mean"),
    ]
    colors = ["tab:red", "tab:blue", "lightcoral", "lightsteelblue", "darkred", "navy"]
    for ax, task in zip(axes[0], tasks):
        lrs = rates[task]
        width = 0.8 / len(series)
        for k, ((key, err, solver, label), color) in enumerate(zip(series, colors)):
            vals, errs = [], []
            for lr in lrs:
                row = next((r for r in table if r["task"] == task and r["lr"] == lr and r["solver"] == solver), None)
                vals.append(np.nan if row is None or row[key] is None else row[key])
                errs.append(0.0 if row is None or err is None or not np.isfinite(row[err] or np.nan) else row[err])
            x = np.arange(len(lrs)) + (k - len(series) / 2 + 0.5) * width
            lower = [min(e, v) if np.isfinite(v) else 0.0 for e, v in zip(errs, vals)]  # the axis starts at 0
            ax.bar(x, vals, width, yerr=[lower, errs], color=color, label=label, capsize=2)
        for j, lr in enumerate(lrs):  # failed-run counts, readable where the bars have height 0
            counts = [
                next(
                    (
                        f"{r['failed_runs']}/{r['runs']}"
                        for r in table
                        if r["task"] == task and r["lr"] == lr and r["solver"] == s
                    ),
                    "-",
                )
                for s in ("qpth", "alqp")
            ]
            ax.annotate(
                f"failed: qpth {counts[0]}, alqp {counts[1]}",
                (j, 0),
                xytext=(0, -28),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
        ax.set_xticks(np.arange(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("SGD learning rate", labelpad=14)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("failed runs (count) / test loss" + (" (MSE)" if task == "denoising" else " (NLL)"))
        ax.set_title(f"robustness: {task}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list | None = None):
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("denoising", "classification", "all"), default="all")
    p.add_argument("--solver", default="all", help="alqp, qpth or all")
    p.add_argument("--full", action="store_true", help="10 seeds, full-size tasks, 30 epochs (hours)")
    p.add_argument("--seeds", type=int, help="seeds per (learning rate, solver) (reduced default 2, full 10)")
    p.add_argument("--epochs", type=int, help="override the epochs of both tasks")
    p.add_argument("--denoising-lrs", help="comma list replacing the paper's denoising learning rates")
    p.add_argument("--classification-lrs", help="comma list replacing the paper's classification learning rates")
    p.add_argument("--data", default="digits", help="classification data: digits, synthetic or an IDX folder")
    p.add_argument("--out", default="results/robustness", help="folder of robustness.json and robustness.png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.solvers = common.parse_solvers(args.solver)
    return args


def main(argv: list | None = None) -> dict:
    """Run the study; returns what it writes to robustness.json."""
    import copy

    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = copy.deepcopy(SIZES["full" if args.full else "reduced"])
    seeds = args.seeds or size["seeds"]
    if args.epochs:
        for task in LEARNING_RATES:
            size[task]["epochs"] = args.epochs
    rates = dict(LEARNING_RATES)
    for task in LEARNING_RATES:
        given = getattr(args, f"{task}_lrs")
        if given:
            try:
                rates[task] = sorted((float(v) for v in given.split(",")), reverse=True)
            except ValueError:
                raise ValueError(f"--{task}-lrs must be a comma list of numbers, got {given!r}") from None
    tasks = list(LEARNING_RATES) if args.task == "all" else [args.task]
    t0 = time.perf_counter()
    rows = []
    for task in tasks:
        rows += run_task(task, rates[task], args.solvers, seeds, size, size["last"], args.data, not args.no_progress)
    table = aggregate(rows)
    config = {
        "tasks": tasks,
        "learning_rates": {t: rates[t] for t in tasks},
        "solvers": args.solvers,
        "seeds": seeds,
        "sizes": {t: size[t] for t in tasks},
        "std_over_last_epochs": size["last"],
        "optimizer": "sgd",
        "data": args.data,
        "wall_s": time.perf_counter() - t0,
    }
    payload = {"config": config, "table": table, "runs": rows}
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, "robustness.json"), payload)
    plot(table, os.path.join(args.out, "robustness.png"))

    def fmt(v, spec):
        return "nan" if v is None or not math.isfinite(v) else format(v, spec)

    print(
        common.timing_table(
            table,
            [
                ("task", lambda r: r["task"]),
                ("lr", lambda r: f"{r['lr']:g}"),
                ("solver", lambda r: r["solver"]),
                ("failed runs", lambda r: f"{r['failed_runs']}/{r['runs']}"),
                ("NaN or raised", lambda r: str(r["nan_or_raised"])),
                ("unsolved QPs", lambda r: str(r["unsolved_qps"])),
                (
                    "final test loss (mean ± 95% CI)",
                    lambda r: f"{fmt(r['final_loss_mean'], '.4g')} ± {fmt(r['final_loss_ci95'], '.2g')}",
                ),
                ("std last epochs (mean)", lambda r: fmt(r["std_last_mean"], ".3g")),
            ],
        )
    )
    print(f"wrote {args.out}/robustness.json and robustness.png ({config['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
