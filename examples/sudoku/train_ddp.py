"""The Sudoku LP layer trained with DistributedDataParallel: one process, or several under torchrun.

    python examples/sudoku/train_ddp.py                              # one process
    torchrun --nproc_per_node 2 examples/sudoku/train_ddp.py         # two processes (gloo)

Every rank draws the same batch order and trains on its share of each batch (batch / world size
puzzles); the loss of a rank is the mean over its share, so DDP's average of the gradients is the
gradient of the mean over the whole batch, as in one process. Each rank takes its share of the
cores (alqp.set_per_process_threads). Rank 0 prints one line per epoch (its own shard's train
loss, the test board errors, the epoch's seconds) and writes <out>/sudoku-ddp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import alqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import SudokuData, load_or_generate, sudoku_constraints  # noqa: E402
from models import build_model  # noqa: E402
from train import batch_loss, evaluate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=2, help="box size n: 2 for 4x4 boards")
    p.add_argument("--train", type=int, default=9000, help="training puzzles")
    p.add_argument("--test", type=int, default=1000, help="test puzzles")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=150, help="global batch (split over the ranks)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--shift-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/sudoku-ddp")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    threads = alqp.set_per_process_threads(local_processes=world if distributed else 1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} processes")

    data = load_or_generate(args.train + args.test, args.box, args.seed)
    train = SudokuData(data.puzzles[:args.train], data.solutions[:args.train])
    test = SudokuData(data.puzzles[args.train:], data.solutions[args.train:])
    settings = alqp.Settings(eps_abs=1e-6, mu_min=1e-5, rho=1e-4, max_iter=200)
    model = build_model("lp", args.box, settings=settings, seed=args.seed)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    rules = sudoku_constraints(args.box)
    order_gen = torch.Generator().manual_seed(args.seed)
    share = args.batch // world
    history = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(args.train, generator=order_gen)  # the same on every rank
        losses = []
        for i in range(0, args.train - args.batch + 1, args.batch):
            idx = order[i + rank * share:i + (rank + 1) * share]
            optimizer.zero_grad()
            loss = batch_loss("lp", net(train.puzzles[idx]), train.solutions[idx], args.shift_weight)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        if rank == 0:
            metrics = evaluate(model, test, args.box, 200, rules)
            row = dict(epoch=epoch, train_loss=sum(losses) / len(losses), test_errors=metrics["errors"],
                       seconds=seconds)
            history.append(row)
            print(f"epoch {epoch}: train loss {row['train_loss']:.3e}  test errors {row['test_errors']}/{args.test}  "
                  f"{seconds:.1f} s  ({world} process(es), {threads} thread(s) each)", flush=True)
    result = dict(world=world, threads=threads, config=vars(args), history=history)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sudoku-ddp.json"), "w") as f:
            json.dump(result, f, indent=1)
    if distributed:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
