"""alqp: differentiable quadratic-programming layers for PyTorch.

    minimize 1/2 x'Hx + g'x  subject to  A x = b,  l <= C x <= u

solved in batches, on the CPU by a compiled dual active-set solver (DAQP) with alqp's own
certification, on CUDA (and as the fallback) by a batched proximal augmented-Lagrangian method;
infeasible QPs are solved to their closest feasible QP. The public surface: :func:`solve_qp`,
:class:`QPLayer`, :class:`QPSolution`, :class:`Status`, :class:`Settings`, the backward choices
:class:`IFT` and :class:`LPGD`, and :mod:`alqp.compat` for qpth's and ProxSuite's argument forms.
"""
from alqp.types import QPSolution, Status
from alqp.settings import IFT, LPGD, Engine, Settings
from alqp.layer import QPLayer, solve_qp
from alqp.parallel import set_per_process_threads
from alqp import compat

__all__ = ["solve_qp", "QPLayer", "QPSolution", "Settings", "Engine", "IFT", "LPGD", "Status",
           "set_per_process_threads", "compat"]
__version__ = "0.1.0"
