"""Sudoku models: a QP/LP layer whose equality constraints are learned from solved puzzles.

Each model maps puzzles (B, N, N, N) (one-hot givens, blanks zero; see :mod:`data`) to a
:class:`SudokuOutput` whose ``x`` has the puzzles' shape; the predicted board is the argmax over the
last (digit) axis. All three use the puzzle as the linear cost (``g = -puzzle``: the layer is
rewarded for switching on the givens) and ``x >= 0``; they differ in what is learned and which QP
they solve:

- :class:`SudokuLP` (QPLayer paper, Fig. 13): ``min -y'x  s.t.  A x = 1 + s,  x >= 0`` with only A
  learned. Nothing makes ``A x = 1`` feasible during training, so the layer solves the closest
  feasible LP and returns the shift ``s``; penalizing ``||s||^2`` in the loss drives A towards a
  constraint set that the Sudoku right-hand side 1 satisfies.
- :class:`OptNetSudoku` (OptNet, Amos & Kolter 2017, Sec. 4.4): ``min q/2 ||x||^2 - y'x  s.t.
  A x = A exp(z0),  x >= 0`` with A and z0 learned. The small quadratic term makes the QP strictly
  convex (qpth requires it) and ``b = A exp(z0)`` makes it feasible by construction (exp(z0) > 0 is a
  feasible point). Solved either by ``alqp`` or, as the baseline, by ``qpth``.

The learned A has as many rows as the Sudoku rules have independent rows (40 for 4x4, as in
OptNet) and starts uniform in [0, 1), as OptNet's does.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

import alqp

try:  # the model files are importable both as examples.sudoku.models and from this folder
    from .data import sudoku_constraints
except ImportError:
    from data import sudoku_constraints


class SudokuOutput(NamedTuple):
    """What a Sudoku model returns for a batch of B puzzles.

    Attributes:
        x: (B, N, N, N) the layer's solution, same layout as the puzzles.
        shift: (B, p) closest-feasible shift ``A x - b`` of the equality rows (zero when the QP
            was feasible, always zero for qpth, which cannot report one).
        shift_in: (B, N^3) shift of the bounds ``x >= 0``: the closest feasible QP may also relax
            them (``min(x, 0)``), so the layer's infeasibility is the pair (shift, shift_in).
        status: (B,) int64 :class:`alqp.Status` per puzzle (all SOLVED for qpth, which reports none).
        attempt: (B,) int64, index of the solver settings that produced the solution (0: the first;
            see :func:`solve_with_fallbacks`).
    """

    x: Tensor
    shift: Tensor
    shift_in: Tensor
    status: Tensor
    attempt: Tensor


#: Settings tried, in order, on the QPs that the previous settings left unsolved. Why: on these
#: LPs, near the boundary between feasible and infeasible A, no single setting of alqp's penalties
#: converged on every problem met in training (measured: the default mu_min fails on the random
#: initial A with NUMERICAL_ERROR, mu_min=1e-5 stalls into MAX_ITER on A after a few steps that the
#: default solves). A problem left unsolved has zero gradient, and once a whole batch is, training
#: freezes; re-solving the few failures with other penalties avoids that at a small cost.
FALLBACK_SETTINGS = (
    dict(mu_min=1e-5, rho=1e-4),
    dict(),  # alqp's defaults (mu_min 1e-9, rho 1e-6)
    dict(mu_min=1e-7, rho=1e-5),
)


def fallback_layers(settings: Optional[alqp.Settings], backward: str) -> nn.ModuleList:
    """QPLayers for :func:`solve_with_fallbacks`: ``settings`` first, then FALLBACK_SETTINGS.

    The fallbacks share ``settings``' tolerance and iteration budget; when ``settings`` is None the
    first entry of FALLBACK_SETTINGS comes first.
    """
    from dataclasses import replace
    base = settings or alqp.Settings(**FALLBACK_SETTINGS[0])
    tried = [base] + [replace(alqp.Settings(**kw), eps_abs=base.eps_abs, max_iter=base.max_iter)
                      for kw in FALLBACK_SETTINGS]
    unique = []
    for s in tried:  # drop repeats so that a failure is never re-solved with the same settings
        if all(s != u for u in unique):
            unique.append(s)
    return nn.ModuleList(alqp.QPLayer(s, backward=backward) for s in unique)


def solve_with_fallbacks(layers: nn.ModuleList, H, g, A, b, C, l, u):
    """Solve the batch (g batched (B, n), the rest shared) with ``layers[0]``, then re-solve the
    problems still unsolved (status beyond CLOSEST_FEASIBLE) with each next layer.

    Returns:
        (x (B,n), s_eq (B,p), s_in (B,m), status (B,), attempt (B,)); differentiable as the layers
        are (a row replaced by a later attempt takes its gradient from that attempt only).
    """
    sol = layers[0](H, g, A, b, C, l, u)
    x, s_eq, s_in, status = sol.x, sol.s_eq, sol.s_in, sol.status
    attempt = torch.zeros_like(status)
    for k, layer in enumerate(layers[1:], start=1):
        bad = (status > int(alqp.Status.CLOSEST_FEASIBLE)).nonzero().squeeze(1)
        if bad.numel() == 0:
            break
        retry = layer(H, g[bad], A, b, C, l, u)
        # index_copy keeps the graph: unchanged rows from the first solve, replaced rows from here.
        x, s_eq, s_in = (t.index_copy(0, bad, r) for t, r in ((x, retry.x), (s_eq, retry.s_eq), (s_in, retry.s_in)))
        status = status.index_copy(0, bad, retry.status)
        attempt = attempt.index_copy(0, bad, torch.full_like(bad, k))
    return x, s_eq, s_in, status, attempt


def _default_rows(n: int) -> int:
    return sudoku_constraints(n).shape[0]


class _SudokuQPBase(nn.Module):
    """Shared parts: the learned A (p, N^3), the bound x >= 0, dtype float64 throughout."""

    def __init__(self, n: int, rows: Optional[int], seed: Optional[int], init_scale: float = 1.0):
        super().__init__()
        self.n = n
        self.nx = (n * n) ** 3
        p = rows if rows is not None else _default_rows(n)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.A = nn.Parameter(init_scale * torch.rand(p, self.nx, dtype=torch.float64, generator=gen))
        # x >= 0 as l <= I x <= u with u = +inf; buffers so that .to(device) moves them.
        self.register_buffer("C", torch.eye(self.nx, dtype=torch.float64))
        self.register_buffer("l", torch.zeros(self.nx, dtype=torch.float64))
        self.register_buffer("u", torch.full((self.nx,), float("inf"), dtype=torch.float64))

    def cost(self, puzzles: Tensor) -> Tensor:
        """(B, N, N, N) puzzles -> (B, N^3) linear cost -puzzle."""
        return -puzzles.reshape(puzzles.shape[0], -1).to(self.A.dtype)


class SudokuLP(_SudokuQPBase):
    """LP layer ``min -y'x s.t. A x = 1 + s, x >= 0``, A (p, N^3) learned, b = 1 fixed.

    Args:
        n: box size (2: 4x4 boards, 64 variables).
        rows: number of learned equality rows p (default: rank of the Sudoku rules, 40 for 4x4).
        settings: :class:`alqp.Settings` of the solver.
        backward: "ift" or "lpgd".
        seed: seed of A's initialization (None: torch's global generator).
        init_scale: A starts uniform in [0, init_scale).
    """

    def __init__(self, n: int = 2, rows: Optional[int] = None, settings: Optional[alqp.Settings] = None,
                 backward: str = "ift", seed: Optional[int] = None, init_scale: float = 1.0):
        super().__init__(n, rows, seed, init_scale)
        self.layers = fallback_layers(settings, backward)
        self.register_buffer("H", torch.zeros(self.nx, self.nx, dtype=torch.float64))  # an LP
        self.register_buffer("b", torch.ones(self.A.shape[0], dtype=torch.float64))

    def forward(self, puzzles: Tensor) -> SudokuOutput:
        x, s_eq, s_in, status, attempt = solve_with_fallbacks(
            self.layers, self.H, self.cost(puzzles), self.A, self.b, self.C, self.l, self.u)
        return SudokuOutput(x.reshape(puzzles.shape), s_eq, s_in, status, attempt)


class OptNetSudoku(_SudokuQPBase):
    """OptNet's Sudoku layer ``min q/2 ||x||^2 - y'x s.t. A x = A exp(z0), x >= 0``; A, z0 learned.

    Args:
        n: box size (2: 4x4 boards, 64 variables).
        q_penalty: q, the weight of the quadratic term (OptNet: 0.1).
        solver: "alqp" (our layer) or "qpth" (OptNet's solver, the baseline).
        rows: number of learned equality rows p (default: rank of the Sudoku rules, 40 for 4x4).
        settings: :class:`alqp.Settings` (solver "alqp" only).
        backward: "ift" or "lpgd" (solver "alqp" only).
        seed: seed of A's initialization (None: torch's global generator).
    """

    def __init__(self, n: int = 2, q_penalty: float = 0.1, solver: str = "alqp", rows: Optional[int] = None,
                 settings: Optional[alqp.Settings] = None, backward: str = "ift", seed: Optional[int] = None):
        super().__init__(n, rows, seed)
        if solver not in ("alqp", "qpth"):
            raise ValueError(f"solver must be 'alqp' or 'qpth', got {solver!r}")
        self.solver = solver
        self.log_z0 = nn.Parameter(torch.zeros(self.nx, dtype=torch.float64))
        self.register_buffer("H", q_penalty * torch.eye(self.nx, dtype=torch.float64))
        if solver == "alqp":
            self.layers = fallback_layers(settings, backward)
        else:
            from qpth.qp import QPFunction  # optional dependency, imported only when asked for
            # qpth's defaults (eps 1e-12, 20 interior-point iterations), as in OptNet's experiment.
            self.qpth = QPFunction(verbose=-1)

    def forward(self, puzzles: Tensor) -> SudokuOutput:
        g = self.cost(puzzles)
        b = self.A @ self.log_z0.exp()  # A times a positive point: feasible by construction
        B = g.shape[0]
        if self.solver == "alqp":
            x, s_eq, s_in, status, attempt = solve_with_fallbacks(
                self.layers, self.H, g, self.A, b, self.C, self.l, self.u)
            return SudokuOutput(x.reshape(puzzles.shape), s_eq, s_in, status, attempt)
        # qpth's form: min 1/2 x'Qx + p'x s.t. G x <= h, A x = b; x >= 0 is -I x <= 0.
        x = self.qpth(self.H, g, -self.C, self.l, self.A, b)
        zeros = x.new_zeros(B, self.A.shape[0])
        status = torch.full((B,), int(alqp.Status.SOLVED), dtype=torch.long, device=x.device)
        return SudokuOutput(x.reshape(puzzles.shape), zeros, torch.zeros_like(x), status, torch.zeros_like(status))


MODEL_NAMES = ("lp", "optnet", "qpth")


def build_model(name: str, n: int = 2, settings: Optional[alqp.Settings] = None, backward: str = "ift",
                q_penalty: float = 0.1, seed: Optional[int] = None, lp_init_scale: float = 1.0) -> nn.Module:
    """A model by its short name: "lp" (:class:`SudokuLP`), "optnet" (:class:`OptNetSudoku` on alqp),
    "qpth" (:class:`OptNetSudoku` on qpth)."""
    if name == "lp":
        return SudokuLP(n, settings=settings, backward=backward, seed=seed, init_scale=lp_init_scale)
    if name == "optnet":
        return OptNetSudoku(n, q_penalty, "alqp", settings=settings, backward=backward, seed=seed)
    if name == "qpth":
        return OptNetSudoku(n, q_penalty, "qpth", seed=seed)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
