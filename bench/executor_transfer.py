"""Executor transfer speed: experts moved by `apply_moves` between ranks over torch.distributed (gloo on CPU, NCCL
when CUDA is there), with checksums and stage commits, against the bytes moved.

One MoE layer of DeepSeek-V2-Lite (64 experts of 16.5 MiB, bf16, deterministic random weights) on two ranks:
rank 0 holds N experts and copies them all to rank 1 in one stage. Prints seconds and GB/s for a few N.
Run: python bench/executor_transfer.py [--experts 8 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

from prism_plan.executor.group import init_distributed
from prism_plan.executor.store import ExpertStore, expert_list, synthetic_layout
from prism_plan.executor.transfer import apply_moves
from prism_plan.placement.cluster import GIB, parse_cluster
from prism_plan.placement.migration import plan_migration
from prism_plan.placement.model import resolve_model


def _worker(rank, world, init, n, out):
    group = init_distributed(600.0, init, rank, world)
    full = resolve_model("deepseek-v2-lite")
    model = replace(full, layers=(1,), expert_bytes=int(full.layer_bytes[0]))  # one MoE layer of 64 experts
    old = np.zeros((2, model.num_layers, model.num_experts), bool)
    old[0, 0, :n] = True
    old[1] = ~old[0]
    new = old.copy()
    new[1, 0, :n] = True  # rank 1 gets a copy of each
    c = parse_cluster({"defaults": {"bandwidth_gbps": 100.0, "latency_ms": 0.0},
                       "server": [{"name": f"r{i}", "memory_gib": model.routed_bytes / GIB} for i in range(2)]})
    moves = plan_migration(old, new, c, model)
    store = ExpertStore().fill_synthetic(model, expert_list(old, rank, model.layers))
    group.barrier()
    start = time.perf_counter()
    apply_moves(store, moves, group, lambda layer: synthetic_layout(model))
    seconds = time.perf_counter() - start
    if rank == 1:
        Path(out).write_text(f"{moves.bytes} {seconds}")
    group.barrier()
    group.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    print(f"{'experts':>8s} {'MiB':>8s} {'seconds':>8s} {'GB/s':>7s}   (gloo on CPU, 2 ranks, checksums included)")
    for n in args.experts:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result"
            mp.spawn(_worker, args=(2, f"file://{tmp}/init", n, str(out)), nprocs=2, join=True)
            moved, seconds = out.read_text().split()
        print(f"{n:8d} {int(moved) / 2**20:8.1f} {float(seconds):8.3f} {int(moved) / float(seconds) / 1e9:7.2f}")


if __name__ == "__main__":
    main()
