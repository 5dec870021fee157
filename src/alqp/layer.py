"""Differentiable QP layer: the only module that knows about autograd.

    x*, y*, z*, s_eq*, s_in* = solve_qp(H, g, A, b, C, l, u)

is the solution of ``min 1/2 x'Hx + g'x  s.t.  A x = b,  l <= C x <= u`` (of its closest feasible
QP when the constraints are inconsistent), and gradients of any loss on the five outputs flow back to
every input tensor that requires grad.

How the gradients are computed is chosen by ``backward``:

- :class:`alqp.IFT` (``"ift"``, default): implicit differentiation of the optimality conditions,
  :func:`alqp.backward.implicit_backward`.
- :class:`alqp.LPGD` (``"lpgd"``): Lagrangian proximal gradient descent, :func:`alqp.lpgd.lpgd_backward`:
  re-solves the QP perturbed by the incoming gradient; its options ``tau``, ``variant`` and
  ``proximal`` are the fields of ``alqp.LPGD(...)``.

How the op is registered with PyTorch
-------------------------------------
Two operators are registered with ``torch.library.custom_op``: ``alqp::solve`` (the forward solve,
batched outputs) and ``alqp::solve_backward`` (the gradients of the QP data, per problem). Each has
a fake implementation (output shapes from input shapes) and a vmap rule (the vmapped dimension and
the problems' own batch dimension are flattened into one batch: the solver is batched already).
Autograd is an ``autograd.Function`` (:class:`QPFunction`) with ``setup_context`` and
``generate_vmap_rule = True``, whose forward and backward call the two operators.

Why both, rather than one of them: ``torch.compile`` cannot trace the solver (data-dependent
loops, numpy and DAQP), so it must see the solve as one opaque operator, which only a custom op
with a fake implementation gives: an ``autograd.Function`` alone is traced into, and breaks the
graph. But ``custom_op.register_autograd`` is not usable under ``torch.func`` gradient transforms
(``jacrev``/``vjp`` refuse the autograd.Function it generates, which has no ``setup_context``), so
the autograd formula sits on our own ``autograd.Function`` with ``setup_context``, which torch.func
accepts, and the vmap rules on the custom ops, which serve both ``vmap`` of the forward and the
``vmap`` of the backward that ``jacrev`` performs. Forward-mode AD (``jvp``, ``jacfwd``) has no rule:
it raises a NotImplementedError saying so.

The forward's by-products that the backward reuses (the canonical problem and the factorization of
H and A that the active-set engine computed) cannot travel through an operator's arguments; in
eager mode they go from the forward op to ``setup_context`` through a thread-local slot, checked
against the identity of the output they belong to, and reach the backward op by a key into a table
that the autograd graph's context keeps alive. Where they do not arrive (compiled graphs, vmap) the
backward recomputes them: same gradients, more work.

The host lane: in a plain eager call (no compile, no torch.func transform), a small CPU batch
with the implicit backward and no warm start is first offered to :mod:`alqp.small`, which
validates, solves, certifies and differentiates it on numpy arrays (:func:`_host_forward`,
:func:`_host_backward`); at a few variables the registered op's machinery and the torch operations
of the general path cost several times the solve. Where the lane declines (data the general path
must check and report, a problem not certified SOLVED, an ill-conditioned KKT system) the general
path answers, with the same results.

Problems without a solution: a problem whose status is MAX_ITER, STALLED, DUAL_INFEASIBLE,
NUMERICAL_ERROR, PRIMAL_INFEASIBLE or NON_CONVEX has outputs that are no solution, so they have no
derivative; its contribution to every input is what ``Settings.failed_gradient`` says: zero with a
RuntimeWarning once per process (the default), NaN, or a RuntimeError (:mod:`alqp.failure`). A NaN
or Inf in the incoming gradient of a problem makes its contributions NaN.

The backward is differentiable once: a double backward (``torch.autograd.functional.hessian``,
``gradgradcheck``, a second backward through gradients taken with ``create_graph=True``) raises a
RuntimeError when it reaches the backward operator, never returns zeros: the operator's inputs are
the QP data and the incoming gradients, so a second derivative with respect to either reaches it.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import warnings
import weakref
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from alqp.backward import implicit_backward
from alqp.problem import _CORE_NDIM, ARG_NAMES, canonicalize
from alqp.settings import (
    IFT,
    Engine,
    LPGD,
    Backward,
    Settings,
    as_backward,
    backward_from_dict,
    backward_from_json,
    settings_from_json,
)
from alqp import small, solver
from alqp.pool import one_torch_thread
from alqp.solver import solve_problem_factored
from alqp.types import QPSolution

# Number of trailing (per-problem) dimensions of each output of alqp::solve.
_OUT_CORE_NDIM = (1, 1, 1, 1, 1, 0, 0)
_GRAD_CORE_NDIM = tuple(_CORE_NDIM[name] for name in ARG_NAMES)


# ------------------------------------------------------------------------------------------------
# Forward-to-backward hand-over (eager mode only)
# ------------------------------------------------------------------------------------------------
class _Carry:
    """The canonical problem and the factorization of one forward, for its backward."""

    __slots__ = ("__weakref__", "factor", "problem")

    def __init__(self, problem, factor):
        self.problem, self.factor = problem, factor


_LOCAL = threading.local()
# key -> _Carry; an entry lives as long as the autograd context that holds its _Carry.
_CARRIES: weakref.WeakValueDictionary[int, _Carry] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _fresh(outputs, inputs) -> tuple:
    """``outputs`` with every tensor that shares memory with an input or an earlier output
    cloned: a custom op's outputs may alias neither. (Empty tensors are always cloned: they cost
    nothing, and two of them may share one storage.)"""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel() > 0}
    out = []
    for t in outputs:
        if t.numel() == 0:
            t = t.clone()
        else:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t._base is not None:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out.append(t)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# The registered operators
# ------------------------------------------------------------------------------------------------
def _solve_impl(H, g, A, b, C, l, u, x0, y0, z0, settings: str, fast_path: bool = True) -> tuple:
    problem = canonicalize(H, g, A, b, C, l, u)
    warm = None if x0 is None else (x0, y0, z0)
    solution, factor = solve_problem_factored(problem, settings_from_json(settings), warm, fast_path=fast_path)
    _LOCAL.forward = (solution.status, _Carry(problem, factor))
    return tuple(solution)


@torch.library.custom_op("alqp::solve", mutates_args=())
def _solve_op(H: Tensor, g: Tensor, A: Optional[Tensor], b: Optional[Tensor], C: Optional[Tensor],
              l: Optional[Tensor], u: Optional[Tensor], x0: Optional[Tensor], y0: Optional[Tensor],
              z0: Optional[Tensor], settings: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """alqp::solve: the batched solution (x, y, z, s_eq, s_in, status, iterations), each with the
    batch dimension, of the QP data in :func:`solve_qp`'s shapes; ``settings`` is a Settings'
    JSON encoding and (x0, y0, z0) an optional warm start."""
    return _fresh(_solve_impl(H, g, A, b, C, l, u, x0, y0, z0, settings), (H, g, A, b, C, l, u, x0, y0, z0))


def _batch_size(tensors, core_ndims):
    """The broadcast batch size of the tensors that carry a batch dimension (1 when none does)."""
    sizes = [(t.shape[0],) for t, k in zip(tensors, core_ndims) if t is not None and t.dim() == k + 1]
    return torch.broadcast_shapes(*sizes)[0] if sizes else 1


@_solve_op.register_fake
def _solve_fake(H, g, A, b, C, l, u, x0, y0, z0, settings):
    B = _batch_size((H, g, A, b, C, l, u), _GRAD_CORE_NDIM)
    n = H.shape[-1]
    p = A.shape[-2] if A is not None else 0
    m = C.shape[-2] if C is not None else 0
    vec = [H.new_empty((B, k)) for k in (n, p, m, p, m)]
    return (*vec, H.new_empty((B,), dtype=torch.int64), H.new_empty((B,), dtype=torch.int64))


def _engine_grads(problem, solution, incoming, settings: Settings, backward: Backward, factor,
                  fast_path: bool = True) -> dict:
    if isinstance(backward, LPGD):
        from alqp.lpgd import lpgd_backward  # (LPGD's module only when chosen)
        return lpgd_backward(problem, solution, *incoming, settings=settings, tau=backward.tau,
                             variant=backward.variant, proximal=backward.proximal, factor=factor)
    return _implicit_grads(problem, solution, incoming, settings, factor, fast_path)


@one_torch_thread  # alqp.pool: the thread policy (no spinning OpenMP threads on a busy machine)
def _implicit_grads(problem, solution, incoming, settings: Settings, factor, fast_path: bool = True) -> dict:
    # alqp.small: a one-step KKT solve for small all-SOLVED CPU batches (None where it does not
    # apply; not tried again where the host lane declined this batch).
    fast = small.backward_small(problem, solution, *incoming, settings) if fast_path else None
    if fast is not None:
        return fast
    return implicit_backward(problem, solution, *incoming, settings=settings, factor=factor)


def _backward_impl(H, g, A, b, C, l, u, x, y, z, s_eq, s_in, status, iterations, gx, gy, gz, gs_eq, gs_in,
                   settings: str, backward: str, carry: int, fast_path: bool = True) -> tuple:
    kept = _CARRIES.get(carry) if carry >= 0 else None
    if kept is not None:
        problem, factor = kept.problem, kept.factor
    else:
        # The forward checked the data; only its canonical form is needed again.
        problem, factor = canonicalize(H, g, A, b, C, l, u, check_symmetry=False), None
    solution = QPSolution(x, y, z, s_eq, s_in, status, iterations)
    grads = _engine_grads(problem, solution, (gx, gy, gz, gs_eq, gs_in), settings_from_json(settings),
                          backward_from_json(backward), factor, fast_path)
    return tuple(grads[name] for name in ARG_NAMES)


@torch.library.custom_op("alqp::solve_backward", mutates_args=())
def _backward_op(H: Tensor, g: Tensor, A: Optional[Tensor], b: Optional[Tensor], C: Optional[Tensor],
                 l: Optional[Tensor], u: Optional[Tensor], x: Tensor, y: Tensor, z: Tensor, s_eq: Tensor,
                 s_in: Tensor, status: Tensor, iterations: Tensor, gx: Tensor, gy: Tensor, gz: Tensor,
                 gs_eq: Tensor, gs_in: Tensor, settings: str, backward: str, carry: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """alqp::solve_backward: the gradients of the loss with respect to H, g, A, b, C, l, u, one per
    problem, each with the batch dimension ((B,n,n), (B,n), ...; (B,0,n) and the like for absent
    data), given the forward's data and solution and the incoming gradients of x, y, z, s_eq, s_in.
    ``carry`` is the key of the forward's canonical problem and factorization, or -1."""
    grads = _backward_impl(H, g, A, b, C, l, u, x, y, z, s_eq, s_in, status, iterations, gx, gy, gz, gs_eq,
                           gs_in, settings, backward, carry)
    return _fresh(grads, (H, g, A, b, C, l, u, x, y, z, gx, gy, gz, gs_eq, gs_in))


@_backward_op.register_fake
def _backward_fake(H, g, A, b, C, l, u, x, y, z, s_eq, s_in, status, iterations, gx, gy, gz, gs_eq, gs_in,
                   settings, backward, carry):
    B, n, p, m = x.shape[0], x.shape[-1], y.shape[-1], z.shape[-1]
    shapes = ((B, n, n), (B, n), (B, p, n), (B, p), (B, m, n), (B, m), (B, m))
    return tuple(x.new_empty(shape) for shape in shapes)


def _not_twice(ctx, *grads):
    raise RuntimeError(
        "alqp's backward is not differentiable twice: the gradients of solve_qp / QPLayer are computed "
        "without a graph, so double backward, torch.autograd.functional.hessian and gradgradcheck are "
        "not supported (differentiate once, or take finite differences of the gradient)")


_backward_op.register_autograd(_not_twice)


class _BackwardFunction(torch.autograd.Function):
    """``alqp::solve_backward`` with the autograd formula that raises, in the form that torch.func
    transforms accept (a ``register_autograd`` formula is refused under them, and
    ``torch.func.grad`` runs every backward with a graph)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _backward_op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_not_twice)


# ---------------------------------------------------------------------------------------- vmap rules
def _flatten(V: int, in_dims, tensors, core_ndims, B: Optional[int] = None):
    """Physical tensors of a vmapped call as one batch of V * B problems.

    Each tensor has its vmapped dimension at ``in_dims[i]`` (None: not vmapped) and, below it, the
    problem's logical shape: ``core`` or (b, *core) with b in {1, B}. Tensors neither vmapped nor
    batched stay shared; the others become (V * B, *core). Returns (tensors, B)."""
    logical = []
    for t, d, k in zip(tensors, in_dims, core_ndims):
        if t is None:
            logical.append(None)
            continue
        t = t if d is None else t.movedim(d, 0)
        logical.append((t, d is not None, t.dim() - (d is not None) == k + 1))
    if B is None:
        B = max([1] + [t.shape[int(v)] for t, v, batched in filter(None, logical) if batched])
    out = []
    for item in logical:
        if item is None:
            out.append(None)
            continue
        t, vmapped, batched = item
        if not vmapped and not batched:
            out.append(t)
            continue
        if not vmapped:
            t = t.unsqueeze(0)
        if not batched:
            t = t.unsqueeze(1)
        t = t.expand(V, B, *t.shape[2:])
        out.append(t.reshape(V * B, *t.shape[2:]))
    return out, B


@_solve_op.register_vmap
def _solve_vmap(info, in_dims, H, g, A, b, C, l, u, x0, y0, z0, settings):
    V = info.batch_size
    data, B = _flatten(V, in_dims[:7], (H, g, A, b, C, l, u), _GRAD_CORE_NDIM)
    warm, _ = _flatten(V, in_dims[7:10], (x0, y0, z0), (1, 1, 1), B)
    if all(t is None or t.dim() == k for t, k in zip(data, _GRAD_CORE_NDIM)):
        # Only the warm start is vmapped: the problem is one, solved V times.
        data = [None if t is None else t.expand(V * B, *t.shape) for t in data]
    out = _solve_op(*data, *warm, settings)
    return tuple(t.reshape(V, B, *t.shape[1:]) for t in out), (0,) * 7


@_backward_op.register_vmap
def _backward_vmap(info, in_dims, H, g, A, b, C, l, u, x, y, z, s_eq, s_in, status, iterations,
                   gx, gy, gz, gs_eq, gs_in, settings, backward, carry):
    V = info.batch_size
    tensors = (H, g, A, b, C, l, u, x, y, z, s_eq, s_in, status, iterations, gx, gy, gz, gs_eq, gs_in)
    core = _GRAD_CORE_NDIM + _OUT_CORE_NDIM + (1,) * 5
    # Every tensor is made per problem: the gradients differ across the vmapped dimension.
    B = x.shape[0] if in_dims[7] is None else x.movedim(in_dims[7], 0).shape[1]
    flat, _ = _flatten(V, in_dims[:19], tensors, core, B)
    flat = [t if t is None or t.dim() > k else t.expand(V * B, *t.shape) for t, k in zip(flat, core)]
    # (The forward's factorization is of B problems, not of these V * B: not passed.)
    out = _backward_op(*flat, settings, backward, -1)
    return tuple(t.reshape(V, B, *t.shape[1:]) for t in out), (0,) * 7


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
def _reduce_to(grad: Tensor, shape: torch.Size, core_ndim: int) -> Tensor:
    """Sum a per-problem (B, ...) gradient down to an input's ``shape``.

    A shared input (no batch dimension) gets the sum over the batch; an input with batch size 1
    broadcast to B gets the sum with its leading 1 kept.
    """
    if len(shape) == core_ndim:
        return grad.sum(0)
    if shape[0] != grad.shape[0]:
        return grad.sum(0, keepdim=True)
    return grad


def _plain_eager() -> bool:
    """Whether nothing traces or transforms the call (no torch.compile, torch.func transform or
    dispatch mode): then the implementations are called directly, without the dispatcher's
    round trip through the registered ops and their alias checks, which buy nothing there."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or _get_current_dispatch_mode() is not None)


class QPFunction(torch.autograd.Function):
    """autograd.Function over the ``alqp::solve`` and ``alqp::solve_backward`` operators.

    ``QPFunction.apply(settings_json, backward_json, H, g, A, b, C, l, u, x0, y0, z0)`` returns the
    batched tensors (x, y, z, s_eq, s_in, status, iterations); use :func:`solve_qp` instead.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(settings_json: str, backward_json: str, H, g, A, b, C, l, u, x0, y0, z0):
        solve = _solve_impl if _plain_eager() else _solve_op
        return solve(H, g, A, b, C, l, u, x0, y0, z0, settings_json)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.settings_json, ctx.backward_json = inputs[0], inputs[1]
        data = inputs[2:9]
        ctx.carry_key = -1
        handed = getattr(_LOCAL, "forward", None)
        if handed is not None:
            _LOCAL.forward = None
            if handed[0] is output[5]:
                # The context keeps the carry (and so its table entry) alive until the graph goes.
                ctx.carry = handed[1]
                ctx.carry_key = next(_KEYS)
                _CARRIES[ctx.carry_key] = ctx.carry
        # Through save_for_backward: autograd detects an in-place change of an input or output
        # before the backward uses it, and a double backward reaches the backward op through them.
        ctx.save_for_backward(*data, *output)
        ctx.mark_non_differentiable(output[5], output[6])

    @staticmethod
    def backward(ctx, gx, gy, gz, gse, gsi, _g_status, _g_iterations):
        needs = ctx.needs_input_grad[2:9]
        if not any(needs):
            return (None,) * 12
        saved = ctx.saved_tensors
        data, solution = saved[:7], saved[7:]
        # With a graph (create_graph=True, torch.func.grad) the gradients come out of a node whose
        # backward raises, so that a double backward reaches its error.
        if torch.compiler.is_compiling():
            grad_of = _backward_op
        elif torch.is_grad_enabled():
            grad_of = _BackwardFunction.apply
        else:
            grad_of = _backward_impl if _plain_eager() else _backward_op
        grads = grad_of(*data, *solution, gx, gy, gz, gse, gsi, ctx.settings_json, ctx.backward_json,
                        ctx.carry_key)
        return _input_grads(data, grads, needs)


def _input_grads(data, grads, needs) -> tuple:
    """The backward's answer for QPFunction.apply's twelve arguments: each per-problem gradient
    in ``grads`` (H, g, A, b, C, l, u order) reduced to its input's shape, dtype and device."""
    out = []
    for name, t, grad, need in zip(ARG_NAMES, data, grads, needs):
        if t is None or not need:
            out.append(None)
            continue
        grad = _reduce_to(grad, t.shape, _CORE_NDIM[name])
        out.append(grad if grad.dtype == t.dtype and grad.device == t.device
                   else grad.to(dtype=t.dtype, device=t.device))
    return (None, None, *out, None, None, None)


def _no_forward_mode(ctx, *tangents):
    raise NotImplementedError(
        "alqp.solve_qp has no forward-mode derivative (jvp), so torch.func.jvp, torch.func.jacfwd and "
        "torch.autograd.forward_ad cannot differentiate it; use reverse mode: torch.func.jacrev, "
        "torch.func.vjp or .backward()")


class _TransformedQPFunction(QPFunction):
    """:class:`QPFunction` with a ``jvp`` that says forward mode is not supported, for calls under
    torch.func transforms (torch.compile does not trace a Function that defines ``jvp``)."""

    jvp = staticmethod(_no_forward_mode)


class _EagerQPFunction(torch.autograd.Function):
    """:class:`QPFunction` in the old ``forward(ctx, ...)`` form, for plain eager calls only:
    ``Function.apply`` binds a ``setup_context`` Function's arguments with ``inspect.signature``
    on every call, which cost more than the rest of the layer at batch 1. Not usable under
    torch.func transforms (which need ``setup_context``), so :func:`_solve` picks it only when
    :func:`_plain_eager`.

    It tries the host lane of :mod:`alqp.small` first (:func:`_host_forward`): a small CPU batch
    that validates and is certified SOLVED there never reaches the registered op's machinery, and
    its backward is one batched KKT solve (:func:`_host_backward`); anything else goes the
    general way, with the same results."""

    @staticmethod
    def forward(ctx, *args):
        output = _host_forward(ctx, args)
        if output is None or output is _DECLINED:
            # (plain eager here: the implementation itself, not the registered op)
            output = _solve_impl(*args[2:], args[0], fast_path=output is None)
        QPFunction.setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        lane = getattr(ctx, "host_lane", None)
        if lane is None:
            return QPFunction.backward(ctx, *grads)
        answer = _host_backward(ctx, lane, grads)
        if answer is not None:
            return answer
        # (grads were not materialized for the host lane: the general backward wants tensors)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, ctx.saved_tensors[7:]))
        if torch.is_grad_enabled() or not any(ctx.needs_input_grad[2:9]):
            return QPFunction.backward(ctx, *grads)
        # The general backward, without a second try of alqp.small's (it declined this batch).
        saved = ctx.saved_tensors
        out = _backward_impl(*saved, *grads[:5], ctx.settings_json, ctx.backward_json, ctx.carry_key,
                             fast_path=False)
        return _input_grads(saved[:7], out, ctx.needs_input_grad[2:9])

    jvp = staticmethod(_no_forward_mode)


_IFT_JSON = IFT()._json
# _host_forward's answer for a batch that the host lane solved but could not certify: the general
# path must not try alqp.small on it again.
_DECLINED = object()
_HOST_ENGINES = (Engine.AUTO, Engine.ACTIVE_SET)


class _HostLane:
    """What the host lane's backward needs: the batch, its answers and the settings."""

    __slots__ = ("qp", "answer", "settings")

    def __init__(self, qp, answer, settings):
        self.qp, self.answer, self.settings = qp, answer, settings


class _HostProbe(NamedTuple):
    """What :func:`alqp.solver.auto_engine` reads of a problem."""

    H: Tensor


def _host_forward(ctx, args):
    """The outputs of ``alqp::solve`` from :mod:`alqp.small`'s host lane; None where the lane
    does not apply, :data:`_DECLINED` where it solved the batch but did not certify all of it.

    Taken for the implicit backward, without a warm start, on the active-set engine (explicit or
    ``auto`` on the CPU) when :func:`alqp.small.host_qp` accepts the data and
    :func:`alqp.small.solve_host` certifies every problem."""
    settings_json, backward_json, H, g, A, b, C, l, u, x0 = args[:10]
    if x0 is not None or backward_json != _IFT_JSON:
        return None
    settings = settings_from_json(settings_json)
    if settings.engine not in _HOST_ENGINES:
        return None
    qp = small.host_qp(H, g, A, b, C, l, u)
    if qp is None:
        return None
    # (solver.auto_engine reads only the problem's H: here the caller's, on the CPU)
    if settings.engine == Engine.AUTO and solver.auto_engine(_HostProbe(H)) != Engine.ACTIVE_SET:
        return None
    answer = small.solve_host(qp, settings)
    if answer is None:
        return _DECLINED
    ctx.host_lane = _HostLane(qp, answer, settings)
    # Unused outputs then reach the backward as None, not as tensors of zeros.
    ctx.set_materialize_grads(False)
    return tuple(small.solution_tensors(qp, answer))


def _host_backward(ctx, lane: _HostLane, grads) -> Optional[tuple]:
    """The gradients of the inputs from :func:`alqp.small.kkt_grads_host`, reduced to each
    input's shape, or None (then the general backward answers)."""
    if torch.is_grad_enabled():  # (a graph was asked for: the general backward raises on its use)
        return None
    saved = ctx.saved_tensors  # (raises if an input or output was modified in place)
    incoming = [None if t is None else t.detach().double().numpy() for t in grads[:5]]
    grads_np = small.kkt_grads_host(lane.qp, lane.answer, incoming, lane.settings)
    if grads_np is None:
        return None
    needs = ctx.needs_input_grad[2:9]
    grads = tuple(torch.from_numpy(np.ascontiguousarray(grads_np[name])) if need and t is not None else None
                  for name, t, need in zip(ARG_NAMES, saved[:7], needs))
    return _input_grads(saved[:7], grads, needs)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _resolve_backward(backward, tau, variant, proximal) -> Backward:
    """``backward`` as IFT / LPGD, with the deprecated LPGD keywords applied."""
    choice = as_backward(backward)
    options = {k: v for k, v in (("tau", tau), ("variant", variant), ("proximal", proximal)) if v is not None}
    if not options:
        return choice
    warnings.warn("the tau, variant and proximal keywords of solve_qp / QPLayer are deprecated: pass "
                  "backward=alqp.LPGD(tau=..., variant=..., proximal=...)", DeprecationWarning, stacklevel=3)
    if not isinstance(choice, LPGD):
        raise ValueError(f"options {sorted(options)} apply to backward='lpgd' (alqp.LPGD) only, "
                         f"got backward={backward!r}")
    return dataclasses.replace(choice, **options)


def _check_inputs(tensors) -> None:
    """The checks that must come before the op is dispatched (the rest are the forward's):
    a non-tensor argument, and tensors on several devices (a 'meta' one would be routed to the
    fake implementation)."""
    device = None
    for name, t in zip(ARG_NAMES, tensors):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if device is None:
            device = t.device
        elif t.device != device:
            devices = {n: v.device for n, v in zip(ARG_NAMES, tensors) if isinstance(v, Tensor)}
            raise ValueError(f"all QP tensors must be on one device, got {devices}")


def _warm_start_tensors(warm_start):
    if warm_start is None:
        return None, None, None
    out = []
    for name, t in zip(("x", "y", "z"), (warm_start[0], warm_start[1], warm_start[2])):
        if not isinstance(t, Tensor):
            raise TypeError(f"warm_start.{name} must be a torch.Tensor, got {type(t).__name__}")
        out.append(t.detach())
    return tuple(out)


def _solve(H, g, A, b, C, l, u, settings_json: str, backward_json: str, warm_start) -> QPSolution:
    tensors = (H, g, A, b, C, l, u)
    _check_inputs(tensors)
    x0, y0, z0 = _warm_start_tensors(warm_start)
    if torch.compiler.is_compiling():
        function = QPFunction
    elif _plain_eager():
        function = _EagerQPFunction
    else:
        function = _TransformedQPFunction
    out = function.apply(settings_json, backward_json, *tensors, x0, y0, z0)
    batched = any(t is not None and t.dim() == _CORE_NDIM[name] + 1 for name, t in zip(ARG_NAMES, tensors))
    return QPSolution(*out) if batched else QPSolution(*(t[0] for t in out))


def solve_qp(H: Tensor, g: Tensor, A: Optional[Tensor] = None, b: Optional[Tensor] = None,
             C: Optional[Tensor] = None, l: Optional[Tensor] = None, u: Optional[Tensor] = None, *,
             settings: Optional[Settings | dict] = None, warm_start=None, backward: Backward | str = "ift",
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
        settings: :class:`alqp.Settings` of the forward solver, or a dict of its fields; defaults
            when None.
        warm_start: a :class:`QPSolution` (or (x, y, z)) of a nearby problem, x (B,n) or (n,), y
            (B,p) or (p,), z (B,m) or (m,); not differentiated. The active-set engine starts cold.
        backward: how gradients are computed: ``alqp.IFT()`` (implicit differentiation, default) or
            ``alqp.LPGD(tau=..., variant=..., proximal=...)``; the strings "ift" and "lpgd" give
            each with its defaults.
        tau, variant, proximal: deprecated (DeprecationWarning): the fields of ``alqp.LPGD``.

    Returns:
        :class:`QPSolution` (x (B,n), y (B,p), z (B,m), s_eq (B,p), s_in (B,m), status (B,),
        iterations (B,)), without the leading B when no input had a batch dimension. x, y, z, s_eq,
        s_in are differentiable with respect to every input that requires grad; an input given
        without batch dimension (shared by the batch) receives the sum of the per-problem gradients.
        Problems without a solution (status other than SOLVED and CLOSEST_FEASIBLE) contribute
        what ``Settings.failed_gradient`` says (zero, with a warning once per process, by default).
        Not differentiable twice (a double backward raises), and reverse mode only (``jacfwd``
        raises NotImplementedError); ``torch.func.vmap``, ``jacrev`` and ``torch.compile`` work.
    """
    settings = Settings.coerce(settings)
    choice = _resolve_backward(backward, tau, variant, proximal)
    return _solve(H, g, A, b, C, l, u, settings._json, choice._json, warm_start)


class QPLayer(nn.Module):
    """A QP as a layer: ``QPLayer(settings, backward)(H, g, A, b, C, l, u) -> QPSolution``.

    A thin :class:`torch.nn.Module` around :func:`solve_qp` (no parameters of its own: make the QP
    data functions of your parameters). Shapes, gradients and the gradient of problems without a
    solution (``Settings.failed_gradient``) are those of :func:`solve_qp`. The settings and the
    backward choice are saved in the module's ``state_dict`` as plain values (its extra state), so a
    model loads back with ``torch.load(..., weights_only=True)`` and ``load_state_dict`` restores them.

    Args:
        settings: :class:`alqp.Settings` of the forward solver, or a dict of its fields; defaults
            when None.
        backward: ``alqp.IFT()`` (default) or ``alqp.LPGD(...)``, or "ift" / "lpgd".
        tau, variant, proximal: deprecated (DeprecationWarning): the fields of ``alqp.LPGD``.

    Attributes:
        settings: the :class:`alqp.Settings` (immutable).
        backward_choice: the :class:`alqp.IFT` or :class:`alqp.LPGD`.
    """

    def __init__(self, settings: Optional[Settings | dict] = None, backward: Backward | str = "ift", *,
                 tau: Optional[float] = None, variant: Optional[str] = None,
                 proximal: Optional[float] = None):
        super().__init__()
        self.settings = settings
        self.backward_choice = _resolve_backward(backward, tau, variant, proximal)

    # Properties, so that a later assignment (a dict, a string) is converted and checked too.
    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, value) -> None:
        self._settings = Settings.coerce(value)

    @property
    def backward_choice(self) -> Backward:
        return self._backward_choice

    @backward_choice.setter
    def backward_choice(self, value) -> None:
        self._backward_choice = as_backward(value)

    def forward(self, H: Tensor, g: Tensor, A: Optional[Tensor] = None, b: Optional[Tensor] = None,
                C: Optional[Tensor] = None, l: Optional[Tensor] = None, u: Optional[Tensor] = None,
                warm_start=None) -> QPSolution:
        return _solve(H, g, A, b, C, l, u, self._settings._json, self._backward_choice._json, warm_start)

    def get_extra_state(self) -> dict:
        return {"settings": self.settings.to_dict(), "backward": self.backward_choice.to_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.settings = dict(state["settings"])
        self.backward_choice = backward_from_dict(state["backward"])

    def extra_repr(self) -> str:
        return f"backward={self.backward_choice!r}, settings={self.settings}"


__all__ = ["IFT", "LPGD", "QPFunction", "QPLayer", "solve_qp"]
