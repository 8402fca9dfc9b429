"""Apply a MigrationPlan to the ranks' ExpertStores over torch.distributed (NCCL on GPUs, gloo on CPUs).

Stage by stage, every rank posts its sends and receives of the stage in one `batch_isend_irecv`: each copy sends
the expert's tensors in key order plus their sha256 digest, from the source rank the plan names. A receiving rank
checks every expert (shapes and dtypes come from the checkpoint's layout, so a wrong size fails the transfer;
the digest must match) before anything changes; only then does it commit the stage: received experts join the
store, the stage's evictions leave it, and a journal on disk records the stage as done (written atomically).
A failed or corrupt transfer raises and leaves the store, and the routing built on it, as they were.

Resuming: every rank reads its journal; all ranks restart from the lowest completed stage among them. Replaying
a stage a rank already committed is harmless: its sources were not evicted in that stage (a plan invariant),
copies it already holds are received again, evictions already made are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.executor import require_torch
from prism_plan.executor.store import ExpertStore, tensor_digest
from prism_plan.fileio import write_text_atomic
from prism_plan.placement.migration import MigrationError, MigrationPlan


class TransferError(MigrationError):
    """A transfer that failed or arrived corrupt; the stage was not committed."""


def placement_before(moves: MigrationPlan, after: np.ndarray) -> np.ndarray:
    """The placement the moves start from, given where they end ([servers, layers, experts] bool): the stages
    undone in reverse (each expert a stage copies was absent before it, each it evicts was present)."""
    out = after.copy()
    for st in reversed(moves.stages):
        out[st.copies[:, 3], st.copies[:, 0], st.copies[:, 1]] = False
        out[st.evicts[:, 2], st.evicts[:, 0], st.evicts[:, 1]] = True
    return out


def read_journal(path: Path | None, moves: MigrationPlan) -> int:
    """Stages already committed by this rank for these moves (0 without a journal, or one for other moves)."""
    if path is None or not path.exists():
        return 0
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        raise PrismError(f"journal {path} is unreadable; delete it to start the moves from the beginning")
    if d.get("from_plan_sha256") != moves.from_sha256 or d.get("to_plan_sha256") != moves.to_sha256:
        return 0
    return int(d.get("completed_stages", 0))


def _write_journal(path: Path | None, moves: MigrationPlan, rank: int, done: int, store: ExpertStore) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps({"from_plan_sha256": moves.from_sha256, "to_plan_sha256": moves.to_sha256,
                                            "rank": rank, "completed_stages": done, "stages": len(moves.stages),
                                            "experts": [list(k) for k in store.experts()]}))


def resume_stage(journal: Path | None, moves: MigrationPlan) -> int:
    """The stage all ranks restart from: the lowest count of committed stages among their journals."""
    torch = require_torch()
    import torch.distributed as dist

    done = torch.tensor([read_journal(journal, moves)], dtype=torch.int64)
    dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return int(done.item())


def apply_moves(store: ExpertStore, moves: MigrationPlan, rank: int, layout, journal: Path | None = None,
                start: int = 0) -> int:
    """Run stages `start`.. of `moves` on this rank (a process in the default process group, rank = server
    index). layout(layer) -> {key: (shape, dtype name)} of one expert's tensors. Returns stages applied."""
    torch = require_torch()
    import torch.distributed as dist

    layers = moves.model.layers
    device = store.device
    for k in range(start, len(moves.stages)):
        st = moves.stages[k]
        ops, incoming = [], []
        sent: dict[tuple[int, int], int] = {}  # messages so far per (src, dst): their tags, in the same order on both

        def tag(src: int, dst: int) -> int:
            sent[(src, dst)] = sent.get((src, dst), -1) + 1
            return sent[(src, dst)]

        for l, e, src, dst in st.copies.tolist():
            key = (int(layers[l]), int(e))
            if rank not in (src, dst):
                continue
            names = sorted(layout(key[0]))
            if src == rank:
                if key not in store.tensors:
                    raise TransferError(f"stage {k + 1}: rank {rank} must send expert {e} of layer {key[0]} but does "
                                        f"not hold it; its store does not match the moves' starting placement")
                tensors = store.tensors[key]
                digest = torch.frombuffer(bytearray(tensor_digest(tensors)), dtype=torch.uint8).to(device)
                for t in [tensors[name].contiguous() for name in names] + [digest]:
                    ops.append(dist.P2POp(dist.isend, t, dst, tag=tag(src, dst)))
            else:
                buffers = {name: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                           for name, (shape, dtype) in layout(key[0]).items()}
                digest = torch.empty(32, dtype=torch.uint8, device=device)
                for t in [buffers[name] for name in names] + [digest]:
                    ops.append(dist.P2POp(dist.irecv, t, src, tag=tag(src, dst)))
                incoming.append((key, src, buffers, digest))
        try:
            for req in dist.batch_isend_irecv(ops) if ops else []:
                req.wait()
        except RuntimeError as e:
            raise TransferError(f"stage {k + 1}: a transfer failed ({str(e).splitlines()[0]}); the stage was not "
                                f"committed, rerun to resume from it")
        corrupt = [(key, src) for key, src, buffers, digest in incoming
                   if tensor_digest(buffers) != bytes(digest.cpu().numpy().tobytes())]
        ok = torch.tensor([0 if corrupt else 1], dtype=torch.int64, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # commit only when every rank has its whole stage
        if corrupt:
            (layer, e), src = corrupt[0]
            raise TransferError(f"stage {k + 1}: expert {e} of layer {layer} from rank {src} arrived corrupt "
                                f"(checksum mismatch); the stage was not committed, rerun to resume from it")
        if not ok.item():
            raise TransferError(f"stage {k + 1}: another rank received a corrupt expert; the stage was not "
                                f"committed, rerun to resume from it")
        for key, _, buffers, _ in incoming:
            store.tensors[key] = buffers
        for l, e, s in st.evicts.tolist():
            if s == rank:
                store.tensors.pop((int(layers[l]), int(e)), None)
        _write_journal(journal, moves, rank, k + 1, store)
        dist.barrier()
    return len(moves.stages) - start
