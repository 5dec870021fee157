"""A compact summary of a results JSON: per point, alqp's forward / backward / total median ms and
each peer's time over alqp's (``python -m benchmarks.summary results/tiny.json``)."""
from __future__ import annotations

import json
import sys


def summarize(result: dict) -> str:
    """One line per configuration: alqp's medians and the ratio peer / alqp of every peer
    (> 1: alqp faster; daqp-raw against alqp's forward)."""
    points: dict = {}
    for r in result["records"]:
        c = r["config"]
        key = (c["batch"], c["n"], c["p"], c["m"], c.get("rows", "random"), c.get("threads"), c["eps"])
        points.setdefault(key, {})[r["method"]] = r
    lines = []
    for (B, n, p, m, rows, threads, eps), recs in points.items():
        base = recs.get("alqp")
        if base is None or base["status"] != "ok":
            continue
        head = (f"B={B:<5} n={n:<4} p={p:<3} m={m:<4} eps={eps:<6g} {rows:<6}"
                + (f" threads={threads}" if threads else "") + f"  alqp fwd {base['forward']['median']:.3g} ms")
        if base["backward"]:
            head += f" bwd {base['backward']['median']:.3g} total {base['total']['median']:.3g} ms"
        ratios = [f"{name}/alqp {r['ratio_vs_alqp']:.2f}" for name, r in recs.items()
                  if name != "alqp" and r["status"] == "ok" and r["ratio_vs_alqp"] is not None]
        lines.append(head + "  |  " + ", ".join(ratios))
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(summarize(json.load(f)))
