"""Seeded generators of random QP families for the oracle tests.

Every generator returns a dict with the keys ``H, g, A, b, C, l, u`` holding float64 torch tensors
with a leading batch dimension (``None`` where the constraint block is absent). The problem is

    minimize 1/2 x'Hx + g'x   subject to   A x = b,   l <= C x <= u

Feasible families are feasible by construction: a point ``x0`` is drawn first, then ``b = A x0`` and
``l <= C x0 <= u``. Infeasible families are built from contradictory rows, so that their closest
feasible shift is nonzero by construction. All randomness comes from a ``torch.Generator`` seeded by
the ``seed`` argument, so a (family, arguments, seed) triple always gives the same tensors.
"""
from __future__ import annotations

import math

import torch

DTYPE = torch.float64
INF = float("inf")
KEYS = ("H", "g", "A", "b", "C", "l", "u")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _rand(gen, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=DTYPE)


def _spd(gen, B, n):
    """(B,n,n) symmetric positive definite, eigenvalues roughly in [0.5, 5]."""
    M = _randn(gen, B, n, n)
    H = M @ M.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=DTYPE)
    return 0.5 * (H + H.transpose(-1, -2))


def _psd(gen, B, n, rank):
    """(B,n,n) symmetric PSD of the given rank (< n)."""
    M = _randn(gen, B, n, rank)
    H = M @ M.transpose(-1, -2) / rank
    return 0.5 * (H + H.transpose(-1, -2))


def _bounds_around(gen, Cx0, lo=0.1, hi=1.0):
    """l < C x0 < u with random margins in [lo, hi]."""
    l = Cx0 - _rand(gen, *Cx0.shape, lo=lo, hi=hi)
    u = Cx0 + _rand(gen, *Cx0.shape, lo=lo, hi=hi)
    return l, u


def _matvec(M, x):
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def _far_cost(gen, H, x0, spread=3.0):
    """g = -H x_u with the unconstrained minimizer x_u far from x0, so constraints get active."""
    xu = x0 + spread * _randn(gen, *x0.shape)
    return -_matvec(H, xu)


def _pack(H, g, A=None, b=None, C=None, l=None, u=None) -> dict:
    return {"H": H, "g": g, "A": A, "b": b, "C": C, "l": l, "u": u}


# ----------------------------------------------------------------------------------------------
# Feasible families
# ----------------------------------------------------------------------------------------------
def _feasible_around_x0(gen, batch: int, n: int, p: int, make_C) -> tuple:
    """H positive definite, p random equality rows and the inequality rows C = make_C(gen), all
    satisfied around a random point x0, and a cost that pushes the minimizer out of the bounds.
    Returns (problem dict, x0)."""
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    C = make_C(gen)
    l, u = _bounds_around(gen, _matvec(C, x0))
    g = _far_cost(gen, H, x0)
    return _pack(H, g, A, b, C, l, u), x0


def strictly_convex(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """H positive definite, p < n random equality rows, m two-sided inequality rows."""
    assert p < n, "strictly_convex needs p < n (full row rank A)"
    return _feasible_around_x0(_gen(seed), batch, n, p, lambda gen: _randn(gen, batch, m, n))[0]


def _boxed_rows(gen, batch, n, m, x0):
    """C = [I; random rows] with the box -1 <= x <= 1 first (needs m >= n) and x0 strictly inside."""
    assert m >= n, "boxed families need m >= n (the first n rows are the box)"
    eye = torch.eye(n, dtype=DTYPE).expand(batch, n, n)
    R = _randn(gen, batch, m - n, n)
    C = torch.cat([eye, R], dim=1)
    lr, ur = _bounds_around(gen, _matvec(R, x0))
    l = torch.cat([-torch.ones(batch, n, dtype=DTYPE), lr], dim=1)
    u = torch.cat([torch.ones(batch, n, dtype=DTYPE), ur], dim=1)
    return C, l, u


def psd_rank_deficient(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """H PSD of rank n//2 (x need not be unique); bounded by the box rows of C (m >= n)."""
    assert p < n
    gen = _gen(seed)
    H = _psd(gen, batch, n, max(1, n // 2))
    x0 = _rand(gen, batch, n, lo=-0.5, hi=0.5)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    C, l, u = _boxed_rows(gen, batch, n, m, x0)
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


def lp(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """H = 0 (a linear program), bounded by the box rows of C (m >= n)."""
    assert p < n
    gen = _gen(seed)
    x0 = _rand(gen, batch, n, lo=-0.5, hi=0.5)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    C, l, u = _boxed_rows(gen, batch, n, m, x0)
    g = _randn(gen, batch, n)
    H = torch.zeros(batch, n, n, dtype=DTYPE)
    return _pack(H, g, A, b, C, l, u)


def equality_only(batch: int, n: int, p: int, seed: int = 0) -> dict:
    """H positive definite, equality rows only (C, l, u are None)."""
    assert p < n
    gen = _gen(seed)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b)


def inequality_only(batch: int, n: int, m: int, seed: int = 0) -> dict:
    """H positive definite, two-sided inequality rows only (A, b are None)."""
    gen = _gen(seed)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    C = _randn(gen, batch, m, n)
    l, u = _bounds_around(gen, _matvec(C, x0))
    g = _far_cost(gen, H, x0)
    return _pack(H, g, C=C, l=l, u=u)


def one_sided(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """H positive definite; inequality rows of four kinds in random order: two-sided, lower bound
    only (u = +inf), upper bound only (l = -inf), and free (both infinite)."""
    assert p < n
    gen = _gen(seed)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    C = _randn(gen, batch, m, n)
    l, u = _bounds_around(gen, _matvec(C, x0))
    # Every kind appears (when m >= 4) in a random order per problem.
    kinds = torch.stack([torch.randperm(m, generator=gen) % 4 for _ in range(batch)])
    u = torch.where((kinds == 1) | (kinds == 3), torch.full_like(u, INF), u)
    l = torch.where((kinds == 2) | (kinds == 3), torch.full_like(l, -INF), l)
    g = _far_cost(gen, H, x0)
    return _pack(H, g, A, b, C, l, u)


def equal_bounds(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """As strictly_convex, but the first min(2, m) inequality rows have l == u = C x0 (equalities
    written as two-sided inequalities)."""
    assert p + min(2, m) < n
    prob, x0 = _feasible_around_x0(_gen(seed), batch, n, p, lambda gen: _randn(gen, batch, m, n))
    Cx0 = _matvec(prob["C"], x0)
    k = min(2, m)
    prob["l"][:, :k] = Cx0[:, :k]
    prob["u"][:, :k] = Cx0[:, :k]
    return prob


def _bound_rows(gen, batch, n, m):
    """C (B,m,n) whose rows each have one nonzero: a random column and a scale in +-[0.5, 2]
    (bounds on single variables, written in any order and scale; columns may repeat)."""
    cols = torch.randint(0, n, (batch, m), generator=gen)
    sign = torch.where(_rand(gen, batch, m) < 0.5, -1.0, 1.0).to(DTYPE)
    C = torch.zeros(batch, m, n, dtype=DTYPE)
    C.scatter_(-1, cols.unsqueeze(-1), (sign * _rand(gen, batch, m, lo=0.5, hi=2.0)).unsqueeze(-1))
    return C


def bound_rows(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """H positive definite; every inequality row bounds a single (scaled) variable, the case
    where the solver adds C'WC to its Newton matrix as a diagonal."""
    assert p < n
    return _feasible_around_x0(_gen(seed), batch, n, p, lambda gen: _bound_rows(gen, batch, n, m))[0]


def qp_from_solution(B: int, n: int, p: int, m: int, n_up: int, n_lo: int, seed: int,
                     open_sides: str = "none") -> tuple:
    """A feasible strictly convex QP batch built from its solution (x*, y*, z*), for the
    derivative tests, where the active set must be known exactly.

    Rows [0, n_up) are active at u (z in [0.5, 1.5]), rows [n_up, n_up + n_lo) at l (z in
    [-1.5, -0.5]), the rest strictly inside (slack in [0.3, 1]). ``open_sides`` makes some unused
    bounds infinite: "alternate" drops the unused side of every second row (rows 0 and n_up keep
    both), "odd_inactive" drops u on every second inactive row; "none" keeps all.

    Returns:
        (problem dict, x* (B,n), y* (B,p), z* (B,m)); A, b (C, l, u) are None when p (m) is 0.
    """
    assert p + n_up + n_lo <= n
    gen = _gen(seed)
    H = _spd(gen, B, n)
    x = _randn(gen, B, n)
    A = _randn(gen, B, p, n)
    y = _randn(gen, B, p)
    C = _randn(gen, B, m, n)
    Cx = _matvec(C, x)
    l = Cx - _rand(gen, B, m, lo=0.3, hi=1.0)
    u = Cx + _rand(gen, B, m, lo=0.3, hi=1.0)
    z = torch.zeros(B, m, dtype=DTYPE)
    up, lo = slice(0, n_up), slice(n_up, n_up + n_lo)
    u[:, up] = Cx[:, up]
    z[:, up] = _rand(gen, B, n_up, lo=0.5, hi=1.5)
    l[:, lo] = Cx[:, lo]
    z[:, lo] = -_rand(gen, B, n_lo, lo=0.5, hi=1.5)
    if open_sides == "alternate":
        for i in range(1, m, 2):
            if i < n_up:
                l[:, i] = -INF
            elif i < n_up + n_lo:
                u[:, i] = INF
            else:
                (u if i % 4 == 1 else l)[:, i] = INF if i % 4 == 1 else -INF
    elif open_sides == "odd_inactive":
        for i in range(n_up + n_lo + 1, m, 2):
            u[:, i] = INF
    elif open_sides != "none":
        raise ValueError(f"open_sides must be 'none', 'alternate' or 'odd_inactive', got {open_sides!r}")
    g = -(_matvec(H, x) + (y.unsqueeze(-2) @ A).squeeze(-2) + (z.unsqueeze(-2) @ C).squeeze(-2))
    prob = dict(H=H, g=g, A=A if p else None, b=_matvec(A, x) if p else None, C=C if m else None,
                l=l if m else None, u=u if m else None)
    return prob, x, y, z


# ----------------------------------------------------------------------------------------------
# Infeasible families (closest feasible shift nonzero by construction)
# ----------------------------------------------------------------------------------------------
def infeasible_bound_rows(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """As bound_rows, but the first equality asks for the sum of the variables to be 1 beyond
    what the box [-1, 1]^n allows (the rows 0..n-1 of C are that box; m >= n)."""
    assert p < n and m >= n
    gen = _gen(seed)
    H = _spd(gen, batch, n)
    x0 = _rand(gen, batch, n, lo=-0.5, hi=0.5)
    A = _randn(gen, batch, p, n)
    A[:, 0] = 1.0
    b = _matvec(A, x0)
    b[:, 0] = n + 1.0
    box = torch.eye(n, dtype=DTYPE).expand(batch, n, n)
    C = torch.cat([box, _bound_rows(gen, batch, n, m - n)], dim=1)
    l, u = _bounds_around(gen, _matvec(C, x0))
    l[:, :n], u[:, :n] = -1.0, 1.0
    g = _far_cost(gen, H, x0)
    return _pack(H, g, A, b, C, l, u)


def infeasible_eq_duplicated(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """Equalities whose last k = max(1, p//2) rows repeat (scaled by a random factor) earlier rows
    with an inconsistent right-hand side; the inequality rows are feasible around x0."""
    assert 2 <= p and p - max(1, p // 2) < n
    gen = _gen(seed)
    k = max(1, p // 2)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A1 = _randn(gen, batch, p - k, n)
    idx = torch.randint(0, p - k, (k,), generator=gen)
    scale = _rand(gen, batch, k, lo=0.5, hi=2.0)
    A2 = scale.unsqueeze(-1) * A1[:, idx, :]
    A = torch.cat([A1, A2], dim=1)
    b = _matvec(A, x0)
    offset = _rand(gen, batch, k, lo=0.5, hi=1.5) * torch.where(
        torch.rand(batch, k, generator=gen, dtype=DTYPE) < 0.5, -1.0, 1.0
    )
    b[:, p - k:] += offset
    C = _randn(gen, batch, m, n)
    l, u = _bounds_around(gen, _matvec(C, x0))
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


def infeasible_eq_overdetermined(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """p > n random equality rows with a random right-hand side (inconsistent almost surely);
    the inequality rows are feasible around the least-squares point."""
    assert p > n
    gen = _gen(seed)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0) + _randn(gen, batch, p)
    C = _randn(gen, batch, m, n)
    l, u = _bounds_around(gen, _matvec(C, x0))
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


def infeasible_ineq(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """Contradictory inequality rows: the last k = max(1, m//3) rows come in pairs with the first
    rows, c x >= c x0 + gap (one-sided) and (s c) x <= s (c x0 - gap) for a scale s > 0, which no x
    satisfies. The equalities and the other inequality rows are feasible at x0."""
    assert p < n and m >= 2
    gen = _gen(seed)
    k = max(1, m // 3)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    C1 = _randn(gen, batch, m - k, n)
    l1, u1 = _bounds_around(gen, _matvec(C1, x0))
    rows = torch.randint(0, m - k, (k,), generator=gen)
    gap = _rand(gen, batch, k, lo=0.3, hi=1.0)
    s = _rand(gen, batch, k, lo=0.5, hi=2.0)
    base = C1[:, rows, :]
    cx0 = _matvec(base, x0)
    # Paired row i of the first block becomes one-sided: c x >= c x0 + gap.
    l1 = l1.clone()
    u1 = u1.clone()
    l1[:, rows] = cx0 + gap
    u1[:, rows] = INF
    C2 = s.unsqueeze(-1) * base
    l2 = torch.full((batch, k), -INF, dtype=DTYPE)
    u2 = s * (cx0 - gap)
    C = torch.cat([C1, C2], dim=1)
    l = torch.cat([l1, l2], dim=1)
    u = torch.cat([u1, u2], dim=1)
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


def infeasible_eq_vs_ineq(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """Equality rows that contradict inequality rows: the last k = min(p, m) // 2 (at least 1)
    inequality rows are scaled copies s a_j of equality rows a_j x = a_j x0 with the one-sided bound
    s a_j x >= s (a_j x0 + gap). The least-squares shift is then split between s_eq and s_in, so
    A's_eq and C's_in are nonzero (only their sum vanishes)."""
    assert 1 <= p < n and m >= 2
    gen = _gen(seed)
    k = max(1, min(p, m) // 2)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    C1 = _randn(gen, batch, m - k, n)
    l1, u1 = _bounds_around(gen, _matvec(C1, x0))
    rows = torch.randperm(p, generator=gen)[:k]
    s = _rand(gen, batch, k, lo=0.5, hi=2.0)
    gap = _rand(gen, batch, k, lo=0.3, hi=1.0)
    C2 = s.unsqueeze(-1) * A[:, rows, :]
    l2 = s * (b[:, rows] + gap)
    u2 = torch.full_like(l2, INF)
    C = torch.cat([C1, C2], dim=1)
    l = torch.cat([l1, l2], dim=1)
    u = torch.cat([u1, u2], dim=1)
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


def _sign(gen, *shape):
    return torch.where(torch.rand(*shape, generator=gen, dtype=DTYPE) < 0.5, -1.0, 1.0).to(DTYPE)


def _hessian(gen, batch, n, hessian):
    if hessian == "spd":
        return _spd(gen, batch, n)
    if hessian == "psd":
        return _psd(gen, batch, n, max(1, n // 2))
    if hessian == "zero":
        return torch.zeros(batch, n, n, dtype=DTYPE)
    raise ValueError(f"hessian must be 'spd', 'psd' or 'zero', got {hessian!r}")


def _repeated_both(batch, n, p, m, seed, hessian="spd", eq_scale=1.0, in_scale=1.0, boxed=False):
    """Issue 12 (1): the last equality row repeats row j of A (times ``eq_scale``) with an
    inconsistent right-hand side, and the last two inequality rows are c (bounds below c x0) and
    ``in_scale`` * c (bounds above c x0 once divided by in_scale, flipped when in_scale < 0), whose
    bound intervals are disjoint. The other rows are consistent around x0 (with slack); with
    ``boxed`` the first n inequality rows are the box [-1, 1]^n (x0 inside [-0.5, 0.5]^n)."""
    nb = n if boxed else 0
    assert 2 <= p <= n and m >= nb + 2
    gen = _gen(seed)
    H = _hessian(gen, batch, n, hessian)
    x0 = _rand(gen, batch, n, lo=-0.5, hi=0.5) if boxed else _randn(gen, batch, n)
    # Equalities: p - 1 random rows, then a (scaled) copy of row j with b_j shifted by +-[0.5, 1.5].
    A1 = _randn(gen, batch, p - 1, n)
    j = torch.randint(0, p - 1, (batch,), generator=gen)
    arange = torch.arange(batch)
    A = torch.cat([A1, (eq_scale * A1[arange, j]).unsqueeze(1)], dim=1)
    b = _matvec(A, x0)
    b[:, -1] += _sign(gen, batch) * _rand(gen, batch, lo=0.5, hi=1.5) * abs(eq_scale)
    # Inequalities: [box;] random rows around x0, then c with l1 <= c x <= u1 = c x0 - gap/2 and a
    # copy with c x >= l2 = c x0 + gap/2 (the other side of each: infinite or finite, per problem).
    R = _randn(gen, batch, m - nb - 2, n)
    lr, ur = _bounds_around(gen, _matvec(R, x0))
    c = _randn(gen, batch, n)
    cx0 = (c * x0).sum(-1)
    gap = _rand(gen, batch, lo=0.4, hi=1.2)
    width1, width2 = _rand(gen, batch, lo=0.5, hi=2.0), _rand(gen, batch, lo=0.5, hi=2.0)
    u1 = cx0 - gap / 2
    l1 = torch.where(_rand(gen, batch) < 0.5, u1 - width1, torch.full_like(u1, -INF))
    l2 = cx0 + gap / 2
    u2 = torch.where(_rand(gen, batch) < 0.5, l2 + width2, torch.full_like(l2, INF))
    # Row in_scale * c: in_scale * [l2, u2], ordered.
    lo2, hi2 = in_scale * l2, in_scale * u2
    if in_scale < 0:
        lo2, hi2 = hi2, lo2
    rows_C = [R, c.unsqueeze(1), (in_scale * c).unsqueeze(1)]
    rows_l = [lr, l1.unsqueeze(1), lo2.unsqueeze(1)]
    rows_u = [ur, u1.unsqueeze(1), hi2.unsqueeze(1)]
    if boxed:
        rows_C.insert(0, torch.eye(n, dtype=DTYPE).expand(batch, n, n))
        rows_l.insert(0, -torch.ones(batch, n, dtype=DTYPE))
        rows_u.insert(0, torch.ones(batch, n, dtype=DTYPE))
    C, l, u = torch.cat(rows_C, 1), torch.cat(rows_l, 1), torch.cat(rows_u, 1)
    g = _randn(gen, batch, n) if hessian == "zero" else _far_cost(gen, H, x0)
    return _pack(H, g, A, b, C, l, u)


def infeasible_repeated_both(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """Issue 12 (1). H positive definite; the last equality row is an exact copy of an earlier one
    with a different right-hand side, and the last two inequality rows are the same row c with
    disjoint bounds (c x <= u1 < l2 <= c x). The other rows are consistent at x0 (p >= 2, m >= 2)."""
    return _repeated_both(batch, n, p, m, seed)


def infeasible_repeated_both_lp(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """As infeasible_repeated_both with H = 0 (an LP), bounded by the box [-1, 1]^n in the first n
    inequality rows (m >= n + 2). x is not unique in general: compare objectives."""
    return _repeated_both(batch, n, p, m, seed, hessian="zero", boxed=True)


def infeasible_scaled_copies(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """As infeasible_repeated_both, but the copies are scaled: the last equality row is 2 a_j with
    a right-hand side inconsistent with a_j x = b_j, and the last inequality row is -2 c with
    -2 c x <= -2 l2 (so c x >= l2 > u1 >= c x for the row before it)."""
    return _repeated_both(batch, n, p, m, seed, eq_scale=2.0, in_scale=-2.0)


def infeasible_dependent(batch: int, n: int, p: int, m: int, seed: int = 0, hessian: str = "spd") -> dict:
    """Issue 12 (2): a dependent set of inequality rows, no two of them parallel: x_i >= 1 for the
    k = n // 2 variables i of a random set S (per problem), and sum_{i in S} x_i <= 0 (the first
    k + 1 rows of C, one-sided). The least-squares shift moves each x_i, i in S, to 1/(k+1). The p
    equality rows and the other m - k - 1 inequality rows are random and hold with slack at an x0
    with x0_i = 1/(k+1) on S (so they are consistent with the closest feasible set).
    H positive definite (``hessian`` 'psd' or 'zero' for the variants; then add a box yourself)."""
    k = n // 2
    assert p < n - k and m >= k + 1
    gen = _gen(seed)
    H = _hessian(gen, batch, n, hessian)
    S = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])  # (B,k)
    inS = torch.zeros(batch, n, dtype=DTYPE).scatter_(1, S, 1.0)
    x0 = torch.where(inS > 0, torch.full((batch, n), 1.0 / (k + 1), dtype=DTYPE), _randn(gen, batch, n))
    A = _randn(gen, batch, p, n)
    b = _matvec(A, x0)
    E = torch.zeros(batch, k, n, dtype=DTYPE).scatter_(2, S.unsqueeze(-1), 1.0)
    R = _randn(gen, batch, m - k - 1, n)
    lr, ur = _bounds_around(gen, _matvec(R, x0))
    C = torch.cat([E, inS.unsqueeze(1), R], dim=1)
    l = torch.cat([torch.ones(batch, k, dtype=DTYPE), torch.full((batch, 1), -INF, dtype=DTYPE), lr], 1)
    u = torch.cat([torch.full((batch, k), INF, dtype=DTYPE), torch.zeros(batch, 1, dtype=DTYPE), ur], 1)
    g = _far_cost(gen, H, x0) if hessian == "spd" else _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


def infeasible_three_way(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """A dependent triple across both blocks, no two rows parallel: the last equality row is
    a = c1 + c2, where the last two inequality rows are c1 x <= u1, c2 x <= u2 (finite lower
    bounds below them), and a x = b > u1 + u2 (by d1 + d2, d_i in [0.3, 0.8]). The least-squares
    shift is s_eq = -(d1+d2)/3 on that row and s_in = (d1+d2)/3 on c1, c2 (when the consistent random
    rows stay inactive). H positive definite (p >= 1, m >= 2)."""
    assert 1 <= p < n and m >= 2
    gen = _gen(seed)
    H = _spd(gen, batch, n)
    x0 = _randn(gen, batch, n)
    c1, c2 = _randn(gen, batch, n), _randn(gen, batch, n)
    A = torch.cat([_randn(gen, batch, p - 1, n), (c1 + c2).unsqueeze(1)], dim=1)
    b = _matvec(A, x0)
    d1, d2 = _rand(gen, batch, lo=0.3, hi=0.8), _rand(gen, batch, lo=0.3, hi=0.8)
    u1, u2 = (c1 * x0).sum(-1) - d1, (c2 * x0).sum(-1) - d2
    l1, l2 = u1 - _rand(gen, batch, lo=1.0, hi=2.0), u2 - _rand(gen, batch, lo=1.0, hi=2.0)
    R = _randn(gen, batch, m - 2, n)
    lr, ur = _bounds_around(gen, _matvec(R, x0), lo=0.5, hi=1.5)
    C = torch.cat([R, c1.unsqueeze(1), c2.unsqueeze(1)], dim=1)
    l = torch.cat([lr, l1.unsqueeze(1), l2.unsqueeze(1)], 1)
    u = torch.cat([ur, u1.unsqueeze(1), u2.unsqueeze(1)], 1)
    g = _randn(gen, batch, n)
    return _pack(H, g, A, b, C, l, u)


#: Issue 12's families: generator and the arguments of the reproduction (tests/ and /tmp/i12/).
ISSUE12 = {
    "infeasible_repeated_both": (infeasible_repeated_both, dict(n=12, p=3, m=6)),
    "infeasible_dependent": (infeasible_dependent, dict(n=10, p=2, m=8)),
    "infeasible_repeated_both_lp": (infeasible_repeated_both_lp, dict(n=8, p=3, m=12)),
    "infeasible_scaled_copies": (infeasible_scaled_copies, dict(n=12, p=3, m=6)),
    "infeasible_three_way": (infeasible_three_way, dict(n=10, p=3, m=6)),
}


# ----------------------------------------------------------------------------------------------
# Issue 17: multi-block infeasibility, built from the solution
# ----------------------------------------------------------------------------------------------
#: The kinds of :func:`multiblock_instance`.
MULTIBLOCK_KINDS = ("pinned", "pinned_dup", "free", "free_dup", "weak")


def _multiblock_rows(gen, n, p, k0, k, r, free, dup, is_in):
    """One draw of the shifted rows of :func:`multiblock_instance`: (G_V, s, w, ok)."""
    # Shifts: signs random, with an upper (+) and a lower (-) one among the inequality rows;
    # magnitudes 0.2..1, and one or two small ones (1e-3..2e-2) among the inequality rows.
    sign = _sign(gen, k)
    sign[p], sign[p + 1] = 1.0, -1.0
    mag = _rand(gen, k, lo=0.2, hi=1.0)
    n_small = 1 + int(torch.rand(1, generator=gen) < 0.5)
    small = torch.exp(_rand(gen, k, lo=math.log(1e-3), hi=math.log(2e-2)))
    rows = (torch.randperm(k0 - p, generator=gen) + p)[:n_small]
    mag[rows] = small[rows]
    s = sign * mag
    R = _randn(gen, k, r) @ _randn(gen, r, n) / r ** 0.5 if free else _randn(gen, k, n)
    if dup:  # a scaled copy of an equality row j as the last (inequality) row of V
        j = int(torch.randint(0, p, (1,), generator=gen))
        sigma = [1.0, -1.0, 2.0][int(torch.randint(0, 3, (1,), generator=gen))]
        R[-1] = sigma * R[j]
        s[-1] = sigma * s[j]
    s_dir = s / s.norm()
    G = R - torch.outer(s_dir, s_dir @ R)
    sv = torch.linalg.svdvals(G)
    rank = r
    well = bool(sv[rank - 1] >= 5e-2 * sv[0])
    # Multipliers: rho in range(G_V), moved along s by the least t >= 0 giving every shifted
    # inequality row the sign of its shift (the solver's choice, alqp.activity).
    rho = G @ _randn(gen, n)
    limit = torch.where(is_in, -rho / s, torch.full_like(s, -INF))
    top = torch.topk(limit, 2).values
    t = float(top[0].clamp_min(0.0))
    no_tie = bool(top[0] - top[1] > 1e-3 * (1.0 + top[0].abs())) or t == 0.0
    w = rho + t * s
    w = torch.where(is_in & (s > 0), w.clamp_min(0.0), torch.where(is_in & (s < 0), w.clamp_max(0.0), w))
    return G, s, w, well and no_tie


def multiblock_instance(batch: int, n: int, p: int, m: int, seed: int = 0, kind: str = "pinned") -> tuple:
    """Issue 17: closest-feasible QPs whose least-squares shift spans the p equality rows and
    inequality rows at their lower and their upper bounds at once, with large multipliers, built
    from their solution (x*, y*, z*, s*) so that the reference is exact.

    The shifted rows V (all p equality rows and q inequality rows, both signs of shift present)
    are G_V = (I - s s'/|s|^2) R: the shift s lies in null(G_V'), so it is the least-squares shift,
    and b, l, u put each row of V at distance s_i beyond the bound named by the sign of s_i (the
    other side of a shifted inequality row is finite or infinite at random). One or two shifted
    inequality rows get a small shift (1e-3 to 2e-2) and the others 0.2 to 1, so that the
    multipliers are the solver's choice w_V = rho + t s with rho = G_V c in range(G_V) and
    t = max(0, max_i -rho_i / s_i) large (10 to 1e4): multipliers in the hundreds to thousands,
    and a shifted row active at a zero multiplier (the row that fixes t).

    kind:
        "pinned": |V| = n + 1 rows in general position: x* is pinned by them (it does not
            depend on H or g), null(G_V') = span(s), and any perturbation of A or C keeps the
            structure (the QP stays infeasible, the derivative exists in every direction).
        "free": rank(G_V) = r = n - 2 (G_V = (I - P_s) M0 W), one further inequality row active
            and unshifted (|z| in [0.5, 1.5]): x* keeps one free direction. The rows of V are
            dependent by construction: only perturbations A0 (I + E), C0 (I + E) keep that.
        "pinned_dup", "free_dup": as "pinned" / "free", plus a scaled copy sigma a_j
            (sigma in {1, -1, 2}) of an equality row j as a further shifted inequality row, with
            shift sigma s_j (a row duplicated across the blocks; null(G_V') has dimension 2).
            (A copy of a shifted inequality row is left out: when that row fixes t, the copy
            ties with it, both multipliers are 0, and l, u move on a kink.)
        "weak": as "free" (rank n - 3), plus one unshifted inequality row on its bound with a zero
            multiplier (weakly active: the solution map has a kink there).
    The other inequality rows hold with slack 0.3 to 1 (one side infinite at random). Rows of C are
    permuted at random. Each problem's shifted rows are redrawn until G_V is well conditioned on
    its range (smallest nonzero singular value >= 5e-2 of the largest) and no two shifted
    inequality rows tie for t. H is positive definite (eigenvalues about 0.5 to 5).

    Returns:
        (problem dict, reference dict with x, y, z, s_eq, s_in (B, ...) and "weak": (B,) long, the
        index of the weakly active row, -1 where none).
    """
    if kind not in MULTIBLOCK_KINDS:
        raise ValueError(f"kind must be one of {MULTIBLOCK_KINDS}, got {kind!r}")
    gen = _gen(seed)
    B = batch
    dup = kind.endswith("_dup")
    free = kind.startswith("free") or kind == "weak"
    n_act = 1 if free else 0
    n_weak = 1 if kind == "weak" else 0
    r = n - 2 - n_weak if free else n  # rank of G_V
    k0 = r + 1  # rows of V before the copy
    k = k0 + (1 if dup else 0)
    q = k - p  # shifted inequality rows
    assert p >= 1 and q >= 2 and r >= p, (n, p, kind)
    n_rest = m - q - n_act - n_weak
    assert n_rest >= 0, (m, q, n_act, n_weak)
    H = _spd(gen, B, n)
    x = _randn(gen, B, n)
    is_in = torch.arange(k) >= p
    G, s, w = torch.zeros(B, k, n, dtype=DTYPE), torch.zeros(B, k, dtype=DTYPE), torch.zeros(B, k, dtype=DTYPE)
    for i in range(B):
        # Redraw until G_V is well conditioned on its range (smallest nonzero singular value at
        # least 5e-2 of the largest: a near-singular G_V makes the multipliers' range part, and
        # the derivative, blow up by its inverse on top of t) and no two shifted inequality rows
        # tie for t (a kink).
        for _ in range(200):
            G_i, s_i, w_i, ok = _multiblock_rows(gen, n, p, k0, k, r, free, dup, is_in)
            if ok:
                break
        assert ok, "no well-conditioned draw"
        G[i], s[i], w[i] = G_i, s_i, w_i
    Gx = _matvec(G, x)
    A, y = G[:, :p], w[:, :p]
    b = Gx[:, :p] - s[:, :p]
    CV, zV, sV, CVx = G[:, p:], w[:, p:], s[:, p:], Gx[:, p:]
    beta = CVx - sV
    far = _rand(gen, B, q, lo=0.5, hi=2.0)
    other = _rand(gen, B, q) < 0.5
    uV = torch.where(sV > 0, beta, torch.where(other, beta + far, torch.full_like(beta, INF)))
    lV = torch.where(sV < 0, beta, torch.where(other, beta - far, torch.full_like(beta, -INF)))
    rows_C, rows_l, rows_u, rows_z = [CV], [lV], [uV], [zV]
    if n_act + n_weak:
        Ca = _randn(gen, B, n_act + n_weak, n)
        Cax = _matvec(Ca, x)
        up = _rand(gen, B, n_act + n_weak) < 0.5
        za = torch.where(up, 1.0, -1.0).to(DTYPE) * _rand(gen, B, n_act + n_weak, lo=0.5, hi=1.5)
        if n_weak:
            za[:, -1] = 0.0
        width = _rand(gen, B, n_act + n_weak, lo=0.5, hi=2.0)
        ua = torch.where(up, Cax, Cax + width)
        la = torch.where(up, Cax - width, Cax)
        rows_C.append(Ca), rows_l.append(la), rows_u.append(ua), rows_z.append(za)
    Cr = _randn(gen, B, n_rest, n)
    lr, ur = _bounds_around(gen, _matvec(Cr, x), lo=0.3, hi=1.0)
    side = torch.rand(B, n_rest, generator=gen)
    lr = torch.where(side < 0.25, torch.full_like(lr, -INF), lr)
    ur = torch.where(side > 0.75, torch.full_like(ur, INF), ur)
    rows_C.append(Cr), rows_l.append(lr), rows_u.append(ur), rows_z.append(torch.zeros(B, n_rest, dtype=DTYPE))
    C, l, u, z = (torch.cat(t, 1) for t in (rows_C, rows_l, rows_u, rows_z))
    s_in = torch.cat([sV, torch.zeros(B, m - q, dtype=DTYPE)], 1)
    weak = torch.full((B,), q + n_act if n_weak else -1, dtype=torch.long)
    perm = torch.stack([torch.randperm(m, generator=gen) for _ in range(B)])
    take = lambda t: torch.gather(t, 1, perm)  # noqa: E731
    C = torch.gather(C, 1, perm.unsqueeze(-1).expand(B, m, n))
    l, u, z, s_in = take(l), take(u), take(z), take(s_in)
    if n_weak:
        weak = torch.argsort(perm, -1)[torch.arange(B), weak]
    g = -(_matvec(H, x) + _matvec(A.transpose(-1, -2), y) + _matvec(C.transpose(-1, -2), z))
    ref = dict(x=x, y=y, z=z, s_eq=s[:, :p].clone(), s_in=s_in, weak=weak)
    return _pack(H, g, A, b, C, l, u), ref


def infeasible_multiblock(batch: int, n: int, p: int, m: int, seed: int = 0, kind: str = "pinned") -> dict:
    """The problems of :func:`multiblock_instance` (issue 17), without their reference solution."""
    return multiblock_instance(batch, n, p, m, seed, kind)[0]


# ----------------------------------------------------------------------------------------------
# Mixed batches and special problems
# ----------------------------------------------------------------------------------------------
#: Component families of :func:`mixed`, in the order the members cycle through them.
MIXED_COMPONENTS = (
    "strictly_convex",
    "infeasible_eq_duplicated",
    "psd_rank_deficient",
    "infeasible_ineq",
    "lp",
    "one_sided",
    "infeasible_eq_vs_ineq",
)


def mixed_labels(batch: int) -> list:
    """The family name of each member of ``mixed(batch, ...)``."""
    return [MIXED_COMPONENTS[i % len(MIXED_COMPONENTS)] for i in range(batch)]


def mixed(batch: int, n: int, p: int, m: int, seed: int = 0) -> dict:
    """A batch whose members cycle through :data:`MIXED_COMPONENTS` (same n, p, m; needs m >= n
    and p >= 2). Member i is member 0 of its component family drawn with seed ``seed*1000 + i``."""
    members = []
    for i, name in enumerate(mixed_labels(batch)):
        members.append(globals()[name](1, n, p, m, seed * 1000 + i))
    return {k: torch.cat([mem[k] for mem in members], dim=0) for k in KEYS}


def unbounded(batch: int, n: int, p: int, m: int, seed: int = 0, lp_only: bool = False) -> dict:
    """Dual infeasible (unbounded below) problems: a direction d with A d = 0, C d >= 0 on rows
    that are bounded below only, H d = 0, and g'd < 0. H is PSD of rank n//2 (0 if lp_only)."""
    assert p < n - 1
    gen = _gen(seed)
    d = _randn(gen, batch, n)
    d = d / d.norm(dim=-1, keepdim=True)
    P = torch.eye(n, dtype=DTYPE) - d.unsqueeze(-1) * d.unsqueeze(-2)  # projector onto d-perp
    x0 = _randn(gen, batch, n)
    A = _randn(gen, batch, p, n) @ P
    b = _matvec(A, x0)
    C = _randn(gen, batch, m, n)
    sign = torch.where(_matvec(C, d) >= 0, 1.0, -1.0).to(DTYPE)
    C = sign.unsqueeze(-1) * C  # now C d >= 0
    l = _matvec(C, x0) - _rand(gen, batch, m, lo=0.1, hi=1.0)
    u = torch.full_like(l, INF)
    if lp_only:
        H = torch.zeros(batch, n, n, dtype=DTYPE)
    else:
        H = P @ _psd(gen, batch, n, max(1, n // 2)) @ P
        H = 0.5 * (H + H.transpose(-1, -2))
    g = -d + _matvec(P, _randn(gen, batch, n))
    return _pack(H, g, A, b, C, l, u)


def shared_batch(batch: int, n: int, p: int, m: int, seed: int = 0, shared=()) -> dict:
    """A feasible strictly convex batch in which the tensors named in ``shared`` are the same for
    every member and returned without the batch dimension; the others vary across the batch.

    Feasibility holds by construction for every combination: members get their own x0, which is
    moved onto A x = b when b is shared but A is not, and l, u are drawn around each member's
    C x0 (and widened to cover all members when they are shared but C is not).
    """
    assert p < n
    shared = set(shared)
    gen = _gen(seed)

    def draw(shape_fn, name):
        t = shape_fn(1 if name in shared else batch)
        return t.expand(batch, *t.shape[1:]) if name in shared else t

    H = draw(lambda B: _spd(gen, B, n), "H")
    x0 = _randn(gen, batch, n)
    A = draw(lambda B: _randn(gen, B, p, n), "A")
    if "b" in shared:
        b = _randn(gen, 1, p).expand(batch, p)
        # Move each x0 onto A x = b (A has full row rank almost surely).
        r = b - _matvec(A, x0)
        x0 = x0 + torch.linalg.lstsq(A, r.unsqueeze(-1)).solution.squeeze(-1)
    else:
        b = _matvec(A, x0)
    C = draw(lambda B: _randn(gen, B, m, n), "C")
    Cx0 = _matvec(C, x0)
    lo = _rand(gen, batch, m, lo=0.1, hi=1.0)
    hi = _rand(gen, batch, m, lo=0.1, hi=1.0)
    l, u = Cx0 - lo, Cx0 + hi
    if "l" in shared:
        l = l.amin(dim=0, keepdim=True).expand(batch, m)
    if "u" in shared:
        u = u.amax(dim=0, keepdim=True).expand(batch, m)
    g = draw(lambda B: _randn(gen, B, n), "g")
    out = _pack(H, g, A, b, C, l, u)
    return {k: (v[0].clone() if k in shared else v.contiguous()) for k, v in out.items()}


def to_dtype(prob: dict, dtype) -> dict:
    """The same problem with every tensor cast to ``dtype``."""
    return {k: (None if v is None else v.to(dtype)) for k, v in prob.items()}


def member(prob: dict, i: int) -> dict:
    """Problem i of a batched problem dict (tensors without a batch dimension are shared)."""
    core = {"H": 2, "g": 1, "A": 2, "b": 1, "C": 2, "l": 1, "u": 1}
    out = {}
    for k, v in prob.items():
        if v is None:
            out[k] = None
        elif v.dim() == core[k] + 1:
            out[k] = v[i if v.shape[0] > 1 else 0]
        else:
            out[k] = v
    return out


def batch_size(prob: dict) -> int:
    core = {"H": 2, "g": 1, "A": 2, "b": 1, "C": 2, "l": 1, "u": 1}
    sizes = [v.shape[0] for k, v in prob.items() if v is not None and v.dim() == core[k] + 1]
    return max(sizes) if sizes else 1
