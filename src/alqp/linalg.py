"""Batched linear algebra shared by the forward and the backward."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

#: The dtype of the backward's linear algebra and of LPGD's finite differences, whatever the data's:
#: a few dense solves whose conditioning is that of the KKT matrix squared (normal equations), and
#: differences such as y_tau x_tau' - y* x*' that lose digits to cancellation; float32's seven
#: digits cannot spare either.
WORK_DTYPE = torch.float64


def safe_rsqrt(norm: Tensor, floor: float = 0.0) -> Tensor:
    """1/sqrt(norm) elementwise, and 1 where norm <= ``floor``: the Ruiz step of a row or column,
    where a zero (or negligible) one keeps its scale instead of being blown up."""
    return torch.where(norm > floor, norm, torch.ones_like(norm)).rsqrt()


def rows_or_zeros(t: Optional[Tensor], batch: int, k: int, like: Tensor) -> Tensor:
    """``t`` as a (batch, k) tensor in ``like``'s dtype and device (broadcast from (k,) or (1, k)),
    or zeros where ``t`` is None: an incoming gradient of an output the loss does not use."""
    if t is None:
        return like.new_zeros(batch, k)
    t = as_dtype(t, like.dtype)
    return t if t.shape == (batch, k) else t.expand(batch, k)



def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``; t itself when it already is (without the cost of a no-op ``Tensor.to`` call,
    which adds up over the hundreds of small tensors of a batch-1 call)."""
    return t if t.dtype == dtype else t.to(dtype)


def inf_norm(v: Tensor) -> Tensor:
    """(B,k) -> (B,): the infinity norm of each row; 0 when k == 0 (amax rejects empty dims)."""
    if v.shape[-1] == 0:
        return v.new_zeros(v.shape[:-1])
    return v.abs().amax(dim=-1)


def vm(v: Tensor, M: Tensor) -> Tensor:
    """Batched row vector times matrix, (B,r) x (B,r,k) -> (B,k). M v is vm(v, M.mT): on CPU this
    layout is about twice as fast as a (B,r,k) @ (B,k,1) product, also with a transposed view M.mT.
    M may have batch size 1 (shared by the batch)."""
    if M.dim() == 3 and M.shape[0] == v.shape[0]:
        # (bmm skips matmul's broadcasting logic: a third less per call, which counts at batch 1)
        return torch.bmm(v.unsqueeze(1), M).squeeze(1)
    return torch.matmul(v.unsqueeze(-2), M).squeeze(-2)


def _solve_row_vectors(F: Tensor, r: Tensor, transposed: bool) -> Tensor:
    """r (B,1,n) -> F^-1 r, or F^-T r when ``transposed`` (F (B,n,n) lower-triangular), as row
    vectors: x'F' = r' or x'F = r' (on CPU faster batched than the column forms)."""
    return torch.linalg.solve_triangular(F if transposed else F.mT, r, upper=not transposed, left=False)


def solve_triangular_rows(F: Tensor, q: Tensor, transposed: bool = False) -> Tensor:
    """F^-1 q, or F^-T q when ``transposed``: F (B,n,n) lower-triangular, q (B,n) -> (B,n)."""
    return _solve_row_vectors(F, q.unsqueeze(-2), transposed).squeeze(-2)


def cholesky_solve_rows(L: Tensor, rhs: Tensor) -> Tensor:
    """Solve (L L') x = rhs: L (B,n,n) lower-triangular Cholesky factor, rhs (B,n) -> x (B,n).

    Two triangular solves on row vectors; on CPU torch.cholesky_solve costs several times as much
    for the same result (it copies the factor on every call)."""
    return _solve_row_vectors(L, _solve_row_vectors(L, rhs.unsqueeze(-2), False), True).squeeze(-2)


def vm_host(v: np.ndarray, M: np.ndarray) -> np.ndarray:
    """:func:`vm` on host arrays: (B,r) x (B or 1,r,c) -> (B,c). (numpy's stacked matmul: at batch 1
    a fifth of the cost of the same product through torch tensors, and no slower at batch 100.)"""
    return (v[:, None, :] @ M)[:, 0]


def inf_norm_host(v: np.ndarray) -> np.ndarray:
    """:func:`inf_norm` on a host array: (B,r) -> (B,), 0 for r = 0."""
    return np.abs(v).max(axis=-1, initial=0.0)


def max_abs(t: Tensor) -> Tensor:
    """The largest |entry| of a whole tensor (0 when empty). One fused min/max pass: several times
    faster on CPU than t.abs().amax(), which writes a temporary of t's size."""
    if t.numel() == 0:
        return t.new_zeros(())
    low, high = torch.aminmax(t)
    return torch.maximum(-low, high)


def magnitudes(M: Tensor) -> Tensor:
    """|M| in single precision (float64 input) or M's own precision, overflow clipped: enough for
    equilibration, whose scalings need a few digits only, at half the memory traffic."""
    if M.dtype != torch.float64:
        return M.abs()  # (a new tensor: never abs_ on the caller's own)
    # Converted first, then made absolute in place: one temporary, of the small type.
    return M.to(torch.float32).abs_().clamp_(max=torch.finfo(torch.float32).max)


def project_out_row_range(G: Tensor, rows: Tensor, r: Tensor, refinements: int = 4,
                          eps: Optional[float] = None) -> Tensor:
    """Remove from r its component in the range of the selected rows of G.

    Args:
        G: (B,k,n) stacked constraint rows.
        rows: (B,k) bool, the rows that span the range (others are treated as absent; r is 0 there
            on return).
        r: (B,k).
        eps: the relative precision of G's entries; None: the machine epsilon of G's dtype. It sets
            the regularization, eps**0.75 times the largest squared row norm: directions of the
            rows' span whose squared singular values lie far below it count as absent (rows that
            are dependent up to a rounding of that size span no more than their exact copies).

    Returns:
        (B,k): r - G_V d with d = argmin |G_V d - r_V|, i.e. the part of r orthogonal to range(G_V).
        The least-squares d comes from regularized normal equations whose iterative refinement
        removes the bias of the regularization in every direction with a non-negligible singular value.
    """
    if not bool(rows.any()):  # (no row in the range anywhere: nothing to remove, no pass over G)
        return torch.zeros_like(r)
    mask = rows.to(G.dtype)
    Gm = G * mask.unsqueeze(-1)
    rm = r * mask
    N = torch.matmul(Gm.transpose(-1, -2), Gm)
    diag_max = (N.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1.0) if N.shape[-1]
                else N.new_ones(N.shape[0], 1))
    reg = ((torch.finfo(G.dtype).eps if eps is None else eps) ** 0.75) * diag_max
    eye = torch.eye(N.shape[-1], dtype=G.dtype, device=G.device)
    L, _ = torch.linalg.cholesky_ex(N + reg.unsqueeze(-1) * eye)
    d = G.new_zeros(G.shape[0], G.shape[-1])
    GmT = Gm.transpose(-1, -2)
    for _ in range(refinements + 1):
        res = rm - vm(d, GmT)
        d = d + cholesky_solve_rows(L, vm(res, Gm))
    return (rm - vm(d, GmT)) * mask
