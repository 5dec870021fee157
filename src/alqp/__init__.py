"""alqp: differentiable quadratic-programming layers for PyTorch.

    minimize 1/2 x'Hx + g'x  subject to  A x = b,  l <= C x <= u

solved in batches by a proximal augmented-Lagrangian method; infeasible QPs are solved to their
closest feasible QP.
"""
from alqp.settings import IFT, LPGD, Engine, Settings, Status
from alqp.layer import QPLayer, solve_qp
from alqp.solver import QPSolution
from alqp.parallel import set_per_process_threads

__all__ = ["solve_qp", "QPLayer", "QPSolution", "Settings", "Engine", "IFT", "LPGD", "Status",
           "set_per_process_threads"]
__version__ = "0.1.0"
