"""What a backward engine returns where it has no derivative to return: the failure policy.

Two kinds of problem of a batch get no derivative from a backward engine
(:func:`alqp.backward.implicit_backward`, :func:`alqp.lpgd.lpgd_backward`):

- a *failed* problem, whose status carries no solution (:func:`alqp.settings.has_solution` is
  False: MAX_ITER, STALLED, DUAL_INFEASIBLE, NUMERICAL_ERROR, PRIMAL_INFEASIBLE, NON_CONVEX) and
  which receives a nonzero incoming gradient. Its contribution follows
  ``Settings.failed_gradient``: zero (with a warning, once per process), NaN, or an error.
  A failed problem whose incoming gradient is exactly zero contributes zero under every policy:
  the loss does not depend on its outputs, so zero is its exact contribution, not a failure.
- a problem whose incoming gradient holds NaN or Inf. Its contribution is NaN under every policy:
  a non-finite gradient in must not come out as a finite one.

An engine calls :func:`screen_incoming` first (it applies the policy and hands the engine finite
incoming gradients, so that a NaN of one problem never enters the batched solves) and
:func:`mark_nan` on its result last.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from alqp.settings import Settings, Status, has_solution

#: Whether the "zero" policy's warning was issued in this process (it is issued once).
_zero_policy_warned = False

#: How many problem indices an error or warning message lists.
_SHOWN = 8


def _describe(index: Tensor, status: Tensor) -> str:
    """"indices [..] with statuses [..]" for the problems at ``index`` (first few)."""
    idx = index[:_SHOWN].tolist()
    names = [Status(int(s)).name for s in status[index[:_SHOWN]].tolist()]
    more = f" (and {index.numel() - _SHOWN} more)" if index.numel() > _SHOWN else ""
    return f"indices {idx}{more} with statuses {names}"


def _rows_any(tensors: Sequence[Tensor], B: int, test) -> Tensor:
    """(B,) True where ``test`` holds for some entry of a problem's row in any of the (B,k) tensors."""
    out = torch.zeros(B, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.shape[-1]:
            out = out | test(t).any(-1)
    return out


def screen_incoming(status: Tensor, incoming: Sequence[Tensor], settings: Optional[Settings] = None
                    ) -> tuple[list[Tensor], Optional[Tensor]]:
    """Apply ``settings.failed_gradient`` to a batch's incoming gradients, before the backward runs.

    Args:
        status: (B,) the forward's statuses.
        incoming: the incoming gradients dL/d(output), each (B,k) (k may be 0), materialized.
        settings: the forward's :class:`Settings` (its ``failed_gradient``); defaults when None.

    Returns:
        The incoming gradients with the rows of problems that hold a NaN or Inf set to zero (the
        others as given), and the (B,) bool mask of the problems whose contributions must be NaN
        (:func:`mark_nan`), or None when there are none.

    Raises:
        RuntimeError: under ``failed_gradient="raise"``, where a failed problem receives a nonzero
            incoming gradient; the message names their indices and statuses.
    """
    global _zero_policy_warned
    B = status.shape[0]
    incoming = list(incoming)
    solved = has_solution(status)
    finite = torch.isfinite(torch.cat(incoming, -1)).all(-1)
    # (The common case, every problem solved and every gradient finite, costs one device sync:
    # at batch 1 the backward takes about a millisecond, and each sync some 10 us.)
    if bool((finite & solved).all()):
        return incoming, None
    nan_rows = None
    if not bool(finite.all()):
        nan_rows = ~finite
        incoming = [torch.where(finite.unsqueeze(-1), t, torch.zeros_like(t)) for t in incoming]
    if bool(solved.all()):
        return incoming, nan_rows
    policy = (settings or Settings()).failed_gradient
    # Failed problems that the loss depends on (a NaN row is one: NaN != 0).
    touched = _rows_any(incoming, B, lambda t: t != 0)
    if nan_rows is not None:
        touched = touched | nan_rows
    failed = ~solved & touched
    if not bool(failed.any()):
        return incoming, nan_rows
    index = failed.nonzero().squeeze(-1)
    what = (f"{index.numel()} problem(s) of the batch of {B} have no solution "
            f"({_describe(index, status)}) but receive a nonzero incoming gradient")
    if policy == "raise":
        raise RuntimeError(f"alqp backward: {what}; their outputs have no derivative "
                           "(Settings.failed_gradient='raise'). Check QPSolution.status, or set "
                           "Settings.failed_gradient to 'zero' or 'nan'.")
    if policy == "nan":
        return incoming, failed if nan_rows is None else nan_rows | failed
    if not _zero_policy_warned:
        _zero_policy_warned = True
        warnings.warn(f"alqp backward: {what}; they contribute zero gradient "
                      "(Settings.failed_gradient='zero'). Reported once per process: check "
                      "QPSolution.status, or set Settings.failed_gradient='nan' or 'raise'.",
                      RuntimeWarning, stacklevel=3)
    return incoming, nan_rows


def mark_nan(grads: dict, nan_rows: Optional[Tensor]) -> dict:
    """``grads`` (name -> (B, ...) tensor) with every entry of the problems in ``nan_rows`` NaN."""
    if nan_rows is None:
        return grads
    return {name: torch.where(nan_rows.view(-1, *([1] * (t.dim() - 1))), torch.full_like(t, float("nan")), t)
            for name, t in grads.items()}
