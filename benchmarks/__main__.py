"""Command line of the benchmark: ``python -m benchmarks --preset NAME`` from the repository root.

Prints a table, writes ``OUT/<preset>.json`` and ``OUT/<preset>.png`` (``-quick`` appended with
--quick), and returns 0; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from benchmarks.harness import PRESETS, SPEED_PEERS, RunOptions, make_preset, rerun_with_tuned_allocator, run_preset
from benchmarks.peers import ALL_METHODS, DEFAULT_METHODS
from benchmarks.report import format_table, plot, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark alqp against ProxSuite's QPLayer, qpth (OptNet) and cvxpylayers on "
                    "random QPs (QPLayer paper style). Prints a table; writes JSON and a PNG plot.",
    )
    parser.add_argument("--preset", default="forward", choices=PRESETS,
                        help="paper-table2: n=100, 50 eq, 50 ineq, batch 100, eps 1e-1/1e-2/1e-3, "
                             "forward+backward; paper-table4: same at batch 1; scaling: batch 1..4096 "
                             "at n=100 and n 10..500 at batch 64; forward / backward: n=100,p=m=50 at "
                             "batch 1/100/1000 and n=50,p=10,m=50 at batch 128; tiny: n 2/5/10 at batch 1/5/8, box and "
                             "mixed rows; threads: 1 and 2 threads at batch 64/256/1024 (default: forward)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CPU-only peers copy to the CPU)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point (preset default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (preset default)")
    parser.add_argument("--peers", default=None,
                        help=f"comma list among {', '.join(ALL_METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                             f"for the tiny and threads presets {','.join(SPEED_PEERS)})")
    parser.add_argument("--eps", default=None,
                        help="comma list of tolerances replacing the preset's (given to every method)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and diffcp jobs for every method (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random QPs")
    parser.add_argument("--ref-max", type=int, default=256,
                        help="accuracy is checked on the first min(B, REF_MAX) problems (default 256)")
    parser.add_argument("--ref-seconds", type=float, default=20.0,
                        help="time budget of the reference solves of one point (default 20)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget of the repeats of one method at one point; fewer repeats "
                             "(at least one) when exceeded (default: 30, 15 for scaling)")
    parser.add_argument("--cvxpylayers-max-batch", type=int, default=128,
                        help="cvxpylayers runs only up to this batch size (default 128)")
    parser.add_argument("--cvxpylayers-max-n", type=int, default=100,
                        help="cvxpylayers runs only up to this n (default 100: n=200 at batch 64 "
                             "takes about a minute per run)")
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG (default results/)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    parser.add_argument("--tuned-allocator", action="store_true",
                        help="re-run this command with transparent huge pages and freed memory kept, for every "
                             "method (benchmarks.harness.ALLOCATOR_ENV; the README's tables were measured so); "
                             "off by default")
    return parser


def main(argv=None, as_program: Optional[bool] = None) -> int:
    """Entry point of ``python -m benchmarks``. Returns the exit status.

    Args:
        argv: the options (default: sys.argv[1:]).
        as_program: whether this process runs the benchmark as its program, so that
            ``--tuned-allocator`` may re-run it (default: when argv is None).
    """
    args = build_parser().parse_args(argv)
    default_peers = SPEED_PEERS if args.preset in ("tiny", "threads") else DEFAULT_METHODS
    peers = [p.strip() for p in (args.peers or ",".join(default_peers)).split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_METHODS and not p.startswith("alqp-")]
    if unknown:
        print(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    eps = [float(e) for e in args.eps.split(",")] if args.eps else None
    preset = make_preset(args.preset, quick=args.quick, eps=eps)
    repeats, warmup = args.repeats, args.warmup
    if args.quick:
        repeats = 1 if repeats is None else repeats
        warmup = 0 if warmup is None else warmup
    options = RunOptions(device=args.device, dtype=args.dtype, repeats=repeats, warmup=warmup,
                         threads=args.threads, seed=args.seed, ref_max=args.ref_max,
                         ref_seconds=args.ref_seconds,
                         max_seconds_per_point=args.max_seconds,
                         cvxpylayers_max_batch=args.cvxpylayers_max_batch,
                         cvxpylayers_max_n=args.cvxpylayers_max_n)
    if (argv is None if as_program is None else as_program) and args.tuned_allocator:
        rerun_with_tuned_allocator()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    start = time.perf_counter()
    result = run_preset(preset, peers, options, log=log)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print()
    print(format_table(result))
    stem = os.path.join(args.out, args.preset + ("-quick" if args.quick else ""))
    print(f"wrote {write_json(result, stem + '.json')}")
    if not args.no_plot:
        png = plot(result, stem + ".png")
        print(f"wrote {png}" if png else "no plot (matplotlib missing or nothing ran)")
    print(f"wall time {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
