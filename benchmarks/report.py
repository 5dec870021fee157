"""Output of a benchmark run: a plain-text table, a JSON file and a PNG plot.

All three read the dict returned by :func:`benchmarks.harness.run_preset`. Each record is
    {"config": {"batch", "n", "p", "m", "eps", "sweep"}, "method", "status": "ok"|"skipped"|"error",
     "reason", "forward"/"backward"/"total": {"median", "q25", "q75", "min", "max", "runs"} in ms or
     None, "err_x": max |x - x_ref|, "ratio_vs_alqp", "repeats", "info", "notes"}.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional


def _fmt_ms(stats: Optional[dict]) -> str:
    """'12.3 [11.9-13.0]': median and interquartile range, 3 significant digits."""
    if not stats:
        return "-"
    return f"{_sig(stats['median'])} [{_sig(stats['q25'])}-{_sig(stats['q75'])}]"


def _sig(v: float) -> str:
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def format_table(result: dict) -> str:
    """The results as a plain-text table, one row per configuration and method.

    Columns: batch B, sizes n/p/m, tolerance, method, forward ms, backward ms and total ms (median
    [first quartile - third quartile] per batch), max |x - x_ref|, total time / alqp's total (forward
    time in forward mode), and a short note (skip reason, alqp's Newton steps).
    """
    backward = result["mode"] == "forward+backward"
    head = ["B", "n", "p", "m", "eps", "method", "fwd ms [IQR]"]
    if backward:
        head += ["bwd ms [IQR]", "total ms"]
    head += ["max|x-xref|", "t/t_alqp", "note"]
    rows = []
    for r in result["records"]:
        c = r["config"]
        row = [str(c["batch"]), str(c["n"]), str(c["p"]), str(c["m"]), f"{c['eps']:g}", r["method"]]
        if r["status"] != "ok":
            row += ["-"] * (4 if backward else 2)
            row += ["-", f"{r['status']}: {r['reason']}"]
        else:
            row.append(_fmt_ms(r["forward"]))
            if backward:
                row += [_fmt_ms(r["backward"]), _sig(r["total"]["median"])]
            row.append(f"{r['err_x']:.1e}")
            row.append("-" if r["ratio_vs_alqp"] is None else f"{r['ratio_vs_alqp']:.2f}")
            info = r.get("info") or {}
            note = []
            if "newton_steps_max" in info:
                note.append(f"iterations max {info['newton_steps_max']} mean {info['newton_steps_mean']}")
            if r.get("ratio_basis") == "alqp forward":
                note.append("forward only; t/t_alqp against alqp's forward")
            if info.get("not_solved"):
                note.append(f"{info['not_solved']} not SOLVED")
            if r.get("repeats") is not None and r["repeats"] < result.get("repeats", 0):
                note.append(f"{r['repeats']} repeats (time cap)")
            if r.get("ref_count") is not None and r["ref_count"] < min(c["batch"], result["ref_max"]):
                note.append(f"accuracy on {r['ref_count']} problems")
            if r.get("warmup") == 0 and result.get("warmup", 0) > 0:
                note.append("no warm-up (warm from the previous point)")
            row.append("; ".join(note))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    # The note column is left unpadded: it is last and may be long.
    def line(cells):
        return "  ".join(cell.rjust(w) if i < 5 else cell.ljust(w) for i, (cell, w) in
                         enumerate(zip(cells[:-1], widths[:-1]))) + "  " + cells[-1]

    env = result["environment"]
    out = [f"preset {result['preset']}: {result['description']}",
           f"mode {result['mode']}; device {env['device']}, {env['dtype']}; torch threads "
           f"{env['torch_threads']} of {env['cpu_count']} CPUs; allocator {env.get('allocator', 'default')}; "
           f"{result['repeats']} repeats after "
           f"{result['warmup']} warm-up; times in ms per batch, median [IQR]; max|x-xref| over the "
           f"first min(B, {result['ref_max']}) problems (fewer where noted) against a KKT-certified "
           f"reference ({env['reference']} active set + exact KKT solve); "
           f"t/t_alqp = median time / alqp's (< 1: faster than alqp)",
           line(head), line(["-" * w for w in widths[:-1]] + ["-" * 4])]
    out += [line(row) for row in rows]
    if result.get("skipped"):
        out.append("skipped methods: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()))
    out.append("tolerances: " + "; ".join(f"{k}: {v}" for k, v in result["tolerances"].items()
                                          if k not in result.get("skipped", {})))
    for note in result.get("notes", []):
        out.append("note: " + note)
    return "\n".join(out)


def write_json(result: dict, path: str) -> str:
    """Write the result dict as JSON (creating the folder); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return path


def _panels(result: dict) -> list:
    """Group the successful records into plot panels.

    A panel is one swept axis ('batch', 'n' or 'eps') with the other sizes held fixed; its lines are
    the methods. Returns [(axis, title, {method: [(x, median, q25, q75), ...]})].
    """
    panels: dict = {}
    for r in result["records"]:
        if r["status"] != "ok":
            continue
        c = r["config"]
        axis = c["sweep"] or "batch"
        fixed = {k: c[k] for k in ("batch", "n", "p", "m", "eps") if k != axis}
        if axis == "n":  # the n sweep keeps p and m proportional to n
            fixed.pop("p"), fixed.pop("m")
        title = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fixed.items())
        key = (axis, title)
        t = r["total"]
        panels.setdefault(key, {}).setdefault(r["method"], []).append(
            (c[axis], t["median"], t["q25"], t["q75"]))
    return [(axis, title, lines) for (axis, title), lines in panels.items()]


def plot(result: dict, path: str) -> Optional[str]:
    """Log-log plot of the median time (total, or forward in forward mode) against each swept axis,
    one line per method with its interquartile range shaded. Returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = _panels(result)
    if not panels:
        return None
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    what = "forward + backward" if result["mode"] == "forward+backward" else "forward"
    # One colour per method across all panels, in the order of the table.
    order = list(dict.fromkeys(r["method"] for r in result["records"]))
    colour = {m: f"C{i % 10}" for i, m in enumerate(order)}
    for ax, (axis, title, lines) in zip(axes.flat, panels):
        for method in sorted(lines, key=order.index):
            pts = sorted(lines[method])
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=method, color=colour[method])
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2, color=colour[method])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel({"batch": "batch size B", "n": "n (p = m = n/2)", "eps": "tolerance eps"}[axis])
        ax.set_ylabel(f"{what} time per batch (ms)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = result["environment"]
    fig.suptitle(f"alqp benchmark {result['preset']} ({env['device']}, {env['dtype']}, "
                 f"{env['torch_threads']} threads)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
