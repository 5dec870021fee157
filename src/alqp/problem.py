"""QP data: validation with clear errors, broadcasting of shared tensors, Ruiz equilibration.

The QP is ``min 1/2 x'Hx + g'x  s.t.  A x = b,  l <= C x <= u`` with shapes
H (B,n,n), g (B,n), A (B,p,n), b (B,p), C (B,m,n), l (B,m), u (B,m); any tensor may drop its
leading B and is then shared by the whole batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from alqp.linalg import magnitudes, max_abs, safe_rsqrt

ARG_NAMES = ("H", "g", "A", "b", "C", "l", "u")
# Number of trailing (per-problem) dimensions of each argument.
_CORE_NDIM = {"H": 2, "g": 1, "A": 2, "b": 1, "C": 2, "l": 1, "u": 1}


class BatchShape:
    """Sizes of a batch of QPs stored as tensors H (B,n,n), A (B,p,n), C (B,m,n)."""

    @property
    def batch_size(self) -> int:
        return self.H.shape[0]

    @property
    def n(self) -> int:
        return self.H.shape[-1]

    @property
    def p(self) -> int:
        return self.A.shape[-2]

    @property
    def m(self) -> int:
        return self.C.shape[-2]


@dataclass
class QPProblem(BatchShape):
    """A batch of QPs, every tensor carrying the batch dimension B (expanded views for shared data).

    Attributes:
        H: (B,n,n) symmetric PSD.  g: (B,n).
        A: (B,p,n).  b: (B,p).  p may be 0.
        C: (B,m,n).  l, u: (B,m), entries may be -inf / +inf.  m may be 0.
        batched: for each argument name, whether the caller gave it with a batch dimension.
        unbatched: True when no argument had a batch dimension (outputs then drop B).
    """

    H: Tensor
    g: Tensor
    A: Tensor
    b: Tensor
    C: Tensor
    l: Tensor
    u: Tensor
    batched: dict
    unbatched: bool

    def tensors(self) -> dict:
        """The seven tensors by name, in ARG_NAMES order."""
        return {name: getattr(self, name) for name in ARG_NAMES}

    def stacked_rows(self) -> Tensor:
        """(B,p+m,n) the constraint rows [A; C], equalities first: the order of the multipliers
        [y; z] in every engine and in DAQP."""
        return torch.cat([self.A, self.C], -2)

    def select(self, index: Tensor) -> "QPProblem":
        """The sub-batch of the problems at ``index`` (1-D long tensor)."""
        return replace(self, **{name: t[index] for name, t in self.tensors().items()})


def _check_tensor(name: str, t, core_ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.dim() not in (core_ndim, core_ndim + 1):
        raise ValueError(
            f"{name} must have {core_ndim} dimensions (shared) or {core_ndim + 1} (batched), "
            f"got shape {tuple(t.shape)}"
        )


def _detached(t: Tensor) -> Tensor:
    """t without autograd history (t itself when it has none: a detach per tensor adds up at
    batch 1)."""
    return t.detach() if t.requires_grad else t


def _all_finite(t: Tensor) -> bool:
    """Whether t holds no NaN or Inf. A sum carries any of them through in one pass with no
    temporary; only a sum that overflows needs the exact elementwise test."""
    t = t.detach()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _BatchLayout(NamedTuple):
    """How the given arguments batch.

    Attributes:
        size: the common batch size B (1 when no argument has a batch dimension).
        batched: for each given argument name, whether it had a batch dimension.
        unbatched: True when no argument had one (the outputs then drop B).
    """

    size: int
    batched: dict
    unbatched: bool


def _check_blocks(A, b, C, l, u) -> None:
    """Reject a constraint block given in part: A without b (or b without A), bounds without C, C
    without any bound."""
    if (A is None) != (b is None):
        raise ValueError("A and b must be given together (got only " + ("A" if b is None else "b") + ")")
    if C is None and (l is not None or u is not None):
        raise ValueError("l or u given without C")
    if C is not None and l is None and u is None:
        raise ValueError("C given without l or u")


def _check_types(present: dict) -> None:
    """Each given argument (name -> tensor, in ARG_NAMES order) is a floating tensor of 2 or 3
    (matrices) / 1 or 2 (vectors) dimensions, and all share one dtype and one device."""
    for name, t in present.items():
        _check_tensor(name, t, _CORE_NDIM[name])
    dtypes = {name: t.dtype for name, t in present.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all QP tensors must share one dtype, got {dtypes}")
    devices = {name: t.device for name, t in present.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all QP tensors must be on one device, got {devices}")


def _check_sizes(H: Tensor, g: Tensor, A, b, C, l, u) -> None:
    """The per-problem sizes agree: H (n,n), g (n,), A (p,n) with b (p,), C (m,n) with l, u (m,)
    (each possibly with a leading batch dimension; None for an absent block)."""
    n = H.shape[-1]
    if H.shape[-2] != n:
        raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
    if g.shape[-1] != n:
        raise ValueError(f"g must have {n} entries (H is {n}x{n}), got shape {tuple(g.shape)}")
    if A is not None:
        if A.shape[-1] != n:
            raise ValueError(f"A must have {n} columns, got shape {tuple(A.shape)}")
        if b.shape[-1] != A.shape[-2]:
            raise ValueError(f"b must have {A.shape[-2]} entries (A has {A.shape[-2]} rows), "
                             f"got shape {tuple(b.shape)}")
    if C is not None:
        if C.shape[-1] != n:
            raise ValueError(f"C must have {n} columns, got shape {tuple(C.shape)}")
        for name, t in (("l", l), ("u", u)):
            if t is not None and t.shape[-1] != C.shape[-2]:
                raise ValueError(
                    f"{name} must have {C.shape[-2]} entries (C has {C.shape[-2]} rows), got shape {tuple(t.shape)}"
                )


def _batch_layout(present: dict) -> _BatchLayout:
    """The common batch size of the given arguments (name -> tensor, shapes already checked):
    batch dimensions must be equal or 1."""
    batched = {name: (t.dim() == _CORE_NDIM[name] + 1) for name, t in present.items()}
    sizes = {name: present[name].shape[0] for name, is_b in batched.items() if is_b}
    distinct = set(sizes.values()) - {1}
    if len(distinct) > 1:
        raise ValueError(f"batch sizes do not broadcast: {sizes}")
    return _BatchLayout(size=distinct.pop() if distinct else 1, batched=batched, unbatched=not sizes)


def _check_finite_data(present: dict) -> None:
    """H, g, A, b, C (those given, name -> tensor) hold no NaN or Inf."""
    data = [(name, present[name]) for name in ("H", "g", "A", "b", "C") if name in present]
    # One sum per tensor and a single check (a NaN or Inf anywhere makes the total non-finite);
    # only when it fails are the tensors checked one by one, to name the culprit.
    if not math.isfinite(float(torch.stack([_detached(t).sum() for _, t in data]).sum())):
        for name, t in data:
            if not _all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf")


def _check_bounds(l, u) -> None:
    """l (m,) or (B,m) and u (same, broadcastable) hold no NaN, l no +inf, u no -inf, and l <= u;
    either may be None (that side unbounded)."""
    # The bounds in one pass (a NaN fails every comparison); only a failure is examined further.
    inf = float("inf")
    if l is not None and u is not None:
        bounds_ok = bool(((l <= u) & (l < inf) & (u > -inf)).all())
    else:
        bounds_ok = bool((l < inf).all()) if l is not None else u is None or bool((u > -inf).all())
    if bounds_ok:
        return
    for name, t in (("l", l), ("u", u)):
        if t is not None and torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")
    if l is not None and (l == inf).any():
        raise ValueError("l contains +inf (a lower bound must be finite or -inf)")
    if u is not None and (u == -inf).any():
        raise ValueError("u contains -inf (an upper bound must be finite or +inf)")
    if l is not None and u is not None and (l > u).any():
        raise ValueError("l > u in some entries: the bounds must satisfy l <= u")


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _symmetric_bits(H: Tensor) -> bool:
    """Whether a contiguous CPU H (n,n) or (B,n,n) equals its transpose bit for bit (compared as
    integers: 0.0 and -0.0 differ); False for a non-contiguous H (left to the general path,
    which returns a contiguous H) and off the CPU (where the general path needs no host sync)."""
    if H.device.type != "cpu" or not H.is_contiguous():
        return False
    bits = H.view(_SAME_SIZE_INT[H.element_size()])
    return torch.equal(bits, bits.transpose(-1, -2))


def _symmetrized(H: Tensor, check_symmetry: bool) -> Tensor:
    """(H + H') / 2 of H (n,n) or (B,n,n), detached; with ``check_symmetry``, H must first be
    symmetric within sqrt(finfo.eps) relative to max(max |H|, 1)."""
    # Symmetrized before the batch is expanded, so a shared H stays one matrix. (H + H') is
    # symmetric bit for bit; 2H - (H + H') is H - H' up to its rounding.
    H = _detached(H)
    if _symmetric_bits(H) and float(max_abs(H)) <= torch.finfo(H.dtype).max / 2:
        # H is symmetric bit for bit and 2H does not overflow: (H + H')/2 is H itself, bit for bit,
        # and 2H - (H + H') is zero, so the symmetry test passes. (One compare pass instead of an
        # add, a subtraction and two reductions over the batch; the data are finite here.)
        return H
    H2 = H + H.transpose(-1, -2)
    if check_symmetry:
        # (Compared as Python floats: at batch 1 each tensor operation costs more than the pass.)
        asym = float(max_abs(torch.sub(H2, H, alpha=2.0)))
        scale = max(float(max_abs(H)), 1.0)
        if asym > torch.finfo(H.dtype).eps ** 0.5 * scale:
            raise ValueError(f"H is not symmetric: max |H - H'| = {asym:.3g}")
    return H2.mul_(0.5)


def _with_batch(t, core_shape: tuple, B: int, like: Tensor, fill: float = 0.0) -> Tensor:
    """t (core_shape), (1, *core_shape) or (B, *core_shape), detached, as (B, *core_shape): an
    expanded view when shared. An absent t (None) becomes ``fill`` in the dtype and device of
    ``like``."""
    if t is None:
        t = torch.full(core_shape, fill, dtype=like.dtype, device=like.device)
    t = _detached(t)
    if t.dim() == len(core_shape):
        t = t.unsqueeze(0)
    return t if t.shape[0] == B else t.expand(B, *core_shape)


def canonicalize(H, g, A=None, b=None, C=None, l=None, u=None, check_symmetry: bool = True) -> QPProblem:
    """Validate the QP data and broadcast it to a common batch size.

    Args:
        H: (n,n) or (B,n,n).  g: (n,) or (B,n).
        A: (p,n) or (B,p,n), or None.  b: (p,) or (B,p), or None (given together with A).
        C: (m,n) or (B,m,n), or None.  l, u: (m,) or (B,m), or None (a missing side is unbounded).
        check_symmetry: reject H that is not symmetric within sqrt(finfo.eps) relative tolerance.

    Returns:
        A :class:`QPProblem` whose tensors are detached, have the batch dimension, and H symmetrized.

    Raises:
        TypeError: a non-tensor argument, a non-floating dtype, or mixed dtypes.
        ValueError: a wrong shape, batch sizes that do not broadcast, mixed devices, NaN/Inf in
            H, g, A, b, C, NaN in l, u, l > u, or H not symmetric.
    """
    # The checks run in this order so that the first error met names the most basic problem
    # (a missing argument before a wrong type, a type before a size, a size before the values).
    _check_blocks(A, b, C, l, u)
    present = {name: t for name, t in zip(ARG_NAMES, (H, g, A, b, C, l, u)) if t is not None}
    _check_types(present)
    _check_sizes(H, g, A, b, C, l, u)
    layout = _batch_layout(present)
    _check_finite_data(present)
    _check_bounds(l, u)
    H = _symmetrized(H, check_symmetry)

    B, n = layout.size, H.shape[-1]
    p = A.shape[-2] if A is not None else 0
    m = C.shape[-2] if C is not None else 0
    inf = float("inf")
    return QPProblem(
        H=_with_batch(H, (n, n), B, H),
        g=_with_batch(g, (n,), B, H),
        A=_with_batch(A, (p, n), B, H),
        b=_with_batch(b, (p,), B, H),
        C=_with_batch(C, (m, n), B, H),
        l=_with_batch(l, (m,), B, H, -inf),
        u=_with_batch(u, (m,), B, H, inf),
        batched={name: layout.batched.get(name, False) for name in ARG_NAMES},
        unbatched=layout.unbatched,
    )


@dataclass
class Scaling:
    """Diagonal equilibration: x = D x_s, y = E y_s / c, z = F z_s / c.

    D (B,n) scales the columns, E (B,p) the equality rows, F (B,m) the inequality rows, and
    c (B,) the cost, so that the scaled problem has H_s = c D H D, g_s = c D g, A_s = E A D,
    b_s = E b, C_s = F C D, l_s = F l, u_s = F u.
    """

    D: Tensor
    E: Tensor
    F: Tensor
    c: Tensor


def ruiz_equilibrate(problem: QPProblem, iterations: int, scale_rows: bool,
                     tol: float = 0.1) -> tuple[QPProblem, Scaling]:
    """Ruiz equilibration of the KKT matrix [[H, A', C'], [A, 0, 0], [C, 0, 0]] plus cost scaling.

    Each sweep divides every column and row by the square root of its infinity norm, which drives
    all of them toward 1; the sweeps stop early once every norm is within ``tol`` of 1. With
    ``scale_rows=False`` all rows of a problem share one factor (from the largest row norm).

    Returns:
        The scaled problem (same shapes) and its :class:`Scaling`.
    """
    H, g, A, b, C, l, u = (problem.H, problem.g, problem.A, problem.b, problem.C, problem.l, problem.u)
    B, n, p, m = problem.batch_size, problem.n, problem.p, problem.m
    dtype = H.dtype
    tiny = torch.finfo(dtype).eps
    # Any positive diagonal is a valid scaling, so the sweeps need magnitudes to a few digits
    # only: they run on single-precision copies of |H|, |A|, |C|, scaled in place, and the data
    # are scaled once at the end. (Sweeping the full-precision matrices cost as much as the
    # whole solve of a mid-sized batch.)
    work = torch.float32 if dtype == torch.float64 else dtype
    D, E, F = (torch.ones(B, k, dtype=work, device=H.device) for k in (n, p, m))
    absH = magnitudes(H) if iterations > 0 else None
    absA = magnitudes(A) if iterations > 0 and p > 0 else None
    absC = magnitudes(C) if iterations > 0 and m > 0 else None
    for _ in range(iterations):
        col = absH.amax(dim=-2) if n > 0 else D.new_zeros(B, 0)  # H is symmetric: rows = columns
        for M in (absA, absC):
            if M is not None and n > 0:
                col = torch.maximum(col, M.amax(dim=-2))
        rowA = absA.amax(dim=-1) if absA is not None and n > 0 else None
        rowC = absC.amax(dim=-1) if absC is not None and n > 0 else None
        if not scale_rows:
            # One factor for all rows: it keeps the metric in which the closest feasible shift
            # is the least-squares one (up to that factor), and still brings rows of any units
            # to size one (an unscaled row of size 1e-12 left the ALM's penalties meaningless).
            rows = [v.amax(-1, keepdim=True) for v in (rowA, rowC) if v is not None and v.shape[-1] > 0]
            uniform = torch.cat(rows, -1).amax(-1, keepdim=True) if rows else None
            rowA = uniform.expand_as(rowA) if rowA is not None and uniform is not None else rowA
            rowC = uniform.expand_as(rowC) if rowC is not None and uniform is not None else rowC
        norms = [v for v in (col, rowA, rowC) if v is not None and v.numel() > 0]
        if norms and max(float(((v - 1).abs() * (v > tiny)).amax()) for v in norms) <= tol:
            break
        dD = safe_rsqrt(col, tiny)
        dE = safe_rsqrt(rowA, tiny) if rowA is not None else None
        dF = safe_rsqrt(rowC, tiny) if rowC is not None else None
        D.mul_(dD)
        absH.mul_(dD.unsqueeze(-1)).mul_(dD.unsqueeze(-2))
        for M, dR, R in ((absA, dE, E), (absC, dF, F)):
            if M is not None:
                M.mul_(dD.unsqueeze(-2))
                if dR is not None:
                    M.mul_(dR.unsqueeze(-1))
                    R.mul_(dR)

    D, E, F = D.to(dtype), E.to(dtype), F.to(dtype)
    gs = D * g
    if iterations > 0:
        mean_col = absH.amax(dim=-2).to(dtype).mean(dim=-1) if n > 0 else H.new_zeros(B)
        gnorm = gs.abs().amax(dim=-1) if n > 0 else H.new_zeros(B)
        c = 1.0 / torch.maximum(mean_col, gnorm).clamp(min=1e-4, max=1e4)
        c = torch.where(torch.maximum(mean_col, gnorm) > tiny, c, torch.ones_like(c))
    else:
        c = H.new_ones(B)
    if iterations > 0:
        # The matrices are equilibrated; the vectors are not, and a problem in other units (all
        # of its data times 1e9, say) would leave b, l, u, g and x far from size one, where the
        # ALM's absolute penalties and targets lose their meaning. One more factor beta per
        # problem, x_s -> x_s / beta, divides b, l, u and g by beta and leaves H, A, C as they
        # are (D beta, E / beta, F / beta, c / beta^2); beta is the size of the bounds, or of
        # g where no bound is finite.
        beta = _vector_size(E * b, F * l, F * u)
        beta = torch.where(beta > tiny, beta, (c * gs.abs().amax(-1) if n > 0 else beta).clamp_min(0.0))
        # (Only beyond a factor 1e3 from one: within it the ALM's penalties, calibrated on data of
        # size one, serve as they are, and its closest-feasible search was measured to be more
        # reliable unmoved.)
        beta = torch.where((beta > tiny) & ((beta > 1e3) | (beta < 1e-3)), beta, torch.ones_like(beta))
        D, E, F, c = D * beta.unsqueeze(-1), E / beta.unsqueeze(-1), F / beta.unsqueeze(-1), c / (beta * beta)
        gs = D * g
    scaled = replace(
        problem,
        H=(H * (c.unsqueeze(-1) * D).unsqueeze(-1)).mul_(D.unsqueeze(-2)),
        g=c[:, None] * gs,
        A=(A * E.unsqueeze(-1)).mul_(D.unsqueeze(-2)),
        b=E * b,
        C=(C * F.unsqueeze(-1)).mul_(D.unsqueeze(-2)),
        l=F * l,
        u=F * u,
    )
    return scaled, Scaling(D=D, E=E, F=F, c=c)


def _vector_size(*vectors: Tensor) -> Tensor:
    """(B,) the largest finite |entry| of (B,k) vectors (0 where there is none)."""
    sizes = [torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v)).amax(-1) for v in vectors if v.shape[-1]]
    return torch.stack(sizes).amax(0) if sizes else vectors[0].new_zeros(vectors[0].shape[0])
