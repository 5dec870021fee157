"""Total-variation denoising with a learned QP layer (OptNet, Amos & Kolter 2017, Sec. 4.2).

Data (:func:`make_signals`): piecewise-constant 1-D signals of length n with 1 to 9 pieces of integer
heights in [10, 100), plus Gaussian noise of standard deviation 10, as in OptNet's generator.

Model (:class:`DenoisingQP`): the QP of OptNet's "learn D" model, on the variables v = [y; t]
(y in R^n the denoised signal, t in R^(n-1) the absolute differences)::

    minimize   1/2 ||y||^2 - x'y + lam 1't  + eps/2 ||v||^2 + 1e-8/2 ||t||^2
    subject to  D y - t <= u,    l <= D y + t          (u = l = 0 at the start: |D y| <= t)

with x the noisy signal, lam = 13 and eps = 1e-4 as in OptNet. D in R^((n-1) x n) is learned (it
starts random, 0.3 N(0,1), as OptNet's), and, as in the QPLayer paper, so are the bounds u and l.
In alqp's form ``l <= C v <= u`` the two rows are ``-inf <= [D, -I] v <= u`` and
``l <= [D, I] v <= +inf``; in qpth's form ``G v <= h`` they are ``[D, -I] v <= u`` and
``[-D, -I] v <= -l``: the same QP.

Gradients: the shared tensors (H, C, u, l) are given to alqp without a batch dimension, and alqp
returns the SUM of the per-signal gradients. qpth returns the MEAN for an input given without a
batch dimension, so the qpth model expands them to the batch first (as OptNet does), and autograd's
expand sums: both models compute the true gradient of the same loss.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import alqp

LAM = 13.0
EPS = 1e-4


class Signals(NamedTuple):
    """A data set of N signals of length n: ``noisy`` (N, n) and ``clean`` (N, n), float64."""

    noisy: Tensor
    clean: Tensor


def make_signals(count: int, length: int, seed: int, noise: float = 10.0, max_pieces: int = 10,
                 min_height: int = 10, max_height: int = 100) -> Signals:
    """``count`` piecewise-constant signals of ``length`` samples with Gaussian noise, from ``seed``.

    Each signal has between 1 and ``max_pieces - 1`` pieces (breakpoints drawn without replacement
    inside the signal), each piece an integer height in [min_height, max_height).
    """
    if count < 1 or length < 3:
        raise ValueError(f"count must be >= 1 and length >= 3, got count={count}, length={length}")
    rng = np.random.default_rng(seed)
    clean = np.empty((count, length))
    for i in range(count):
        pieces = int(rng.integers(1, min(max_pieces, length - 1)))
        inner = np.sort(rng.choice(length - 2, pieces - 1, replace=False) + 1) if pieces > 1 else []
        edges = [0, *inner, length]
        heights = rng.integers(min_height, max_height, pieces)
        for h, a, b in zip(heights, edges[:-1], edges[1:]):
            clean[i, a:b] = h
    noisy = clean + rng.normal(0.0, noise, clean.shape)
    return Signals(torch.from_numpy(noisy), torch.from_numpy(clean))


class DenoisingQP(nn.Module):
    """The learned TV-denoising QP layer; ``forward(noisy (B, n)) -> DenoisingOutput``.

    Args:
        n: signal length. solver: "alqp" or "qpth". seed: seed of D's random start.
        settings: alqp.Settings (alqp only).
    """

    def __init__(self, n: int, solver: str = "alqp", seed: int = 0, settings: alqp.Settings | None = None):
        super().__init__()
        if solver not in ("alqp", "qpth"):
            raise ValueError(f"solver must be 'alqp' or 'qpth', got {solver!r}")
        self.n, self.solver = n, solver
        gen = torch.Generator().manual_seed(seed)
        self.D = nn.Parameter(0.3 * torch.randn(n - 1, n, generator=gen, dtype=torch.float64))
        self.upper = nn.Parameter(torch.zeros(n - 1, dtype=torch.float64))
        self.lower = nn.Parameter(torch.zeros(n - 1, dtype=torch.float64))
        diag = torch.cat([torch.ones(n), torch.full((n - 1,), 1e-8)]).double() + EPS
        self.register_buffer("H", torch.diag(diag))
        self.layer = alqp.QPLayer(settings=settings) if solver == "alqp" else None

    def constraint_matrix(self) -> Tensor:
        """C = [[D, -I], [D, I]], (2(n-1), 2n-1): rows ``D y - t`` and ``D y + t``."""
        eye = torch.eye(self.n - 1, dtype=self.D.dtype)
        return torch.cat([torch.cat([self.D, -eye], 1), torch.cat([self.D, eye], 1)], 0)

    def forward(self, noisy: Tensor) -> DenoisingOutput:
        B, n = noisy.shape
        if n != self.n:
            raise ValueError(f"noisy must have {self.n} columns, got shape {tuple(noisy.shape)}")
        g = torch.cat([-noisy, torch.full((B, n - 1), LAM, dtype=noisy.dtype)], 1)
        C = self.constraint_matrix()
        inf = torch.full((n - 1,), float("inf"), dtype=C.dtype)
        if self.solver == "alqp":
            sol = self.layer(self.H, g, None, None, C, torch.cat([-inf, self.lower]), torch.cat([self.upper, inf]))
            return DenoisingOutput(sol.x[:, :n], sol.status)
        from qpth.qp import QPFunction
        G = torch.cat([C[:n - 1], -C[n - 1:]], 0)
        h = torch.cat([self.upper, -self.lower])
        empty = torch.empty(0, dtype=C.dtype)
        v = QPFunction(verbose=-1)(self.H.expand(B, -1, -1), g, G.expand(B, -1, -1), h.expand(B, -1), empty, empty)
        return DenoisingOutput(v[:, :n], None)


class DenoisingOutput(NamedTuple):
    """``y`` (B, n) the denoised signals; ``status`` (B,) alqp statuses, or None for qpth."""

    y: Tensor
    status: Tensor | None
