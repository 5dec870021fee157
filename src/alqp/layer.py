"""Differentiable QP layer: the only module that knows about autograd.

    x*, y*, z*, s_eq*, s_in* = solve_qp(H, g, A, b, C, l, u)

is the solution of ``min 1/2 x'Hx + g'x  s.t.  A x = b,  l <= C x <= u`` (of its closest feasible
QP when the constraints are inconsistent), and gradients of any loss on the five outputs flow back to
every input tensor that requires grad.

How the gradients are computed is a pluggable *backward engine*, chosen by name:

- ``"ift"`` (default): implicit differentiation of the optimality conditions,
  :func:`alqp.backward.implicit_backward`.
- ``"lpgd"``: Lagrangian proximal gradient descent (DESIGN section 5),
  :func:`alqp.lpgd.lpgd_backward`: re-solves the QP perturbed by the incoming gradient. Its options
  ``tau``, ``variant``, ``proximal`` (see :class:`alqp.lpgd.LPGDOptions`) are given to
  :func:`solve_qp` / :class:`QPLayer` and reach the engine as keyword arguments.

An engine is a function ``engine(problem, solution, grad_x, grad_y, grad_z, grad_s_eq, grad_s_in,
settings, factor=None, **options) -> dict`` that receives the canonical batch
(:class:`alqp.problem.QPProblem`, every tensor with its batch dimension B, detached), the batched
:class:`QPSolution`, the incoming gradients (each (B, k)) and the factorization of H and A the
forward computed (:class:`alqp.active_set.LeastDistanceFactor` or None; an engine may ignore it),
and returns the gradients of "H", "g", "A", "b", "C", "l", "u" with the
batched shapes. This module then reduces them to the shapes the caller gave (summing over the batch for a
shared input) and casts them to the inputs' dtype and device.

Problems without a solution: a problem whose status is MAX_ITER, STALLED, DUAL_INFEASIBLE,
NUMERICAL_ERROR, PRIMAL_INFEASIBLE or NON_CONVEX has outputs that are no solution, so they have no
derivative; its contribution to every input is what ``Settings.failed_gradient`` says: zero with a
RuntimeWarning once per process (the default), NaN, or a RuntimeError (:mod:`alqp.failure`). A NaN
or Inf in the incoming gradient of a problem makes its contributions NaN.

The backward is differentiable once: a double backward (``torch.autograd.functional.hessian``,
``gradgradcheck``, a second backward through gradients taken with ``create_graph=True``) raises a
RuntimeError when it reaches alqp, never returns zeros (:func:`_differentiable_once`).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch._C import _functions as _autograd_functions

from alqp.backward import implicit_backward
from alqp.problem import _CORE_NDIM, ARG_NAMES, QPProblem, canonicalize
from alqp.settings import Settings
from alqp.small import backward_small  # alqp.small: fast path
from alqp.pool import one_torch_thread  # alqp.pool: thread policy
from alqp.solver import QPSolution, solve_problem_factored, unbatch


@one_torch_thread  # alqp.pool: the thread policy (no spinning OpenMP threads on a busy machine)
def _ift_engine(problem, solution, gx, gy, gz, gse, gsi, settings, factor=None):
    # --- alqp.small: one-step KKT backward for small all-SOLVED CPU batches (None: not taken) ---
    fast = backward_small(problem, solution, gx, gy, gz, gse, gsi, settings)
    if fast is not None:
        return fast
    # --- end alqp.small ---
    return implicit_backward(problem, solution, gx, gy, gz, gse, gsi, settings=settings, factor=factor)


def _lpgd_engine(problem, solution, gx, gy, gz, gse, gsi, settings, factor=None, **options):
    return _load_lpgd().lpgd_backward(problem, solution, gx, gy, gz, gse, gsi, settings, factor=factor, **options)


def _load_lpgd():
    try:
        return importlib.import_module("alqp.lpgd")
    except ModuleNotFoundError as err:
        if err.name != "alqp.lpgd":
            raise
        raise NotImplementedError('backward="lpgd" is not available yet (alqp.lpgd is not written)') from None


#: Backward engines by name (see the module docstring for the signature).
BACKWARDS: dict[str, Callable] = {"ift": _ift_engine, "lpgd": _lpgd_engine}


def _engine(backward: str, options: Optional[dict] = None) -> Callable:
    """The engine ``backward`` with its options bound; options of value None are left out."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {sorted(BACKWARDS)}, got {backward!r}")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if backward == "lpgd":
        # Fail at the call, not later inside loss.backward().
        _load_lpgd().LPGDOptions(**options)
    elif options:
        raise ValueError(f"options {sorted(options)} apply to backward='lpgd' only, "
                         f"got backward={backward!r}")
    return functools.partial(BACKWARDS[backward], **options) if options else BACKWARDS[backward]


def _differentiable_once(backward: Callable) -> Callable:
    """Decorate an ``autograd.Function.backward`` whose result is not differentiable.

    The backward runs without a graph; when it is called under ``create_graph=True`` and its result
    depends on something that requires grad, the result comes out of a node that raises as soon as
    a double backward reaches it (a graph built for another purpose, e.g. a gradient penalty
    elsewhere in the network, is not affected). The node's inputs are the incoming gradients and
    the forward's inputs (``ctx.saved_tensors[ctx.first_input:]``), so that a double backward
    with respect to either reaches it.

    ``torch.autograd.function.once_differentiable`` links its error node to nothing but fresh
    leaves: a second derivative with respect to the QP data cannot reach it, and autograd reports
    that derivative as unused, which ``hessian`` and ``gradgradcheck`` turn into zeros.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        links = [t for t in (*grads, *ctx.saved_tensors[ctx.first_input:])
                 if isinstance(t, Tensor) and t.requires_grad]
        if not links:
            return out
        error = _autograd_functions.DelayedError(
            b"alqp's backward is not differentiable twice: the gradients of solve_qp / QPLayer are "
            b"computed without a graph, so double backward, torch.autograd.functional.hessian and "
            b"gradgradcheck are not supported (differentiate once, or take finite differences of "
            b"the gradient)", len(out) + len(links))
        aliases = [None if t is None else t.detach().requires_grad_() for t in out]
        return error(*aliases, *links)[:len(out)]

    return wrapper


def _reduce_to(grad: Tensor, shape: torch.Size, core_ndim: int) -> Tensor:
    """Sum a batched (B, ...) gradient down to an input's ``shape``.

    A shared input (no batch dimension) gets the sum over the batch; an input with batch size 1
    broadcast to B gets the sum with its leading 1 kept.
    """
    if len(shape) == core_ndim:
        return grad.sum(0)
    if shape[0] != grad.shape[0]:
        return grad.sum(0, keepdim=True)
    return grad


class QPFunction(torch.autograd.Function):
    """autograd.Function over :func:`alqp.solver.solve_problem` and a backward engine.

    ``QPFunction.apply(settings, warm_start, engine, H, g, A, b, C, l, u)`` returns the batched
    tensors (x, y, z, s_eq, s_in, status, iterations); use :func:`solve_qp` instead.
    """

    @staticmethod
    def forward(ctx, settings: Settings, warm_start, engine: Callable, H, g, A, b, C, l, u):
        problem = canonicalize(H, g, A, b, C, l, u)
        solution, factor = solve_problem_factored(problem, settings, warm_start)
        # The factorization is the engine's own (never handed to the caller, so no cycle through
        # the outputs and nothing to modify in place): a plain attribute, not a saved tensor.
        ctx.settings, ctx.engine, ctx.factor = settings, engine, factor
        ctx.batched, ctx.unbatched = problem.batched, problem.unbatched
        ctx.inputs_meta = [None if t is None else (t.shape, t.dtype, t.device) for t in (H, g, A, b, C, l, u)]
        # Through save_for_backward (not ctx attributes): no reference cycle through the outputs, and
        # autograd detects an in-place change of an input or output before the backward uses it
        # (the problem's tensors are detached views of the inputs).
        # The inputs themselves come last, only to link a double backward to its error
        # (_differentiable_once).
        ctx.save_for_backward(*problem.tensors().values(), *solution, H, g, A, b, C, l, u)
        ctx.first_input = 7 + len(solution)
        ctx.mark_non_differentiable(solution.status, solution.iterations)
        return tuple(solution)

    @staticmethod
    @_differentiable_once
    def backward(ctx, gx, gy, gz, gse, gsi, _g_status, _g_iterations):
        if not any(ctx.needs_input_grad[3:]):
            return (None,) * 10
        saved = ctx.saved_tensors
        problem = QPProblem(**dict(zip(ARG_NAMES, saved[:7])), batched=ctx.batched, unbatched=ctx.unbatched)
        solution = QPSolution(*saved[7:ctx.first_input])
        grads = ctx.engine(problem, solution, gx, gy, gz, gse, gsi, ctx.settings, factor=ctx.factor)
        out = []
        for i, name in enumerate(ARG_NAMES):
            meta = ctx.inputs_meta[i]
            if meta is None or not ctx.needs_input_grad[3 + i]:
                out.append(None)
                continue
            shape, dtype, device = meta
            grad = _reduce_to(grads[name], shape, _CORE_NDIM[name])
            out.append(grad if grad.dtype == dtype and grad.device == device else grad.to(dtype=dtype, device=device))
        return (None, None, None, *out)


def solve_qp(H: Tensor, g: Tensor, A: Optional[Tensor] = None, b: Optional[Tensor] = None,
             C: Optional[Tensor] = None, l: Optional[Tensor] = None, u: Optional[Tensor] = None,
             settings: Optional[Settings] = None, warm_start=None, backward: str = "ift", *,
             tau: Optional[float] = None, variant: Optional[str] = None,
             proximal: Optional[float] = None) -> QPSolution:
    """Solve a batch of convex QPs, differentiably.

        minimize 1/2 x'Hx + g'x   subject to   A x = b,   l <= C x <= u

    When the constraints are inconsistent the closest feasible QP is solved (constraints shifted by
    the least-squares shift returned in ``s_eq``, ``s_in``; status CLOSEST_FEASIBLE).

    Args:
        H: (B,n,n) or (n,n), symmetric positive semi-definite.
        g: (B,n) or (n,).
        A: (B,p,n) or (p,n), or None.  b: (B,p) or (p,), given with A.
        C: (B,m,n) or (m,n), or None.  l, u: (B,m) or (m,), entries may be -inf / +inf; a missing
            side is unbounded (and receives no gradient).
        settings: :class:`alqp.Settings` of the forward solver; defaults when None.
        warm_start: a :class:`QPSolution` (or (x, y, z)) of a nearby problem; not differentiated.
        backward: the backward engine, "ift" (implicit differentiation) or "lpgd".
        tau, variant, proximal: options of backward="lpgd" (None: its defaults), see
            :class:`alqp.lpgd.LPGDOptions`; an error with backward="ift".

    Returns:
        :class:`QPSolution` (x (B,n), y (B,p), z (B,m), s_eq (B,p), s_in (B,m), status (B,),
        iterations (B,)), without the leading B when no input had a batch dimension. x, y, z, s_eq,
        s_in are differentiable with respect to every input that requires grad; an input given
        without batch dimension (shared by the batch) receives the sum of the per-problem gradients.
        Problems without a solution (status other than SOLVED and CLOSEST_FEASIBLE) contribute
        what ``Settings.failed_gradient`` says (zero, with a warning once per process, by default).
        Not differentiable twice (a double backward raises).
    """
    engine = _engine(backward, dict(tau=tau, variant=variant, proximal=proximal))
    settings = settings or Settings()
    solution = QPSolution(*QPFunction.apply(settings, warm_start, engine, H, g, A, b, C, l, u))
    batched = any(t is not None and t.dim() == _CORE_NDIM[name] + 1
                  for name, t in zip(ARG_NAMES, (H, g, A, b, C, l, u)))
    return solution if batched else unbatch(solution)


class QPLayer(nn.Module):
    """A QP as a layer: ``QPLayer(settings, backward)(H, g, A, b, C, l, u) -> QPSolution``.

    A thin :class:`torch.nn.Module` around :func:`solve_qp` (no parameters of its own: make the QP
    data functions of your parameters). Shapes, gradients and the gradient of problems without a
    solution (``Settings.failed_gradient``) are those of :func:`solve_qp`.

    Args:
        settings: :class:`alqp.Settings` of the forward solver; defaults when None.
        backward: "ift" (implicit differentiation, default) or "lpgd".
        tau, variant, proximal: options of backward="lpgd" (None: its defaults), see
            :class:`alqp.lpgd.LPGDOptions`.
    """

    def __init__(self, settings: Optional[Settings] = None, backward: str = "ift", *,
                 tau: Optional[float] = None, variant: Optional[str] = None,
                 proximal: Optional[float] = None):
        super().__init__()
        self.backward_options = dict(tau=tau, variant=variant, proximal=proximal)
        _engine(backward, self.backward_options)
        self.settings = settings or Settings()
        self.backward_mode = backward

    def forward(self, H: Tensor, g: Tensor, A: Optional[Tensor] = None, b: Optional[Tensor] = None,
                C: Optional[Tensor] = None, l: Optional[Tensor] = None, u: Optional[Tensor] = None,
                warm_start=None) -> QPSolution:
        return solve_qp(H, g, A, b, C, l, u, settings=self.settings, warm_start=warm_start,
                        backward=self.backward_mode, **self.backward_options)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.backward_options.items() if v is not None)
        return f"backward={self.backward_mode!r}{options}, settings={self.settings}"
