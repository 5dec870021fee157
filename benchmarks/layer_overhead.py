"""The layer's own cost: ``alqp.solve_qp`` + backward against the engine calls it wraps.

Times forward + backward of a random linear loss of x through the public ``solve_qp`` (the
registered op, autograd, broadcasting of the gradients) and through the engine functions directly
(``canonicalize``, ``solve_problem_factored``, ``implicit_backward``), interleaved, at the QPLayer
paper's Table-2 size (n=100, 50 equalities, 50 inequalities) and at a tiny size (n=2, two box
rows), and prints the medians and their ratio:

    python -m benchmarks.layer_overhead [--repeats 21] [--out results]

Writes ``OUT/layer-overhead.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import alqp
from alqp.backward import implicit_backward
from alqp.problem import canonicalize
from alqp.solver import solve_problem_factored
from benchmarks.problems import random_qp_batch

NAMES = ("H", "g", "A", "b", "C", "l", "u")


def engine_step(data: dict, w: torch.Tensor) -> float:
    """Seconds of the engine calls the layer wraps: canonicalize, solve, implicit backward."""
    data = {k: None if v is None else v.clone() for k, v in data.items()}  # fresh memory, as the layer's leaves
    start = time.perf_counter()
    problem = canonicalize(**data)
    solution, factor = solve_problem_factored(problem, alqp.Settings())
    implicit_backward(problem, solution, w, settings=alqp.Settings(), factor=factor)
    return time.perf_counter() - start


def layer_step(data: dict, w: torch.Tensor) -> float:
    """Seconds of the same work through ``alqp.solve_qp`` and autograd."""
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in data.items()}
    start = time.perf_counter()
    (alqp.solve_qp(**leaves).x * w).sum().backward()
    return time.perf_counter() - start


def tiny_batch(batch: int) -> dict:
    """Strictly convex QPs with n=2 and the box |x| <= 1 (the cart-pole's friction QP shape)."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(batch, 2, 2, generator=gen, dtype=torch.float64)
    return dict(H=M @ M.mT + 0.5 * torch.eye(2, dtype=torch.float64), g=torch.randn(batch, 2, generator=gen,
                dtype=torch.float64), A=None, b=None, C=torch.eye(2, dtype=torch.float64).expand(batch, 2, 2).clone(),
                l=-torch.ones(batch, 2, dtype=torch.float64), u=torch.ones(batch, 2, dtype=torch.float64))


def measure(data: dict, n: int, repeats: int) -> dict:
    batch = data["g"].shape[0]
    w = torch.randn(batch, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    engine_step(data, w), layer_step(data, w)  # warm-up
    engine, layer = [], []
    for i in range(repeats):
        for step in ((layer_step, engine_step) if i % 2 == 0 else (engine_step, layer_step)):
            (engine if step is engine_step else layer).append(step(data, w))
    return {"layer_ms": 1e3 * statistics.median(layer), "engine_ms": 1e3 * statistics.median(engine),
            "ratio": statistics.median(layer) / statistics.median(engine), "repeats": repeats}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    points = {}
    for batch in (1, 100):
        qp = random_qp_batch(batch, 100, 50, 50, seed=0)
        points[f"table2-batch{batch}"] = measure({k: getattr(qp, k) for k in NAMES}, 100, args.repeats)
    for batch in (1, 5):
        points[f"n2-box-batch{batch}"] = measure(tiny_batch(batch), 2, args.repeats)
    print(f"{'point':>18} {'solve_qp ms':>12} {'engine ms':>10} {'ratio':>6}")
    for name, r in points.items():
        print(f"{name:>18} {r['layer_ms']:12.2f} {r['engine_ms']:10.2f} {r['ratio']:6.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "layer-overhead.json")
    with open(path, "w") as f:
        json.dump({"points": points, "torch": torch.__version__, "threads": 1}, f, indent=1)
    print(f"wrote {path}")
    return points


if __name__ == "__main__":
    main()
