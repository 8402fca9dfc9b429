"""Importer for the generic JSONL trace: one JSON object per token.

`{"origin": "law", "request": 17, "position": 0, "phase": "prefill", "layers": [1, 2, ...],
  "experts": [[3, 9, ...], ...], "weights": [[0.2, ...], ...]}`
`experts` holds one top-k list per MoE layer in the order of `layers`; `layers` may be left out (the model's
MoE layers are assumed); `phase` defaults to prefill; `weights` is optional and mirrors `experts`;
`position` defaults to the token's index among the earlier rows of its (origin, request).
Values are taken only as they are written: ids are JSON integers (not 3.7, "3" or true), `origin` a string,
`request` a non-negative integer, `position` one below 2**31, weights finite numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer, text
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import INT64_MAX, JsonLine, json_ints, json_lines, json_numbers
from prism_plan.traces.trace import PHASES, POSITION_MAX, Trace, TraceMeta, gate_weights, routing_ids

FIX = "fix the line or re-export the trace"
FIX_IDS = "pass the right `model` or fix the line"


def _parse_row(line: JsonLine, model: ModelSpec) -> tuple:
    where, d, _ = line
    if not isinstance(d, dict):
        raise PrismError(f"{where}: expected a JSON object per line")
    if "origin" not in d or "experts" not in d:
        raise PrismError(f"{where}: each line needs `origin` and `experts`")
    origin = text(d["origin"], f"{where}: `origin`", fix=FIX)
    if d.get("layers") is not None:
        layers = json_ints(d["layers"], "layers", line)
        if layers.ndim != 1 or layers.tolist() != list(model.layers):
            raise PrismError(f"{where}: `layers` {str(d['layers'])[:30]} do not match model {model.name!r} MoE "
                             f"layers {list(model.layers)[:4]}...; pass the right `model`", parameters=("model",))
    phase = d.get("phase", "prefill")
    if not isinstance(phase, str) or phase not in PHASES:
        raise PrismError(f"{where}: phase {phase!r} is not 'prefill' or 'decode'")
    request = integer(d.get("request", 0), f"{where}: `request`", low=0, high=INT64_MAX, fix=FIX)
    position = None if d.get("position") is None else integer(d["position"], f"{where}: `position`", low=0,
                                                               high=POSITION_MAX, fix=FIX)
    experts = json_ints(d["experts"], "experts", line)
    shape = (model.num_layers, model.top_k)
    if experts.shape != shape:
        raise PrismError(f"{where}: `experts` has shape {list(experts.shape)}, model {model.name!r} needs "
                         f"{list(shape)} (MoE layers x top_k)")
    weights = json_numbers(d["weights"], "weights", line) if d.get("weights") is not None else None
    if weights is not None and weights.shape != shape:
        raise PrismError(f"{where}: `weights` has shape {list(weights.shape)}, expected {list(shape)}")
    return origin, request, position, phase == "decode", experts, weights


def iter_jsonl(src: str | Path, model: ModelSpec, batch_rows: int = 65536) -> Iterator[Trace]:
    """Yield Trace batches of up to `batch_rows` tokens from a JSONL file."""
    src = Path(src)
    meta = TraceMeta.for_model(model, source=f"jsonl:{src.name}")
    origins: list[str] = []
    next_pos: dict[tuple[str, int], int] = {}
    rows: list[tuple] = []
    lines: list[str] = []
    for line in json_lines(src, "JSONL file"):
        origin, request, position, decode, experts, weights = _parse_row(line, model)
        key = (origin, request)
        position = next_pos.get(key, 0) if position is None else position
        if position > POSITION_MAX:
            raise PrismError(f"{line.where}: request {request} of {origin!r} has more than {POSITION_MAX} tokens")
        next_pos[key] = position + 1
        if origin not in origins:
            origins.append(origin)
        rows.append((origins.index(origin), request, position, decode, experts, weights))
        lines.append(line.where)
        if len(rows) == batch_rows:
            yield _batch(rows, lines, origins, meta, src, model)
            rows, lines = [], []
    if rows:
        yield _batch(rows, lines, origins, meta, src, model)


def _batch(rows: list[tuple], lines: list[str], origins: list[str], meta: TraceMeta, src: Path,
           model: ModelSpec) -> Trace:
    """One Trace of parsed rows; ids and weights are checked here, for the whole batch at once (lines[i] is
    where row i came from)."""
    has_w = [r[5] is not None for r in rows]
    if any(has_w) and not all(has_w):
        raise PrismError(f"{src}: some lines have `weights` and some do not; give them on all lines or none")
    cols = list(zip(*rows))
    experts = routing_ids(np.stack(cols[4]), meta.num_experts, "", FIX_IDS, rows=lambda t: lines[t],
                          parameters=("model",))
    weights = gate_weights(np.stack(cols[5]), str(src), FIX) if all(has_w) else None
    return Trace(meta, tuple(origins), np.array(cols[0], np.int32), np.array(cols[1], np.int64),
                 np.array(cols[2], np.int32), np.array(cols[3], bool), experts, weights)
