"""Scaled copies of the same QP (issue 17): all seven tensors times 10^k, k from -12 to 12, leave x
unchanged. With the default, relative tolerance every copy must get the same status as the
unscaled QP, and a SOLVED copy the same x to relative accuracy (an honest non-SOLVED status is
allowed only where the unscaled QP is not SOLVED either). The oracle is Clarabel through cvxpy on
the unscaled QP, certified by the residuals alqp reports on it."""
from __future__ import annotations

import numpy as np
import pytest

import families as F
import oracles as O
from alqp import Settings, Status, solve_qp

EXPONENTS = list(range(-12, 13, 3))
FEASIBLE = [("strictly_convex", dict(batch=6, n=8, p=3, m=6)), ("lp", dict(batch=6, n=6, p=2, m=8)),
            ("bound_rows", dict(batch=6, n=6, p=2, m=6))]


@pytest.mark.parametrize("engine", ["active_set", "alm"])
@pytest.mark.parametrize("family,size", FEASIBLE)
def test_scaled_copies_same_status_and_x(engine, family, size):
    prob = getattr(F, family)(seed=7, **size)
    base = solve_qp(**prob, settings=Settings(engine=engine))
    assert (base.status == Status.SOLVED).all(), base.status
    ref = [O.cvxpy_qp(**F.member(prob, i)).x for i in range(size["batch"])]
    for i, r in enumerate(ref):
        # (an LP's x may not be unique: there the oracle's x is only a check where it is)
        if family != "lp":
            assert np.abs(base.x[i].numpy() - r).max() <= 1e-6 * max(1.0, np.abs(r).max()), i
    for k in EXPONENTS:
        scale = 10.0 ** k
        copy = {name: (None if t is None else t * scale) for name, t in prob.items()}
        sol = solve_qp(**copy, settings=Settings(engine=engine))
        wrong = [(i, float((sol.x[i] - base.x[i]).abs().max())) for i in range(size["batch"])
                 if int(sol.status[i]) == Status.SOLVED
                 and (sol.x[i] - base.x[i]).abs().max() > 1e-6 * max(1.0, float(base.x[i].abs().max()))]
        assert not wrong, f"10^{k}: SOLVED with x off: {wrong}"
        # Honest statuses: a copy that is not SOLVED says so; the default engine solves every copy.
        if engine == "active_set":
            assert (sol.status == Status.SOLVED).all(), (k, sol.status.tolist())
