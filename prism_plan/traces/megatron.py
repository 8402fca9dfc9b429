"""Importer for Megatron-Core router traces (`--moe-routing-trace-path`): `router_trace_rank{r}.jsonl`, one record
per step and MoE layer: `{"rank", "step", "layer", "num_tokens", "topk", "top_indices": [[...top_k], ...]}`
(records of the `mtp` block are skipped).

Megatron numbers layers from 1; the model's MoE layers are matched with that offset (or none, when the
numbers fit as they are). A step's records must cover every MoE layer with the same tokens. Origin: --origin,
else `rank{r}`; request = step; position = the token's row; phase prefill.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import dump_files, json_lines
from prism_plan.traces.trace import Trace, TraceMeta


def iter_megatron(src: str | Path, model: ModelSpec, origin: str | None = None) -> Iterator[Trace]:
    """Yield one Trace per (file, step)."""
    meta = TraceMeta.for_model(model, source=f"megatron:{Path(src).name}")
    names: list[str] = []
    for path in dump_files(Path(src), ("router_trace_rank*.jsonl",), "router trace"):
        steps: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)
        for where, r in json_lines(path, "router trace"):
            try:
                if r.get("block", "decoder") != "decoder":
                    continue
                key, layer = (int(r["rank"]), int(r["step"])), int(r["layer"])
                ids = np.asarray(r["top_indices"], dtype=np.int64).reshape(-1, model.top_k) \
                    if r["top_indices"] else np.zeros((0, model.top_k), np.int64)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise PrismError(f"{where}: not a router trace record ({type(e).__name__}: {e}); each needs "
                                 f"rank, step, layer and top_indices with top_k={model.top_k} ids per token")
            if len(ids) != int(r.get("num_tokens", len(ids))):
                raise PrismError(f"{where}: {len(ids)} rows of top_indices but num_tokens={r['num_tokens']}")
            if layer in steps[key]:
                raise PrismError(f"{where}: layer {layer} appears twice in step {key[1]} of rank {key[0]}")
            steps[key][layer] = ids
        for (rank, step), layers in sorted(steps.items()):
            where = f"{path} rank {rank} step {step}"
            offset = _offset(sorted(layers), model, where)
            stacked = [layers[x + offset] for x in model.layers]
            if len({len(x) for x in stacked}) != 1:
                raise PrismError(f"{where}: MoE layers saw different token counts {sorted({len(x) for x in stacked})}")
            ids = np.stack(stacked, axis=1)
            if len(ids) and (ids.min() < 0 or ids.max() >= model.num_experts):
                raise PrismError(f"{where}: expert id outside 0..{model.num_experts - 1}")
            name = origin or f"rank{rank}"
            if name not in names:
                names.append(name)
            n = len(ids)
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), np.full(n, step, np.int64),
                        np.arange(n, dtype=np.int32), np.zeros(n, bool), ids.astype(np.int16))


def _offset(layers: list[int], model: ModelSpec, where: str) -> int:
    """1 when the records number the model's MoE layers from 1, 0 when as the model does."""
    for offset in (1, 0):
        if layers == [x + offset for x in model.layers]:
            return offset
    raise PrismError(f"{where}: records for layers {layers[:6]}{'...' if len(layers) > 6 else ''} do not match "
                     f"model {model.name!r}'s {model.num_layers} MoE layers {list(model.layers)[:6]}...; pass the "
                     f"right `model`", parameters=("model",))
