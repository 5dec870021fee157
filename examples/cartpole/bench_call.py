"""Time one friction QP call (equation 33, n = 2, a batch of 5) per solver: forward and backward.

The training loop makes 20 such calls per iteration; this isolates the per-call cost from the
dynamics' own torch operations. Each solver gets the same QPs, from cart-pole states drawn at
random; the figures are medians over ``--repeats`` calls (the calls alternate between the solvers,
so that a slow spell of a shared machine hits all of them alike).

    python examples/cartpole/bench_call.py --repeats 300
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dynamics import SOLVERS, CartPole, available, make_friction_solver, mass_matrix


def random_friction_qps(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M_inv (batch,2,2), v_free (batch,2), eta (2,)): friction QPs at random pole angles, with
    free velocities whose stopping impulses lie around the friction bounds (some stick, some slip)."""
    model = CartPole()
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.rand(batch, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pi
    _, M_inv = mass_matrix(model, theta)
    eta = model.eta()
    v_free = (torch.rand(batch, 2, generator=gen, dtype=torch.float64) * 6 - 3) * eta * torch.diagonal(M_inv, 0, 1, 2)
    return M_inv, v_free, eta


def main(argv: list | None = None) -> dict:
    """Print and return the median forward and backward ms of one call, per available solver."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the results (optional)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        p.error("--repeats and --batch must be at least 1")
    torch.set_num_threads(args.threads)
    names = [n for n in SOLVERS if available(n) is None]
    solvers = {n: make_friction_solver(n) for n in names}
    times = {n: {"forward_ms": [], "backward_ms": []} for n in names}
    for r in range(args.repeats + 3):  # the first 3 rounds warm up
        M_inv, v_free, eta = random_friction_qps(args.batch, seed=r)
        weights = torch.randn(args.batch, 2, dtype=torch.float64)
        for name in names:
            M_, v_ = M_inv.clone().requires_grad_(True), v_free.clone().requires_grad_(True)
            t0 = time.perf_counter()
            impulse = solvers[name](M_, v_, eta)
            t1 = time.perf_counter()
            (impulse * weights).sum().backward()
            t2 = time.perf_counter()
            if r >= 3:
                times[name]["forward_ms"].append(1e3 * (t1 - t0))
                times[name]["backward_ms"].append(1e3 * (t2 - t1))
    summary = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    print(f"one friction QP call, batch {args.batch}, n = 2, median of {args.repeats}:")
    print("| solver | forward ms | backward ms |\n|---|---|---|")
    for n, s in summary.items():
        print(f"| {n} | {s['forward_ms']:.3f} | {s['backward_ms']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "summary": summary, "times": times}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
