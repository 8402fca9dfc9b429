"""Running the executor on ranks: process-group setup and `prism-plan apply`'s work on one rank."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from prism_plan.errors import PrismError
from prism_plan.executor import require_torch
from prism_plan.executor.store import ExpertStore, expert_list, index_checkpoint, synthetic_layout
from prism_plan.executor.transfer import apply_moves, placement_before, resume_stage
from prism_plan.fileio import loaded
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.migration import MigrationPlan, verify_migration
from prism_plan.placement.plan import Plan


def init_distributed(timeout_s: float = 300.0, init_method: str | None = None, rank: int | None = None,
                     world: int | None = None) -> tuple[int, int, str]:
    """Join the default process group: NCCL when CUDA is there, else gloo. Without arguments, from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Returns (rank, world size, device)."""
    torch = require_torch()
    import torch.distributed as dist

    if rank is None and "RANK" not in os.environ:
        raise PrismError("apply runs one process per server: start it with torchrun, e.g. "
                         "`torchrun --nproc-per-node 2 -m prism_plan.cli apply ...`")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    kwargs = {"timeout": timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world)
    dist.init_process_group(backend, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    return rank, world, device


def apply_on_rank(plan: Plan, cluster, rank: int, world: int, device: str = "cpu",
                  moves: MigrationPlan | None = None, checkpoint: str | Path | None = None,
                  journal_dir: str | Path | None = None) -> tuple[ExpertStore, dict]:
    """This rank's part of `prism-plan apply`: load the experts it starts with (the moves' starting placement,
    else the plan's), run the moves, and return (store, summary line)."""
    if world != len(plan.servers):
        raise PrismError(f"the plan has {len(plan.servers)} servers but {world} processes run; start one per server "
                         f"(torchrun --nproc-per-node {len(plan.servers)})")
    plan.check_cluster(cluster)
    layers = plan.model.layers
    start, first, journal = plan.hosted, 0, None
    if moves is not None:
        if moves.to_sha256 and moves.to_sha256 != plan.sha256():
            raise PrismError("the moves lead to a different plan than `plan`; pass the plan `migrate` wrote with them",
                             parameters=("plan",))
        start = placement_before(moves, plan.hosted)
        verify_migration(moves, start, plan.hosted, cluster)
        if journal_dir is not None:
            journal = Path(journal_dir) / f"journal-rank{rank}.json"
            journal.parent.mkdir(parents=True, exist_ok=True)
        first = resume_stage(journal, moves)
        start = moves.apply(start, first)  # on a resume, where the experts stand after the stages already done
    wanted = expert_list(start, rank, layers)
    store = ExpertStore(device)
    if checkpoint is not None:
        index = index_checkpoint(checkpoint, plan.model)
        store.load(index, wanted)
        layout = index.layout
    else:
        store.fill_synthetic(plan.model, wanted)
        layout = lambda layer: synthetic_layout(plan.model)  # noqa: E731
    if moves is not None:
        apply_moves(store, moves, rank, layout, journal, first)
    if store.experts() != expert_list(plan.hosted, rank, layers):
        raise PrismError(f"rank {rank} ended with experts that differ from the plan's")
    return store, {"rank": rank, "server": plan.servers[rank], "experts": [list(k) for k in store.experts()],
                   "sha256": store.sha256()}


def apply_plan(plan: Plan | str | Path, cluster, *, moves: MigrationPlan | str | Path | None = None,
               checkpoint: str | Path | None = None, journal_dir: str | Path | None = "prism-journal",
               timeout_s: float = 300.0) -> dict:
    """`prism-plan apply` on this rank, under torchrun: join the process group, load this rank's experts, run
    the moves, leave the group; returns this rank's summary (rank, server, experts, sha256)."""
    plan, cluster, moves = loaded(plan, Plan), loaded(cluster, ClusterSpec), loaded(moves, MigrationPlan)
    rank, world, device = init_distributed(timeout_s)
    import torch.distributed as dist

    try:
        return apply_on_rank(plan, cluster, rank, world, device, moves, checkpoint, journal_dir)[1]
    finally:
        dist.destroy_process_group()
