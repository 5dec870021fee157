"""Correctness of the CUDA path (the batched ALM engine) against the CPU: every oracle family of
the test suite, float64 and float32, forward statuses, x, the shift, and the gradients of a fixed
random loss on x with respect to g, b, u and C. Prints one line a family and writes JSON.

    PYTHONPATH=src python scripts/cuda_check.py [--out DIR]

The CPU side runs the default engine (the active-set engine with the ALM as fallback); a status
that differs, or an x / gradient farther apart than the dtype's tolerance, is a failure (exit 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_forward import FAMILIES  # noqa: E402

import alqp  # noqa: E402

INPUTS = ("g", "b", "u", "C")


def run(prob: dict, device: str, dtype: torch.dtype, seed: int = 0):
    tensors = {k: (None if v is None else v.to(device=device, dtype=dtype).requires_grad_(k in INPUTS))
               for k, v in prob.items()}
    start = time.perf_counter()
    sol = alqp.QPLayer()(**tensors)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(sol.x.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    solved = alqp.settings.has_solution(sol.status)
    loss = (sol.x * weight)[solved].sum()
    grads = torch.autograd.grad(loss, [tensors[k] for k in INPUTS if tensors.get(k) is not None], allow_unused=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = dict(status=sol.status.cpu(), x=sol.x.detach().double().cpu(), s=sol.s_in.detach().double().cpu(),
               grads=[None if gr is None else gr.double().cpu() for gr in grads], seconds=seconds)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to check")
        return 2
    rows, failures = [], 0
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 2e-2)):
        for name, (fn, kwargs, seed) in FAMILIES.items():
            prob = fn(seed=seed, **kwargs)
            cpu, gpu = run(prob, "cpu", dtype), run(prob, "cuda", dtype)
            same_status = cpu["status"].tolist() == gpu["status"].tolist()
            both = alqp.settings.has_solution(cpu["status"]) & alqp.settings.has_solution(gpu["status"])
            dx = float((cpu["x"] - gpu["x"])[both].abs().max()) if bool(both.any()) else 0.0
            ds = float((cpu["s"] - gpu["s"])[both].abs().max()) if bool(both.any()) and cpu["s"].numel() else 0.0
            dg = 0.0
            for a, b in zip(cpu["grads"], gpu["grads"]):
                if a is not None and b is not None:
                    dg = max(dg, float((a - b).abs().max() / a.abs().max().clamp_min(1.0)))
            ok = same_status and dx <= tol and ds <= tol and dg <= 10 * tol
            failures += not ok
            row = dict(family=name, dtype=str(dtype).split(".")[-1], batch=int(cpu["status"].numel()),
                       same_status=same_status, cpu_status=cpu["status"].tolist(), cuda_status=gpu["status"].tolist(),
                       max_dx=dx, max_ds=ds, max_grad_rel=dg, cuda_seconds=gpu["seconds"], ok=ok)
            rows.append(row)
            print(f"{'ok  ' if ok else 'FAIL'} {row['dtype']:8s} {name:34s} status {'same' if same_status else 'DIFF'} "
                  f"dx {dx:.1e} ds {ds:.1e} dgrad {dg:.1e}  cuda {gpu['seconds'] * 1e3:7.1f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda-check.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, failures=failures), indent=1))
    print(f"{failures} failures of {len(rows)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
