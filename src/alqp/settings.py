"""Solver settings and backward choices: the one place where defaults live.

Plain types only (no solver import): :class:`Settings`, :class:`Engine` and the backward choices
:class:`IFT` and :class:`LPGD` (:class:`Status` lives in :mod:`alqp.types`). All are immutable and
validated when built, so that a wrong value fails where it is written, with the field's name in
the error.
"""
from __future__ import annotations

import enum
import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Optional, Union

from alqp.types import Status, has_solution  # noqa: F401  (re-exported: their home before alqp.types)


#: Values of ``Settings.failed_gradient``.
FAILED_GRADIENT_POLICIES = ("zero", "nan", "raise")


class Engine(str, enum.Enum):
    """The forward engine (``Settings.engine``); a member compares equal to its string value.

    AUTO: ACTIVE_SET for CPU tensors (when daqp is installed), ALM on other devices.
    ACTIVE_SET: DAQP, a dual active-set solver, one problem at a time on the CPU in float64;
        the problems it does not certify go to the ALM.
    ALM: the batched proximal augmented-Lagrangian solver (any device, every status).
    """

    AUTO = "auto"
    ACTIVE_SET = "active_set"
    ALM = "alm"

    def __str__(self) -> str:
        return self.value


def _check_real(owner: str, name: str, value) -> float:
    # bool is an int to Python, but True as a tolerance is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_choice(owner: str, name: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")
    return value


_REAL_FIELDS = ("eps_abs", "eps_rel", "rho", "mu_eq", "mu_in", "mu_update_factor", "eps_dual_inf")
_INT_FIELDS = ("max_iter", "max_inner_iter", "stall_iter", "scaling_iter")
_BOOL_FIELDS = ("closest_feasible", "verbose")


@dataclass(frozen=True)
class Settings:
    """Settings of the forward solver (and of LPGD's re-solve). Immutable: derive a variant with
    ``dataclasses.replace(settings, max_iter=50)``. Every field is checked when the object is
    built; a wrong type raises TypeError and a wrong value ValueError, each naming the field.
    ``solve_qp`` and ``QPLayer`` also take a dict of fields (``settings={"max_iter": 50}``).

    Attributes:
        eps_abs: absolute tolerance on the primal, dual and duality-gap residuals (infinity norm,
            the caller's units). 0 by default, so that the test is scale-free.
        eps_rel: relative tolerance, multiplied by the largest norm of the terms of each residual:
            SOLVED means residual <= eps_abs + eps_rel * (size of its terms) for all three
            (:mod:`alqp.certify`). A nonzero tolerance is never below ``100 * finfo(dtype).eps``,
            so that float32 can meet it: 1e-9 means about 1.2e-5 for float32. Also the relative
            tolerance that tells active rows from inactive ones in the backward.
        max_iter: maximum number of outer (multiplier) iterations, >= 1.
        max_inner_iter: maximum number of semi-smooth Newton steps within one outer iteration, >= 1.
        stall_iter: a problem that makes no progress for this many outer iterations in a row
            ends with status STALLED. Progress: its primal, dual or closest-feasible residual
            falls below half its best so far, its penalties change, or it moves to its closest
            feasible QP. Bounds the work a bad problem can cost the batch to about
            ``stall_iter * max_inner_iter`` Newton steps after its last progress.
        rho: proximal weight on the primal variable (scaled units), > 0; makes every Newton system
            positive definite, LPs included.
        mu_eq: initial penalty of the equality rows (ProxQP's mu_eq; smaller is stiffer), > 0.
        mu_in: initial penalty of the inequality rows, > 0.
        mu_min: floor of both penalties. The closest-feasible solution is accurate to about
            ``mu_min`` times the size of the multipliers. ``None``: 1e-9 in float64, 1e-6 in float32 (round-off
            amplified by 1/mu must stay below float32's tolerance).
        mu_update_factor: factor in (0, 1) applied to the penalties when the primal residual
            stalls (BCL rule).
        scaling_iter: number of Ruiz equilibration sweeps (0 turns scaling off). Rows are equilibrated
            only when ``closest_feasible`` is False, because row scaling would change the metric in
            which the closest feasible shift is the least-squares one.
        closest_feasible: solve infeasible QPs to their closest feasible QP and report
            CLOSEST_FEASIBLE (True), or report PRIMAL_INFEASIBLE (False).
        eps_dual_inf: relative tolerance of the unboundedness certificate, > 0.
        verbose: print one line of residuals per outer iteration.
        engine: the forward engine, an :class:`Engine` or its value. "alm": the batched proximal
            augmented-Lagrangian solver (any device, every status). "active_set": DAQP, a dual
            active-set solver, one problem at a time on the CPU in float64; an answer is kept only
            where it passes alqp's own residual checks at ``eps_abs``/``eps_rel``, and the other
            problems (infeasible ones among them) go to the ALM. "auto": "active_set" for CPU
            tensors, "alm" on other devices (or where daqp is not installed). Stored as an
            :class:`Engine` (which compares equal to the string).
        failed_gradient: the gradient of a problem without a solution (status other than SOLVED
            and CLOSEST_FEASIBLE: its outputs are no solution, so they have no derivative) that
            receives a nonzero incoming gradient, in either backward (IFT or LPGD).
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
    mu_min: Optional[float] = None
    mu_update_factor: float = 0.1
    scaling_iter: int = 10
    closest_feasible: bool = True
    eps_dual_inf: float = 1e-4
    verbose: bool = False
    engine: Engine = Engine.AUTO
    failed_gradient: str = "zero"

    def __post_init__(self) -> None:
        # Types first, each normalized (numpy scalars become Python ones, "alm" an Engine), so
        # that equal settings compare and hash equal whatever their spelling.
        normalized = {name: _check_real("Settings", name, getattr(self, name)) for name in _REAL_FIELDS}
        normalized.update({name: _check_int("Settings", name, getattr(self, name)) for name in _INT_FIELDS})
        normalized.update({name: _check_bool("Settings", name, getattr(self, name)) for name in _BOOL_FIELDS})
        if self.mu_min is not None:
            normalized["mu_min"] = _check_real("Settings", "mu_min", self.mu_min)
        if isinstance(self.engine, Engine):
            normalized["engine"] = self.engine
        else:
            normalized["engine"] = Engine(_check_choice("Settings", "engine", self.engine,
                                                        tuple(e.value for e in Engine)))
        normalized["failed_gradient"] = _check_choice("Settings", "failed_gradient", self.failed_gradient,
                                                      FAILED_GRADIENT_POLICIES)
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

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
            if getattr(self, name) < 1:
                raise ValueError(f"Settings.{name} must be at least 1, got {getattr(self, name)!r}")
        if self.scaling_iter < 0:
            raise ValueError(f"Settings.scaling_iter must be non-negative, got {self.scaling_iter!r}")
        for name in _REAL_FIELDS + ("mu_min",):
            value = getattr(self, name)
            if value is not None and math.isinf(value):
                raise ValueError(f"Settings.{name} must be finite, got {value!r}")
        # The encoding the solver's registered op receives (its arguments must be plain values),
        # computed once here so that a compiled model reads an attribute, not a JSON encoder.
        object.__setattr__(self, "_json", json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """The fields as plain Python values (the engine as its string): what ``state_dict``
        stores, and what ``Settings(**d)`` reads back."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["engine"] = self.engine.value
        return out

    @classmethod
    def coerce(cls, settings) -> Settings:
        """``settings`` as a :class:`Settings`: None gives the defaults, a Settings is returned as
        it is, a dict (mapping) of field values is converted; unknown keys raise a ValueError
        that lists them and the known fields, anything else a TypeError."""
        if settings is None:
            return _DEFAULT_SETTINGS
        if isinstance(settings, cls):
            return settings
        if isinstance(settings, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"settings has unknown field(s) {unknown}; the fields of alqp.Settings are "
                                 f"{sorted(known)}")
            return cls(**settings)
        raise TypeError(f"settings must be an alqp.Settings, a dict of its fields, or None, "
                        f"got {type(settings).__name__}")


_DEFAULT_SETTINGS = Settings()


@lru_cache(maxsize=64)
def settings_from_json(text: str) -> Settings:
    """The :class:`Settings` whose ``_json`` is ``text`` (cached: the registered op decodes it on
    every call)."""
    return Settings(**json.loads(text))


# ------------------------------------------------------------------------------------------------
# Backward choices
# ------------------------------------------------------------------------------------------------
#: Values of ``LPGD.variant`` (see :mod:`alqp.lpgd`).
LPGD_VARIANTS = ("right", "left", "central")

#: Default perturbation size. tau multiplies the incoming gradient, so it has the units of cost
#: per unit of loss: tau |dL/dx| is the change of the cost vector g (and tau |dL/dy|, tau |dL/dz|
#: the change of b, l, u). The default 1.0 suits a loss whose gradient is of the order of the cost
#: gaps between competing vertices, the case LPGD is for (an LP layer: tau must be large enough
#: that the perturbed cost reaches a neighbouring vertex; examples/lpgd_learning.py learns about
#: as well for any tau from 0.1 to 2). Scale it with the loss (a loss averaged over a batch of B has B
#: times smaller gradients). For a QP where LPGD should approximate the exact gradient, pass a tau
#: small against |g| / |dL/dx| but with tau |dL/dx| far above Settings.eps_abs (1e-3 .. 1e-5 in float64).
DEFAULT_TAU = 1.0

#: Default proximal weight rho_p (0: plain LPGD, whose tau -> 0 limit is the exact derivative).
DEFAULT_PROXIMAL = 0.0

#: Default variant: central is exact on QPs for tau below the first active-set change (one-sided
#: variants carry an O(tau) error), at the price of re-solving 2B problems instead of B.
DEFAULT_VARIANT = "central"


@dataclass(frozen=True)
class IFT:
    """Backward by implicit differentiation of the optimality conditions
    (:func:`alqp.backward.implicit_backward`): the exact derivative of the solution wherever it
    exists (the default). No options."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_json", json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """``{"kind": "ift"}``: plain values for ``state_dict``."""
        return {"kind": "ift"}


@dataclass(frozen=True)
class LPGD:
    """Backward by Lagrangian proximal gradient descent (:mod:`alqp.lpgd`): re-solves the QP with
    its linear terms perturbed by tau times the incoming gradient, and returns a finite difference
    of the Lagrangian's data-gradient. Informative where the true derivative is zero (LPs).

    Attributes:
        tau: perturbation size, a positive finite number (see :data:`DEFAULT_TAU` for its units and
            how to choose it).
        variant: "right", "left" or "central" (central re-solves 2B problems and is exact on QPs
            for tau below the first active-set change; see :data:`DEFAULT_VARIANT`).
        proximal: weight rho_p >= 0 (finite) of the proximal term rho_p/2 |x - x*|^2 added to the
            re-solved cost (0: plain LPGD).
    """

    tau: float = DEFAULT_TAU
    variant: str = DEFAULT_VARIANT
    proximal: float = DEFAULT_PROXIMAL

    def __post_init__(self) -> None:
        tau = _check_real("LPGD", "tau", self.tau)
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"LPGD.tau must be a positive finite number, got {self.tau!r}")
        _check_choice("LPGD", "variant", self.variant, LPGD_VARIANTS)
        proximal = _check_real("LPGD", "proximal", self.proximal)
        if not (0 <= proximal < math.inf):
            raise ValueError(f"LPGD.proximal must be a non-negative finite number, got {self.proximal!r}")
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "proximal", proximal)
        object.__setattr__(self, "_json", json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """``{"kind": "lpgd", "tau": ..., "variant": ..., "proximal": ...}``: plain values."""
        return {"kind": "lpgd", **asdict(self)}


#: A backward choice.
Backward = Union[IFT, LPGD]
_BACKWARD_KINDS = {"ift": IFT, "lpgd": LPGD}
_BACKWARD_DEFAULTS = {"ift": IFT(), "lpgd": LPGD()}


def backward_from_dict(spec: dict) -> Backward:
    """The inverse of ``IFT.to_dict`` / ``LPGD.to_dict``."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _BACKWARD_KINDS:
        raise ValueError(f"backward kind must be one of {sorted(_BACKWARD_KINDS)}, got {kind!r}")
    return _BACKWARD_KINDS[kind](**spec)


@lru_cache(maxsize=64)
def backward_from_json(text: str) -> Backward:
    """The backward choice whose ``_json`` is ``text`` (cached)."""
    return backward_from_dict(json.loads(text))


def as_backward(backward) -> Backward:
    """``backward`` as an :class:`IFT` or :class:`LPGD`: an instance is returned as it is, and the
    strings "ift" and "lpgd" give the defaults of each. Anything else raises, naming ``backward``."""
    if isinstance(backward, (IFT, LPGD)):
        return backward
    if isinstance(backward, str) and backward in _BACKWARD_DEFAULTS:
        return _BACKWARD_DEFAULTS[backward]
    raise ValueError(f"backward must be alqp.IFT(), alqp.LPGD(...), 'ift' or 'lpgd', got {backward!r}")
