"""The active-set engine and the implicit backward on a small thread pool, without spinning threads.

``daqp.solve`` releases the GIL around its C solve (its Cython binding calls ``daqp_quadprog``
``with nogil``; measured: while it runs, another Python thread keeps running, as with numpy's
LAPACK calls and unlike a pure-Python loop), and so do torch's CPU operations, so Python threads
can run independent problems on several cores. The Python around each operation still holds the
GIL, which bounds the gain at small n.

Thread policy of the active-set engine and of the layer's IFT backward (:func:`one_torch_thread`,
:func:`batch_threads`, :func:`solve_threads`):

* their torch operations run on one intra-op thread (torch's thread count is set to 1 for the
  duration of :func:`alqp.active_set.solve_active_set` and of the layer's IFT backward engine,
  and restored after). They are many small operations; torch's OpenMP threads spin while they
  wait, and when another process keeps a core busy, 2 torch threads made this forward 3.7 to 28
  times slower than 1 thread on the 2-core development machine (batch 256, Table-2 size), where
  the pool's threads lost nothing;
* the cores come from batch parallelism instead: the caller's torch thread count
  (``torch.get_num_threads()``, which :func:`alqp.set_per_process_threads` sets to a process's
  share of the cores), capped by the cores this process may run on, is the number of pool
  threads. A batch of at least :data:`MIN_BATCH_CHUNKED` problems of at least :data:`MIN_N`
  variables is cut into contiguous chunks (:func:`chunk_bounds`: the same number per thread, of
  about :data:`CHUNK_SIZE` problems), and each
  chunk runs the whole engine (the batched least-distance factorization, the DAQP solves, the
  certification) or the whole backward, as an independent batch, on a pool thread
  (:func:`map_batch_chunks`). The answers and gradients are bit for bit the serial ones: the
  problems of a batch are independent, every batched operation works problem by problem, and a
  problem's factor keeps LAPACK's memory layout whatever its batch-mates
  (:func:`alqp.active_set.take_rows`). The backward is cut only where every problem is SOLVED
  (a closest-feasible problem's adjoint system is padded to the sizes of its group). The
  chunks' least-distance factors stay apart (:class:`alqp.active_set.ChunkedFactor`) for the
  backward's identical chunks, and the outputs are joined on the pool (:func:`concat_rows`);
* at one thread (the caller's torch threads, or the usable cores, are 1) a batch that makes at
  least two chunks of about :data:`CHUNK_SIZE` problems runs them one after the other in the
  calling thread (:func:`chunk_threads`), forward and backward: each chunk's factors stay in
  cache and its temporaries page-fault less. Table-2 size, one thread, medians of alternating
  runs: batch 1024 forward 475 to 511 ms against 499 to 530 as one batch, backward 179 to 196
  against 294 to 339 ms; batch 256 backward 46 to 49 against 50 to 54 ms; batch 100 level;
* smaller batches (from :data:`MIN_BATCH` problems) run the engine's torch algebra in the calling
  thread and only the per-problem DAQP solves on the pool (:func:`run_chunked`); inside a chunk
  of a batch those solves run in the chunk's thread (no nested use of the pool);
* the pool's threads block, they do not spin: when another process keeps a core busy, a chunk on
  that core just runs later, and with more than one chunk per thread the idle thread takes over
  the rest.

Measured on the 2-core development machine (shared, so medians of alternating runs of the code
before and after the batch chunks; Table-2 size, forward + backward, float64):
``python -m benchmarks --preset threads --peers alqp``, 2 threads over 1: batch 64 1.32x (was
0.96x), 256 1.77x (1.04x), 1024 2.08x (1.01x); ``python -m benchmarks.threads_check``, batch 256:
idle 1.82 to 1.85x in the two quiet runs (1.40x in a disturbed one; was 0.98 to 1.08x), and with one core kept busy by
another process 2 threads are 1.03 to 1.16x faster than 1 and 1.50 to 1.66x slower than 2 threads
on the idle machine (torch's own 2 threads, the policy off: 2.1 to 3.9x). Part of the gain is the
chunking itself: at 1 thread, 4 chunks of 64 run the forward of batch 256 some 20% faster than
one batch (fewer page faults, the factors in cache), and 2 threads over serially run chunks give
1.4 to 1.5x, as 2 processes do.

``ENABLED = False`` turns all of it off (torch threads as the caller set them, every loop serial).
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

import torch

#: Module switch: False runs every loop in the calling thread.
ENABLED = True
#: Smallest batch and problem size whose solves go to the pool.
MIN_BATCH = 32
MIN_N = 16
#: Chunks per thread: a thread whose core is busy leaves the remaining chunks to the others.
CHUNKS_PER_THREAD = 4
#: Smallest batch whose whole engine and backward run in chunks on the pool (map_batch_chunks).
MIN_BATCH_CHUNKED = 64
#: Problems per chunk of such a batch, about: the same number of chunks per thread, as many as
#: make chunks of about this size, at least one. (Measured on 2 cores, Table-2 size: chunks of
#: 64 kept each chunk's factors in cache, 2.24x at batch 1024 against 2.09x with chunks of 256;
#: with more than one chunk per thread, the thread of an idle core takes over chunks from one
#: whose core is busy; at batch 32, two chunks of 16 lost to one.)
CHUNK_SIZE = 64

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_lock = threading.Lock()
# The caller's torch thread count while one_torch_thread runs (per calling thread).
_caller = threading.local()
# Per thread: True inside a chunk of map_batch_chunks (its loops then stay in that thread).
_in_chunk = threading.local()

_T = TypeVar("_T")


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
    1 when the pool is off, the batch is too small or this is a chunk of a batch already on the
    pool, else min(torch threads, usable cores)."""
    if not ENABLED or batch < MIN_BATCH or n < MIN_N or getattr(_in_chunk, "active", False):
        return 1
    caller = getattr(_caller, "threads", None) or torch.get_num_threads()
    return max(1, min(caller, _cores(), batch))


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="alqp-pool")
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
    _run_tasks([functools.partial(body, range(bounds[c], bounds[c + 1])) for c in range(chunks)], threads)


def batch_threads(batch: int, n: int) -> int:
    """Threads on which a whole batch of ``batch`` problems of ``n`` variables runs in chunks
    (:func:`map_batch_chunks`; see the module docstring): 1 unless the caller runs under
    :func:`one_torch_thread` with more than one torch thread (torch's operations are then on one
    intra-op thread each, so the threads do not oversubscribe the cores), the batch has at least
    :data:`MIN_BATCH_CHUNKED` problems of at least :data:`MIN_N` variables and this is not a chunk
    already; else min(the caller's torch threads, usable cores)."""
    if not ENABLED or batch < MIN_BATCH_CHUNKED or n < MIN_N or getattr(_in_chunk, "active", False):
        return 1
    caller = getattr(_caller, "threads", None)
    if caller is None:
        return 1
    return max(1, min(caller, _cores(), batch // 2))


def chunk_threads(batch: int, n: int) -> int:
    """How a whole batch of ``batch`` problems of ``n`` variables runs (see the module docstring):
    0, as one batch; ``k > 1``, in chunks on k pool threads (:func:`batch_threads`); 1, in chunks
    one after the other in the calling thread, where it makes at least two chunks of about
    :data:`CHUNK_SIZE` problems (at one thread the chunks alone are faster: each chunk's factors
    stay in cache, and the batch's temporaries page-fault less)."""
    threads = batch_threads(batch, n)
    if threads > 1:
        return threads
    if (not ENABLED or batch < MIN_BATCH_CHUNKED or n < MIN_N or getattr(_in_chunk, "active", False)
            or len(chunk_bounds(batch, 1)) < 3):
        return 0
    return 1


def chunk_bounds(count: int, threads: int) -> list:
    """The bounds [0, ..., count] of the contiguous chunks :func:`map_batch_chunks` cuts
    ``count`` problems into on ``threads`` threads: the same number per thread, as many as make
    chunks of about :data:`CHUNK_SIZE` problems, at least one per thread (and at most ``count``)."""
    per_thread = max(1, round(count / max(threads * CHUNK_SIZE, 1)))
    chunks = max(1, min(count, max(threads, 1) * per_thread))
    return [count * c // chunks for c in range(chunks + 1)]


def _run_tasks(tasks: list, threads: int) -> list:
    """``[task() for task in tasks]``, each task marked as a chunk (:data:`_in_chunk`): on
    ``threads`` pool threads with torch on one intra-op thread and the caller's grad and inference
    modes (thread-local in torch: a pool thread would otherwise record autograd graphs inside a
    backward), every task finishing before the first exception, if any, is raised; or, for
    ``threads`` 1, one after the other in the calling thread."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(task: Callable):
        _in_chunk.active = True
        try:
            if torch.get_num_threads() != 1:  # (a pool thread keeps the count it first saw)
                torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return task()
        finally:
            _in_chunk.active = False

    if threads <= 1:  # (in the calling thread: its torch threads and modes are the caller's own)
        _in_chunk.active = True
        try:
            return [task() for task in tasks]
        finally:
            _in_chunk.active = False
    futures = [_executor(threads).submit(run, task) for task in tasks]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


def map_batch_chunks(body: Callable[[int, int], _T], count: int, threads: int) -> list:
    """``[body(start, stop), ...]`` over the contiguous ranges of :func:`chunk_bounds`, which cover
    0..count-1 in order, on ``threads`` pool threads, or one after the other in the calling thread
    when ``threads`` is 1.

    Inside a chunk, :func:`solve_threads` and :func:`batch_threads` are 1 and :func:`chunk_threads`
    0 (no nested use of the pool, which could wait on itself) and torch runs on one intra-op
    thread. An exception in any chunk is raised here, after every chunk has finished."""
    if count <= 1:
        return [body(0, count)]
    bounds = chunk_bounds(count, threads)
    return _run_tasks([functools.partial(body, bounds[c], bounds[c + 1]) for c in range(len(bounds) - 1)], threads)


def concat_rows(pieces: list, threads: int) -> torch.Tensor:
    """``torch.cat(pieces)`` along the batch (dim 0), in the memory layout of the pieces (LAPACK's
    factors are column-major, and later products round by the layout of their operands), the
    copies on ``threads`` pool threads: at Table-2 size the factors and gradients of a batch of
    256 are some 60 MB, whose serial copy would cost a tenth of the forward.

    The buffer takes the layout of the largest piece whose batch is the outermost dimension of a
    dense layout (row-major, or column-major matrices); where there is none, ``torch.cat``."""
    def batch_outermost(piece: torch.Tensor) -> bool:
        dense = piece.is_contiguous() or (piece.dim() == 3 and piece.mT.is_contiguous())
        return dense and piece.shape[0] > 1 and piece.stride(0) == max(piece[0].numel(), 1)

    shaped = [piece for piece in pieces if batch_outermost(piece)]
    if len(pieces) == 1 or not shaped or any(piece.shape[1:] != pieces[0].shape[1:] for piece in pieces):
        return torch.cat(pieces)
    model = max(shaped, key=lambda piece: piece.shape[0])
    rows = [piece.shape[0] for piece in pieces]
    out = torch.empty_strided((sum(rows),) + tuple(model.shape[1:]), model.stride(), dtype=model.dtype,
                              device=model.device)
    starts = [sum(rows[:i]) for i in range(len(rows))]

    def copy(start: int, piece: torch.Tensor) -> None:
        out[start:start + piece.shape[0]].copy_(piece)

    if threads <= 1 or out.numel() < 1 << 16:
        for start, piece in zip(starts, pieces):
            copy(start, piece)
    else:
        _run_tasks([functools.partial(copy, start, piece) for start, piece in zip(starts, pieces)], threads)
    return out
