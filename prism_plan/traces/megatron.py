"""Importer for Megatron-Core router traces (`--moe-routing-trace-path`): `router_trace_rank{r}.jsonl`, one record
per step and MoE layer: `{"rank", "step", "layer", "num_tokens", "topk", "top_indices": [[...top_k], ...]}`
(records of the `mtp` block are skipped).

Megatron numbers layers from 1; the model's MoE layers are matched with that offset (or none, when the
numbers fit as they are). A step's records must cover every MoE layer with the same tokens; rank, step and
layer are non-negative JSON integers, a token's ids distinct integers below the model's number of experts. Origin: --origin,
else `rank{r}`; request = step; position = the token's row; phase prefill.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import JsonLine, dump_files, json_ints, json_lines
from prism_plan.traces.trace import Trace, TraceMeta, routing_ids

FIX = "record the trace again with Megatron-Core"


def _record(line: JsonLine, top_k: int) -> tuple[int, int, int, np.ndarray] | None:
    """(rank, step, layer, ids [tokens, top_k] int64) of one decoder record; None for another block's."""
    where, r, _ = line
    need = f"each needs integers rank, step, layer and top_indices with top_k={top_k} ids per token"
    if isinstance(r, dict) and r.get("block", "decoder") != "decoder":
        return None
    if not isinstance(r, dict) or any(k not in r for k in ("rank", "step", "layer", "top_indices")):
        raise PrismError(f"{where}: not a router trace record; {need}")
    rank, step, layer = (integer(r[k], f"{where}: `{k}`", low=0, fix=FIX) for k in ("rank", "step", "layer"))
    if r.get("topk", top_k) != top_k:
        raise PrismError(f"{where}: the record has topk={json.dumps(r['topk'])} but the model has top_k={top_k}; "
                         f"pass the right `model`", parameters=("model",))
    ids = json_ints(r["top_indices"], "top_indices", line)
    if ids.ndim == 1 and ids.size % top_k == 0:  # flattened [tokens * top_k]
        ids = ids.reshape(-1, top_k)
    if ids.ndim != 2 or ids.shape[1] != top_k:
        raise PrismError(f"{where}: top_indices has shape {list(ids.shape)}; {need}")
    if "num_tokens" in r and integer(r["num_tokens"], f"{where}: `num_tokens`", low=0, fix=FIX) != len(ids):
        raise PrismError(f"{where}: {len(ids)} rows of top_indices but num_tokens={r['num_tokens']}; the record is "
                         f"cut short or edited")
    return rank, step, layer, ids


def iter_megatron(src: str | Path, model: ModelSpec, origin: str | None = None) -> Iterator[Trace]:
    """Yield one Trace per (file, step)."""
    meta = TraceMeta.for_model(model, source=f"megatron:{Path(src).name}")
    names: list[str] = []
    for path in dump_files(Path(src), ("router_trace_rank*.jsonl",), "router trace"):
        steps: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)
        for line in json_lines(path, "router trace"):
            record = _record(line, model.top_k)
            if record is None:
                continue
            rank, step, layer, ids = record
            if layer in steps[rank, step]:
                raise PrismError(f"{line.where}: layer {layer} appears twice in step {step} of rank {rank}")
            steps[rank, step][layer] = ids
        for (rank, step), layers in sorted(steps.items()):
            where = f"{path} rank {rank} step {step}"
            offset = _offset(sorted(layers), model, where)
            stacked = [layers[x + offset] for x in model.layers]
            if len({len(x) for x in stacked}) != 1:
                raise PrismError(f"{where}: MoE layers saw different token counts {sorted({len(x) for x in stacked})}")
            ids = routing_ids(np.stack(stacked, axis=1), model.num_experts, where, "pass the right `model`",
                              rows=lambda t: f" token {t}", parameters=("model",))
            name = origin or f"rank{rank}"
            if name not in names:
                names.append(name)
            n = len(ids)
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), np.full(n, step, np.int64),
                        np.arange(n, dtype=np.int32), np.zeros(n, bool), ids)


def _offset(layers: list[int], model: ModelSpec, where: str) -> int:
    """1 when the records number the model's MoE layers from 1, 0 when as the model does."""
    for offset in (1, 0):
        if layers == [x + offset for x in model.layers]:
            return offset
    raise PrismError(f"{where}: records for layers {layers[:6]}{'...' if len(layers) > 6 else ''} do not match "
                     f"model {model.name!r}'s {model.num_layers} MoE layers {list(model.layers)[:6]}...; pass the "
                     f"right `model`", parameters=("model",))
