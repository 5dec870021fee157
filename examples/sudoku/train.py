"""Learn the rules of Sudoku with a QP/LP layer (QPLayer paper, Sec. 4.1; OptNet, Sec. 4.4).

Trains each chosen model (see :mod:`models`) on generated puzzles (see :mod:`data`) with Adam and an
MSE loss on the one-hot solution; the LP model adds ``shift_weight * ||s||^2`` (mean over the batch)
for the closest-feasible shift s. After every epoch it measures on the test set:

- board errors: boards whose argmax digits break a row, column or box rule (OptNet's metric);
- violation: mean over boards of ||A x - 1||_2 with the learned A and the layer's x, i.e. how far
  the learned equality rows are from being satisfied with the Sudoku right-hand side 1;
- the time per training batch of the forward pass and of loss.backward().

It writes ``<out>/sudoku.json`` (configuration, per-epoch history, summary) and ``<out>/sudoku.png``
(test loss, board errors and violation per epoch, one line per model) and prints a table.

    python examples/sudoku/train.py                                   # the full 4x4 run: 20 epochs, 9000/1000
    python examples/sudoku/train.py --demo                            # the README's short run, 2 to 3 minutes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch
from torch import nn

import alqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import SudokuData, board_errors, decode, load_or_generate, sudoku_constraints  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402

LABELS = {"lp": "LP, A learned, infeasible training (alqp)",
          "optnet": "OptNet QP (alqp)",
          "qpth": "OptNet QP (qpth)"}


def batch_loss(model_name: str, out, target: torch.Tensor, shift_weight: float) -> torch.Tensor:
    """MSE against the one-hot solution, plus ``shift_weight * mean ||s||^2`` for the LP model.

    s is the whole closest-feasible shift, equality rows and bounds x >= 0 together: the solver may
    relax either, so penalizing only the equality part would let infeasibility hide in x < 0.
    """
    loss = nn.functional.mse_loss(out.x, target)
    if model_name == "lp":
        loss = loss + shift_weight * (out.shift.pow(2).sum(1) + out.shift_in.pow(2).sum(1)).mean()
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, data: SudokuData, n: int, batch: int, rules: torch.Tensor) -> dict:
    """Test metrics of ``model`` over ``data`` (sums and means over all boards).

    Returns:
        dict with loss (mean MSE), errors (boards breaking a rule), wrong (boards differing from
        the solution), violation (mean ||A x - 1||_2, learned A), rule_violation (mean ||A* x - 1||_2
        with the true Sudoku rules A*), unsolved (QPs whose status is neither SOLVED nor
        CLOSEST_FEASIBLE).
    """
    total = {"loss": 0.0, "errors": 0, "wrong": 0, "violation": 0.0, "rule_violation": 0.0, "shift_in": 0.0,
             "unsolved": 0}
    B = data.puzzles.shape[0]
    for i in range(0, B, batch):
        puzzles, target = data.puzzles[i:i + batch], data.solutions[i:i + batch]
        out = model(puzzles)
        x = out.x.reshape(out.x.shape[0], -1)
        boards = decode(x, n)
        total["loss"] += nn.functional.mse_loss(out.x, target, reduction="sum").item() / target[0].numel()
        total["errors"] += int(board_errors(boards, n).sum())
        total["wrong"] += int((boards != decode(target, n)).flatten(1).any(1).sum())
        total["violation"] += (x @ model.A.T - 1).norm(dim=1).sum().item()
        total["rule_violation"] += (x @ rules.T - 1).norm(dim=1).sum().item()
        total["shift_in"] += out.shift_in.norm(dim=1).sum().item()
        total["unsolved"] += int((out.status > int(alqp.Status.CLOSEST_FEASIBLE)).sum())
    for key in ("loss", "violation", "rule_violation", "shift_in"):
        total[key] /= B
    return total


def clip_outlier_gradient(model: nn.Module, history: list, factor: float, warmup: int = 20,
                          memory: int = 100) -> None:
    """Scale the gradient down to ``factor`` times the median norm of the last ``memory`` steps.

    Why: OptNet's Sudoku runs jump where a single batch's gradient is 5 to 10 times the usual one
    (docs/results/sudoku-jumps.md); Adam's first moment then carries that batch's direction for
    several steps while its second moment, averaged over about 1000 steps, hardly grows. The bound is
    relative to the run's own gradients, so it does not depend on the loss's scale (qpth's mean
    against alqp's sum of the shared parameters' gradients). Appends the unclipped norm to ``history``.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if len(history) >= warmup:
        recent = sorted(history[-memory:])
        bound = factor * recent[len(recent) // 2]
        if norm > bound:
            for g in grads:
                g.mul_(bound / norm)
    history.append(norm)


def train_one(name: str, args, train: SudokuData, test: SudokuData, settings: alqp.Settings) -> dict:
    """Train model ``name`` for ``args.epochs`` epochs; returns its per-epoch history."""
    from tqdm import tqdm

    n, device = args.box, torch.device(args.device)
    model = build_model(name, n, settings=settings, backward=args.backward, q_penalty=args.q_penalty,
                        seed=args.seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rules = sudoku_constraints(n).to(device)
    history = []

    def log_epoch(epoch: int, row: dict) -> None:
        row.update({f"test_{k}": v for k, v in evaluate(model, test, n, args.test_batch, rules).items()})
        row["epoch"] = epoch
        history.append(row)
        tqdm.write(f"[{name}] epoch {epoch:2d}  test loss {row['test_loss']:.2e}  errors "
                   f"{row['test_errors']:4d}/{test.puzzles.shape[0]}  violation {row['test_violation']:.2e}"
                   + (f"  fwd {row['forward_ms']:.0f} ms  bwd {row['backward_ms']:.0f} ms" if epoch else ""))

    log_epoch(0, {})
    g = torch.Generator().manual_seed(args.seed)
    # --capture: per training step, the parameters before the step, the batch, the gradients and the
    # update, so that diagnose_jumps.py can rebuild and re-solve exactly the QPs of any step.
    capture = [] if args.capture else None
    grad_norms = []  # the gradient norm of every step so far (before clipping), for --clip-outliers
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(train.puzzles.shape[0], generator=g)
        fwd, bwd, losses, errors, unsolved, retried = [], [], [], 0, 0, 0
        bar = tqdm(range(0, len(order), args.batch), desc=f"{name} epoch {epoch}/{args.epochs}",
                   leave=False, dynamic_ncols=True, disable=args.no_progress)
        for i in bar:
            idx = order[i:i + args.batch]
            puzzles, target = train.puzzles[idx], train.solutions[idx]
            optimizer.zero_grad()
            t0 = time.perf_counter()
            out = model(puzzles)
            loss = batch_loss(name, out, target, args.shift_weight)
            t1 = time.perf_counter()
            (loss * args.loss_scale).backward()
            t2 = time.perf_counter()
            if args.clip_outliers:
                clip_outlier_gradient(model, grad_norms, args.clip_outliers)
            if capture is not None:
                before = {k: p.detach().clone() for k, p in model.named_parameters()}
            optimizer.step()
            if capture is not None:
                capture.append({"epoch": epoch, "step": len(fwd), "idx": idx.clone(), "loss": loss.item(),
                                "params": before,
                                "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()},
                                "update": {k: p.detach() - before[k] for k, p in model.named_parameters()},
                                "status": out.status.clone(), "attempt": out.attempt.clone()})
            fwd.append(1e3 * (t1 - t0))
            bwd.append(1e3 * (t2 - t1))
            losses.append(loss.item())
            errors += int(board_errors(decode(out.x.detach(), n), n).sum())
            unsolved += int((out.status > int(alqp.Status.CLOSEST_FEASIBLE)).sum())
            retried += int((out.attempt > 0).sum())
            bar.set_postfix(loss=f"{loss.item():.3e}", fwd_ms=f"{fwd[-1]:.0f}", bwd_ms=f"{bwd[-1]:.0f}")
        log_epoch(epoch, {"train_loss": sum(losses) / len(losses), "train_errors": errors,
                          "train_unsolved": unsolved, "train_retried": retried, "forward_ms": sum(fwd) / len(fwd),
                          "backward_ms": sum(bwd) / len(bwd), "forward_ms_all": fwd, "backward_ms_all": bwd})
    if capture is not None:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"capture-{name}.pt")
        torch.save({"model": name, "args": vars(args), "steps": capture,
                    "final": {k: p.detach().clone() for k, p in model.named_parameters()}}, path)
        tqdm.write(f"[{name}] captured {len(capture)} steps in {path}")
    return {"label": LABELS[name], "history": history}


def summarize(name: str, result: dict, last: int = 5) -> dict:
    """Final-epoch metrics, errors summed over the last ``last`` epochs, mean times over all epochs."""
    hist = result["history"]
    final, trained = hist[-1], hist[1:]
    fwd = [t for h in trained for t in h["forward_ms_all"]]
    bwd = [t for h in trained for t in h["backward_ms_all"]]

    def std(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((t - m) ** 2 for t in v) / max(len(v) - 1, 1))

    return {"model": name, "label": result["label"], "test_errors": final["test_errors"],
            "test_errors_last5": sum(h["test_errors"] for h in trained[-last:]),
            "test_wrong": final["test_wrong"], "test_loss": final["test_loss"],
            "violation": final["test_violation"], "rule_violation": final["test_rule_violation"],
            "forward_ms": sum(fwd) / len(fwd) if fwd else float("nan"), "forward_ms_std": std(fwd) if fwd else 0.0,
            "backward_ms": sum(bwd) / len(bwd) if bwd else float("nan"), "backward_ms_std": std(bwd) if bwd else 0.0,
            "unsolved": sum(h.get("train_unsolved", 0) for h in trained) + sum(h["test_unsolved"] for h in hist)}


def table(rows: list[dict], n_test: int) -> str:
    """A Markdown table of the summaries."""
    head = ("| model | test errors (final) | errors, last 5 epochs | test MSE | violation ‖Ax−1‖ (learned A) "
            "| rule violation ‖A*x−1‖ (true rules) "
            "| forward ms/batch | backward ms/batch | unsolved QPs |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['label']} | {r['test_errors']}/{n_test} | {r['test_errors_last5']} | {r['test_loss']:.2e} "
        f"| {r['violation']:.1e} | {r['rule_violation']:.1e} | {r['forward_ms']:.0f} ± {r['forward_ms_std']:.0f} "
        f"| {r['backward_ms']:.0f} ± {r['backward_ms_std']:.0f} | {r['unsolved']} |\n" for r in rows)


def plot(results: dict, path: str) -> None:
    """Test loss, test board errors and violation per epoch, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("test_loss", "test MSE", "log"), ("test_errors", "test board errors", "symlog"),
              ("test_violation", "violation mean ‖Ax − 1‖₂ (test)", "log")]
    for ax, (key, title, scale) in zip(axes, panels):
        for res in results.values():
            epochs = [h["epoch"] for h in res["history"]]
            values = [h[key] for h in res["history"]]
            if scale == "log":  # an exact zero has no place on a log axis: floor it visibly
                values = [max(v, 1e-12) for v in values]
            ax.plot(epochs, values, marker="o", ms=3, label=res["label"])
        ax.set_yscale(scale)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[list] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lp,optnet,qpth",
                   help=f"comma-separated, from {MODEL_NAMES}; qpth is skipped when not installed")
    p.add_argument("--box", type=int, default=2, help="box size n: 2 for 4x4 boards (default), 3 for 9x9")
    p.add_argument("--train", type=int, default=9000, help="training puzzles")
    p.add_argument("--test", type=int, default=1000, help="test puzzles")
    p.add_argument("--max-blanks", type=int, default=None, help="cap on blanks per puzzle (default: minimal puzzles)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=150)
    p.add_argument("--test-batch", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (the QPLayer paper's 0.05)")
    p.add_argument("--shift-weight", type=float, default=1.0, help="weight of mean ||s||^2 in the LP model's loss")
    p.add_argument("--q-penalty", type=float, default=0.1, help="quadratic term of the OptNet models")
    p.add_argument("--backward", default="ift", choices=["ift", "lpgd"], help="alqp's backward engine")
    p.add_argument("--eps-abs", type=float, default=1e-9, help="alqp's absolute tolerance")
    p.add_argument("--mu-min", type=float, default=1e-5, help="alqp's floor on the penalties")
    p.add_argument("--rho", type=float, default=1e-4, help="alqp's proximal weight")
    p.add_argument("--max-iter", type=int, default=200, help="alqp's outer-iteration budget")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, of A's initialization and of the batch order")
    p.add_argument("--out", default="results/sudoku", help="folder of sudoku.json and sudoku.png")
    p.add_argument("--data-cache", default=None, help="folder to memoize generated puzzles in")
    p.add_argument("--loss-scale", type=float, default=1.0,
                   help="multiply the training loss by this before backward (1/batch on alqp reproduces qpth's "
                        "gradient scale: qpth returns the batch mean of a shared parameter's gradient, alqp the sum)")
    p.add_argument("--clip-outliers", type=float, default=0.0,
                   help="clip each step's gradient norm to this many times the median of the last 100 steps' "
                        "(0: off; 3 halves the largest test-error spikes of OptNet's model over three seeds, see "
                        "docs/results/sudoku-jumps.md)")
    p.add_argument("--capture", action="store_true",
                   help="save every training step (parameters before it, batch indices, gradients, update, "
                        "statuses) to <out>/capture-<model>.pt, for diagnose_jumps.py")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (per-epoch lines only)")
    p.add_argument("--demo", action="store_true",
                   help="the README's short run: the LP model and OptNet's model on alqp, 9000 train / 1000 "
                        "test puzzles, 10 epochs, eps_abs 1e-6, out results/sudoku-demo (2 to 3 minutes on a "
                        "2-core CPU; the LP model ends up solving most test puzzles)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="train nothing: combine the models of these sudoku.json files (e.g. runs made in "
                        "parallel processes) into <out>/sudoku.json and sudoku.png, and print the table")
    args = p.parse_args(argv)
    if args.demo:
        # The demo's values are defaults: options given on the command line still win.
        # (qpth is left out: on this data it takes about 50 s an epoch, alqp's models 5 to 10.)
        p.set_defaults(models="lp,optnet", train=9000, test=1000, epochs=10, eps_abs=1e-6, lr=0.05,
                       out="results/sudoku-demo")
        args = p.parse_args(argv)
    return args


def merge(paths: list, out: str) -> dict:
    """Combine the results of several sudoku.json files (later files win on a repeated model)."""
    results, configs = {}, []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        results.update(saved["results"])
        configs.append(saved["config"])
    summary = [summarize(name, res) for name, res in results.items()]
    os.makedirs(out, exist_ok=True)
    merged = {"config": {"merged_from": paths, "configs": configs}, "summary": summary, "results": results}
    with open(os.path.join(out, "sudoku.json"), "w") as f:
        json.dump(merged, f, indent=1)
    plot(results, os.path.join(out, "sudoku.png"))
    print(table(summary, configs[0]["test"]))
    print(f"merged {len(paths)} runs; wrote {out}/sudoku.json and sudoku.png")
    return merged


def main(argv: Optional[list] = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODEL_NAMES:
            raise SystemExit(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    if "qpth" in names:
        try:
            import qpth  # noqa: F401
        except ImportError:
            print("qpth is not installed: skipping the qpth baseline")
            names.remove("qpth")

    t0 = time.perf_counter()
    data = load_or_generate(args.train + args.test, args.box, args.seed, args.data_cache, args.max_blanks)
    device = torch.device(args.device)
    train = SudokuData(data.puzzles[:args.train].to(device), data.solutions[:args.train].to(device))
    test = SudokuData(data.puzzles[args.train:].to(device), data.solutions[args.train:].to(device))
    N = args.box ** 2
    print(f"{args.train} train / {args.test} test {N}x{N} puzzles, "
          f"{float(data.puzzles.flatten(1).sum(1).mean()):.2f} givens on average "
          f"(generated in {time.perf_counter() - t0:.1f} s)")

    settings = alqp.Settings(eps_abs=args.eps_abs, mu_min=args.mu_min, rho=args.rho, max_iter=args.max_iter)
    results = {name: train_one(name, args, train, test, settings) for name in names}
    summary = [summarize(name, res) for name, res in results.items()]

    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    config.update(torch=torch.__version__, threads=torch.get_num_threads(), models=names,
                  wall_s=time.perf_counter() - t0)
    with open(os.path.join(args.out, "sudoku.json"), "w") as f:
        json.dump({"config": config, "summary": summary, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "sudoku.png"))
    print()
    print(table(summary, args.test))
    print(f"Adam lr {args.lr}, batch {args.batch}, {args.epochs} epochs, {args.train}/{args.test} puzzles, "
          f"backward {args.backward!r}, {args.threads} thread(s), {config['wall_s']:.0f} s; "
          f"wrote {args.out}/sudoku.json and sudoku.png")
    return {"config": config, "summary": summary, "results": results}


if __name__ == "__main__":
    main()
