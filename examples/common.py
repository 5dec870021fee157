"""Helpers shared by the denoising, classification and robustness examples.

Only what more than one example needs: a per-batch stopwatch for the forward and backward passes,
summary statistics of a list of numbers, the count of alqp problems that ended without a solution,
and writing a JSON result file. Each example imports this module as ``common`` after putting
``examples/`` on ``sys.path`` (see ``import_common``), so the examples run as plain scripts.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Iterable

import torch

#: Names of the solvers every example can train with (``--solver``); "all" runs both in one process.
SOLVERS = ("alqp", "qpth")


def import_common():
    """Make ``examples/`` importable (for ``import common``) from a script in one of its folders."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def parse_solvers(value: str) -> list:
    """``"alqp"``, ``"qpth"``, ``"all"`` or a comma list of those -> list of solver names."""
    names = list(SOLVERS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in SOLVERS]
    if bad or not names:
        raise ValueError(f"--solver must be 'all' or a comma list of {SOLVERS}, got {value!r}")
    return names


def stats(values: Iterable[float]) -> dict:
    """Median, mean and standard deviation (0 for one value) of the finite entries of ``values``.

    Returns ``{"median", "mean", "std", "n"}``; all NaN when no entry is finite.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"median": math.nan, "mean": math.nan, "std": math.nan, "n": 0}
    return {"median": statistics.median(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "n": len(finite)}


def unsolved_count(status: torch.Tensor | None) -> int:
    """Number of problems in a (B,) alqp status tensor that are not SOLVED (0 when ``status`` is None).

    The examples' QPs are feasible by construction, so CLOSEST_FEASIBLE counts as a failure too.
    """
    if status is None:
        return 0
    import alqp
    return int((status != int(alqp.Status.SOLVED)).sum())


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` (folders created); NaN and Inf are written as null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1)


def timing_table(rows: list, columns: list) -> str:
    """A markdown table: ``rows`` are dicts, ``columns`` pairs (header, function of a row -> str)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fn(row) for _, fn in columns) + " |")
    return "\n".join(lines)


def _evaluate(model, loss_fn, error_fn, X: torch.Tensor, Y: torch.Tensor, batch: int) -> dict:
    """Mean loss, mean error (``error_fn``) and unsolved count of ``model`` over (X, Y), no gradient."""
    loss, err, unsolved = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, X.shape[0], batch):
            out = model(X[i:i + batch])
            k = min(batch, X.shape[0] - i)
            loss += float(loss_fn(out, Y[i:i + batch])) * k
            err += float(error_fn(out, Y[i:i + batch])) * k if error_fn else 0.0
            unsolved += unsolved_count(getattr(out, "status", None))
    return {"loss": loss / X.shape[0], "error": err / X.shape[0] if error_fn else None, "unsolved": unsolved}


def train_loop(model, optimizer, loss_fn, train: tuple, test: tuple, *, batch: int, epochs: int, seed: int,
               penalty_fn=None, error_fn=None, test_batch: int | None = None, desc: str = "",
               progress: bool = True) -> dict:
    """Train ``model`` by mini-batches and evaluate it on ``test`` after every epoch (and before the first).

    Args:
        model: maps X[idx] (b, ...) to an output with ``.status`` (alqp, (b,)) or ``.status = None``.
        optimizer: a torch optimizer over the model's parameters.
        loss_fn(out, Y[idx]) -> scalar tensor, the data loss (also the reported test loss);
        penalty_fn() -> scalar tensor added to the training loss only (or None).
        error_fn(out, Y[idx]) -> float in [0, 1], reported as ``error`` (or None).
        train, test: pairs (X (N, ...), Y (N, ...)). batch, test_batch: batch sizes.
        seed: seed of the order of the training samples.

    Returns:
        ``{"history": [per-epoch dict], "failed": bool, "failure": str | None, "unsolved": int,
        "forward_ms": [...], "backward_ms": [...]}``. A run fails at the first non-finite training
        loss or gradient, or at an exception in the solver (recorded in ``failure``), and stops
        there; problems that alqp leaves unsolved are counted in ``unsolved`` (training goes on,
        with the layer's ``failed_gradient`` policy for them).
    """
    import time

    from tqdm import tqdm

    Xtr, Ytr = train
    test_batch = test_batch or batch
    history, fwd_ms, bwd_ms = [], [], []
    total_unsolved, failure = 0, None
    row = _evaluate(model, loss_fn, error_fn, *test, test_batch)
    history.append({"epoch": 0, "test_loss": row["loss"], "test_error": row["error"], "test_unsolved": row["unsolved"]})
    total_unsolved += row["unsolved"]
    gen = torch.Generator().manual_seed(seed)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(Xtr.shape[0], generator=gen)
        losses, unsolved = [], 0
        bar = tqdm(range(0, len(order), batch),
                   desc=f"{desc} epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True, disable=not progress)
        for i in bar:
            idx = order[i:i + batch]
            optimizer.zero_grad()
            try:
                t0 = time.perf_counter()
                out = model(Xtr[idx])
                data_loss = loss_fn(out, Ytr[idx])
                loss = data_loss + penalty_fn() if penalty_fn else data_loss
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
            except (RuntimeError, ValueError, ArithmeticError) as err:  # qpth raises on singular KKT systems
                failure = f"epoch {epoch}, batch {i // batch}: {type(err).__name__}: {str(err)[:200]}"
                break
            fwd_ms.append(1e3 * (t1 - t0))
            bwd_ms.append(1e3 * (t2 - t1))
            unsolved += unsolved_count(getattr(out, "status", None))
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
            if not math.isfinite(float(loss.detach())) or not grads_finite:
                failure = f"epoch {epoch}, batch {i // batch}: non-finite {'loss' if grads_finite else 'gradient'}"
                break
            optimizer.step()
            losses.append(float(data_loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3e}", fwd_ms=f"{fwd_ms[-1]:.0f}", bwd_ms=f"{bwd_ms[-1]:.0f}")
        bar.close()
        total_unsolved += unsolved
        if failure:
            history.append({"epoch": epoch, "train_loss": math.nan, "test_loss": math.nan, "test_error": None,
                            "train_unsolved": unsolved})
            break
        row = _evaluate(model, loss_fn, error_fn, *test, test_batch)
        total_unsolved += row["unsolved"]
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses) if losses else math.nan,
                        "train_unsolved": unsolved, "test_loss": row["loss"], "test_error": row["error"],
                        "test_unsolved": row["unsolved"]})
        if progress:
            tqdm.write(f"[{desc}] epoch {epoch:2d}  train loss {history[-1]['train_loss']:.4g}  test loss "
                       f"{row['loss']:.4g}" + (f"  test error {row['error']:.4f}" if error_fn else "")
                       + f"  unsolved {unsolved + row['unsolved']}"
                       + (f"  fwd {statistics.median(fwd_ms):.0f} ms  bwd {statistics.median(bwd_ms):.0f} ms"
                          if fwd_ms else ""))
    return {"history": history, "failed": failure is not None, "failure": failure, "unsolved": total_unsolved,
            "forward_ms": fwd_ms, "backward_ms": bwd_ms}


def summarize_run(run: dict, last: int = 5) -> dict:
    """Final test loss / error, their std over the last ``last`` epochs, and ms per batch of one run.

    ``run`` is :func:`train_loop`'s result. Timing: median and mean (with std) over all batches.
    """
    hist = [h for h in run["history"] if h["epoch"] > 0]
    tail = hist[-last:]
    final = hist[-1] if hist else run["history"][0]
    return {"final_test_loss": final["test_loss"], "final_test_error": final.get("test_error"),
            "test_loss_std_last": stats(h["test_loss"] for h in tail)["std"] if len(tail) > 1 else math.nan,
            "test_error_std_last": (stats(h["test_error"] for h in tail)["std"]
                                    if len(tail) > 1 and tail[0].get("test_error") is not None else None),
            "forward_ms": stats(run["forward_ms"]), "backward_ms": stats(run["backward_ms"]),
            "failed": run["failed"], "failure": run["failure"], "unsolved": run["unsolved"]}
