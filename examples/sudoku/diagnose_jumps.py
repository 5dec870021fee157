"""Diagnose the test-error jumps of OptNet's Sudoku model (issue 19, item 5).

Reads a capture written by ``train.py --capture`` (every training step: the parameters before it,
the batch, the gradients and Adam's update), finds the step after which the test board errors jump
the most, rebuilds exactly the QPs of that step and compares alqp's and qpth's answers on them:

- forward: statuses, primal residuals ||A x - b||, min x, objective values, distance between the two
  answers, active sets (x_i = 0), and the degeneracy of the answer (active bounds + equality rows
  against the 64 variables; rank of the active constraint matrix);
- backward: the batch loss's gradient with respect to A and z0 from each solver, norms and cosines,
  and a finite-difference check of the directional derivative along each gradient and a random
  direction (central differences of the loss computed with a tight alqp solve, at several steps);
- the step: Adam's update from each gradient (Adam's state replayed from the captured gradients),
  and the test errors after each of the two counterfactual steps, evaluated with both solvers.

It writes ``<out>/diagnose_jumps.json`` and ``<out>/diagnose_jumps.png`` (test errors per step around
the jump; gradient cosine and update size per step).

    python examples/sudoku/train.py --models optnet --capture --out results/jump-alqp   # about 5 min
    python examples/sudoku/diagnose_jumps.py --capture results/jump-alqp/capture-optnet.pt
    python examples/sudoku/diagnose_jumps.py --capture ... --tolerance-sweep 10   # gradient at eps_abs 1e-6 vs 1e-9
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

import alqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import SudokuData, board_errors, decode, load_or_generate  # noqa: E402
from models import build_model  # noqa: E402


def _settings(args: dict) -> alqp.Settings:
    return alqp.Settings(eps_abs=args["eps_abs"], mu_min=args["mu_min"], rho=args["rho"], max_iter=args["max_iter"])


def make_model(solver: str, run_args: dict, params: dict, backward: Optional[str] = None):
    """The captured run's model ("optnet": alqp, "qpth") with the given parameters (A, log_z0)."""
    model = build_model(solver, run_args["box"], settings=_settings(run_args),
                        backward=backward or run_args["backward"], q_penalty=run_args["q_penalty"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model


@torch.no_grad()
def test_errors(model, test: SudokuData, n: int, batch: int = 200) -> int:
    """Test boards whose argmax digits break a Sudoku rule."""
    errors = 0
    for i in range(0, test.puzzles.shape[0], batch):
        out = model(test.puzzles[i:i + batch])
        errors += int(board_errors(decode(out.x.reshape(out.x.shape[0], -1), n), n).sum())
    return errors


def batch_loss_and_grads(model, puzzles, target):
    """The training loss (MSE) of a batch and its gradients w.r.t. the parameters."""
    model.zero_grad()
    out = model(puzzles)
    loss = torch.nn.functional.mse_loss(out.x, target)
    loss.backward()
    return loss.item(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}, out


def flat(d: dict) -> torch.Tensor:
    return torch.cat([d[k].flatten() for k in sorted(d)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def qp_report(A, b, x, g, q, tol=1e-7) -> dict:
    """Forward quality and degeneracy of the answers x (B, n) to min q/2|x|^2 + g'x, Ax=b, x>=0."""
    n = x.shape[1]
    active = x < tol
    ranks, dims = [], []
    for k in range(x.shape[0]):
        rows = torch.cat([A, torch.eye(n, dtype=A.dtype)[active[k]]])
        ranks.append(int(torch.linalg.matrix_rank(rows)))
        dims.append(rows.shape[0])
    ranks, dims = torch.tensor(ranks), torch.tensor(dims)
    return {"eq_residual_max": float((x @ A.T - b).abs().max()),
            "min_x": float(x.min()),
            "objective_mean": float((0.5 * q * x.pow(2).sum(1) + (g * x).sum(1)).mean()),
            "active_bounds_mean": float(active.sum(1).double().mean()),
            "near_zero_not_active_mean": float(((x >= tol) & (x < 1e-3)).sum(1).double().mean()),
            "active_rows_mean": float(dims.double().mean()),
            "active_rank_mean": float(ranks.double().mean()),
            "licq_fails": int((ranks < dims).sum())}


def adam_states(steps: list, betas=(0.9, 0.999)) -> list:
    """Adam's (m, v) before each captured step, replayed from the captured gradients."""
    m = {k: torch.zeros_like(v) for k, v in steps[0]["grads"].items()}
    v = {k: torch.zeros_like(t) for k, t in steps[0]["grads"].items()}
    states = []
    for st in steps:
        states.append(({k: t.clone() for k, t in m.items()}, {k: t.clone() for k, t in v.items()}))
        for k, grad in st["grads"].items():
            m[k].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
            v[k].mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    return states


def adam_update(grads: dict, state, t: int, lr: float, betas=(0.9, 0.999), eps=1e-8) -> dict:
    """The update Adam (torch's defaults) makes at step t (1-based) from ``state`` and ``grads``."""
    m0, v0 = state
    out = {}
    for k, grad in grads.items():
        m = betas[0] * m0[k] + (1 - betas[0]) * grad
        v = betas[1] * v0[k] + (1 - betas[1]) * grad * grad
        mhat, vhat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        out[k] = -lr * mhat / (vhat.sqrt() + eps)
    return out


def finite_difference(loss_at, params: dict, direction: dict, hs) -> list:
    """Central differences of ``loss_at(params)`` along ``direction`` (unit norm) for each h."""
    out = []
    for h in hs:
        plus = {k: params[k] + h * direction[k] for k in params}
        minus = {k: params[k] - h * direction[k] for k in params}
        out.append((loss_at(plus) - loss_at(minus)) / (2 * h))
    return out


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capture", default="results/jump-alqp/capture-optnet.pt", help="train.py --capture's file")
    p.add_argument("--step", type=int, default=None,
                   help="global index of the step to diagnose (default: the one after which test errors jump most)")
    p.add_argument("--window", type=int, default=60, help="steps before the jump whose test errors are measured")
    p.add_argument("--fd-steps", default="1e-3,1e-4,1e-5,1e-6", help="finite-difference steps h")
    p.add_argument("--out", default="results/sudoku-jumps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tolerance-sweep", type=int, default=0, metavar="EVERY",
                   help="instead: every EVERY-th captured step, the batch gradient at eps_abs 1e-6 against 1e-9 "
                        "(same parameters), and for the batch that differs most, its puzzles against qpth and "
                        "finite differences; writes <out>/tolerance_sweep.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    cap = torch.load(args.capture, weights_only=False)
    run, steps = cap["args"], cap["steps"]
    n = run["box"]
    data = load_or_generate(run["train"] + run["test"], n, run["seed"], run["data_cache"], run["max_blanks"])
    train = SudokuData(data.puzzles[:run["train"]], data.solutions[:run["train"]])
    test = SudokuData(data.puzzles[run["train"]:], data.solutions[run["train"]:])
    if args.tolerance_sweep:
        sweep = tolerance_sweep(steps, run, train, args.tolerance_sweep)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tolerance_sweep.json"), "w") as f:
            json.dump(sweep, f, indent=1)
        print(json.dumps(sweep["worst"], indent=1))
        print(f"wrote {args.out}/tolerance_sweep.json")
        return sweep
    params_after = [steps[i + 1]["params"] for i in range(len(steps) - 1)] + [cap["final"]]
    per_epoch = max(st["step"] for st in steps) + 1

    # 1. Where: test errors at every epoch end, then at every step of the window before the worst jump.
    result = {"capture": args.capture, "run": {k: run[k] for k in ("lr", "batch", "epochs", "train", "test", "eps_abs",
                                                                    "mu_min", "rho", "max_iter", "q_penalty")}}
    ends = [i for i, st in enumerate(steps) if st["step"] == per_epoch - 1]
    epoch_errors = [test_errors(make_model(cap["model"], run, params_after[i]), test, n)
                    for i in tqdm(ends, desc="test errors per epoch")]
    result["epoch_test_errors"] = epoch_errors
    if args.step is None:
        jumps = [epoch_errors[0]] + [epoch_errors[e] - epoch_errors[e - 1] for e in range(1, len(ends))]
        worst_epoch = max(range(1, len(ends)), key=lambda e: jumps[e])
        lo, hi = ends[worst_epoch - 1] + 1, ends[worst_epoch]
    else:
        lo, hi = max(0, args.step - args.window), min(len(steps) - 1, args.step + 3)
    lo = max(lo, hi - args.window)
    window = list(range(lo - 1, hi + 1))
    window_errors = {}
    for i in tqdm(window, desc="test errors per step"):
        window_errors[i] = test_errors(make_model(cap["model"], run, params_after[i]), test, n)
    if args.step is None:
        step = max(window[1:], key=lambda i: window_errors[i] - window_errors[i - 1])
    else:
        step = args.step
    st = steps[step]
    result["window"] = {"steps": window, "test_errors_after": [window_errors[i] for i in window]}
    result["jump"] = {"step": step, "epoch": st["epoch"], "step_in_epoch": st["step"],
                      "test_errors_before": test_errors(make_model(cap["model"], run, st["params"]), test, n),
                      "test_errors_after": window_errors.get(step)}
    print(f"jump: global step {step} (epoch {st['epoch']}, step {st['step']}): test errors "
          f"{result['jump']['test_errors_before']} -> {result['jump']['test_errors_after']}")

    hs = [float(h) for h in args.fd_steps.split(",")]
    # The trigger: the step of the window whose gradient norm is the largest multiple of the median of
    # the 50 steps before it (a batch with an outlier gradient), if it comes before the jump.
    norms = [float(flat(s_["grads"]).norm()) for s_ in steps]
    ratios = {i: norms[i] / sorted(norms[max(0, i - 50):i])[len(norms[max(0, i - 50):i]) // 2]
              for i in window[1:] if i >= 1}
    trigger = max((i for i in ratios if i <= step), key=lambda i: ratios[i], default=step)
    result["trigger"] = {"step": trigger, "epoch": steps[trigger]["epoch"], "step_in_epoch": steps[trigger]["step"],
                         "grad_norm_over_median": ratios.get(trigger),
                         "test_errors_after": window_errors.get(trigger)}
    result["grad_norm_over_median_window"] = [ratios.get(i) for i in window[1:]]
    states = adam_states(steps)
    result["at_trigger"] = compare(trigger, steps, states, run, train, test, n, hs, per_puzzle=True)
    result["at_jump"] = compare(step, steps, states, run, train, test, n, hs)
    result["test_errors_after_captured_step_qpth_forward"] = test_errors(make_model("qpth", run, params_after[step]),
                                                                          test, n)
    result["update_norms_window"] = {k: [float(steps[i]["update"][k].norm()) for i in window[1:]]
                                     for k in st["update"]}
    result["grad_norms_window"] = {k: [float(steps[i]["grads"][k].norm()) for i in window[1:]] for k in st["grads"]}

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "diagnose_jumps.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "diagnose_jumps.png"))
    print(json.dumps({k: result[k] for k in ("jump", "trigger", "at_trigger", "at_jump")}, indent=1))
    print(f"wrote {args.out}/diagnose_jumps.json and diagnose_jumps.png")
    return result


def compare(step: int, steps: list, states: list, run: dict, train: SudokuData, test: SudokuData, n: int,
            hs: list, per_puzzle: bool = False) -> dict:
    """alqp against qpth on the QPs of one captured step: forward, gradients, finite differences, Adam's step."""
    from tqdm import tqdm

    st = steps[step]
    result = {"step": step}
    # 2. The QPs of that step, solved by both.
    puzzles, target = train.puzzles[st["idx"]], train.solutions[st["idx"]]
    A, z0 = st["params"]["A"], st["params"]["log_z0"]
    b = A @ z0.exp()
    g = -puzzles.reshape(puzzles.shape[0], -1)
    solvers = {"alqp": make_model("optnet", run, st["params"]), "qpth": make_model("qpth", run, st["params"]),
               "alqp_lpgd": make_model("optnet", run, st["params"], backward="lpgd")}
    outs, grads, losses = {}, {}, {}
    for name, model in solvers.items():
        losses[name], grads[name], out = batch_loss_and_grads(model, puzzles, target)
        outs[name] = out.x.detach().reshape(out.x.shape[0], -1)
        result.setdefault("forward", {})[name] = dict(
            qp_report(A, b, outs[name], g, run["q_penalty"]), loss=losses[name],
            statuses={alqp.Status(s).name: int((out.status == s).sum()) for s in out.status.unique().tolist()},
            retried=int((out.attempt > 0).sum()))
    dx = (outs["alqp"] - outs["qpth"]).abs()
    result["forward"]["alqp_vs_qpth"] = {"max_abs_dx": float(dx.max()), "mean_abs_dx": float(dx.mean()),
                                         "argmax_agree": int((decode(outs["alqp"], n) == decode(outs["qpth"], n))
                                                             .flatten(1).all(1).sum())}
    captured = flat(st["grads"])
    names = list(grads)
    result["gradients"] = {
        "norms": {k: {p: float(v.norm()) for p, v in grads[k].items()} for k in names} | {
            "captured": {p: float(v.norm()) for p, v in st["grads"].items()}},
        "cosine": {f"{a}_vs_{b2}": cosine(flat(grads[a]), flat(grads[b2]))
                   for i, a in enumerate(names) for b2 in names[i + 1:]}
        | {"alqp_vs_captured": cosine(flat(grads["alqp"]), captured)},
        "cosine_per_param": {p: cosine(grads["alqp"][p].flatten(), grads["qpth"][p].flatten()) for p in grads["alqp"]},
        "norm_ratio_alqp_over_qpth": float(flat(grads["alqp"]).norm() / flat(grads["qpth"]).norm()),
    }

    # 3. Finite differences of the loss (a tight alqp solve) along each gradient and a random direction.
    tight = alqp.Settings(eps_abs=1e-11, mu_min=run["mu_min"], rho=run["rho"], max_iter=1000)
    fd_model = build_model("optnet", n, settings=tight, q_penalty=run["q_penalty"])

    @torch.no_grad()
    def loss_at(params):
        for name, prm in fd_model.named_parameters():
            prm.copy_(params[name])
        return torch.nn.functional.mse_loss(fd_model(puzzles).x, target).item()

    gen = torch.Generator().manual_seed(1)
    directions = {k: grads[k] for k in ("alqp", "qpth", "alqp_lpgd")}
    directions["random"] = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in st["params"].items()}
    fd = {}
    for dname, d in tqdm(directions.items(), desc="finite differences"):
        norm = flat(d).norm()
        unit = {k: v / norm for k, v in d.items()}
        fd[dname] = {"h": hs, "fd": finite_difference(loss_at, st["params"], unit, hs),
                     **{f"{s}_predicts": float(flat(grads[s]) @ flat(unit)) for s in ("alqp", "qpth", "alqp_lpgd")}}
    result["finite_differences"] = fd

    # 4. The step: Adam's update from each gradient, and the test errors after it, with both solvers.
    t = step + 1
    lr = run["lr"]
    replayed = adam_update(st["grads"], states[step], t, lr)
    replay_error = max(float((replayed[k] - st["update"][k]).abs().max()) for k in replayed)
    result["adam"] = {"replay_matches_capture": replay_error,
                      "eps_share_of_sqrt_v": {k: float((states[step][1][k].sqrt() < 1e-7).double().mean())
                                              for k in replayed}}
    counter = {}
    # qpth returns the batch mean of a shared parameter's gradient, alqp the sum (the captured Adam
    # state holds sums): qpth's gradient enters times B, so that only its direction differs.
    scale = {"alqp": 1.0, "qpth": float(puzzles.shape[0]), "alqp_lpgd": 1.0}
    for gname in ("alqp", "qpth", "alqp_lpgd"):
        upd = adam_update({k: scale[gname] * v for k, v in grads[gname].items()}, states[step], t, lr)
        new = {k: st["params"][k] + upd[k] for k in upd}
        counter[gname] = {"update_norm": {k: float(v.norm()) for k, v in upd.items()},
                          "test_errors_alqp_forward": test_errors(make_model("optnet", run, new), test, n),
                          "test_errors_qpth_forward": test_errors(make_model("qpth", run, new), test, n)}
    result["counterfactual_step"] = counter
    # Adam's epsilon against sqrt(v) at each solver's gradient scale (alqp: sums; qpth: means, B times smaller).
    vhat = {k: states[step][1][k] / (1 - 0.999 ** step) for k in st["grads"]} if step else None
    if vhat is not None:
        B = puzzles.shape[0]
        result["adam"]["eps_over_sqrt_v_median"] = {
            "alqp": {k: float((1e-8 / v.sqrt().clamp_min(1e-300)).median()) for k, v in vhat.items()},
            "qpth": {k: float((1e-8 * B / v.sqrt().clamp_min(1e-300)).median()) for k, v in vhat.items()}}
    if per_puzzle:
        result["per_puzzle"] = per_puzzle_gradients(st["params"], run, puzzles, target, hs)
    return result


def tolerance_sweep(steps: list, run: dict, train: SudokuData, every: int, loose: float = 1e-6,
                    tight: float = 1e-9) -> dict:
    """Does the backward depend on eps_abs where the answers do not? Every ``every``-th step: the
    batch gradient with eps_abs ``loose`` against ``tight`` (same parameters and QPs), and how many
    puzzles have an x_i in (1e-10, loose]. For the batch that differs most: each puzzle's gradient at
    both tolerances against qpth's (times B) and, for the puzzle that differs most, central finite
    differences along its ``tight`` gradient and one-sided ones along the difference."""
    from tqdm import tqdm

    def grads_at(eps, st, puzzles, target):
        r = dict(run, eps_abs=eps)
        _, g, out = batch_loss_and_grads(make_model("optnet", r, st["params"]), puzzles, target)
        return flat(g), out.x.detach().reshape(puzzles.shape[0], -1)

    rows = []
    for i in tqdm(range(0, len(steps), every), desc="tolerance sweep"):
        st = steps[i]
        puzzles, target = train.puzzles[st["idx"]], train.solutions[st["idx"]]
        g_loose, x = grads_at(loose, st, puzzles, target)
        g_tight, _ = grads_at(tight, st, puzzles, target)
        rows.append({"step": i, "epoch": st["epoch"],
                     "puzzles_with_small_x": int(((x > 1e-10) & (x <= loose)).any(1).sum()),
                     "grad_rel_diff": float((g_loose - g_tight).norm() / g_tight.norm()),
                     "cosine": cosine(g_loose, g_tight)})
    worst = max(rows, key=lambda r: r["grad_rel_diff"])
    result = {"loose": loose, "tight": tight, "every": every, "rows": rows,
              "batches_differing": sum(r["grad_rel_diff"] > 1e-9 for r in rows), "worst": worst}
    if worst["grad_rel_diff"] <= 1e-9:
        return result
    st = steps[worst["step"]]
    puzzles, target = train.puzzles[st["idx"]], train.solutions[st["idx"]]
    B = puzzles.shape[0]

    def per_puzzle(solver, eps):
        model = make_model(solver, dict(run, eps_abs=eps), st["params"])
        out, xs = [], []
        for k in range(B):
            model.zero_grad()
            o = model(puzzles[k:k + 1])
            (torch.nn.functional.mse_loss(o.x, target[k:k + 1]) / B).backward()
            out.append(torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())]).clone())
            xs.append(o.x.detach().reshape(-1))
        return torch.stack(out), torch.stack(xs)

    g_l, _ = per_puzzle("optnet", loose)
    g_t, xs = per_puzzle("optnet", tight)
    g_q, _ = per_puzzle("qpth", tight)  # qpth's per-puzzle gradient of loss/B: same scale at batch 1
    k = int((g_l - g_t).norm(dim=1).argmax())
    x = xs[k]
    shapes = {name: p.shape for name, p in make_model("optnet", run, st["params"]).named_parameters()}

    def split(v):
        out, offset = {}, 0
        for name in sorted(shapes):
            size = int(torch.tensor(shapes[name]).prod())
            out[name] = v[offset:offset + size].reshape(shapes[name])
            offset += size
        return out

    fd_model = build_model("optnet", run["box"], settings=alqp.Settings(eps_abs=1e-11, mu_min=run["mu_min"],
                                                                         rho=run["rho"], max_iter=1000),
                           q_penalty=run["q_penalty"])

    @torch.no_grad()
    def loss_at(prm):
        for name, p in fd_model.named_parameters():
            p.copy_(prm[name])
        return torch.nn.functional.mse_loss(fd_model(puzzles[k:k + 1]).x, target[k:k + 1]).item() / B

    hs = [1e-4, 1e-5, 1e-6, 1e-7]
    unit = g_t[k] / g_t[k].norm()
    diff = (g_l[k] - g_t[k]) / (g_l[k] - g_t[k]).norm()
    base = loss_at(st["params"])
    one_sided = []
    for h in hs:
        plus = loss_at({name: st["params"][name] + h * d for name, d in split(diff).items()})
        minus = loss_at({name: st["params"][name] - h * d for name, d in split(diff).items()})
        one_sided.append({"h": h, "forward": (plus - base) / h, "backward": (base - minus) / h})
    result["worst_puzzle"] = {
        "puzzle": k, "small_x": x[(x > 1e-10) & (x <= loose)].tolist(),
        "norm": {"loose": float(g_l[k].norm()), "tight": float(g_t[k].norm()), "qpth": float(g_q[k].norm())},
        "cosine_with_qpth": {"loose": cosine(g_l[k], g_q[k]), "tight": cosine(g_t[k], g_q[k])},
        "fd_along_tight": {"h": hs, "fd": finite_difference(loss_at, st["params"], split(unit), hs),
                           "predicts": {"loose": float(g_l[k] @ unit), "tight": float(g_t[k] @ unit),
                                        "qpth": float(g_q[k] @ unit)}},
        "fd_along_difference": {"one_sided": one_sided,
                                "predicts": {"loose": float(g_l[k] @ diff), "tight": float(g_t[k] @ diff),
                                             "qpth": float(g_q[k] @ diff)}}}
    return result


def smallest_singular_value(A, x, tol=1e-7) -> float:
    """sigma_min of [A; rows of I at the active bounds of x] (n columns): how close the answer's
    active constraints come to losing rank."""
    rows = torch.cat([A, torch.eye(x.numel(), dtype=A.dtype)[x < tol]])
    return float(torch.linalg.svdvals(rows).min())


def smallest_singular_values(A, xs) -> float:
    """Median over the batch of :func:`smallest_singular_value`."""
    xs = xs.reshape(xs.shape[0], -1)
    return float(torch.tensor([smallest_singular_value(A, x) for x in xs]).median())


def per_puzzle_gradients(params: dict, run: dict, puzzles, target, hs) -> dict:
    """Each puzzle's share of the batch gradient, and a finite-difference check of the largest one."""
    model = make_model("optnet", run, params)
    B = puzzles.shape[0]
    per = []
    for k in range(B):
        model.zero_grad()
        # the batch loss is the mean over B puzzles: puzzle k contributes 1/B of its own MSE
        loss = torch.nn.functional.mse_loss(model(puzzles[k:k + 1]).x, target[k:k + 1]) / B
        loss.backward()
        per.append(torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())]).clone())
    per = torch.stack(per)
    norms = per.norm(dim=1)
    total = per.sum(0)
    top = int(norms.argmax())
    out = model(puzzles[top:top + 1]).x.detach().reshape(-1)
    A = params["A"]
    active = out < 1e-7
    rows = torch.cat([A, torch.eye(out.numel(), dtype=A.dtype)[active]])
    g_top = {}
    offset = 0
    for name, p in sorted(model.named_parameters()):
        g_top[name] = per[top, offset:offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    unit = {k: v / norms[top] for k, v in g_top.items()}
    tight = alqp.Settings(eps_abs=1e-11, mu_min=run["mu_min"], rho=run["rho"], max_iter=1000)
    fd_model = build_model("optnet", run["box"], settings=tight, q_penalty=run["q_penalty"])

    @torch.no_grad()
    def loss_at(prm):
        for name, p in fd_model.named_parameters():
            p.copy_(prm[name])
        return torch.nn.functional.mse_loss(fd_model(puzzles[top:top + 1]).x, target[top:top + 1]).item() / B

    # the smallest slack x_i > 0: how far (in x) the active set is from changing
    slack = out[~active].min() if (~active).any() else torch.tensor(float("nan"))
    return {"norm_median": float(norms.median()), "norm_max": float(norms.max()), "top_puzzle": top,
            "top_share_of_batch_norm": float(norms[top] / total.norm()),
            "cosine_top_vs_batch": cosine(per[top], total),
            "top_mse": float(torch.nn.functional.mse_loss(out, target[top].reshape(-1))),
            "top_active_bounds": int(active.sum()), "top_active_rank": int(torch.linalg.matrix_rank(rows)),
            "top_active_rows": int(rows.shape[0]),
            "top_active_smallest_singular_value": float(torch.linalg.svdvals(rows).min()),
            "batch_smallest_singular_value_median": smallest_singular_values(A, model(puzzles).x.detach()),
            "top_smallest_positive_x": float(slack),
            "top_fd": {"h": hs, "fd": finite_difference(loss_at, params, unit, hs), "predicts": float(norms[top])}}


def plot(result: dict, path: str) -> None:
    """Test errors after each step of the window, each step's gradient norm against the median of the
    50 before it, and the size of Adam's update; the trigger and the jump marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    w = result["window"]
    steps = w["steps"][1:]
    axes[0].plot(w["steps"], w["test_errors_after"], marker="o", ms=3)
    axes[0].set_ylabel("test board errors after the step (of 1000)")
    ratios = [r if r is not None else float("nan") for r in result["grad_norm_over_median_window"]]
    axes[1].semilogy(steps, ratios, marker="o", ms=3)
    axes[1].set_ylabel("gradient norm / median of the 50 steps before")
    for k, v in result["update_norms_window"].items():
        axes[2].semilogy(steps, v, marker="o", ms=3, label=f"‖Adam update of {k}‖₂")
    axes[2].set_ylabel("update norm (parameter units)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.axvline(result["trigger"]["step"], color="tab:orange", ls=":", label="trigger (outlier gradient)")
        ax.axvline(result["jump"]["step"], color="r", ls="--", label="largest one-step jump")
        ax.set_xlabel("training step (global index)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
