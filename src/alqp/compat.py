"""Arguments of qpth's and ProxSuite's QP layers, as keyword arguments of :func:`alqp.solve_qp`.

    sol = alqp.solve_qp(**from_qpth(Q, p, G, h, A, b))              # qpth.qp.QPFunction()(Q, p, G, h, A, b)
    sol = alqp.solve_qp(**from_proxsuite(Q, p, A, b, G, l, u))      # proxsuite.torch.qplayer.QPFunction()(...)

The helpers only rename and reshape: the tensors they return are the caller's own (or functions of
them), so gradients flow back to the tensors given. docs/migration.md sets the three libraries side
by side (argument order, multiplier signs, gradients of shared inputs, failures).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: ProxSuite's stand-in for an absent bound (its QPLayer's closest-feasible path writes -1e20 for
#: the missing lower bounds). alqp would read it as a finite bound, whose size enters its scaling.
PROXSUITE_INFINITY = 1e20


def _absent(t: Tensor | None) -> bool:
    """Whether ``t`` is how qpth and ProxSuite mark a missing block: None or an empty tensor
    (their ``torch.Tensor()``)."""
    return t is None or (isinstance(t, Tensor) and t.numel() == 0)


def _check(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or None / an empty tensor where absent), "
                        f"got {type(t).__name__}")


def _pair(first: str, second: str, a, b) -> tuple:
    """(a, b) as alqp takes them: both None when both are absent; an error naming the arguments
    when only one is."""
    if _absent(a) and _absent(b):
        return None, None
    if _absent(a) or _absent(b):
        missing = first if _absent(a) else second
        raise ValueError(f"{first} and {second} must be given together: {missing} is absent "
                         "(None or an empty tensor) but the other is not")
    _check(first, a)
    _check(second, b)
    return a, b


def from_qpth(Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None,
              A: Tensor | None = None, b: Tensor | None = None) -> dict:
    """qpth's ``QPFunction()(Q, p, G, h, A, b)`` arguments as :func:`alqp.solve_qp` keyword arguments.

    qpth solves ``min 1/2 z'Qz + p'z  s.t.  G z <= h,  A z = b``. Its one-sided rows become
    alqp's ``C = G``, ``u = h`` with no lower bound (``l = None``: -inf). qpth marks absent
    equality rows with empty tensors (``torch.Tensor()``); they, and None, become ``A = b = None``;
    likewise an absent ``G``, ``h`` gives no inequality rows (qpth itself requires them).

    Args:
        Q: (B,n,n) or (n,n), positive semi-definite (qpth: definite).  p: (B,n) or (n,).
        G: (B,m,n) or (m,n).  h: (B,m) or (m,).
        A: (B,p,n) or (p,n), or empty / None.  b: (B,p) or (p,), or empty / None.
        A tensor without its leading B is shared by the batch, as in qpth.

    Returns:
        dict with keys "H", "g", "A", "b", "C", "l", "u" (``alqp.solve_qp(**d)``). Multipliers map
        one to one: alqp's y is qpth's nu (equality rows), its z is qpth's lam (>= 0, G rows).

    Raises:
        TypeError: an argument that is not a tensor (nor None / empty where it may be absent).
        ValueError: only one of A, b (or of G, h) given.
    """
    _check("Q", Q)
    _check("p", p)
    C, u = _pair("G", "h", G, h)
    A, b = _pair("A", "b", A, b)
    return {"H": Q, "g": p, "A": A, "b": b, "C": C, "l": None, "u": u}


def _infinite_bounds(t: Tensor, sign: float) -> Tensor:
    """``t`` with ProxSuite's stand-ins for an absent bound (sign * t >= 1e20) set to sign * inf;
    ``t`` itself when it has none (a ``where`` keeps the gradient of the other entries)."""
    far = sign * t.detach() >= PROXSUITE_INFINITY
    if not bool(far.any()):
        return t
    return torch.where(far, torch.full_like(t, sign * float("inf")), t)


def from_proxsuite(Q: Tensor, p: Tensor, A: Tensor | None = None, b: Tensor | None = None,
                   G: Tensor | None = None, l: Tensor | None = None, u: Tensor | None = None) -> dict:
    """ProxSuite's ``proxsuite.torch.qplayer.QPFunction()(Q, p, A, b, G, l, u)`` arguments as
    :func:`alqp.solve_qp` keyword arguments.

    ProxSuite solves ``min 1/2 z'Qz + p'z  s.t.  A z = b,  l <= G z <= u``: the same problem as
    alqp's, in the order (H, g, A, b, C, l, u). Empty tensors (ProxSuite's ``torch.Tensor()`` for
    absent equality rows) and None become None. Bounds at or beyond ProxSuite's stand-in for
    infinity, ``l <= -1e20`` and ``u >= 1e20``, become -inf and +inf (alqp takes infinite bounds
    as they are, and would treat 1e20 as a finite bound of that size).

    Args:
        Q: (B,n,n) or (n,n).  p: (B,n) or (n,).
        A: (B,p,n) or (p,n), or empty / None.  b: (B,p) or (p,), or empty / None.
        G: (B,m,n) or (m,n), or empty / None.  l, u: (B,m) or (m,), or None (that side unbounded).
        A tensor without its leading B is shared by the batch, as in ProxSuite.

    Returns:
        dict with keys "H", "g", "A", "b", "C", "l", "u" (``alqp.solve_qp(**d)``). The multipliers
        are ProxSuite's unchanged: its (x, lams, nus) are alqp's (x, y, z).

    Raises:
        TypeError: an argument that is not a tensor (nor None / empty where it may be absent).
        ValueError: only one of A, b given, or G without l and u (or l, u without G).
    """
    _check("Q", Q)
    _check("p", p)
    A, b = _pair("A", "b", A, b)
    l = None if _absent(l) else l
    u = None if _absent(u) else u
    if _absent(G):
        if l is not None or u is not None:
            raise ValueError("l or u given without G (G is None or an empty tensor)")
        return {"H": Q, "g": p, "A": A, "b": b, "C": None, "l": None, "u": None}
    _check("G", G)
    if l is None and u is None:
        raise ValueError("G given without l or u")
    for name, t in (("l", l), ("u", u)):
        if t is not None:
            _check(name, t)
    l = None if l is None else _infinite_bounds(l, -1.0)
    u = None if u is None else _infinite_bounds(u, 1.0)
    return {"H": Q, "g": p, "A": A, "b": b, "C": G, "l": l, "u": u}
