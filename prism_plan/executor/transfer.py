"""Apply a MigrationPlan to the ranks' ExpertStores over torch.distributed (NCCL on GPUs, gloo on CPUs).

Stage by stage, every rank posts its sends and receives of the stage in one `batch_isend_irecv`: each copy sends
the expert's tensors in key order plus their sha256 digest, from the source rank the plan names. A receiving rank
checks every expert (shapes and dtypes come from the checkpoint's layout, so a wrong size fails the transfer;
the digest must match) before anything changes; only then does it commit the stage: received experts join the
store, the stage's evictions leave it, and a journal on disk records the stage as done (written atomically).
A failed or corrupt transfer raises and leaves the store, and the routing built on it, as they were. Every wait
goes through the Group, so a rank that is lost or stalls ends the stage on every other rank with one line.

Resuming: every rank reads its journal; all ranks restart from the lowest completed stage among them. Replaying
a stage a rank already committed is harmless: its sources were not evicted in that stage (a plan invariant),
copies it already holds are received again, evictions already made are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from prism_plan.errors import PrismError
from prism_plan.executor import require_torch
from prism_plan.executor.group import Group
from prism_plan.executor.store import ExpertStore, tensor_digest
from prism_plan.fileio import write_text_atomic
from prism_plan.placement.checks import is_integer
from prism_plan.placement.migration import MigrationError, MigrationPlan


class TransferError(MigrationError):
    """A transfer that failed or arrived corrupt; the stage was not committed."""


def read_journal(path: Path | None, moves: MigrationPlan) -> int:
    """Stages already committed by this rank for these moves (0 without a journal, or with one for other
    moves); a PrismError for a journal that is not one."""
    if path is None or not path.exists():
        return 0
    fix = "delete it to start the moves from the beginning"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PrismError(f"journal {path} is unreadable ({type(e).__name__}); {fix}")
    if not isinstance(d, dict):
        raise PrismError(f"journal {path} is not a prism-plan journal; {fix}")
    if d.get("moves_sha256") != moves.sha256():
        return 0
    done = d.get("completed_stages")
    if not is_integer(done) or not 0 <= done <= len(moves.stages):
        raise PrismError(f"journal {path}: completed_stages must be a whole number from 0 to {len(moves.stages)}, "
                         f"got {done!r}; {fix}")
    return int(done)


def _write_journal(path: Path | None, moves: MigrationPlan, rank: int, done: int, store: ExpertStore) -> None:
    """Record `done` stages as committed, at once (`now`: not held back by the output transaction, which would
    drop it when the run fails; the journal must outlive such a run)."""
    if path is None:
        return
    write_text_atomic(path, json.dumps({"moves_sha256": moves.sha256(), "from_plan_sha256": moves.from_sha256,
                                        "to_plan_sha256": moves.to_sha256, "rank": rank, "completed_stages": done,
                                        "stages": len(moves.stages), "experts": [list(k) for k in store.experts()]}),
                      now=True)


def apply_moves(store: ExpertStore, moves: MigrationPlan, group: Group, layout, journal: Path | None = None,
                start: int = 0) -> int:
    """Run stages `start`.. of `moves` on this rank (group.rank = server index). layout(layer) -> {key: (shape,
    dtype name)} of one expert's tensors. Returns stages applied."""
    torch = require_torch()
    import torch.distributed as dist

    layers, rank = moves.model.layers, group.rank
    device = store.device
    for k in range(start, len(moves.stages)):
        group.stage = k + 1
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
        group.exchange(ops)
        corrupt = [(key, src) for key, src, buffers, digest in incoming
                   if tensor_digest(buffers) != bytes(digest.cpu().numpy().tobytes())]
        ok = group.all_reduce_min(0 if corrupt else 1)  # commit only when every rank has its whole stage
        if corrupt:
            (layer, e), src = corrupt[0]
            raise TransferError(f"stage {k + 1}: expert {e} of layer {layer} from rank {src} arrived corrupt "
                                f"(checksum mismatch); the stage was not committed, rerun to resume from it")
        if not ok:
            raise TransferError(f"stage {k + 1}: another rank received a corrupt expert; the stage was not "
                                f"committed, rerun to resume from it")
        for key, _, buffers, _ in incoming:
            store.tensors[key] = buffers
        for l, e, s in st.evicts.tolist():
            if s == rank:
                store.tensors.pop((int(layers[l]), int(e)), None)
        _write_journal(journal, moves, rank, k + 1, store)
        group.barrier()
    group.stage = 0
    return len(moves.stages) - start
