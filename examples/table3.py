"""The QPLayer paper's Table 3 in one command: the four learning tasks, alqp next to its peers.

Runs each task's own script (examples/cartpole, examples/sudoku, examples/denoising,
examples/classification) in a subprocess, at a reduced size by default (about 4 to 15 minutes
on a 2-core CPU) or at the paper's size with ``--full`` (hours: qpth's denoising forward alone
takes about 26 s a batch there), reads the JSON each writes, and prints a table laid out like the
paper's Table 3: forward ms, backward ms and final test loss per task and solver, with the paper's
numbers beside ours. A peer that a task cannot run gets its reason printed instead of numbers.

    python examples/table3.py [--full] [--tasks cartpole,sudoku,denoising,classification] [--out results/table3]

Writes ``<out>/table3.json`` and ``<out>/table3.md`` and each task's own JSON and plots under
``<out>/<task>/``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent

#: The paper's Table 3 (QPLayer paper, ICLR 2024, appendix): forward ms, backward ms, final test loss.
PAPER = {
    "cartpole": {"QPLayer": (55.20, 39.27, 0.02556), "OptNet": (615.84, 61.26, 0.02604),
                 "CvxpyLayer": (629.70, 101.88, 0.02566)},
    "sudoku": {"QPLayer": (87.39, 20.80, 6.19e-4), "OptNet": (454.48, 8.07, 0.0017),
               "CvxpyLayer": (772.77, 192.99, 0.389)},
    "denoising": {"QPLayer": (247.89, 52.99, 3281.84), "OptNet": (2827.48, 40.57, 3529.2029),
                  "CvxpyLayer": None},
    "classification": {"QPLayer": (26.77, 11.12, 0.1363), "OptNet": (102.62, 16.58, 0.3264),
                       "CvxpyLayer": None},
}
#: Why the paper has no CvxpyLayer numbers for two tasks (its footnote to Table 3).
PAPER_CVXPY_ERROR = "the paper: CvxpyLayer cannot put the learned quadratic cost in DPP form"

#: Reduced and full command lines of each task (the script's own options).
COMMANDS = {
    "cartpole": (["cartpole/train.py", "--solver", "all", "--iterations", "60"],
                 ["cartpole/train.py", "--solver", "all", "--iterations", "800"]),
    "sudoku": (["sudoku/train.py", "--models", "lp,optnet,qpth", "--train", "2000", "--test", "300",
                "--epochs", "3", "--eps-abs", "1e-6"],
               ["sudoku/train.py", "--models", "lp,optnet,qpth"]),
    "denoising": (["denoising/train.py", "--solver", "all", "--epochs", "3"],
                  ["denoising/train.py", "--solver", "all", "--full"]),
    "classification": (["classification/train.py", "--solver", "all", "--epochs", "10"],
                       ["classification/train.py", "--solver", "all"]),
}
JSON_NAME = {"cartpole": "cartpole.json", "sudoku": "sudoku.json", "denoising": "denoising.json",
             "classification": "classification.json"}

#: Peers that a task's script does not run, and why (printed in the table).
NOT_RUN = {
    ("sudoku", "proxsuite"): "not wired into examples/sudoku (its models use alqp and qpth)",
    ("denoising", "proxsuite"): "not wired into examples/denoising (its models use alqp and qpth)",
    ("classification", "proxsuite"): "not wired into examples/classification (its models use alqp and qpth)",
    ("cartpole", "cvxpylayers"): "not wired into examples/cartpole",
    ("sudoku", "cvxpylayers"): "not wired into examples/sudoku",
    ("denoising", "cvxpylayers"): PAPER_CVXPY_ERROR,
    ("classification", "cvxpylayers"): PAPER_CVXPY_ERROR,
}


def run_task(task: str, full: bool, out: Path, progress: bool) -> dict:
    """Run one task's script and return its JSON (with the wall time added)."""
    args = COMMANDS[task][1 if full else 0]
    folder = out / task
    command = [sys.executable, str(EXAMPLES / args[0]), *args[1:], "--out", str(folder)]
    if not progress:
        command.append("--no-progress")
    print(f"[table3] {task}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with open(folder / JSON_NAME[task]) as f:
        result = json.load(f)
    result["wall_s"] = time.perf_counter() - start
    return result


def rows_of(task: str, result: dict) -> list:
    """(solver label, forward ms, backward ms, final test loss) of each solver a task ran.

    Times are the scripts' medians per batch (per iteration for the cart-pole); Sudoku's are means
    (its script records means). The cart-pole's loss is its noise-free swing-up loss; the others'
    are their test losses."""
    summary = result["summary"]
    if task == "cartpole":
        return [(s["label"], s["forward_ms"]["median"], s["backward_ms"]["median"], s["clean_loss"])
                for s in summary]
    if task == "sudoku":
        return [(s["label"], s["forward_ms"], s["backward_ms"], s["test_loss"]) for s in summary]
    names = {"alqp": "alqp", "qpth": "qpth (OptNet)"}
    return [(names.get(k, k), s["forward_ms"]["median"], s["backward_ms"]["median"], s["final_test_loss"])
            for k, s in summary.items()]


def table(results: dict) -> str:
    """A Markdown table laid out like the paper's Table 3, ours beside the paper's."""
    lines = ["| task | solver | forward ms | backward ms | final test loss | paper: forward / backward / loss |",
             "|---|---|---|---|---|---|"]
    paper_name = {"alqp": "QPLayer", "OptNet QP (alqp)": "QPLayer", "qpth (OptNet)": "OptNet",
                  "OptNet QP (qpth)": "OptNet", "ProxSuite QPLayer": "QPLayer"}
    for task, result in results.items():
        for label, fwd, bwd, loss in rows_of(task, result):
            key = next((v for k, v in paper_name.items() if label.startswith(k)), None)
            if label.startswith("LP"):
                key = "QPLayer"  # the paper's QPLayer learns an LP for Sudoku (its footnote 5)
            ref = PAPER[task].get(key) if key else None
            ref_text = f"{ref[0]:g} / {ref[1]:g} / {ref[2]:.4g} ({key})" if ref else ""
            lines.append(f"| {task} | {label} | {fwd:.1f} | {bwd:.1f} | {loss:.4g} | {ref_text} |")
        for (t, peer), why in NOT_RUN.items():
            if t == task:
                ref = PAPER[task].get("CvxpyLayer") if peer == "cvxpylayers" else None
                ref_text = f"{ref[0]:g} / {ref[1]:g} / {ref[2]:.4g} (CvxpyLayer)" if ref else ""
                lines.append(f"| {task} | {peer} | not run: {why} | | | {ref_text} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the paper's sizes (hours)")
    parser.add_argument("--tasks", default=",".join(COMMANDS), help="comma list (default: all four)")
    parser.add_argument("--out", type=Path, default=Path("results/table3"))
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars in the tasks")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in COMMANDS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {list(COMMANDS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {task: run_task(task, args.full, args.out, not args.no_progress) for task in tasks}
    text = table(results)
    print(text)
    summary = {"full": args.full, "tasks": {t: {"rows": rows_of(t, r), "wall_s": r["wall_s"],
                                                "command": COMMANDS[t][1 if args.full else 0]}
                                            for t, r in results.items()},
               "paper": PAPER, "not_run": {f"{t}/{p}": why for (t, p), why in NOT_RUN.items() if t in results}}
    (args.out / "table3.json").write_text(json.dumps(summary, indent=1))
    (args.out / "table3.md").write_text(text + "\n")
    print(f"wrote {args.out / 'table3.json'} and {args.out / 'table3.md'}")
    return summary


if __name__ == "__main__":
    main()
