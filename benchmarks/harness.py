"""Timing harness: presets, warm-up and repeats, robust statistics, accuracy against a reference.

For one configuration (batch size B, sizes n, p, m, tolerance eps) and one method:
    * the batch is generated once (seeded) and its float64 reference x_ref computed once (untimed);
    * the method is set up (untimed: layer construction, tolerance), then run ``warmup`` times
      (first-call costs: lazy imports, allocator, thread pools), then ``repeats`` times; repeats are
      reduced (to one at least) when they would exceed ``max_seconds_per_point``, and the warm-up is
      skipped for a method whose previous point took over a second per run (it is warm by then);
    * forward-only mode times ``x = forward(params)`` under torch.no_grad();
      forward+backward mode gives every run fresh leaf tensors that require grad, times the forward,
      then times ``(w * x).sum().backward()`` with a fixed random w (B,n): the gradient reaches all
      seven inputs H, g, A, b, C, l, u ("all Jacobians", as in the QPLayer paper's tables);
    * reported: median and quartiles (and min / max) of forward, backward and total (ms per batch),
      max |x - x_ref| over the first ``ref_count`` problems (at most ``ref_max``, fewer when their
      reference solves exceed ``ref_seconds``), and the ratio of each method's median
      time to alqp's in the same configuration (> 1: slower than alqp).
On CUDA, the device is synchronized before each clock read.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from benchmarks.peers import DEFAULT_METHODS, Method, make_method
from benchmarks.problems import QPBatch, box_qp_batch, random_qp_batch, reference_name, reference_solution


@dataclass(frozen=True)
class Config:
    """One benchmark point.

    Attributes:
        batch, n, p, m: batch size and problem sizes.
        eps: the tolerance given to every method.
        sweep: the axis this point belongs to in the plots ('batch', 'n', 'eps' or '' for none).
        rows: 'random' (random rows, :func:`benchmarks.problems.random_qp_batch`) or 'box'
            (-1 <= x <= 1 only, :func:`benchmarks.problems.box_qp_batch`; p must be 0 and m = n).
        two_sided: finite lower bounds on random rows (None: the preset's setting).
        threads: torch threads at this point (None: the run's setting).
    """

    batch: int
    n: int
    p: int
    m: int
    eps: float
    sweep: str = ""
    rows: str = "random"
    two_sided: Optional[bool] = None
    threads: Optional[int] = None

    def label(self) -> str:
        extra = (" box" if self.rows == "box" else "") + (f" threads={self.threads}" if self.threads else "")
        return f"B={self.batch} n={self.n} p={self.p} m={self.m} eps={self.eps:g}{extra}"

    def batch_of_qps(self, seed: int, two_sided: bool) -> QPBatch:
        """The seeded float64 batch of this point (``two_sided``: the preset's default)."""
        if self.rows == "box":
            return box_qp_batch(self.batch, self.n, seed=seed)
        two = two_sided if self.two_sided is None else self.two_sided
        return random_qp_batch(self.batch, self.n, self.p, self.m, seed=seed, two_sided=two)


@dataclass
class Preset:
    """A named list of configurations with its mode and default repeat counts.

    Attributes:
        name: the ``--preset`` value.
        description: one line printed above the table.
        configs: the benchmark points.
        backward: time forward+backward (True) or the forward only (False).
        repeats, warmup: defaults of ``--repeats`` / ``--warmup``.
        two_sided: generate l = C x0 - margin as well (default: one-sided, as in the paper).
        max_seconds: default budget of the timed runs of one method at one point.
        peers: the methods run when ``--peers`` is not given (None: DEFAULT_METHODS).
    """

    name: str
    description: str
    configs: list
    backward: bool
    repeats: int = 5
    warmup: int = 1
    two_sided: bool = False
    max_seconds: float = 30.0
    peers: Optional[tuple] = None


# The methods of the tiny and threads presets (issue 20): the peers a control loop would use, and
# DAQP's own solve, the limit of alqp's active-set forward.
SPEED_PEERS = ("alqp", "proxsuite", "qpth", "daqp-raw")
# Sizes of the paper's random-QP benchmark (QPLayer paper, tables 2 and 4).
_PAPER = dict(n=100, p=50, m=50)
# Default tolerance of the forward/backward/scaling presets: the accuracy a learning task needs, and
# one that SCS (cvxpylayers) still reaches in reasonable time. Override with --eps.
DEFAULT_EPS = 1e-6


def make_preset(name: str, quick: bool = False, eps: Optional[Sequence[float]] = None) -> Preset:
    """The preset called ``name``; ``quick`` shrinks every size so that it runs in seconds (tests).

    Args:
        name: one of :data:`PRESETS`.
        quick: tiny sizes (n <= 10, B <= 4), same structure.
        eps: tolerances replacing the preset's own.

    Returns:
        :class:`Preset`.
    """
    preset = _make_preset(name, quick, eps)
    if quick:  # the description names the full sizes
        preset.description = "QUICK (tiny sizes, smoke test) version of: " + preset.description
    return preset


def _make_preset(name: str, quick: bool, eps: Optional[Sequence[float]]) -> Preset:
    if name == "paper-table2" or name == "paper-table4":
        B = 100 if name == "paper-table2" else 1
        tols = list(eps or (1e-1, 1e-2, 1e-3))
        size = dict(n=10, p=5, m=5) if quick else _PAPER
        B = min(B, 4) if quick else B
        configs = [Config(B, eps=t, sweep="eps", **size) for t in tols]
        table = "2 (batch 100)" if name == "paper-table2" else "4 (batch 1)"
        return Preset(name, f"QPLayer paper table {table}: random QPs n=100, 50 eq, 50 ineq, "
                      "forward tolerances 1e-1/1e-2/1e-3, forward + backward (all Jacobians)",
                      configs, backward=True, repeats=5 if name == "paper-table2" else 10)
    tols = list(eps or (DEFAULT_EPS,))
    if name in ("forward", "backward"):
        if quick:
            sizes = [(1, 10, 5, 5), (4, 10, 5, 5), (3, 6, 2, 6)]
        else:
            sizes = [(1, 100, 50, 50), (100, 100, 50, 50), (1000, 100, 50, 50), (128, 50, 10, 50)]
        configs = [Config(B, n, p, m, t, sweep="batch") for t in tols for (B, n, p, m) in sizes]
        what = "forward only" if name == "forward" else "forward + backward (all Jacobians)"
        return Preset(name, f"random QPs n=100,p=50,m=50 at batch 1/100/1000 and n=50,p=10,m=50 at "
                      f"batch 128, {what}", configs, backward=(name == "backward"), repeats=5)
    if name == "scaling":
        if quick:
            batches, ns, B_n = [1, 2, 4], [4, 8], 2
        else:
            batches, ns, B_n = [1, 4, 16, 64, 256, 1024, 4096], [10, 20, 50, 100, 200, 500], 64
        configs = [Config(B, eps=t, sweep="batch", **_PAPER if not quick else dict(n=8, p=4, m=4))
                   for t in tols for B in batches]
        configs += [Config(B_n, n, n // 2, n // 2, t, sweep="n") for t in tols for n in ns]
        return Preset(name, f"cost curves: batch {batches[0]}..{batches[-1]} at n=100 (p=m=50), "
                      f"n {ns[0]}..{ns[-1]} (p=m=n/2) at batch {B_n}, forward + backward",
                      configs, backward=True, repeats=3, warmup=1, max_seconds=15.0)
    if name == "tiny":
        # The QPs of control loops: a few variables, a few problems per call, one call after another.
        ns, batches = ([2, 5], [1, 3]) if quick else ([2, 5, 10], [1, 5, 8])
        configs = []
        for t in tols:
            for n in ns:
                for B in batches:
                    configs.append(Config(B, n, 0, n, t, sweep="batch", rows="box"))
                    # Mixed rows: equalities and two-sided random inequalities.
                    configs.append(Config(B, n, max(1, n // 4), n, t, sweep="batch", two_sided=True))
        return Preset(name, f"tiny QPs: n in {ns}, batch in {batches}, box-only rows (-1 <= x <= 1) and "
                      "mixed rows (n//4 equalities, n two-sided random rows), forward + backward (all "
                      "Jacobians); peers proxsuite, qpth, daqp-raw (forward only)", configs, backward=True,
                      repeats=30 if not quick else 2, warmup=3 if not quick else 1, max_seconds=10.0,
                      peers=SPEED_PEERS)
    if name == "threads":
        size = dict(n=10, p=5, m=5) if quick else _PAPER
        batches = [4, 8] if quick else [64, 256, 1024]
        configs = [Config(B, eps=t, sweep="batch", threads=k, **size)
                   for t in tols for B in batches for k in (1, 2)]
        return Preset(name, f"1 and 2 torch threads at batch {batches} on the paper's random QPs (n=100, "
                      "50 eq, 50 ineq), forward + backward; peers proxsuite, qpth, daqp-raw (forward only)",
                      configs, backward=True, repeats=5 if not quick else 1, warmup=1, max_seconds=30.0,
                      peers=SPEED_PEERS)
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")



PRESETS = ("paper-table2", "paper-table4", "scaling", "forward", "backward", "tiny", "threads")


def _stats(values_ms: list) -> Optional[dict]:
    """Median, quartiles, min and max of a list of times (ms); None for an empty list."""
    if not values_ms:
        return None
    t = torch.tensor(values_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]),
            "min": float(t.min()), "max": float(t.max()), "runs": [round(v, 4) for v in values_ms]}


@dataclass
class RunOptions:
    """Options shared by every configuration of a run (see ``alqp --help``)."""

    device: str = "cpu"
    dtype: str = "float64"
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    threads: Optional[int] = None
    seed: int = 0
    # Accuracy is measured on the first min(B, ref_max) problems, fewer if their reference solves
    # exceed ref_seconds (dense solves cost ~n^3 each); the count is stored as 'ref_count'.
    ref_max: int = 256
    ref_seconds: float = 20.0
    # A method whose first timed run shows that its repeats would take longer than this gets fewer
    # repeats (at least one): it keeps slow peers from dominating the wall-clock of a preset.
    # None: the preset's own budget.
    max_seconds_per_point: Optional[float] = None
    cvxpylayers_max_batch: int = 128
    cvxpylayers_max_n: int = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(method: Method, qp: QPBatch, eps: float, backward: bool, repeats: int, warmup: int,
                threads: int, max_seconds: float = math.inf) -> dict:
    """Time one method on one batch.

    Args:
        method: the adapter.
        qp: the batch, already on the benchmark's device and dtype.
        eps: tolerance passed to the method.
        backward: time forward + backward (True) or forward only.
        repeats, warmup: numbers of timed and untimed runs.
        threads: thread count handed to methods that run their own pools.
        max_seconds: budget of the timed runs; repeats are reduced to fit it (at least one run).

    Returns:
        dict with 'forward', 'backward', 'total' statistics in ms (see :func:`_stats`; 'backward' is
        None in forward mode, where 'total' equals 'forward'), 'x' (B,n) float64 CPU of the last run,
        'repeats' (timed runs actually made) and 'info' (the method's facts about its last forward).
    """
    device = qp.H.device
    method.setup(qp, eps, backward, threads)
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(qp.batch_size, qp.n, generator=gen, dtype=torch.float64).to(device, qp.H.dtype)
    fwd, bwd = [], []
    x = None

    def one_run() -> tuple[float, float]:
        nonlocal x
        if backward:
            params = tuple(t.detach().clone().requires_grad_(True) for t in qp.tensors())
            _sync(device)
            t0 = time.perf_counter()
            x = method.forward(params)
            _sync(device)
            t1 = time.perf_counter()
            (w * x).sum().backward()
            _sync(device)
            t2 = time.perf_counter()
            if params[0].grad is None:
                raise RuntimeError(f"{method.name}: no gradient reached H")
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3
        params = qp.tensors()
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            x = method.forward(params)
            _sync(device)
            t1 = time.perf_counter()
        return (t1 - t0) * 1e3, 0.0

    for _ in range(warmup):
        one_run()
    done = 0
    start = time.perf_counter()
    while done < repeats:
        f, b = one_run()
        fwd.append(f)
        bwd.append(b)
        done += 1
        per_run = (time.perf_counter() - start) / done
        if done < repeats and per_run * repeats > max_seconds:
            repeats = max(done, int(max_seconds / per_run))
    total = [f + b for f, b in zip(fwd, bwd)]
    return {
        "forward": _stats(fwd),
        "backward": _stats(bwd) if backward else None,
        "total": _stats(total),
        "x": x.detach().to("cpu", torch.float64),
        "repeats": done,
        "info": method.last_info(),
    }


def _reference_name_or_none() -> Optional[str]:
    try:
        return reference_name()
    except ImportError:
        return None


# Allocator settings under which large temporaries are cheap. By default a tensor of 2 MB or more
# (a (100, 100, 100) float64 batch is 8 MB, at batch 1024 80 MB) comes fresh from mmap in 4 KB
# pages and is unmapped when freed, so every such temporary page-faults anew: on the 2-core
# benchmark machine allocating and filling 80 MB took 50 ms in 4 KB pages and 10 ms in huge pages,
# and alqp spent 10-30% of its time there. THP_MEM_ALLOC_ENABLE makes torch
# ask for transparent huge pages; the MALLOC_* variables make glibc keep freed blocks of up to 32
# MiB in the process. torch and glibc read them when they start, so they must be in the
# environment before Python starts: see rerun_with_tuned_allocator().
ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": "33554432",
                 "MALLOC_TRIM_THRESHOLD_": "1073741824"}
# How results name a run made under ALLOCATOR_ENV.
ALLOCATOR_TUNED_LABEL = "huge pages, freed memory kept (ALLOCATOR_ENV)"


def allocator_tuned() -> bool:
    """Whether this process started with :data:`ALLOCATOR_ENV` in its environment."""
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


def rerun_with_tuned_allocator() -> None:
    """Replace this process by the same command line with :data:`ALLOCATOR_ENV` set.

    For command-line entry points only (it re-runs ``sys.executable`` on ``sys.argv``). Returns
    without doing anything where the settings are already in effect, off Linux, or when Python
    was not started on a script or module. Every method of a run then shares the same settings.
    """
    if allocator_tuned() or not sys.platform.startswith("linux") or not sys.argv or sys.argv[0] in ("", "-c"):
        return
    # A module run (python -m benchmarks) must be re-run as a module: run as a file, its package
    # imports would not resolve.
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    command = (["-m", main_spec.name.removesuffix(".__main__"), *sys.argv[1:]] if main_spec is not None
               else list(sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *command], {**os.environ, **ALLOCATOR_ENV})


def environment(options: RunOptions, threads: int) -> dict:
    """Facts about the machine and the versions, stored with every JSON result."""
    versions = {"torch": torch.__version__}
    for module in ("alqp", "proxsuite", "qpth", "cvxpy", "cvxpylayers", "diffcp", "scs", "clarabel",
                   "numpy"):
        try:
            mod = __import__(module)
            versions[module] = getattr(mod, "__version__", "?")
        except Exception:
            versions[module] = None
    env = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": options.device,
        "dtype": options.dtype,
        "reference": _reference_name_or_none(),
        "allocator": ALLOCATOR_TUNED_LABEL if allocator_tuned() else "default",
        "versions": versions,
    }
    if options.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run_preset(preset: Preset, methods: Sequence[str] = DEFAULT_METHODS, options: Optional[RunOptions] = None,
               log: Callable[[str], None] = print, extra_methods: Sequence[Method] = ()) -> dict:
    """Run every method on every configuration of a preset.

    Args:
        preset: from :func:`make_preset`.
        methods: names of the methods (see :data:`benchmarks.peers.ALL_METHODS`).
        options: :class:`RunOptions`.
        log: where progress lines and skip reasons go.
        extra_methods: additional :class:`Method` instances (tests inject fakes here).

    Returns:
        A JSON-ready dict: 'preset', 'description', 'mode', 'environment', 'tolerances' (how each
        method received eps), 'notes', 'skipped' (method -> reason, for methods that never ran) and
        'records' (one per configuration and method; see :func:`benchmarks.report.format_table`).
    """
    options = options or RunOptions()
    threads = options.threads or os.cpu_count() or 1
    # One thread count for every method: torch (alqp, qpth, cvxpylayers' glue) uses it, diffcp gets
    # it as n_jobs; ProxSuite fixes its own OpenMP count (see its adapter's note). The caller's
    # setting is restored afterwards.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(preset, methods, options, log, extra_methods, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run(preset, methods, options, log, extra_methods, threads) -> dict:
    device = torch.device(options.device)
    dtype = getattr(torch, options.dtype)
    repeats = options.repeats if options.repeats is not None else preset.repeats
    warmup = options.warmup if options.warmup is not None else preset.warmup
    max_seconds = (options.max_seconds_per_point if options.max_seconds_per_point is not None
                   else preset.max_seconds)

    instances = [make_method(name, options.cvxpylayers_max_batch, options.cvxpylayers_max_n)
                 for name in methods] + list(extra_methods)
    skipped, active = {}, []
    for method in instances:
        if method.backward_only and not preset.backward:
            log(f"skip {method.name}: same forward as alqp (it differs in the backward only)")
            skipped[method.name] = "forward-only preset: same forward as alqp"
            continue
        reason = method.unavailable()
        if reason:
            log(f"skip {method.name}: {reason}")
            skipped[method.name] = reason
            continue
        active.append(method)

    result = {
        "preset": preset.name,
        "description": preset.description,
        "mode": "forward+backward" if preset.backward else "forward",
        "repeats": repeats,
        "warmup": warmup,
        "ref_max": options.ref_max,
        "max_seconds_per_point": max_seconds,
        "environment": environment(options, threads),
        "tolerances": {m.name: m.tolerance for m in instances},
        "skipped": skipped,
        "notes": [],
        "records": [],
    }
    ref_cache: dict = {}
    # Median run time (ms) of each method at its previous point. A method that has already run in
    # this process is past its first-call costs (imports, thread pools: milliseconds); once its runs
    # take over a second, warm-up runs would only double the wall-clock of the large points.
    last_ms: dict = {}
    for cfg in preset.configs:
        qp64 = cfg.batch_of_qps(options.seed, preset.two_sided)
        key = (cfg.batch, cfg.n, cfg.p, cfg.m, cfg.rows, cfg.two_sided)
        point_threads = cfg.threads or threads
        torch.set_num_threads(point_threads)
        if key not in ref_cache:
            t0 = time.perf_counter()
            ref_cache[key] = reference_solution(qp64.head(min(cfg.batch, options.ref_max)),
                                                max_seconds=options.ref_seconds)
            log(f"[{cfg.label()}] reference x_ref ({reference_name()} active set + KKT polish, "
                f"{ref_cache[key].shape[0]} problems): {time.perf_counter() - t0:.1f} s")
        x_ref = ref_cache[key]
        k = x_ref.shape[0]
        qp = qp64.to(device=device, dtype=dtype)
        point_records = []
        for method in active:
            record = {"config": asdict(cfg), "method": method.name, "status": "ok", "reason": "",
                      "forward": None, "backward": None, "total": None, "err_x": None,
                      "ratio_vs_alqp": None, "ref_count": k, "repeats": 0, "info": {}, "notes": []}
            reason = method.inapplicable(qp, preset.backward)
            if reason:
                record.update(status="skipped", reason=reason)
                log(f"[{cfg.label()}] skip {method.name}: {reason}")
            else:
                try:
                    skip_warmup = last_ms.get(method.name, 0.0) > 1000.0
                    # (A forward-only method, e.g. a raw solver, is timed on its forward in every mode.)
                    timing = time_method(method, qp, cfg.eps, preset.backward and not method.forward_only,
                                         repeats, 0 if skip_warmup else warmup, point_threads, max_seconds)
                except Exception as exc:  # a failing peer must not stop the whole benchmark
                    record.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
                    log(f"[{cfg.label()}] {method.name} failed: {record['reason']}")
                else:
                    x = timing.pop("x")
                    record.update(timing)
                    record["err_x"] = float((x[:k] - x_ref).abs().max()) if k and cfg.n else 0.0
                    record["notes"] = list(method.notes)
                    record["warmup"] = 0 if skip_warmup else warmup
                    ms = last_ms[method.name] = record["total"]["median"]
                    log(f"[{cfg.label()}] {method.name}: {ms:.2f} ms, max|x-x_ref| {record['err_x']:.1e}")
            point_records.append(record)
        # Ratio to alqp: the total in forward+backward mode, the forward in forward mode; a
        # forward-only method (daqp-raw) against alqp's forward.
        base = next((r for r in point_records if r["method"] == "alqp" and r["status"] == "ok"), None)
        for r in point_records:
            if base is not None and r["status"] == "ok":
                forward_only = r["backward"] is None and base["backward"] is not None
                ref = base["forward" if forward_only else "total"]["median"]
                r["ratio_vs_alqp"] = r["total"]["median"] / max(ref, 1e-12)
                r["ratio_basis"] = "alqp forward" if forward_only else "alqp total"
        result["records"].extend(point_records)
    # The notes of each method's last point (thread counts, conversions), once per method.
    result["notes"] = [f"{m.name}: " + "; ".join(m.notes) for m in active if m.notes]
    return result
