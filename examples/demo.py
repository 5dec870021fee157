"""Demo: solve a batch of random QPs, feasible and infeasible, and print what the solver found.

    python examples/demo.py [--batch 64] [--n 30] [--dtype float64]
"""
import argparse
import time

import torch

import alqp


def random_batch(batch: int, n: int, p: int, m: int, dtype, seed: int = 0):
    """Strictly convex QPs; every third one made infeasible by a contradictory pair of rows."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, n, n, generator=gen, dtype=dtype)
    H = M @ M.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=dtype)
    g = torch.randn(batch, n, generator=gen, dtype=dtype)
    A = torch.randn(batch, p, n, generator=gen, dtype=dtype)
    x0 = torch.randn(batch, n, generator=gen, dtype=dtype)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    C = torch.randn(batch, m, n, generator=gen, dtype=dtype)
    Cx0 = (C @ x0.unsqueeze(-1)).squeeze(-1)
    l = Cx0 - torch.rand(batch, m, generator=gen, dtype=dtype)
    u = Cx0 + torch.rand(batch, m, generator=gen, dtype=dtype)
    infeasible = torch.arange(batch) % 3 == 2
    # Row 1 repeats row 0 but demands C_0 x >= u_0 + 1: no x satisfies both.
    C[infeasible, 1] = C[infeasible, 0]
    l[infeasible, 1] = u[infeasible, 0] + 1.0
    u[infeasible, 1] = float("inf")
    return (H, g, A, b, C, l, u), infeasible


def main(argv=None) -> int:
    """Run the demo; returns how many problems ended with the status they were built for."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    (H, g, A, b, C, l, u), infeasible = random_batch(args.batch, args.n, args.n // 3, args.n, dtype)

    alqp.solve_qp(H[:2], g[:2], A[:2], b[:2], C[:2], l[:2], u[:2])  # warm-up
    start = time.perf_counter()
    sol = alqp.solve_qp(H, g, A, b, C, l, u)
    elapsed = time.perf_counter() - start

    Ax = (A @ sol.x.unsqueeze(-1)).squeeze(-1)
    Cx = (C @ sol.x.unsqueeze(-1)).squeeze(-1)
    dual = (H @ sol.x.unsqueeze(-1)).squeeze(-1) + g + (A.transpose(-1, -2) @ sol.y.unsqueeze(-1)).squeeze(-1) \
        + (C.transpose(-1, -2) @ sol.z.unsqueeze(-1)).squeeze(-1)
    # Residuals of the (shifted) QP that was actually solved.
    primal = torch.maximum((Ax - b - sol.s_eq).abs().amax(-1),
                           (Cx - sol.s_in - torch.clamp(Cx - sol.s_in, l, u)).abs().amax(-1))
    print(f"alqp {alqp.__version__}: {args.batch} QPs, n={args.n}, p={args.n // 3}, m={args.n}, {args.dtype}, "
          f"solved in {elapsed * 1e3:.1f} ms ({elapsed * 1e3 / args.batch:.3f} ms per QP)")
    print(f"{'status':>18} {'count':>6} {'max primal res':>15} {'max dual res':>13} {'max |shift|':>12} "
          f"{'mean Newton steps':>18}")
    for status in alqp.Status:
        sel = sol.status == status
        if not sel.any():
            continue
        shift = torch.cat([sol.s_eq[sel], sol.s_in[sel]], -1).abs().amax()
        print(f"{status.name:>18} {int(sel.sum()):>6} {float(primal[sel].max()):>15.2e} "
              f"{float(dual[sel].max()):>13.2e} "
              f"{float(shift):>12.3e} {float(sol.iterations[sel].double().mean()):>18.1f}")
    expected = torch.where(infeasible, int(alqp.Status.CLOSEST_FEASIBLE), int(alqp.Status.SOLVED))
    as_constructed = int((sol.status == expected).sum())
    print(f"statuses as constructed (feasible -> SOLVED, infeasible -> CLOSEST_FEASIBLE): "
          f"{as_constructed}/{args.batch}")
    return as_constructed


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
