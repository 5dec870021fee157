"""Plain types shared by every layer of alqp: the statuses and the solution.

This module imports nothing of alqp, so that the problem, the engines, the backward and the
PyTorch face can all use these types without importing one another.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

from torch import Tensor


class Status(enum.IntEnum):
    """Per-problem outcome of :func:`alqp.solve_qp`, stored as an int64 tensor in ``QPSolution.status``.

    SOLVED: primal and dual residuals below tolerance; the shift is exactly zero.
    CLOSEST_FEASIBLE: the constraints cannot hold; the solution is that of the closest feasible QP
        (constraints shifted by the least-squares shift returned in ``s_eq``, ``s_in``).
    PRIMAL_INFEASIBLE: as CLOSEST_FEASIBLE, reported instead of it when ``Settings.closest_feasible``
        is False (x and the shift are still those of the closest feasible QP).
    MAX_ITER: the iteration budget ran out before the tolerances were met.
    DUAL_INFEASIBLE: the QP is unbounded below (a certificate direction was found).
    NUMERICAL_ERROR: a factorization failed or a non-finite value appeared.
    STALLED: no progress for ``Settings.stall_iter`` outer iterations (no residual halved, no
        penalty change, no move to the closest feasible QP): the problem was stopped so that it
        does not hold the batch; x, y, z are its last iterate and get no gradient.
    INACCURATE: the best answer found misses the asked tolerance, but only by what round-off in
        the data's dtype allows to compute (:func:`alqp.certify.roundoff_floor`): the tolerance is
        unreachable for this problem, not merely unreached. x, y, z are that answer; no gradient.
    NON_CONVEX: the solve failed and H (symmetrized) has an eigenvalue below round-off's reach of
        zero, so H is not positive semi-definite; a RuntimeWarning gives the estimate of its most
        negative eigenvalue. x, y, z and the shift are returned as zeros (a convex method's iterate
        on a non-convex problem answers nothing, and may be arbitrarily large).

    Only SOLVED and CLOSEST_FEASIBLE carry a solution (:func:`has_solution`); the other statuses
    get the gradient that ``Settings.failed_gradient`` says.
    """

    SOLVED = 0
    CLOSEST_FEASIBLE = 1
    PRIMAL_INFEASIBLE = 2
    MAX_ITER = 3
    DUAL_INFEASIBLE = 4
    NUMERICAL_ERROR = 5
    STALLED = 6
    INACCURATE = 7
    NON_CONVEX = 8


def has_solution(status):
    """Whether ``status`` (a :class:`Status`, an int, or an integer tensor / array of them) is one
    that carries a solution, SOLVED or CLOSEST_FEASIBLE: the outputs the backward differentiates.
    The one definition of it, for every backward engine."""
    # (Plain ints: a tensor compared with an IntEnum member takes a slow path, ~10 us each.)
    return (status == _SOLVED) | (status == _CLOSEST_FEASIBLE)


_SOLVED, _CLOSEST_FEASIBLE = int(Status.SOLVED), int(Status.CLOSEST_FEASIBLE)


class QPSolution(NamedTuple):
    """Solution of a batch of QPs (the leading B is dropped for unbatched input).

    Attributes:
        x: (B,n) primal solution (of the closest feasible QP when the QP is infeasible).
        y: (B,p) multipliers of A x = b.
        z: (B,m) multipliers of l <= C x <= u: positive at the upper bound, negative at the lower.
            For a closest-feasible QP the multipliers of its shifted rows are not unique; alqp
            reports the choice of :func:`alqp.activity.closest_feasible_multipliers`, which the
            backward differentiates.
        s_eq: (B,p) closest-feasible shift of the equality rows, A x - b on the shifted rows
            (:func:`alqp.activity.shifted_rows`) and 0 elsewhere (exactly 0 when SOLVED).
        s_in: (B,m) shift of the inequality rows, C x - clip(C x, l, u) on the shifted rows and 0
            elsewhere (exactly 0 when SOLVED).
        status: (B,) int64, values of :class:`alqp.Status`.
        iterations: (B,) int64, the work done: the ALM's semi-smooth Newton steps, or DAQP's
            active-set iterations for the problems the active-set engine answered.
    """

    x: Tensor
    y: Tensor
    z: Tensor
    s_eq: Tensor
    s_in: Tensor
    status: Tensor
    iterations: Tensor


def unbatch(solution: QPSolution) -> QPSolution:
    """The solution of an unbatched call: each field without its leading batch dimension of 1."""
    return QPSolution(*(t[0] for t in solution))
