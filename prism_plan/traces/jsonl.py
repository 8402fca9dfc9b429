"""Importer for the generic JSONL trace: one JSON object per token.

`{"origin": "law", "request": 17, "position": 0, "phase": "prefill", "layers": [1, 2, ...],
  "experts": [[3, 9, ...], ...], "weights": [[0.2, ...], ...]}`
`experts` holds one top-k list per MoE layer in the order of `layers`; `layers` may be left out (the model's
MoE layers are assumed); `phase` defaults to prefill; `weights` is optional and mirrors `experts`;
`position` defaults to the token's index among the earlier rows of its (origin, request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import json_lines
from prism_plan.traces.trace import PHASES, Trace, TraceMeta


def _parse_row(d: object, model: ModelSpec, where: str) -> tuple:
    if not isinstance(d, dict):
        raise PrismError(f"{where}: expected a JSON object per line")
    if "origin" not in d or "experts" not in d:
        raise PrismError(f"{where}: each line needs `origin` and `experts`")
    layers = d.get("layers")
    if layers is not None and [int(x) for x in layers] != list(model.layers):
        raise PrismError(f"{where}: `layers` {layers[:4]}... do not match model {model.name!r} MoE layers "
                         f"{list(model.layers)[:4]}...; pass the right `model`", parameters=("model",))
    phase = d.get("phase", "prefill")
    if phase not in PHASES:
        raise PrismError(f"{where}: phase {phase!r} is not 'prefill' or 'decode'")
    try:
        experts = np.asarray(d["experts"], dtype=np.int64)
        weights = np.asarray(d["weights"], dtype=np.float32) if d.get("weights") is not None else None
    except (TypeError, ValueError):
        raise PrismError(f"{where}: `experts` must be a list of {model.num_layers} lists of {model.top_k} ints")
    shape = (model.num_layers, model.top_k)
    if experts.shape != shape:
        raise PrismError(f"{where}: `experts` has shape {list(experts.shape)}, model {model.name!r} needs "
                         f"{list(shape)} (MoE layers x top_k)")
    if experts.min() < 0 or experts.max() >= model.num_experts:
        raise PrismError(f"{where}: expert id out of range 0..{model.num_experts - 1}")
    if weights is not None and weights.shape != shape:
        raise PrismError(f"{where}: `weights` has shape {list(weights.shape)}, expected {list(shape)}")
    return (str(d["origin"]), d.get("request", 0), d.get("position"), phase == "decode", experts, weights)


def iter_jsonl(src: str | Path, model: ModelSpec, batch_rows: int = 65536) -> Iterator[Trace]:
    """Yield Trace batches of up to `batch_rows` tokens from a JSONL file."""
    src = Path(src)
    meta = TraceMeta.for_model(model, source=f"jsonl:{src.name}")
    origins: list[str] = []
    next_pos: dict[tuple[str, int], int] = {}
    rows: list[tuple] = []
    for where, d in json_lines(src, "JSONL file"):
        origin, request, position, decode, experts, weights = _parse_row(d, model, where)
        if not isinstance(request, int) or (position is not None and not isinstance(position, int)):
            raise PrismError(f"{where}: `request` and `position` must be integers")
        key = (origin, request)
        position = next_pos.get(key, 0) if position is None else position
        next_pos[key] = position + 1
        if origin not in origins:
            origins.append(origin)
        rows.append((origins.index(origin), request, position, decode, experts, weights))
        if len(rows) == batch_rows:
            yield _batch(rows, origins, meta, src)
            rows = []
    if rows:
        yield _batch(rows, origins, meta, src)


def _batch(rows: list[tuple], origins: list[str], meta: TraceMeta, src: Path) -> Trace:
    has_w = [r[5] is not None for r in rows]
    if any(has_w) and not all(has_w):
        raise PrismError(f"{src}: some lines have `weights` and some do not; give them on all lines or none")
    cols = list(zip(*rows))
    return Trace(meta, tuple(origins), np.array(cols[0], np.int32), np.array(cols[1], np.int64),
                 np.array(cols[2], np.int32), np.array(cols[3], bool),
                 np.stack(cols[4]).astype(np.int16), np.stack(cols[5]) if all(has_w) else None)
