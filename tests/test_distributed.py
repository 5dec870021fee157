"""Training through a QPLayer on two processes (issue 21): DistributedDataParallel over gloo,
started by torch.multiprocessing.spawn.

The model has a QP input shared by the batch (H = L L' + I/10 from a learned L, the learned
inequality rows C) and per-sample ones (g from a linear map of the sample, the right-hand side b of
sum(x) = b). Some samples ask sum(x) = b beyond what 0 <= x <= 1 allows, so their QPs are infeasible
and the closest-feasible path runs. Each rank takes half of the batch.

The convention checked: the loss of a rank is the mean over its own samples, and DDP averages the
gradients over the ranks, so with equal shards the result equals one process's gradient of the mean
over the whole batch. (A sum over samples would need the ranks' gradients summed instead: DDP
divides by the world size.) The gradients of the shared inputs reach the parameters as sums over
their samples inside the layer, and DDP all-reduces them like any other parameter's.
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

import alqp

WORLD = 2
BATCH = 8  # 4 per rank
N, M = 4, 2
STEPS = 3


class Net(torch.nn.Module):
    """A QP layer with shared (H, C) and per-sample (g, b) inputs."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.L = torch.nn.Parameter(torch.randn(N, N, generator=gen, dtype=torch.float64) / 2)
        self.C = torch.nn.Parameter(torch.randn(M, N, generator=gen, dtype=torch.float64))
        self.to_g = torch.nn.Linear(3, N, dtype=torch.float64)
        with torch.no_grad():
            self.to_g.weight.copy_(torch.randn(N, 3, generator=gen, dtype=torch.float64))
            self.to_g.bias.zero_()
        self.qp = alqp.QPLayer(settings=alqp.Settings(eps_rel=1e-11))

    def forward(self, features, b):
        B = features.shape[0]
        H = self.L @ self.L.T + 0.1 * torch.eye(N, dtype=torch.float64)
        A = torch.ones(1, N, dtype=torch.float64)
        # Bounds 0 <= x <= 1 as rows of C, plus the learned rows between -2 and 2.
        C = torch.cat([torch.eye(N, dtype=torch.float64), self.C])
        l = torch.cat([torch.zeros(N, dtype=torch.float64), torch.full((M,), -2.0, dtype=torch.float64)])
        u = torch.cat([torch.ones(N, dtype=torch.float64), torch.full((M,), 2.0, dtype=torch.float64)])
        return self.qp(H, self.to_g(features), A, b.view(B, 1), C, l, u)


def data():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
    # sum(x) = b with 0 <= x <= 1: b > N is infeasible (samples 1 and 6).
    b = torch.tensor([1.0, 5.5, 2.0, 0.5, 3.0, 1.5, 6.0, 2.5], dtype=torch.float64)
    target = torch.rand(BATCH, N, generator=gen, dtype=torch.float64)
    return features, b, target


def loss_of(sol, target):
    """Per-sample loss on x and on the closest-feasible shift, then the mean."""
    return ((sol.x - target).square().sum(-1) + sol.s_eq.square().sum(-1) + sol.s_in.square().sum(-1)).mean()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    threads = alqp.set_per_process_threads(local_processes=WORLD)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(Net())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        features, b, target = data()
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        record = dict(threads=threads)
        for step in range(STEPS):
            optimizer.zero_grad()
            sol = model(features[mine], b[mine])
            loss_of(sol, target[mine]).backward()
            if step == 0:
                record["grads"] = {k: p.grad.clone() for k, p in model.module.named_parameters()}
                record["status"] = sol.status.tolist()
            optimizer.step()
        record["params"] = {k: p.detach().clone() for k, p in model.module.named_parameters()}
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_two_process_ddp_matches_one_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # The ranks hold identical parameters after every step (compared bitwise at the end).
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # The closest-feasible path ran: samples 1 and 6 are infeasible.
    statuses = ranks[0]["status"] + ranks[1]["status"]
    assert statuses[1] == alqp.Status.CLOSEST_FEASIBLE and statuses[6] == alqp.Status.CLOSEST_FEASIBLE, statuses
    assert all(alqp.settings.has_solution(torch.tensor(statuses)))
    # The thread policy: each of the two processes takes half of the cores (at least one).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert all(r["threads"] == max(1, cores // WORLD) for r in ranks)

    # The first step's gradients equal one process's gradient of the mean loss over the whole batch.
    model = Net()
    features, b, target = data()
    loss_of(model(features, b), target).backward()
    for name, p in model.named_parameters():
        for r in range(WORLD):
            assert torch.allclose(ranks[r]["grads"][name], p.grad, rtol=1e-8, atol=1e-10), (name, r)
    # Not all zero: the check has something to compare.
    assert any(p.grad.abs().max() > 1e-3 for p in model.parameters())


def test_set_per_process_threads_reads_torchrun(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert alqp.set_per_process_threads(cores=8) == 2 == torch.get_num_threads()
        assert alqp.set_per_process_threads(cores=2) == 1
        assert alqp.set_per_process_threads(local_processes=1, cores=3) == 3
        with pytest.raises(ValueError, match="local_processes"):
            alqp.set_per_process_threads(local_processes=0)
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
