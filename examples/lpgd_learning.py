"""Learning the costs of a shortest-path LP: implicit differentiation vs LPGD.

The task ("predict, then optimize"): each instance has a feature vector phi (5 numbers) and hidden
edge costs c_true(phi), a degree-2 polynomial of phi, on a 5x5 grid graph whose 40 edges point right
and down. The label is the shortest top-left to bottom-right path under c_true, as a 0/1 edge
vector. A linear model predicts costs c = W phi + w0, and an LP layer turns them into a path:

    minimize c'x   subject to   A x = b   (flow conservation: one unit from source to sink)
                                x >= 0    (the DAG makes every vertex a 0/1 path)

trained on the Hamming-type loss |x - x_true|^2 summed over the batch, with Adam.

At any cost vector without ties the LP's solution is a vertex that does not move under a small
change of c, so the implicit (IFT) gradient of the loss with respect to c is exactly zero and the
model cannot learn from it: its loss curve stays flat. LPGD re-solves the LP with c + tau dL/dx
(and c - tau dL/dx for the central variant), which reaches the neighbouring paths that the loss
prefers, and returns (x_tau - x_-tau) / (2 tau): an informative direction. Both runs use the same
seed, data, initial model, optimizer and budget.

Run:  python examples/lpgd_learning.py        (about a minute on one CPU thread)
Prints both loss curves and the final test accuracy (exact path match) and normalized regret, and
writes results/lpgd_learning.png and results/lpgd_learning.json (``--out DIR`` for another folder).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import alqp

DT = torch.float64
GRID = 5  # nodes per side
N_FEATURES = 5
N_TRAIN, N_TEST = 200, 200
BATCH = 40
EPOCHS = 12
LR = 0.05
# tau multiplies dL/dx (entries 0 or +-2 here) and is added to costs of order 1: 0.5 perturbs a
# wrongly used or wrongly avoided edge by about one unit of cost, enough to reach the paths that
# the loss prefers; much smaller values leave the vertex in place (zero gradient, like IFT).
TAU = 0.5
SETTINGS = alqp.Settings(eps_abs=1e-7)


def grid_graph(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node-edge incidence of the k x k grid with edges right and down, source node 0, sink k*k-1.

    Returns:
        A (k*k-1, E): the conservation rows (the sink's row, implied by the others, is dropped so that
        A has full row rank), b (k*k-1,): +1 at the source.
    """
    edges = []
    for i in range(k):
        for j in range(k):
            if j + 1 < k:
                edges.append((i * k + j, i * k + j + 1))
            if i + 1 < k:
                edges.append((i * k + j, (i + 1) * k + j))
    A = torch.zeros(k * k, len(edges), dtype=DT)
    for e, (tail, head) in enumerate(edges):
        A[tail, e], A[head, e] = 1.0, -1.0
    b = torch.zeros(k * k, dtype=DT)
    b[0] = 1.0
    return A[:-1], b[:-1]


def make_data(gen: torch.Generator, count: int, B_true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (count, N_FEATURES) and true costs (count, E): the degree-2 polynomial of the
    shortest-path benchmark of Elmachtoub and Grigas, c = (1 + (B phi / sqrt(p) + 3)^2) / 3.5^2."""
    phi = torch.randn(count, N_FEATURES, generator=gen, dtype=DT)
    c = (1.0 + (phi @ B_true.T / N_FEATURES ** 0.5 + 3.0) ** 2) / 3.5 ** 2
    return phi, c


class PathLayer(torch.nn.Module):
    """Linear cost model and the shortest-path LP: phi (B, N_FEATURES) -> x (B, E)."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, backward: str, gen: torch.Generator):
        super().__init__()
        E = A.shape[1]
        self.W = torch.nn.Parameter(0.1 * torch.randn(E, N_FEATURES, generator=gen, dtype=DT))
        self.w0 = torch.nn.Parameter(torch.ones(E, dtype=DT))
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.register_buffer("H", torch.zeros(E, E, dtype=DT))
        self.register_buffer("C", torch.eye(E, dtype=DT))
        self.register_buffer("l", torch.zeros(E, dtype=DT))
        choice = alqp.LPGD(tau=TAU, variant="central") if backward == "lpgd" else alqp.IFT()
        self.layer = alqp.QPLayer(SETTINGS, backward=choice)

    def costs(self, phi: torch.Tensor) -> torch.Tensor:
        return phi @ self.W.T + self.w0

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return self.layer(self.H, self.costs(phi), self.A, self.b, self.C, self.l).x


def solve_paths(A, b, costs) -> torch.Tensor:
    E = A.shape[1]
    sol = alqp.solve_qp(torch.zeros(E, E, dtype=DT), costs, A, b, torch.eye(E, dtype=DT),
                        torch.zeros(E, dtype=DT), settings=SETTINGS)
    assert (sol.status == alqp.Status.SOLVED).all()
    return sol.x


def evaluate(model: PathLayer, phi, x_true, c_true) -> dict:
    """Mean loss, accuracy (rounded path equals the true one) and normalized regret
    sum(c_true'x_pred - c_true'x_true) / sum(c_true'x_true)."""
    with torch.no_grad():
        x = model(phi)
    loss = ((x - x_true) ** 2).sum(-1).mean().item()
    acc = (x.round() == x_true).all(-1).to(DT).mean().item()
    best = (c_true * x_true).sum(-1)
    regret = (((c_true * x.round()).sum(-1) - best).sum() / best.sum()).item()
    return dict(loss=loss, accuracy=acc, regret=regret)


def train(backward: str, data: dict, seed: int, epochs: int = EPOCHS) -> dict:
    gen = torch.Generator().manual_seed(seed)
    model = PathLayer(data["A"], data["b"], backward, gen)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order_gen = torch.Generator().manual_seed(seed + 1)
    curve, t_backward = [evaluate(model, data["phi_tr"], data["x_tr"], data["c_tr"])["loss"]], 0.0
    grad_norms = []
    n_train = data["phi_tr"].shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=order_gen)
        for start in range(0, n_train, BATCH):
            i = perm[start:start + BATCH]
            x = model(data["phi_tr"][i])
            loss = ((x - data["x_tr"][i]) ** 2).sum()
            opt.zero_grad()
            t0 = time.perf_counter()
            loss.backward()
            t_backward += time.perf_counter() - t0
            grad_norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
            opt.step()
        curve.append(evaluate(model, data["phi_tr"], data["x_tr"], data["c_tr"])["loss"])
    test = evaluate(model, data["phi_te"], data["x_te"], data["c_te"])
    return dict(train_loss=curve, test=test, backward_seconds=t_backward,
                mean_grad_norm=sum(grad_norms) / len(grad_norms))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for the PNG and JSON (default: results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    parser.add_argument("--train", type=int, default=N_TRAIN, help=f"training instances (default {N_TRAIN})")
    parser.add_argument("--test", type=int, default=N_TEST, help=f"test instances (default {N_TEST})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(args.seed)
    A, b = grid_graph(GRID)
    E = A.shape[1]
    B_true = torch.bernoulli(torch.full((E, N_FEATURES), 0.5, dtype=DT), generator=gen)
    phi_tr, c_tr = make_data(gen, args.train, B_true)
    phi_te, c_te = make_data(gen, args.test, B_true)
    data = dict(A=A, b=b, phi_tr=phi_tr, c_tr=c_tr, x_tr=solve_paths(A, b, c_tr).round(),
                phi_te=phi_te, c_te=c_te, x_te=solve_paths(A, b, c_te).round())

    results = {}
    for backward in ("ift", "lpgd"):
        t0 = time.perf_counter()
        results[backward] = train(backward, data, args.seed, args.epochs)
        results[backward]["seconds"] = time.perf_counter() - t0

    print(f"shortest path on a {GRID}x{GRID} grid ({E} edges), {args.train} train / {args.test} test instances, "
          f"batch {BATCH}, {args.epochs} epochs, Adam lr {LR}; LPGD: tau={TAU}, central")
    print("train loss |x - x_true|^2 per instance, after each epoch (epoch 0 = initial model):")
    for name, r in results.items():
        print(f"  {name:5s} " + " ".join(f"{v:5.2f}" for v in r["train_loss"]))
    print(f"{'':6s}{'test acc':>9s}{'regret':>9s}{'|grad|':>10s}{'backward s':>12s}{'total s':>9s}")
    for name, r in results.items():
        t = r["test"]
        print(f"  {name:5s}{t['accuracy']:8.1%}{t['regret']:9.3f}{r['mean_grad_norm']:10.2e}"
              f"{r['backward_seconds']:12.1f}{r['seconds']:9.1f}")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lpgd_learning.json"), "w") as f:
        config = dict(grid=GRID, edges=E, n_train=args.train, n_test=args.test, batch=BATCH, epochs=args.epochs,
                      lr=LR, tau=TAU, seed=args.seed)
        json.dump(dict(config=config, results=results), f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("ift", "implicit (IFT)"), ("lpgd", f"LPGD (tau={TAU}, central)")):
        r = results[name]
        ax.plot(range(args.epochs + 1), r["train_loss"], marker="o",
                label=f"{label}: test accuracy {r['test']['accuracy']:.0%}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss  |x - x_true|^2 per instance")
    ax.set_title(f"Learning shortest-path costs ({GRID}x{GRID} grid LP)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(args.out, "lpgd_learning.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path} and {os.path.join(args.out, 'lpgd_learning.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
