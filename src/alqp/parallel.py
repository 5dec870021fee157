"""Several training processes on one machine: the thread count each should use.

alqp's solves are many small operations; when the torch threads of all processes on a machine
outnumber its cores, they wait on each other, and alqp slows down far more than dense algebra
does (with another process busy on one of two cores, 2 torch threads made alqp 6 to 16 times
slower). Each process of a DistributedDataParallel job should therefore take its share of the cores.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def set_per_process_threads(local_processes: Optional[int] = None, cores: Optional[int] = None) -> int:
    """Set this process's torch threads to its share of the machine's cores and return it.

    Args:
        local_processes: processes sharing this machine; default the ``LOCAL_WORLD_SIZE`` that
            ``torchrun`` sets, else 1.
        cores: cores of the machine; default those this process may run on
            (``os.sched_getaffinity``), else ``os.cpu_count()``.

    Returns:
        The thread count set: max(1, cores // local_processes).
    """
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes < 1:
        raise ValueError(f"local_processes must be at least 1, got {local_processes}")
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_processes)
    torch.set_num_threads(threads)
    return threads
