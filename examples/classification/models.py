"""OptNet's classification model (Amos & Kolter 2017, Sec. 4.3): fully connected layers, then a QP layer.

    x -> FC(pixels, hidden) -> ReLU -> FC(hidden, 10) -> ReLU -> QP -> log_softmax

The QP layer has 10 variables (one per class) and ``nineq`` inequality rows (10, OptNet's default);
every one of its tensors is learned::

    minimize 1/2 v'Hv + g'v   subject to   C v <= u
    H = L L' + eps I  (L lower-triangular, starts uniform [0, 1), eps = 1e-4)
    g = the FC output (per image)
    C  (starts uniform [-1, 1]),    u = C z0 + s0  (z0 starts 0, s0 starts 1: v = z0 is feasible)

as in OptNet's ``OptNet`` model of ``cls/models.py``. The QP runs in float64 (OptNet casts to double).

Gradients: H, C and u are shared by the batch. alqp is given them without a batch dimension and
returns the SUM of the per-image gradients; qpth would return the MEAN for such an input, so the
qpth model expands them to the batch (as OptNet does) and autograd's expand sums: both compute the
gradient of the same loss.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import alqp


class ClassifierOutput(NamedTuple):
    """``log_probs`` (B, 10) log-softmax of the QP's solution; ``status`` (B,) alqp statuses or None (qpth)."""

    log_probs: Tensor
    status: Tensor | None


class OptNetClassifier(nn.Module):
    """FC-ReLU-FC-ReLU-QP-softmax; ``forward(images (B, pixels)) -> ClassifierOutput``.

    Args:
        pixels: input size. hidden: width of the first FC layer (OptNet: 500). classes: 10.
        nineq: inequality rows of the QP. eps: H's regularization. solver: "alqp" or "qpth".
        seed: seed of the initialization (the same for both solvers). settings: alqp.Settings.
    """

    def __init__(self, pixels: int, hidden: int = 500, classes: int = 10, nineq: int = 10, eps: float = 1e-4,
                 solver: str = "alqp", seed: int = 0, settings: alqp.Settings | None = None):
        super().__init__()
        if solver not in ("alqp", "qpth"):
            raise ValueError(f"solver must be 'alqp' or 'qpth', got {solver!r}")
        gen = torch.Generator().manual_seed(seed)
        self.solver, self.eps, self.classes = solver, eps, classes
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.fc1 = nn.Linear(pixels, hidden).double()
            self.fc2 = nn.Linear(hidden, classes).double()
        self.L = nn.Parameter(torch.rand(classes, classes, generator=gen, dtype=torch.float64).tril())
        self.C = nn.Parameter(2 * torch.rand(nineq, classes, generator=gen, dtype=torch.float64) - 1)
        self.z0 = nn.Parameter(torch.zeros(classes, dtype=torch.float64))
        self.s0 = nn.Parameter(torch.ones(nineq, dtype=torch.float64))
        self.layer = alqp.QPLayer(settings=settings) if solver == "alqp" else None

    def qp_data(self) -> tuple:
        """The shared QP tensors (H (10, 10), C (nineq, 10), u (nineq,))."""
        L = self.L.tril()
        H = L @ L.T + self.eps * torch.eye(self.classes, dtype=L.dtype)
        return H, self.C, self.C @ self.z0 + self.s0

    def forward(self, images: Tensor) -> ClassifierOutput:
        B = images.shape[0]
        g = F.relu(self.fc2(F.relu(self.fc1(images.reshape(B, -1)))))
        H, C, u = self.qp_data()
        if self.solver == "alqp":
            sol = self.layer(H, g, None, None, C, torch.full_like(u, -float("inf")), u)
            return ClassifierOutput(F.log_softmax(sol.x, dim=1), sol.status)
        from qpth.qp import QPFunction
        empty = torch.empty(0, dtype=H.dtype)
        v = QPFunction(verbose=-1)(H.expand(B, -1, -1), g, C.expand(B, -1, -1), u.expand(B, -1), empty, empty)
        return ClassifierOutput(F.log_softmax(v, dim=1), None)
