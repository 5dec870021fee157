"""One adapter per timed method, all with the same interface.

Every adapter takes the QP in alqp's form (H, g, A, b, C, l, u; ProxSuite's signs) and returns x (B,n)
as a tensor connected to the autograd graph of its inputs, so that the harness times
``x = method.forward(params)`` and then ``(w * x).sum().backward()`` the same way for everyone.
Conversions that a user of a peer would have to write for this problem form (two-sided rows to
one-sided rows for qpth, a Cholesky factor for cvxpylayers, a copy to the CPU for CPU-only peers) are
done inside ``forward`` with differentiable torch ops, so they are part of the timed work.

Peers are imported lazily, inside the adapters, so that ``import alqp`` never imports them; a missing
or inapplicable peer is skipped with a reason (:meth:`Method.unavailable`, :meth:`Method.inapplicable`).

Tolerances: the harness passes one ``eps`` to every method; what each does with it:
    alqp         Settings(eps_abs=eps, eps_rel=0): inf-norm primal and dual residuals <= eps
                 (engine "auto": the active-set engine on the CPU; alqp-alm forces the ALM).
    alqp-lpgd    same forward; the LPGD backward re-solves with the same settings.
    proxsuite    QPFunction(eps=eps): ProxQP's eps_abs (inf-norm residuals; eps_rel stays 0).
    qpth         QPFunction(eps=eps): its stopping test is (sum of residual 2-norms + m * mu) < eps,
                 with its default cap of 20 interior-point iterations.
    cvxpylayers  solver_args eps=eps: SCS (diffcp's default) with eps_abs = eps_rel = eps.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from benchmarks.problems import QPBatch

# ProxSuite and qpth represent "no bound" differently; ProxSuite's infinity is 1e20.
_PROXSUITE_INF = 1e20


def _import(module: str):
    """Import a peer module; kept as one function so that tests can make a peer look uninstalled."""
    return importlib.import_module(module)


class Method:
    """A timed method. Subclasses set ``name``, ``tolerance`` and implement :meth:`forward`.

    Attributes:
        name: the identifier used by ``--peers`` and in the tables.
        tolerance: how the shared ``eps`` is passed to this method (printed with the results).
        backward_only: the method differs from another only by its backward (timed only in
            forward+backward mode).
        forward_only: the method has no backward (a raw solver): timed on its forward in every
            mode, and compared with alqp's forward.
    """

    name = "method"
    tolerance = ""
    backward_only = False
    forward_only = False

    def __init__(self):
        self.notes: list[str] = []

    def last_info(self) -> dict:
        """Method-specific facts about the latest forward (iterations, statuses), or {}. Called
        after the timed runs: what it computes is not timed."""
        return {}

    def unavailable(self) -> Optional[str]:
        """None when the method can run here, else why not (e.g. the package is not installed)."""
        return None

    def inapplicable(self, qp: QPBatch, backward: bool) -> Optional[str]:
        """None when the method accepts this batch (and mode), else why not."""
        return None

    def setup(self, qp: QPBatch, eps: float, backward: bool, threads: int) -> None:
        """One-time preparation for a problem size (not timed): build layers, fix tolerances."""

    def forward(self, params: tuple[Tensor, ...]) -> Tensor:
        """Solve the batch.

        Args:
            params: (H (B,n,n), g (B,n), A (B,p,n), b (B,p), C (B,m,n), l (B,m), u (B,m)), requiring
                grad in forward+backward mode.

        Returns:
            x (B,n), same dtype and device as H, differentiable w.r.t. ``params`` in backward mode.
        """
        raise NotImplementedError


def _missing(module: str, install: str) -> Optional[str]:
    try:
        _import(module)
    except Exception as exc:  # ImportError, or a broken build that fails on import
        return (f"{module} is not importable ({type(exc).__name__}: {exc}); "
                f"install with `pip install {install}`")
    return None


# --------------------------------------------------------------------------------------------- alqp
class AlqpMethod(Method):
    """alqp.solve_qp for the forward; alqp.QPLayer(backward=...) when gradients are needed."""

    tolerance = "Settings(eps_abs=eps, eps_rel=0)"

    def __init__(self, backward: str = "ift", engine: str = "auto"):
        super().__init__()
        self.backward = backward
        self.engine = engine
        self.name = "alqp" if backward == "ift" else f"alqp-{backward}"
        if engine != "auto":
            self.name = f"alqp-{engine}" if backward == "ift" else f"{self.name}-{engine}"
        self.backward_only = backward != "ift"
        self._call: Optional[Callable] = None

    def _settings(self, eps: float):
        from alqp import Settings

        if self.engine == "auto":  # (Settings without the field: an alqp from before the engines)
            return Settings(eps_abs=eps, eps_rel=0.0)
        return Settings(eps_abs=eps, eps_rel=0.0, engine=self.engine)

    def _differentiable_call(self, settings) -> tuple[Optional[Callable], Optional[str]]:
        """A callable (H,g,A,b,C,l,u) -> solution with gradients, or None and the reason."""
        import alqp

        if hasattr(alqp, "QPLayer"):
            try:
                layer = alqp.QPLayer(settings=settings, backward=self.backward)
            except (TypeError, ValueError, NotImplementedError) as exc:
                return None, f"alqp.QPLayer(backward={self.backward!r}) is not available: {exc}"
            return layer, None
        if self.backward != "ift":
            return None, f"alqp has no QPLayer yet, so no backward={self.backward!r}"
        # Before QPLayer exists solve_qp may already be differentiable: probe it on a 2-variable QP.
        H = torch.eye(2, dtype=torch.float64, requires_grad=True)
        g = torch.ones(2, dtype=torch.float64, requires_grad=True)
        try:
            x = alqp.solve_qp(H, g, settings=settings).x
        except Exception as exc:
            return None, f"alqp.solve_qp failed on a probe QP: {exc}"
        if not x.requires_grad:
            return None, "alqp has no QPLayer yet and solve_qp's x carries no gradient"

        def call(*params):
            return alqp.solve_qp(*params, settings=settings)

        return call, None

    def inapplicable(self, qp: QPBatch, backward: bool) -> Optional[str]:
        if backward:
            _, reason = self._differentiable_call(self._settings(1e-6))
            return reason
        return None

    def setup(self, qp: QPBatch, eps: float, backward: bool, threads: int) -> None:
        settings = self._settings(eps)
        if backward:
            self._call, reason = self._differentiable_call(settings)
            if self._call is None:
                raise RuntimeError(reason)
        else:
            from alqp import solve_qp

            self._call = lambda *params: solve_qp(*params, settings=settings)

    def forward(self, params):
        out = self._call(*params)
        # (Kept for last_info, outside the timed region; not x, whose graph would outlive the run.)
        self._last_counts = (getattr(out, "iterations", None), getattr(out, "status", None))
        return out.x if hasattr(out, "x") else (out[0] if isinstance(out, (tuple, list)) else out)

    def last_info(self) -> dict:
        iterations, status = getattr(self, "_last_counts", (None, None))
        info = {}
        if iterations is not None:
            it = iterations.detach().reshape(-1).to(torch.float64)
            info["newton_steps_max"] = int(it.max()) if it.numel() else 0
            info["newton_steps_mean"] = round(float(it.mean()), 2) if it.numel() else 0.0
        if status is not None:
            st = status.detach().reshape(-1)
            info["not_solved"] = int((st != 0).sum())
        return info


# ---------------------------------------------------------------------------------------- proxsuite
class ProxsuiteMethod(Method):
    """ProxSuite's QPLayer: ``proxsuite.torch.qplayer.QPFunction`` (dense ProxQP, one C++ solve per QP).

    ``parallel=True`` passes omp_parallel=True, ProxSuite's fast setting: forward and backward run
    through ``solve_in_parallel`` / ``solve_backward_in_parallel`` with os.cpu_count() // 2 OpenMP
    threads (a number that ProxSuite's QPFunction fixes itself). The serial setting is much slower in
    the backward (it calls compute_backward problem by problem).
    """

    tolerance = "QPFunction(eps=eps) (ProxQP eps_abs, eps_rel=0, maxIter=1000)"

    def __init__(self, parallel: bool = True):
        super().__init__()
        self.parallel = parallel
        self.name = "proxsuite" if parallel else "proxsuite-serial"
        self._fn = None

    def unavailable(self):
        reason = _missing("proxsuite", "proxsuite")
        if reason is None:
            reason = _missing("proxsuite.torch.qplayer", "proxsuite (with its torch extension)")
        return reason

    def setup(self, qp, eps, backward, threads):
        qplayer = _import("proxsuite.torch.qplayer")
        self._eps = eps
        self._qplayer = qplayer
        if self.parallel:
            self.notes = [f"omp_parallel=True: {max(1, (os.cpu_count() or 2) // 2)} OpenMP threads "
                          "(os.cpu_count()//2, fixed by ProxSuite)"]

    def forward(self, params):
        # QPFunction keeps its omp flag in a module-global, so build it per call (it is a cheap closure).
        fn = self._qplayer.QPFunction(eps=self._eps, omp_parallel=self.parallel)
        H = params[0]
        device, dtype = H.device, H.dtype
        # ProxSuite is CPU/float64 only: copy in and out differentiably (timed: a user pays it too).
        H, g, A, b, C, l, u = (t.to("cpu", torch.float64) for t in params)
        l = l.clamp(min=-_PROXSUITE_INF)
        u = u.clamp(max=_PROXSUITE_INF)
        x = fn(H, g, A, b, C, l, u)[0]
        return x.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- qpth
class QpthMethod(Method):
    """OptNet's layer ``qpth.qp.QPFunction`` (batched primal-dual interior point in torch).

    qpth solves ``min 1/2 x'Qx + p'x  s.t.  G x <= h,  A x = b``: each finite side of l <= C x <= u
    becomes one row of G x <= h (a two-sided row becomes two rows), and infinite sides are dropped.
    """

    tolerance = "QPFunction(eps=eps) (sum of residual 2-norms + m*mu < eps; maxIter=20, its default)"
    name = "qpth"

    def unavailable(self):
        return _missing("qpth.qp", "qpth")

    def inapplicable(self, qp, backward):
        l_fin, u_fin = torch.isfinite(qp.l), torch.isfinite(qp.u)
        # The rows kept must be the same for every problem of the batch (G has one shape).
        if not (bool((l_fin == l_fin[:1]).all()) and bool((u_fin == u_fin[:1]).all())):
            return "qpth needs the same finite bounds in every problem (its G has one shape)"
        if qp.batch_size and int(l_fin[0].sum() + u_fin[0].sum()) == 0:
            return "qpth needs at least one finite inequality bound"
        _, info = torch.linalg.cholesky_ex(qp.H.to(torch.float64))
        if bool((info != 0).any()):
            return "qpth needs a positive-definite H"
        return None

    def setup(self, qp, eps, backward, threads):
        self._qp = _import("qpth.qp")
        self._eps = eps
        # Which sides to keep is data-independent within a batch (checked in inapplicable).
        self._keep_u = torch.isfinite(qp.u[0]).to(qp.u.device)
        self._keep_l = torch.isfinite(qp.l[0]).to(qp.l.device)
        self.notes = [f"{int(self._keep_u.sum() + self._keep_l.sum())} one-sided rows G x <= h"]

    def forward(self, params):
        H, g, A, b, C, l, u = params
        keep_u, keep_l = self._keep_u.to(C.device), self._keep_l.to(C.device)
        G = torch.cat([C[:, keep_u], -C[:, keep_l]], dim=1)
        h = torch.cat([u[:, keep_u], -l[:, keep_l]], dim=1)
        fn = self._qp.QPFunction(eps=self._eps, verbose=-1)
        if A.shape[1] == 0:
            # qpth's way to say "no equality rows".
            A = b = torch.empty(0, dtype=H.dtype, device=H.device)
        return fn(H, g, G, h, A, b)


# -------------------------------------------------------------------------------------- cvxpylayers
class CvxpylayersMethod(Method):
    """``cvxpylayers.torch.CvxpyLayer``: CVXPY canonicalization, then diffcp + SCS per problem (thread pool).

    CVXPY's DPP rules do not allow a parametric quad_form with diffcp, so the objective is written
    1/2 ||R x||^2 + g'x with R = chol(H)' computed by torch inside the timed forward (gradients flow
    to H through the Cholesky). The CvxpyLayer is built once per problem size, outside the timing.
    It is slow: batch sizes above ``max_batch`` and sizes above ``max_n`` are skipped.
    """

    name = "cvxpylayers"
    tolerance = "solver_args eps=eps (SCS via diffcp: eps_abs = eps_rel = eps)"

    def __init__(self, max_batch: int = 128, max_n: int = 100):
        super().__init__()
        self.max_batch = max_batch
        self.max_n = max_n
        self._layers: dict = {}

    def unavailable(self):
        return _missing("cvxpy", "cvxpy") or _missing("cvxpylayers.torch", "cvxpylayers")

    def inapplicable(self, qp, backward):
        if qp.batch_size > self.max_batch:
            return (f"capped: batch {qp.batch_size} > {self.max_batch} "
                    "(cvxpylayers is slow; --cvxpylayers-max-batch)")
        if qp.n > self.max_n:
            return f"capped: n {qp.n} > {self.max_n} (cvxpylayers is slow; --cvxpylayers-max-n)"
        if qp.H.device.type != "cpu":
            return None  # handled by copying to the CPU, like ProxSuite
        l_fin, u_fin = torch.isfinite(qp.l), torch.isfinite(qp.u)
        if not (bool((l_fin == l_fin[:1]).all()) and bool((u_fin == u_fin[:1]).all())):
            return "cvxpylayers needs the same finite bounds in every problem (one CVXPY problem per size)"
        _, info = torch.linalg.cholesky_ex(qp.H.to(torch.float64))
        if bool((info != 0).any()):
            return "this adapter writes H = R'R (Cholesky) and needs a positive-definite H"
        return None

    def setup(self, qp, eps, backward, threads):
        cp = _import("cvxpy")
        layers = _import("cvxpylayers.torch")
        keep_u = torch.isfinite(qp.u[0]).cpu()
        keep_l = torch.isfinite(qp.l[0]).cpu()
        key = (qp.n, qp.p, qp.m, tuple(keep_u.tolist()), tuple(keep_l.tolist()))
        if key not in self._layers:
            n, p, m = qp.n, qp.p, qp.m
            iu = [i for i, k in enumerate(keep_u.tolist()) if k]
            il = [i for i, k in enumerate(keep_l.tolist()) if k]
            x = cp.Variable(n)
            R, g = cp.Parameter((n, n)), cp.Parameter(n)
            # CVXPY rejects zero-size parameters: create only the blocks that have rows.
            A, b = (cp.Parameter((p, n)), cp.Parameter(p)) if p else (None, None)
            C = cp.Parameter((m, n)) if m else None
            u_p = cp.Parameter(len(iu)) if iu else None
            l_p = cp.Parameter(len(il)) if il else None
            cons, params = [], [R, g]
            if p:
                cons.append(A @ x == b)
                params += [A, b]
            if iu or il:
                params.append(C)
            if iu:
                cons.append(C[iu, :] @ x <= u_p)
                params.append(u_p)
            if il:
                cons.append(C[il, :] @ x >= l_p)
                params.append(l_p)
            prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(R @ x) + g @ x), cons)
            assert prob.is_dpp()
            with warnings.catch_warnings():
                # CVXPY warns that DPP compilation with n*n parameters is slow: it is, once, untimed.
                warnings.simplefilter("ignore")
                layer = layers.CvxpyLayer(prob, parameters=params, variables=[x])
            self._layers[key] = (layer, iu, il)
        self._layer, self._iu, self._il = self._layers[key]
        # diffcp runs the batch on a thread pool: give it the same thread count as torch.
        self._solver_args = {"eps": eps, "n_jobs_forward": threads}
        if backward:  # diffcp's forward-only entry point rejects n_jobs_backward
            self._solver_args["n_jobs_backward"] = threads
        self.notes = [f"SCS via diffcp, {threads} jobs; layer built outside the timing"]

    def forward(self, params):
        H = params[0]
        device, dtype = H.device, H.dtype
        H, g, A, b, C, l, u = (t.to("cpu", torch.float64) for t in params)
        R = torch.linalg.cholesky(H).mT
        args = [R, g]
        if A.shape[1]:
            args += [A, b]
        if self._iu or self._il:
            args.append(C)
        if self._iu:
            args.append(u[:, self._iu])
        if self._il:
            args.append(l[:, self._il])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torch sparse-invariant warning on every call
            (x,) = self._layer(*args, solver_args=self._solver_args)
        return x.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------- daqp-raw
class DaqpRawMethod(Method):
    """DAQP's own solve, ``daqp.solve`` once per problem in a Python loop: the physical limit of
    alqp's active-set forward (which calls the same solver). Forward only, no gradient.

    Each problem goes as it is: H, g, rows [A; C] with bounds [b; l] <= . <= [b; u] (equality
    rows flagged), infinite bounds clipped to DAQP's infinity (1e30); DAQP factors H itself. The
    copy of the batch to numpy is timed with the loop.
    """

    name = "daqp-raw"
    forward_only = True
    tolerance = "daqp.solve(primal_tol=min(eps, 1e-6)); its other settings at their defaults"

    def unavailable(self):
        return _missing("daqp", "daqp")

    def setup(self, qp, eps, backward, threads):
        self._daqp = _import("daqp")
        self._primal_tol = min(eps, 1e-6)
        self.notes = ["forward only: daqp.solve per problem, one thread"]

    def forward(self, params):
        import numpy as np

        H, g, A, b, C, l, u = (t.detach().to("cpu", torch.float64).numpy() for t in params)
        B, n, p = H.shape[0], H.shape[-1], A.shape[-2]
        G = np.ascontiguousarray(np.concatenate([A, C], 1))
        hi = np.ascontiguousarray(np.clip(np.concatenate([b, u], 1), -1e30, 1e30))
        lo = np.ascontiguousarray(np.clip(np.concatenate([b, l], 1), -1e30, 1e30))
        H, g = np.ascontiguousarray(H), np.ascontiguousarray(g)
        sense = np.zeros(G.shape[1], dtype=np.intc)
        sense[:p] = 5  # DAQP's equality flag
        x = np.zeros((B, n))
        solve = self._daqp.solve
        for i in range(B):
            x[i] = solve(H[i], g[i], G[i], hi[i], lo[i], sense, primal_tol=self._primal_tol)[0]
        return torch.from_numpy(x).to(device=params[0].device, dtype=params[0].dtype)


# ------------------------------------------------------------------------------------------ registry
# Default order of the tables: alqp first, then the peers from fastest to slowest in the QP paper.
DEFAULT_METHODS = ("alqp", "alqp-lpgd", "proxsuite", "qpth", "cvxpylayers")
# alqp-alm: alqp with its batched ALM engine forced (on the CPU "alqp" takes the active-set engine).
ALL_METHODS = DEFAULT_METHODS + ("alqp-alm", "proxsuite-serial", "daqp-raw")


def make_method(name: str, cvxpylayers_max_batch: int = 128, cvxpylayers_max_n: int = 100) -> Method:
    """The adapter called ``name`` (one of :data:`ALL_METHODS`)."""
    if name == "alqp":
        return AlqpMethod("ift")
    if name == "alqp-alm":
        return AlqpMethod("ift", engine="alm")
    if name.startswith("alqp-"):
        return AlqpMethod(name[len("alqp-"):])
    if name == "proxsuite":
        return ProxsuiteMethod(parallel=True)
    if name == "proxsuite-serial":
        return ProxsuiteMethod(parallel=False)
    if name == "qpth":
        return QpthMethod()
    if name == "cvxpylayers":
        return CvxpylayersMethod(cvxpylayers_max_batch, cvxpylayers_max_n)
    if name == "daqp-raw":
        return DaqpRawMethod()
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
