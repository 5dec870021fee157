"""Two checks of issue 20 on the CPU, each in one run (``python -m benchmarks.threads_check``):

1. Does ``daqp.solve`` release the GIL? Many independent Table-2 solves timed on 1 and 2 Python
   threads, next to two baselines in the same run: numpy's LAPACK inverse (releases the GIL)
   and a pure-Python loop (holds it). On an idle 2-core machine a releasing call speeds up
   about 2x and a holding one not at all; on a loaded machine compare the ratios with the
   baselines'. Also a load-independent probe: while the main thread calls the function, how
   much a second Python thread gets done (a GIL holder starves it).
2. alqp's forward + backward at Table-2 size (n=100, 50 eq, 50 ineq), batch 256, with 1 and 2 torch threads,
   on an idle machine and with a busy-loop process pinned to one core.

Writes the numbers as JSON (``--out``) and prints them.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def _daqp_problems(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = m = 100
    out = []
    for _ in range(count):
        M = rng.standard_normal((n, n))
        H = M @ M.T / n + 0.01 * np.eye(n)
        A = rng.standard_normal((m, n))
        x0 = rng.standard_normal(n)
        hi = A @ x0 + rng.uniform(0, 1, m)
        lo = np.full(m, -1e30)
        lo[:50] = hi[:50] = A[:50] @ x0
        sense = np.zeros(m, dtype=np.intc)
        sense[:50] = 5
        out.append((H, rng.standard_normal(n), A, hi, lo, sense))
    return out


def gil_check(repeats: int = 5) -> dict:
    """Speed-up of 2 threads over 1 on 64 independent calls, medians over ``repeats``."""
    import daqp

    problems = _daqp_problems(64)
    mats = [np.random.default_rng(i).standard_normal((150, 150)) for i in range(64)]

    def run_daqp(ix):
        for i in ix:
            daqp.solve(*problems[i])

    def run_numpy(ix):
        for i in ix:
            np.linalg.inv(mats[i])

    def run_python(ix):
        total = 0
        for _ in ix:
            for k in range(20000):
                total += k

    def timed(job, threads):
        idx = list(range(64))
        t0 = time.perf_counter()
        if threads == 1:
            job(idx)
        else:
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(job, [idx[j::threads] for j in range(threads)]))
        return time.perf_counter() - t0

    def starved(work, seconds=0.5):
        """Increments/s of a counting thread while the main thread calls ``work``."""
        state = {"stop": False, "count": 0}

        def counter():
            while not state["stop"]:
                state["count"] += 1

        t = threading.Thread(target=counter)
        t.start()
        c0, t0 = state["count"], time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            work()
        rate = (state["count"] - c0) / (time.perf_counter() - t0)
        state["stop"] = True
        t.join()
        return rate

    out = {}
    old = sys.getswitchinterval()
    for name, job in (("daqp.solve", run_daqp), ("numpy inv (releases the GIL)", run_numpy),
                      ("pure Python (holds the GIL)", run_python)):
        ratios = []
        for _ in range(repeats):
            one, two = timed(job, 1), timed(job, 2)
            ratios.append(one / two)
        sys.setswitchinterval(old)
        out[name] = {"speedup_2_threads": statistics.median(ratios), "runs": ratios,
                     "counter_rate_while_main_calls": starved(functools.partial(job, [0]))}
    return out


def _busy(stop_after: float) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    t_end = time.time() + stop_after
    while time.time() < t_end:
        pass


def forward_threads(batch: int = 256, repeats: int = 5) -> dict:
    """alqp's forward and backward (active-set engine, IFT) at Table-2 size: median ms with 1 and 2
    torch threads, idle and with one core kept busy by another process (a busy loop pinned to core 0)."""
    import alqp
    from benchmarks.problems import random_qp_batch

    qp = random_qp_batch(batch, 100, 50, 50, seed=0)
    settings = alqp.Settings(eps_abs=1e-6, eps_rel=0.0)

    weight = torch.randn(batch, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def one_run():
        params = [t.clone().requires_grad_(True) for t in qp.tensors()]
        t0 = time.perf_counter()
        x = alqp.solve_qp(*params, settings=settings).x
        t1 = time.perf_counter()
        (weight * x).sum().backward()
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    def median_ms(threads):
        torch.set_num_threads(threads)
        one_run()
        runs = [one_run() for _ in range(repeats)]
        return {"forward": statistics.median(f for f, _ in runs), "backward": statistics.median(b for _, b in runs),
                "total": statistics.median(f + b for f, b in runs)}

    from alqp import pool

    def settings_sweep():
        times = {str(k): median_ms(k) for k in (1, 2)}
        # The same with the thread policy off (torch's threads inside alqp, no pool): the baseline.
        pool.ENABLED = False
        try:
            times["2, policy off"] = median_ms(2)
        finally:
            pool.ENABLED = True
        return times

    out = {"idle": settings_sweep()}
    busy = multiprocessing.Process(target=_busy, args=(600.0,), daemon=True)
    busy.start()
    try:
        time.sleep(0.2)
        out["one_core_busy"] = settings_sweep()
    finally:
        busy.terminate()
        busy.join()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads_check", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/threads_check.json")
    args = parser.parse_args(argv)
    result = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "gil": gil_check(args.repeats),
              "alqp_ms": forward_threads(args.batch, args.repeats)}
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
