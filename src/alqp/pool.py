"""The per-problem DAQP solves of the active-set engine on a small thread pool.

``daqp.solve`` releases the GIL around its C solve (its Cython binding calls ``daqp_quadprog``
``with nogil``; measured: while it runs, another Python thread keeps running, as with numpy's
LAPACK calls and unlike a pure-Python loop), so threads can run the solves of independent
problems on several cores. The Python around each solve (slicing, DAQP's argument checks, the
scale of the problem) still holds the GIL, which bounds the gain at small n.

Thread policy of the active-set engine (:func:`one_torch_thread`, :func:`solve_threads`):

* its torch operations, and those of the implicit backward, run on one intra-op thread (torch's
  thread count is set to 1 for the duration of :func:`alqp.active_set.solve_active_set` and of
  the layer's IFT backward engine, and restored after). They are many small
  operations; torch's OpenMP threads spin while they wait, and when another process keeps a core
  busy, 2 torch threads made this forward 3.7 to 28 times slower than 1 thread on the 2-core
  development machine (batch 256, Table-2 size), where the pool's threads lost nothing;
* the caller's torch thread count (``torch.get_num_threads()``, which
  :func:`alqp.set_per_process_threads` sets to a process's share of the cores), capped by the
  cores this process may run on, is the number of pool threads for the DAQP solves, for batches of
  at least :data:`MIN_BATCH` problems of at least :data:`MIN_N` variables (below that, handing
  chunks to threads costs more than it saves). The pool's threads block, they do not spin: when
  another process keeps a core busy, a chunk on that core just runs later, and the batch is cut
  into :data:`CHUNKS_PER_THREAD` chunks per thread so that the idle thread takes over the rest.

``ENABLED = False`` turns both off (torch threads as the caller set them, every loop serial).
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

#: Module switch: False runs every loop in the calling thread.
ENABLED = True
#: Smallest batch and problem size whose solves go to the pool.
MIN_BATCH = 32
MIN_N = 16
#: Chunks per thread: a thread whose core is busy leaves the remaining chunks to the others.
CHUNKS_PER_THREAD = 4

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_lock = threading.Lock()
# The caller's torch thread count while one_torch_thread runs (per calling thread).
_caller = threading.local()


def one_torch_thread(fn: Callable) -> Callable:
    """Decorate ``fn`` to run with torch's intra-op thread count set to 1 (restored on return,
    also on an exception); :func:`solve_threads` reads the caller's count meanwhile. A no-op when
    ``ENABLED`` is False or the count is 1 already. (The count is process-wide: other threads of
    the process that run torch operations meanwhile also get one thread.)"""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if not ENABLED or threads == 1:
            return fn(*args, **kwargs)
        _caller.threads = threads
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            _caller.threads = None

    return wrapper


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def solve_threads(batch: int, n: int) -> int:
    """Threads for ``batch`` independent DAQP solves of ``n`` variables (see the module docstring):
    1 when the pool is off or the batch is too small, else min(torch threads, usable cores)."""
    if not ENABLED or batch < MIN_BATCH or n < MIN_N:
        return 1
    caller = getattr(_caller, "threads", None) or torch.get_num_threads()
    return max(1, min(caller, _cores(), batch))


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="alqp-daqp")
            _pool_size = threads
        return _pool


def run_chunked(body: Callable[[range], None], count: int, threads: int) -> None:
    """Call ``body(range)`` over 0..count-1, cut into ranges, on ``threads`` threads (the calling
    thread alone when ``threads`` is 1). ``body`` must write only the entries of its own range.
    An exception in any chunk is raised here, after every chunk has finished."""
    if threads <= 1 or count <= 1:
        body(range(count))
        return
    chunks = min(count, threads * CHUNKS_PER_THREAD)
    bounds = [count * c // chunks for c in range(chunks + 1)]
    futures = [_executor(threads).submit(body, range(bounds[c], bounds[c + 1])) for c in range(chunks)]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
