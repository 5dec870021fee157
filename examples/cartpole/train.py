"""Cart-pole swing-up through dry friction QPs (QPLayer paper, Appendix D.2 and Table 3).

An open-loop force sequence of ``--horizon`` steps (20, the paper's) is learned with Adam so that
the pole swings up from hanging down and stays upright (see :class:`dynamics.SwingUpCost`). Every
simulation step solves equation 33, the friction impulse QP, with the chosen solver. The dynamics
are non-smooth (a joint sticks or slips), so the loss is smoothed as in the paper: each forward
pass simulates ``--samples`` (5) noisy copies of the forces, one batch of 5 QPs per step, and
averages their losses; the gradient is that of the average, through the QP layer.

``--solver all`` trains the same model, from the same start and with the same noise, with alqp,
qpth (OptNet) and ProxSuite's QPLayer one after another in this process, and prints a table laid
out like the paper's Table 3: forward and backward ms per iteration (median, and mean ± std as in
the paper) and the final loss.

Writes ``<out>/cartpole.json`` (configuration, per-iteration loss and times, final forces and
trajectories, summary) and ``<out>/cartpole.png`` (pole angle and cart position over time with
the learned forces, loss against iteration).

    python examples/cartpole/train.py                          # reduced: 150 iterations, all solvers
    python examples/cartpole/train.py --iterations 800         # the paper's length
    python examples/cartpole/train.py --solver alqp --iterations 50
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import sys
import time

import torch

import alqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dynamics import (
    SOLVERS,
    CartPole,
    SwingUpCost,
    available,
    make_friction_solver,
    rollout,
    upright_error_deg,
)

LABELS = {"alqp": "alqp", "qpth": "qpth (OptNet)", "proxsuite": "ProxSuite QPLayer"}
#: The paper's Table 3, cart-pole rows: forward ms, backward ms (mean ± std over all epochs), final loss.
PAPER = {
    "QPLayer (paper)": (55.20, 6.93, 39.27, 2.17, 0.02556),
    "OptNet (paper)": (615.84, 16.15, 61.26, 2.84, 0.02604),
    "CvxpyLayer (paper)": (629.70, 30.42, 101.88, 1.11, 0.02566),
}


class TimedFriction:
    """A friction solver that adds up the wall time spent in its calls, and counts alqp's failures.

    Args:
        name: the solver's name (see :data:`dynamics.SOLVERS`).
        settings: alqp's settings (alqp only).
    """

    def __init__(self, name: str, settings: alqp.Settings | None = None):
        self.name = name
        self.seconds = 0.0
        self.calls = 0
        self.unsolved = 0
        if name == "alqp":
            self._layer = alqp.QPLayer(settings)
        else:
            self._solve = make_friction_solver(name)

    def __call__(self, M_inv: torch.Tensor, v_free: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.name == "alqp":
            eye = torch.eye(2, dtype=v_free.dtype, device=v_free.device)
            sol = self._layer(M_inv, v_free, None, None, eye, -eta, eta)
            self.unsolved += int((sol.status != int(alqp.Status.SOLVED)).sum())
            impulse = sol.x
        else:
            impulse = self._solve(M_inv, v_free, eta)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return impulse


def train_one(name: str, args, model: CartPole, cost: SwingUpCost) -> dict:
    """Learn the force sequence with solver ``name``; returns its history and final trajectory.

    Every solver starts from zero forces and draws the same noise (a generator seeded with
    ``args.seed``), so runs differ only by what their QP solutions and gradients differ by.
    """
    from tqdm import tqdm

    dtype = torch.float64
    friction = TimedFriction(name, alqp.Settings())
    params = torch.zeros(args.horizon, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([params], lr=args.lr)
    noise_gen = torch.Generator().manual_seed(args.seed)
    losses, fwd_ms, bwd_ms, qp_fwd_ms = [], [], [], []
    profiler = cProfile.Profile() if args.profile else None
    # One untimed forward and backward first: a solver's first call pays for imports and set-up.
    warm_forces = args.force_scale * (params + args.noise * torch.randn(args.samples, args.horizon, dtype=dtype))
    cost(model, rollout(model, warm_forces, friction), warm_forces).mean().backward()
    params.grad = None
    friction.seconds, friction.unsolved = 0.0, 0
    bar = tqdm(range(args.iterations), desc=LABELS[name], dynamic_ncols=True, disable=args.no_progress)
    for _ in bar:
        noise = args.noise * torch.randn(args.samples, args.horizon, generator=noise_gen, dtype=dtype)
        optimizer.zero_grad()
        if profiler:
            profiler.enable()
        qp_before = friction.seconds
        t0 = time.perf_counter()
        forces = args.force_scale * (params + noise)
        loss = cost(model, rollout(model, forces, friction), forces).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if profiler:
            profiler.disable()
        optimizer.step()
        losses.append(loss.item())
        fwd_ms.append(1e3 * (t1 - t0))
        bwd_ms.append(1e3 * (t2 - t1))
        qp_fwd_ms.append(1e3 * (friction.seconds - qp_before))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", fwd_ms=f"{fwd_ms[-1]:.0f}", bwd_ms=f"{bwd_ms[-1]:.0f}")

    with torch.no_grad():  # the learned forces without noise
        forces = args.force_scale * params.detach()[None]
        states = rollout(model, forces, friction)
        clean = cost(model, states, forces).item()
    # A joint sticks where friction cancels its free velocity: its velocity after the step is 0.
    stuck = (states[0, 1:, 2:].abs() < 1e-9).sum(0).tolist()
    result = {
        "label": LABELS[name],
        "loss": losses,
        "stuck_steps_cart_pole": stuck,
        "forward_ms": fwd_ms,
        "backward_ms": bwd_ms,
        "qp_forward_ms": qp_fwd_ms,
        "forces": forces[0].tolist(),
        "states": states[0].tolist(),
        "clean_loss": clean,
        "final_upright_error_deg": upright_error_deg(states[0, -1, 1]).item(),
        "unsolved_qps": friction.unsolved if name == "alqp" else None,
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        path = os.path.join(args.out, f"profile-{name}.txt")
        with open(path, "w") as f:
            f.write(text.getvalue())
        result["profile"] = path
    return result


def summarize(name: str, result: dict, last: int = 10) -> dict:
    """Median and mean ± std of the times over all iterations, and the final losses."""

    def stats(values):
        return {
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }

    tail = result["loss"][-last:]
    return {
        "solver": name,
        "label": result["label"],
        "forward_ms": stats(result["forward_ms"]),
        "backward_ms": stats(result["backward_ms"]),
        "qp_forward_ms": stats(result["qp_forward_ms"]),
        "final_loss": result["loss"][-1],
        "final_loss_mean_last": statistics.fmean(tail),
        "clean_loss": result["clean_loss"],
        "final_upright_error_deg": result["final_upright_error_deg"],
        "unsolved_qps": result["unsolved_qps"],
    }


def table(summary: list[dict], iterations: int, last: int = 10) -> str:
    """A Markdown table in the layout of the paper's Table 3, our rows next to the paper's."""
    head = (
        "| solver | forward ms (median) | forward ms (mean ± std) | of which QP calls (median) "
        "| backward ms (median) | backward ms (mean ± std) | final loss (smoothed) "
        f"| mean loss, last {last} | loss without noise | final angle from upright |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = "".join(
        f"| {s['label']} | {s['forward_ms']['median']:.1f} "
        f"| {s['forward_ms']['mean']:.1f} ± {s['forward_ms']['std']:.1f} "
        f"| {s['qp_forward_ms']['median']:.1f} | {s['backward_ms']['median']:.1f} "
        f"| {s['backward_ms']['mean']:.1f} ± {s['backward_ms']['std']:.1f} | {s['final_loss']:.4f} "
        f"| {s['final_loss_mean_last']:.4f} | {s['clean_loss']:.4f} | {s['final_upright_error_deg']:.1f}° |\n"
        for s in summary
    )
    paper = "".join(
        f"| {label} | | {f:.2f} ± {fs:.2f} | | | {b:.2f} ± {bs:.2f} | {loss:.5f} | | | |\n"
        for label, (f, fs, b, bs, loss) in PAPER.items()
    )
    return (
        head
        + rows
        + paper
        + (
            f"\n({iterations} iterations; the paper's rows: 800 iterations, its own loss "
            "and model parameters, so only the timing columns compare)"
        )
    )


def plot(results: dict, model: CartPole, path: str) -> None:
    """Pole angle, cart position and force over time for the learned forces; loss per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MultipleLocator

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for i, res in enumerate(results.values()):
        states = torch.tensor(res["states"])
        t = model.dt * torch.arange(states.shape[0])
        style = {"label": res["label"], "marker": "o", "ms": 3, "ls": ["-", "--", ":"][i % 3]}
        axes[0].plot(t, torch.rad2deg(states[:, 1]), **style)
        axes[1].plot(t, states[:, 0], **style)
        axes[2].step(t, res["forces"] + res["forces"][-1:], where="post", label=res["label"], ls=style["ls"])
        axes[3].plot(range(1, len(res["loss"]) + 1), res["loss"], label=res["label"], ls=style["ls"], lw=1)
    axes[0].axhline(180, color="k", lw=0.8, alpha=0.5)
    axes[0].yaxis.set_major_locator(MultipleLocator(45))
    titles = [
        ("pole angle (learned forces, no noise)", "time (s)", "pole angle θ (deg, 0 = down, 180 = up)"),
        ("cart position", "time (s)", "cart position x (m)"),
        ("learned force on the cart", "time (s)", "force u (N)"),
        ("training loss (mean of the noisy copies)", "iteration", "loss (dimensionless)"),
    ]
    for ax, (title, xlabel, ylabel) in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--solver",
        default="all",
        choices=[*SOLVERS, "all"],
        help="the friction QP's solver; all: alqp, qpth and proxsuite one after another",
    )
    p.add_argument("--iterations", type=int, default=150, help="Adam steps (the paper: 800)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (the paper's 0.1)")
    p.add_argument("--horizon", type=int, default=20, help="control steps (the paper's 20)")
    p.add_argument("--samples", type=int, default=5, help="noisy copies of the forces per forward (the paper's 5)")
    p.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="standard deviation of the Gaussian noise on the force parameters (x force-scale N)",
    )
    p.add_argument("--force-scale", type=float, default=10.0, help="newtons per unit of the learned parameters")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="results/cartpole", help="folder of cartpole.json and cartpole.png")
    p.add_argument(
        "--profile", action="store_true", help="cProfile each solver's training into <out>/profile-<solver>.txt"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    for name in ("iterations", "horizon", "samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.noise < 0 or not math.isfinite(args.noise):
        p.error(f"--noise must be finite and >= 0, got {args.noise}")
    return args


def main(argv: list | None = None) -> dict:
    """Run the experiment (see the module docstring); returns what cartpole.json holds."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    names = list(SOLVERS) if args.solver == "all" else [args.solver]
    skipped = {}
    for name in list(names):
        reason = available(name)
        if reason:
            print(f"skipping {name}: {reason}")
            skipped[name] = reason
            names.remove(name)
    model, cost = CartPole(), SwingUpCost()
    t0 = time.perf_counter()
    results = {name: train_one(name, args, model, cost) for name in names}
    summary = [summarize(name, res) for name, res in results.items()]
    config = dict(
        vars(args),
        model=model.as_dict(),
        cost=vars(cost),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        solvers=names,
        skipped=skipped,
        wall_s=time.perf_counter() - t0,
    )
    if len(names) > 1:  # the same noise and start: how far apart do the solvers' runs drift?
        base = results[names[0]]["loss"]
        config["max_loss_gap_vs_" + names[0]] = {
            n: max(abs(a - b) for a, b in zip(base, results[n]["loss"])) for n in names[1:]
        }
    out = {"config": config, "summary": summary, "results": results}
    with open(os.path.join(args.out, "cartpole.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(results, model, os.path.join(args.out, "cartpole.png"))
    print()
    print(table(summary, args.iterations))
    print(
        f"Adam lr {args.lr}, {args.iterations} iterations, horizon {args.horizon}, {args.samples} noisy copies, "
        f"{args.threads} thread(s), {config['wall_s']:.0f} s; wrote {args.out}/cartpole.json and cartpole.png"
    )
    return out


if __name__ == "__main__":
    main()
