"""A batch cut into chunks on the pool's threads (alqp.pool.map_batch_chunks) against the serial path.

The active-set engine and the IFT backward cut a large CPU batch into contiguous chunks and run
each as an independent batch on a pool thread. The problems of a batch are independent, so the
oracle is the serial path itself (the other test files check it against independent solvers and
finite differences): every output, status and gradient must be bit for bit the same. The chunking
is forced here on small batches (the thresholds lowered by monkeypatch), on 2 threads.
"""
from __future__ import annotations

import threading

import pytest
import torch

import alqp
from alqp import active_set, backward, pool, small
from alqp.problem import canonicalize
from tests import families

NAMES = ("H", "g", "A", "b", "C", "l", "u")


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 threads (restored after), the host fast path off (so that the engine runs)."""
    monkeypatch.setattr(small, "ENABLED", False)
    monkeypatch.setattr(pool, "_cores", lambda: 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _chunking(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(pool, "MIN_BATCH_CHUNKED", 2 if on else 10**9)
    monkeypatch.setattr(pool, "CHUNK_SIZE", 3)
    monkeypatch.setattr(pool, "MIN_N", 1)


def _solve_and_grads(data: dict, dtype=torch.float64):
    """The solution of ``data`` through alqp.solve_qp and the gradients of a fixed random linear
    loss on (x, y, z) with respect to every input that is given."""
    params = {k: (None if v is None else v.detach().to(dtype).clone().requires_grad_(True)) for k, v in data.items()}
    sol = alqp.solve_qp(*(params[k] for k in NAMES))
    gen = torch.Generator().manual_seed(3)
    loss = sum((torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) * t).sum()
               for t in (sol.x, sol.y, sol.z) if t.numel())
    given = [k for k in NAMES if params[k] is not None]
    grads = torch.autograd.grad(loss, [params[k] for k in given], allow_unused=True)
    return sol, dict(zip(given, grads))


def _count_calls(monkeypatch, module, name: str) -> list:
    """Record the batch size of every call of ``module.name`` (thread-safe), calling through."""
    sizes, lock, original = [], threading.Lock(), getattr(module, name)

    def spy(problem, *args, **kwargs):
        with lock:
            sizes.append(problem.batch_size)
        return original(problem, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return sizes


def _shared_hac(batch: int) -> dict:
    """Strictly convex problems that share all but g (given without a batch dimension): the
    factor of every chunk is one factor of batch size 1."""
    data = families.strictly_convex(batch, 6, 2, 8, seed=11)
    return {k: (v if k == "g" else v[0]) for k, v in data.items()}


def _lp_chunk_first(batch: int) -> dict:
    """LPs first, then strictly convex problems: the first chunk has no least-distance factor."""
    lps, qps = families.lp(3, 6, 2, 8, seed=4), families.strictly_convex(batch - 3, 6, 2, 8, seed=4)
    return {k: torch.cat([lps[k], qps[k]]) for k in lps}


CASES = {
    "strictly_convex": lambda: families.strictly_convex(12, 6, 2, 8, seed=5),
    "shared_H_A_C": lambda: _shared_hac(12),
    "lp_chunk_first": lambda: _lp_chunk_first(12),
    "mixed_with_closest_feasible": lambda: families.mixed(14, 6, 3, 8, seed=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_batch_gives_the_serial_answers_and_gradients(case, dtype, monkeypatch, two_threads):
    data = CASES[case]()
    _chunking(monkeypatch, False)
    serial_sol, serial_grads = _solve_and_grads(data, dtype)
    _chunking(monkeypatch, True)
    forward_chunks = _count_calls(monkeypatch, active_set, "_solve_batch")
    backward_calls = _count_calls(monkeypatch, backward, "implicit_backward")  # (the chunks' calls)
    chunked_sol, chunked_grads = _solve_and_grads(data, dtype)

    B = data["g"].shape[0]
    assert sorted(forward_chunks) == sorted(pool.chunk_bounds(B, 2)[i + 1] - pool.chunk_bounds(B, 2)[i]
                                            for i in range(4))  # the forward ran in 4 chunks
    if (serial_sol.status == int(alqp.Status.SOLVED)).all():
        assert len(backward_calls) == 4 and sum(backward_calls) == B  # the backward too
    else:  # (a closest-feasible problem: the backward runs in one piece)
        assert backward_calls == [] and case == "mixed_with_closest_feasible"
    for name, a, b in zip(serial_sol._fields, serial_sol, chunked_sol):
        assert torch.equal(a, b), name
    assert serial_grads.keys() == chunked_grads.keys()
    for name in serial_grads:
        a, b = serial_grads[name], chunked_grads[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("case", ["strictly_convex", "shared_H_A_C", "lp_chunk_first"])
def test_chunked_factor_is_the_serial_factor(case, monkeypatch, two_threads):
    """The chunks' factors, read as one factor (its fields, select, rows), equal the serial
    engine's, in the same memory layout (the backward's products round by it)."""
    problem = canonicalize(*(CASES[case]()[k] for k in NAMES))
    settings = alqp.Settings()
    _chunking(monkeypatch, False)
    serial = active_set.solve_active_set(problem, settings).factor
    _chunking(monkeypatch, True)
    chunked = active_set.solve_active_set(problem, settings).factor
    assert isinstance(chunked, active_set.ChunkedFactor) and isinstance(serial, active_set.LeastDistanceFactor)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        a, b = a.expand_as(b) if a.shape[0] == 1 else a, b.expand_as(a) if b.shape[0] == 1 else b
        return torch.equal(a, b)

    usable = serial.usable
    for name in active_set.LeastDistanceFactor._fields:
        a, b = getattr(serial, name), getattr(chunked, name)
        rows = usable if a.dim() and a.shape[0] == usable.shape[0] and b.shape[0] == usable.shape[0] else slice(None)
        assert same(a[rows], b[rows]), name  # (placeholders of unusable problems may differ)
        if a.shape[0] > 1 and b.shape[0] > 1 and a.stride(0) and b.stride(0):  # (not expanded)
            assert a.stride() == b.stride(), name
    index = torch.tensor([7, 4, 10])  # (usable problems of every case)
    for a, b in zip(serial.select(index), chunked.select(index)):
        assert same(a, b)
    bounds = pool.chunk_bounds(problem.batch_size, 2)
    for start, stop in [(bounds[1], bounds[2]), (1, 2), (2, 9)]:
        part = chunked.rows(start, stop)
        if part is None:  # a chunk without a factor: none of its problems is usable
            assert not serial.usable[start:stop].any()
            continue
        keep = serial.usable[start:stop]
        for name, a, b in zip(active_set.LeastDistanceFactor._fields, serial.rows(start, stop), part):
            a, b = (t[keep] if t.shape[0] == keep.shape[0] else t for t in (a, b))
            assert same(a, b), name


def test_no_nested_pool_inside_a_chunk(monkeypatch, two_threads):
    """Inside a chunk the per-problem DAQP solves stay in the chunk's thread (a nested submission
    to the same pool could wait on itself) and torch runs on one thread."""
    _chunking(monkeypatch, True)
    monkeypatch.setattr(pool, "MIN_BATCH", 1)
    seen, original = [], active_set._solve_batch

    def probe(problem, *args):
        seen.append((threading.current_thread() is threading.main_thread(), pool.solve_threads(64, 64),
                     pool.batch_threads(64, 64), torch.get_num_threads(), torch.is_grad_enabled()))
        return original(problem, *args)

    monkeypatch.setattr(active_set, "_solve_batch", probe)
    data = families.strictly_convex(12, 6, 2, 8, seed=5)
    with torch.no_grad():
        alqp.solve_qp(*(data[k] for k in NAMES))
    assert seen == [(False, 1, 1, 1, False)] * 4
    assert pool.solve_threads(64, 64) == 2 or torch.get_num_threads() == 2  # (outside: the caller's threads)


def test_an_error_in_a_chunk_reaches_the_caller(monkeypatch, two_threads):
    _chunking(monkeypatch, True)
    data = families.strictly_convex(12, 6, 2, 8, seed=5)
    calls, lock, original = [], threading.Lock(), active_set._solve_batch

    def second_chunk_fails(problem, *args):
        with lock:
            calls.append(problem.batch_size)
            fail = len(calls) == 2
        if fail:
            raise FloatingPointError("chunk failed")
        return original(problem, *args)

    monkeypatch.setattr(active_set, "_solve_batch", second_chunk_fails)
    with pytest.raises(FloatingPointError, match="chunk failed"):
        alqp.solve_qp(*(data[k] for k in NAMES))
    assert len(calls) == 4  # every chunk ran to its end before the error was raised
    assert torch.get_num_threads() == 2

    # The same in the backward's chunks.
    monkeypatch.setattr(active_set, "_solve_batch", original)
    params = [data[k].clone().requires_grad_(True) for k in NAMES]
    x = alqp.solve_qp(*params).x
    original_adjoint = backward._solve_adjoint

    def adjoint_fails(batch, *args):
        raise ArithmeticError("backward chunk failed")

    monkeypatch.setattr(backward, "_solve_adjoint", adjoint_fails)
    with pytest.raises(ArithmeticError, match="backward chunk failed"):
        x.sum().backward()
    monkeypatch.setattr(backward, "_solve_adjoint", original_adjoint)
    assert torch.get_num_threads() == 2
    # The pool still works after the errors.
    again = alqp.solve_qp(*(data[k] for k in NAMES))
    assert (again.status == int(alqp.Status.SOLVED)).all()


def test_map_batch_chunks_and_concat_rows(monkeypatch):
    """Contiguous chunks in order, covering every index once, the same number per thread, of
    about CHUNK_SIZE problems; the concatenation keeps a column-major layout and the values."""
    monkeypatch.setattr(pool, "CHUNK_SIZE", 64)
    chunks = lambda count, threads: len(pool.chunk_bounds(count, threads)) - 1  # noqa: E731
    assert chunks(256, 2) == 4 and chunks(1024, 2) == 16 and chunks(64, 2) == 2 and chunks(20, 2) == 2
    assert chunks(1, 2) == 1 and chunks(1000, 1) == 16 and chunks(400, 3) == 6 and chunks(64, 1) == 1
    monkeypatch.setattr(pool, "CHUNK_SIZE", 10)
    seen = []
    out = pool.map_batch_chunks(lambda start, stop: (start, stop), 103, threads=3)
    for (start, stop), (next_start, _) in zip(out, out[1:] + [(103, None)]):
        assert stop == next_start and 9 <= stop - start <= 12
        seen.extend(range(start, stop))
    assert seen == list(range(103)) and len(out) == 9
    # One thread: the same chunks, one after the other in the calling thread.
    serial = pool.map_batch_chunks(lambda start, stop: (start, stop, threading.current_thread()), 103, threads=1)
    assert [c[:2] for c in serial] == [(103 * c // 10, 103 * (c + 1) // 10) for c in range(10)]
    assert all(c[2] is threading.current_thread() for c in serial)

    gen = torch.Generator().manual_seed(0)
    full = torch.randn(40, 30, 20, generator=gen, dtype=torch.float64).mT  # column-major (40, 20, 30)
    pieces = [full[0:7], full[7:8], full[8:40]]
    joined = pool.concat_rows(pieces, threads=2)
    assert torch.equal(joined, full) and joined.stride() == full.stride()
    rows = torch.randn(50, 6, generator=gen)
    assert torch.equal(pool.concat_rows([rows[:20], rows[20:]], threads=2), rows)
    shared = rows[:1].expand(5, 6)  # an expanded piece is copied out
    assert torch.equal(pool.concat_rows([rows[:3], shared], threads=2), torch.cat([rows[:3], shared]))


@pytest.mark.parametrize("case", ["strictly_convex", "lp_chunk_first"])
def test_one_thread_runs_the_chunks_in_turn_with_the_serial_answers(case, monkeypatch):
    """At one torch thread a batch of several chunks runs them one after the other in the calling
    thread (no pool), bit for bit as one batch, and leaves torch's thread count alone."""
    monkeypatch.setattr(small, "ENABLED", False)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = CASES[case]()
        _chunking(monkeypatch, False)
        whole_sol, whole_grads = _solve_and_grads(data)
        _chunking(monkeypatch, True)
        threads_seen = []
        original = active_set._solve_batch

        def spy(problem, *args):
            threads_seen.append(threading.current_thread())
            return original(problem, *args)

        monkeypatch.setattr(active_set, "_solve_batch", spy)
        chunked_sol, chunked_grads = _solve_and_grads(data)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert len(threads_seen) == len(pool.chunk_bounds(data["g"].shape[0], 1)) - 1 == 4
    assert all(t is threading.main_thread() for t in threads_seen)
    for name, a, b in zip(whole_sol._fields, whole_sol, chunked_sol):
        assert torch.equal(a, b), name
    for name in whole_grads:
        assert torch.equal(whole_grads[name], chunked_grads[name]), name
