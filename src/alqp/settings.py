"""Solver settings: the one place where defaults live."""
from __future__ import annotations

from dataclasses import dataclass

from alqp.types import Status, has_solution  # noqa: F401  (re-exported: their home before alqp.types)


#: Values of ``Settings.failed_gradient``.
FAILED_GRADIENT_POLICIES = ("zero", "nan", "raise")


@dataclass
class Settings:
    """Settings of the forward solver (and of LPGD's re-solve).

    Attributes:
        eps_abs: absolute tolerance on the primal, dual and duality-gap residuals (infinity norm,
            the caller's units). 0 by default, so that the test is scale-free.
        eps_rel: relative tolerance, multiplied by the largest norm of the terms of each residual:
            SOLVED means residual <= eps_abs + eps_rel * (size of its terms) for all three
            (:mod:`alqp.certify`). A nonzero tolerance is never below ``100 * finfo(dtype).eps``,
            so that float32 can meet it: 1e-9 means about 1.2e-5 for float32. Also the relative
            tolerance that tells active rows from inactive ones in the backward.
        max_iter: maximum number of outer (multiplier) iterations.
        max_inner_iter: maximum number of semi-smooth Newton steps within one outer iteration.
        stall_iter: a problem that makes no progress for this many outer iterations in a row
            ends with status STALLED. Progress: its primal, dual or closest-feasible residual
            falls below half its best so far, its penalties change, or it moves to its closest
            feasible QP. Bounds the work a bad problem can cost the batch to about
            ``stall_iter * max_inner_iter`` Newton steps after its last progress.
        rho: proximal weight on the primal variable (scaled units); makes every Newton system
            positive definite, LPs included.
        mu_eq: initial penalty of the equality rows (ProxQP's mu_eq; smaller is stiffer).
        mu_in: initial penalty of the inequality rows.
        mu_min: floor of both penalties. The closest-feasible solution is accurate to about
            ``mu_min`` times the size of the multipliers. ``None``: 1e-9 in float64, 1e-6 in float32 (round-off
            amplified by 1/mu must stay below float32's tolerance).
        mu_update_factor: factor applied to the penalties when the primal residual stalls (BCL rule).
        scaling_iter: number of Ruiz equilibration sweeps (0 turns scaling off). Rows are equilibrated
            only when ``closest_feasible`` is False, because row scaling would change the metric in
            which the closest feasible shift is the least-squares one.
        closest_feasible: solve infeasible QPs to their closest feasible QP and report
            CLOSEST_FEASIBLE (True), or report PRIMAL_INFEASIBLE (False).
        eps_dual_inf: relative tolerance of the unboundedness certificate.
        verbose: print one line of residuals per outer iteration.
        engine: the forward engine. "alm": the batched proximal augmented-Lagrangian solver
            (any device, every status). "active_set": DAQP, a dual active-set solver, one problem
            at a time on the CPU in float64; an answer is kept only where it passes alqp's own
            residual checks at ``eps_abs``/``eps_rel``, and the other problems (infeasible ones
            among them) go to the ALM. "auto": "active_set" for CPU tensors, "alm" on other devices
            (or where daqp is not installed).
        failed_gradient: the gradient of a problem without a solution (status other than SOLVED
            and CLOSEST_FEASIBLE: its outputs are no solution, so they have no derivative) that
            receives a nonzero incoming gradient, in either backward ("ift" or "lpgd").
            "zero": it contributes zero to every input, and a RuntimeWarning naming the statuses
            and the number of such problems is issued once per process (the first time; later
            ones are silent, so check ``QPSolution.status``). "nan": its contributions are NaN,
            so a shared input's summed gradient is NaN. "raise": the backward raises a
            RuntimeError naming the problems' indices and statuses. A problem whose incoming
            gradient is exactly zero contributes zero under every policy (the loss does not
            depend on it); one whose incoming gradient holds NaN or Inf contributes NaN under
            every policy. A problem whose LPGD re-solve fails gets the same policy (its "zero"
            warns every time: it is about tau). A double backward raises.
    """

    eps_abs: float = 0.0
    eps_rel: float = 1e-9
    max_iter: int = 1000
    max_inner_iter: int = 50
    stall_iter: int = 50
    rho: float = 1e-6
    mu_eq: float = 1e-3
    mu_in: float = 1e-1
    mu_min: float | None = None
    mu_update_factor: float = 0.1
    scaling_iter: int = 10
    closest_feasible: bool = True
    eps_dual_inf: float = 1e-4
    verbose: bool = False
    engine: str = "auto"
    failed_gradient: str = "zero"

    def __post_init__(self) -> None:
        for name in ("rho", "mu_eq", "mu_in", "eps_dual_inf"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Settings.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("eps_abs", "eps_rel"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Settings.{name} must be non-negative, got {getattr(self, name)!r}")
        if not self.eps_abs + self.eps_rel > 0:
            raise ValueError("Settings.eps_abs and Settings.eps_rel are both 0: no answer could be certified; "
                             "give at least one a positive value")
        if self.mu_min is not None and not self.mu_min > 0:
            raise ValueError(f"Settings.mu_min must be positive or None, got {self.mu_min!r}")
        if not 0 < self.mu_update_factor < 1:
            raise ValueError(f"Settings.mu_update_factor must lie in (0, 1), got {self.mu_update_factor!r}")
        for name in ("max_iter", "max_inner_iter", "stall_iter"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Settings.{name} must be at least 1, got {getattr(self, name)!r}")
        if self.engine not in ("auto", "active_set", "alm"):
            raise ValueError(f"Settings.engine must be 'auto', 'active_set' or 'alm', got {self.engine!r}")
        if int(self.scaling_iter) < 0:
            raise ValueError(f"Settings.scaling_iter must be non-negative, got {self.scaling_iter!r}")
        if self.failed_gradient not in FAILED_GRADIENT_POLICIES:
            raise ValueError(f"Settings.failed_gradient must be one of {FAILED_GRADIENT_POLICIES}, "
                             f"got {self.failed_gradient!r}")
