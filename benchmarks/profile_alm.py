"""Where the batched ALM's time goes on one device: one forward + backward of the paper's random QPs
(n=100, p=m=50 by default) at a given batch, timed whole, then under torch.profiler (the top
operators by device and by host time), and timed again with the multiplier refit of the ALM
(solver._polish_multipliers) switched off, to price it.

    PYTHONPATH=src python -m benchmarks.profile_alm --device cuda --batch 4096 [--dtype float32]

Prints tables; writes OUT/profile-alm.json (--out, default results/).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import alqp
import alqp.solver as solver
from benchmarks.problems import random_qp_batch


SETTINGS = alqp.Settings(engine="alm")


def one_call(qp, device, dtype) -> tuple[float, int]:
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in qp.tensors()]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sol = alqp.solve_qp(*tensors, settings=SETTINGS)
    sol.x.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, int(sol.iterations.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps-abs", type=float, default=None,
                        help="a purely absolute tolerance (as the benchmark presets give), instead of the default")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    global SETTINGS
    if args.eps_abs is not None:
        SETTINGS = alqp.Settings(engine="alm", eps_abs=args.eps_abs, eps_rel=0.0)
    dtype = getattr(torch, args.dtype)
    qp = random_qp_batch(args.batch, args.n, args.n // 2, args.n // 2, seed=0)
    one_call(qp, args.device, dtype)  # warm-up
    times = [one_call(qp, args.device, dtype) for _ in range(args.repeats)]
    wall = sorted(t for t, _ in times)[len(times) // 2]
    print(f"batch {args.batch} n {args.n} {args.dtype} on {args.device}: forward+backward median {wall * 1e3:.1f} ms, "
          f"Newton steps max {times[0][1]}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        one_call(qp, args.device, dtype)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table_device = prof.key_averages().table(sort_by=sort, row_limit=20)
    table_host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(table_device)
    print(table_host)
    polish = solver._polish_multipliers
    solver._polish_multipliers = lambda w, problem, res, solved, *a, **k: torch.zeros_like(solved)
    try:
        no_polish = sorted(one_call(qp, args.device, dtype)[0] for _ in range(args.repeats))[args.repeats // 2]
    finally:
        solver._polish_multipliers = polish
    print(f"without the multiplier refit: {no_polish * 1e3:.1f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile-alm{'' if args.eps_abs is None else '-abs'}.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
        batch=args.batch, n=args.n, dtype=args.dtype, median_ms=wall * 1e3, no_refit_ms=no_polish * 1e3,
        newton_steps_max=times[0][1], top_device=table_device, top_host=table_host), indent=1))


if __name__ == "__main__":
    main()
