"""alqp's benchmarks: time alqp against ProxSuite's QPLayer, qpth (OptNet) and cvxpylayers.

Not part of the installed library: run from the repository root, ``python -m benchmarks --preset
forward`` (see ``python -m benchmarks --help``); the Maros-Meszaros preset is
``python -m benchmarks.maros_meszaros``. The peers are optional and imported lazily by their
adapters in :mod:`benchmarks.peers`; importing this package imports none of them.

Modules:
    problems  random QP batches in the QPLayer paper's style and float64 reference solutions
    peers     one adapter per method with the same forward / forward+backward interface
    harness   presets, warm-up and repeats, statistics, accuracy, ratio to alqp
    report    text table, JSON, PNG plot
"""
from benchmarks.harness import PRESETS, Config, Preset, RunOptions, make_preset, run_preset
from benchmarks.problems import QPBatch, random_qp_batch, reference_solution

__all__ = ["PRESETS", "Config", "Preset", "RunOptions", "make_preset", "run_preset", "QPBatch",
           "random_qp_batch", "reference_solution"]
