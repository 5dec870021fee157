"""Cart-pole with dry friction on both joints, stepped in torch (QPLayer paper, Appendix D.2).

Generalized coordinates q = (x, theta): the cart's position x (m) on its rail and the pole's angle
theta (rad), measured from hanging straight down (theta = pi is upright). The pole is a point mass
m_p at distance l from its pivot on the cart (massless rod); the cart has mass m_c. With
v = (x', theta') the equations of motion are

    M(q) v' + c(q, v) = tau + lambda,
    M(q) = [[m_c + m_p,          m_p l cos theta],
            [m_p l cos theta,    m_p l^2        ]],
    c(q, v) = [-m_p l sin(theta) theta'^2,  m_p g l sin theta],

tau = (u, 0): the control u is a horizontal force (N) on the cart, the pole's joint is passive.
lambda is the dry (Coulomb) friction on the rail and on the pole's revolute joint.

Time stepping (semi-implicit Euler with friction impulses, as in the paper): with step dt,

    v_f   = v + dt M^-1 (tau - c)                                  free velocity (no friction)
    Lam   = argmin 1/2 Lam' M^-1 Lam + v_f' Lam  s.t. |Lam| <= eta     (equation 33)
    v+    = v_f + M^-1 Lam,     q+ = q + dt v+

where eta = dt * (F_cart, T_pole) bounds the friction impulse on each joint (N s and N m s). At the
QP's solution the new velocity is minus its bound multiplier: a joint whose free velocity friction
can cancel sticks (v+_j = 0), any other slips with the full impulse eta_j opposing its motion.

The friction QP is handed to a *friction solver*, a callable ``solver(Minv, v_f, eta) -> Lam`` with
Minv (B, 2, 2), v_f (B, 2), eta (2,) and Lam (B, 2): :func:`make_friction_solver` builds it for
alqp, qpth or ProxSuite's QPLayer, the same QP written in each solver's own form.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

FrictionSolver = Callable[[Tensor, Tensor, Tensor], Tensor]
SOLVERS = ("alqp", "qpth", "proxsuite")


@dataclass(frozen=True)
class CartPole:
    """Physical parameters (SI units) and the time step of the simulation.

    The QPLayer paper gives none of them; these are the classic cart-pole's masses with a longer
    pole, and friction strong enough to stop a slowly swinging pole (see the README).
    """
    cart_mass: float = 1.0          # kg
    pole_mass: float = 0.5          # kg, point mass at the pole's tip
    pole_length: float = 0.5        # m, pivot to the point mass
    gravity: float = 9.81           # m/s^2
    cart_friction: float = 1.0      # N, Coulomb friction force bound on the rail
    pole_friction: float = 0.1      # N m, Coulomb friction torque bound on the pole's joint
    dt: float = 0.1                 # s, one control step = one simulation step

    def __post_init__(self):
        for name in ("cart_mass", "pole_mass", "pole_length", "dt"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("cart_friction", "pole_friction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        """The parameters as a plain dict (for JSON)."""
        return asdict(self)

    def eta(self, dtype=torch.float64) -> Tensor:
        """(2,) bounds of the friction impulse per step: dt * (cart force, pole torque)."""
        return torch.tensor([self.cart_friction, self.pole_friction], dtype=dtype) * self.dt


def mass_matrix(model: CartPole, theta: Tensor) -> tuple[Tensor, Tensor]:
    """M(q) and its inverse for a batch of pole angles.

    Args:
        model: the parameters.
        theta: (B,) pole angles (rad).
    Returns:
        (M, M_inv), each (B, 2, 2), symmetric positive definite (det = m_c m_p l^2 + m_p^2 l^2 sin^2).
    """
    mc, mp, l = model.cart_mass, model.pole_mass, model.pole_length
    off = mp * l * torch.cos(theta)
    a = torch.full_like(theta, mc + mp)
    d = torch.full_like(theta, mp * l * l)
    M = torch.stack([torch.stack([a, off], -1), torch.stack([off, d], -1)], -2)
    det = a * d - off * off
    M_inv = torch.stack([torch.stack([d, -off], -1), torch.stack([-off, a], -1)], -2) / det[:, None, None]
    return M, M_inv


def step(model: CartPole, state: Tensor, force: Tensor, friction: FrictionSolver) -> Tensor:
    """One semi-implicit Euler step with the friction impulse of equation 33.

    Args:
        model: the parameters.
        state: (B, 4) rows (x, theta, x', theta') in m, rad, m/s, rad/s.
        force: (B,) horizontal force on the cart (N) held over the step.
        friction: solves the friction QP, ``friction(M_inv (B,2,2), v_f (B,2), eta (2,)) -> Lam (B,2)``.
    Returns:
        (B, 4) the state after dt.
    """
    q, v = state[:, :2], state[:, 2:]
    theta, theta_dot = q[:, 1], v[:, 1]
    mp, l, grav = model.pole_mass, model.pole_length, model.gravity
    _, M_inv = mass_matrix(model, theta)
    bias = torch.stack([-mp * l * torch.sin(theta) * theta_dot ** 2, mp * grav * l * torch.sin(theta)], -1)
    tau = torch.stack([force, torch.zeros_like(force)], -1)
    v_free = v + model.dt * (M_inv @ (tau - bias).unsqueeze(-1)).squeeze(-1)
    impulse = friction(M_inv, v_free, model.eta(state.dtype).to(state.device))
    v_next = v_free + (M_inv @ impulse.unsqueeze(-1)).squeeze(-1)
    return torch.cat([q + model.dt * v_next, v_next], -1)


def rollout(model: CartPole, forces: Tensor, friction: FrictionSolver, initial: Tensor | None = None) -> Tensor:
    """Simulate a batch of force sequences from the hanging rest state (or ``initial``).

    Args:
        model: the parameters.
        forces: (S, N) forces (N) of S sequences over N steps.
        friction: the friction QP's solver (see :func:`step`).
        initial: (4,) or (S, 4) initial state; default at rest, pole hanging down (all zeros).
    Returns:
        (S, N + 1, 4) the states, the initial one first.
    """
    if forces.dim() != 2:
        raise ValueError(f"forces must have shape (S, N), got {tuple(forces.shape)}")
    S = forces.shape[0]
    state = torch.zeros(S, 4, dtype=forces.dtype, device=forces.device) if initial is None else \
        initial.to(forces).expand(S, 4)
    states = [state]
    for t in range(forces.shape[1]):
        state = step(model, state, forces[:, t], friction)
        states.append(state)
    return torch.stack(states, 1)


@dataclass(frozen=True)
class SwingUpCost:
    """The swing-up loss, a mean over time of a state cost plus a small force penalty.

    For states s_1..s_N after each step (s_0, hanging at rest, is fixed):

        loss = 1/N sum_t [ w_t (1 + cos theta_t)/2 + position * x_t^2 ]  +  force * mean_t (u_t / 10 N)^2
               + terminal * [ (1 + cos theta_N)/2 + velocity * (x'_N^2 + (l theta'_N)^2) ]

    (1 + cos theta)/2 is 1 hanging down and 0 upright. The weight w_t = t / N grows over the
    horizon, so that the swing itself costs little and being upright late costs least; the terminal
    term asks for the pole to arrive upright and slow, i.e. to stay there.
    """
    position: float = 0.01      # per m^2
    force: float = 1e-3         # per (10 N)^2
    terminal: float = 1.0
    velocity: float = 0.01      # per (m/s)^2

    def __call__(self, model: CartPole, states: Tensor, forces: Tensor) -> Tensor:
        """Loss per sequence.

        Args:
            model: the parameters (pole length for the tip speed).
            states: (S, N + 1, 4) from :func:`rollout`.
            forces: (S, N) the forces applied.
        Returns:
            (S,) the loss of each sequence.
        """
        s = states[:, 1:]
        N = s.shape[1]
        down = (1 + torch.cos(s[..., 1])) / 2
        w = torch.arange(1, N + 1, dtype=s.dtype, device=s.device) / N
        running = (w * down + self.position * s[..., 0] ** 2).mean(1)
        last = s[:, -1]
        end = down[:, -1] + self.velocity * (last[:, 2] ** 2 + (model.pole_length * last[:, 3]) ** 2)
        return running + self.terminal * end + self.force * (forces / 10.0).pow(2).mean(1)


def _alqp_friction(settings=None) -> FrictionSolver:
    import alqp

    layer = alqp.QPLayer(settings)

    def solve(M_inv: Tensor, v_free: Tensor, eta: Tensor) -> Tensor:
        eye = torch.eye(2, dtype=v_free.dtype, device=v_free.device)
        return layer(M_inv, v_free, None, None, eye, -eta, eta).x
    return solve


def _qpth_friction() -> FrictionSolver:
    from qpth.qp import QPFunction

    qp = QPFunction(verbose=-1)

    def solve(M_inv: Tensor, v_free: Tensor, eta: Tensor) -> Tensor:
        eye = torch.eye(2, dtype=v_free.dtype, device=v_free.device)
        empty = torch.empty(0, dtype=v_free.dtype, device=v_free.device)
        # A batched h: given a shared one, qpth returns the batch's *mean* gradient, not its sum.
        h = torch.cat([eta, eta], -1).expand(v_free.shape[0], 4)
        return qp(M_inv, v_free, torch.cat([eye, -eye]), h, empty, empty)
    return solve


def _proxsuite_friction() -> FrictionSolver:
    from proxsuite.torch.qplayer import QPFunction

    qp = QPFunction()

    def solve(M_inv: Tensor, v_free: Tensor, eta: Tensor) -> Tensor:
        eye = torch.eye(2, dtype=v_free.dtype, device=v_free.device)
        empty = torch.empty(0, dtype=v_free.dtype, device=v_free.device)
        return qp(M_inv, v_free, empty, empty, eye, -eta, eta)[0]
    return solve


def available(name: str) -> str | None:
    """None when solver ``name`` (one of :data:`SOLVERS`) can run here, else the reason it cannot."""
    module = {"alqp": "alqp", "qpth": "qpth", "proxsuite": "proxsuite.torch.qplayer"}[name]
    try:
        __import__(module)
    except ImportError as err:
        return f"{module} is not installed ({err})"
    return None


def make_friction_solver(name: str, settings=None) -> FrictionSolver:
    """The friction QP of equation 33 solved by one of :data:`SOLVERS`, differentiably.

    ``alqp``: box rows C = I, l = -eta, u = eta. ``qpth``: G = [I; -I], h = [eta; eta] (its Q = M^-1
    is positive definite as qpth requires). ``proxsuite``: ProxSuite's QPLayer (``QPFunction()`` of
    proxsuite.torch.qplayer, feasible mode) with C = I, l = -eta, u = eta.

    Args:
        name: "alqp", "qpth" or "proxsuite".
        settings: :class:`alqp.Settings` for alqp (ignored by the others).
    Returns:
        ``solve(M_inv (B,2,2), v_f (B,2), eta (2,)) -> Lam (B,2)``.
    """
    if name == "alqp":
        return _alqp_friction(settings)
    if name == "qpth":
        return _qpth_friction()
    if name == "proxsuite":
        return _proxsuite_friction()
    raise ValueError(f"name must be one of {SOLVERS}, got {name!r}")


def friction_closed_form(M_inv_diag: Tensor, v_free: Tensor, eta: Tensor) -> Tensor:
    """Equation 33's solution when M^-1 is diagonal: each joint sticks or slips on its own.

    Lam_j = clip(-v_f,j / (M^-1)_jj, -eta_j, eta_j): the impulse that stops the joint, unless it
    exceeds the friction bound, in which case the joint slips under the bound's impulse.

    Args:
        M_inv_diag: (B, n) positive diagonal of M^-1.  v_free: (B, n).  eta: (n,) or (B, n), positive.
    Returns:
        (B, n) the friction impulse.
    """
    return torch.clamp(-v_free / M_inv_diag, -eta, eta)


def upright_error_deg(theta: Tensor) -> Tensor:
    """Distance (degrees, in [0, 180]) of pole angles from upright (theta = pi mod 2 pi)."""
    return torch.rad2deg(torch.abs(torch.remainder(theta, 2 * math.pi) - math.pi))
