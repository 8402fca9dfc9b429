"""Importer for Megatron-Core router traces (`--moe-routing-trace-path`, its RouterTracer):
`router_trace_rank{r}.jsonl`, one record per forward of one MoE layer: `{"step", "stage", "block", "layer", "rank",
"num_tokens", "topk", "top_indices": [[...top_k], ...]}`; records of the `mtp` block are skipped.

- Micro-batches: a training step runs several micro-batches through each layer; the records of one rank, step and
  layer are, in file order, its successive micro-batches. Each micro-batch (in inference: each forward pass) is
  one request. The records do not mark sequence boundaries: position = the token's row, phase prefill.
- Layer numbers: the tracer's hook path numbers a layer by its 0-based index in its pipeline stage's
  `decoder.layers`, its `layer_number` path (inference's `record_indices`, routers outside `decoder.layers`) by
  Megatron's global 1-based layer number. No field says which; the layers each rank recorded do: when they are the
  model's MoE layers (0-based, one stage) or split its 1-based numbers between pipeline stages, the numbers are
  global; otherwise they are stage-local. Stage p then holds the hidden layers after those of stages 0..p-1:
  `stage_layers` (hidden layers per stage, for uneven splits), else an even split over `pipeline_stages`, else the
  one even split the records fit. Rank r is on stage r // (W / P), W ranks and P stages: Megatron's default rank
  order (tp-cp-ep-dp-pp); every rank's file is needed. Interleaved (virtual) stages are not told apart.
- Pipeline stages run the same micro-batches: the ranks of one pipeline, one per stage, give each token its layers
  and make one origin, `rank{r}` after its first stage's rank (or --origin); requests are numbered per origin in
  order of pipeline, step and micro-batch.
Rank, step and layer are non-negative JSON integers, a token's ids distinct integers below the model's number of
experts.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import JsonLine, dump_files, json_ints, json_lines
from prism_plan.traces.trace import Trace, TraceMeta, routing_ids

FIX = "record the trace again with Megatron-Core"
FILE_RANK = re.compile(r"router_trace_rank(\d+)\.jsonl$")


class Record(NamedTuple):
    """One decoder record: where it is, its rank, step and layer number as written, and its ids [tokens, top_k]."""

    where: str
    rank: int
    step: int
    layer: int
    ids: np.ndarray


def _record(line: JsonLine, model: ModelSpec) -> Record | None:
    """The record of one line; None for another block's."""
    where, r, _ = line
    top_k = model.top_k
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
    ids = routing_ids(ids, model.num_experts, where, "pass the right `model`", rows=lambda t: f" token {t}",
                      parameters=("model",))
    return Record(where, rank, step, layer, ids)


def _read(src: Path, model: ModelSpec) -> tuple[dict[int, list[Record]], set[int]]:
    """(rank -> its decoder records in file order, every rank that wrote a file)."""
    by_rank: dict[int, list[Record]] = defaultdict(list)
    file_of: dict[int, Path] = {}
    ranks: set[int] = set()
    for path in dump_files(src, ("router_trace_rank*.jsonl",), "router trace"):
        if m := FILE_RANK.search(path.name):
            ranks.add(int(m.group(1)))
        for line in json_lines(path, "router trace"):
            rec = _record(line, model)
            if rec is None:
                continue
            if file_of.setdefault(rec.rank, path) != path:
                raise PrismError(f"{line.where}: rank {rec.rank} also has records in {file_of[rec.rank]}; give each "
                                 f"rank's trace once")
            by_rank[rec.rank].append(rec)
    return by_rank, ranks | set(by_rank)


def _span(layers: Iterable[int]) -> str:
    """Layer numbers for a message: "1..26" when they run without a gap."""
    xs = sorted(layers)
    return f"{xs[0]}..{xs[-1]}" if len(xs) > 2 and xs[-1] - xs[0] == len(xs) - 1 else str(xs)


def _stages(model: ModelSpec, pipeline_stages: int | None,
            stage_layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """Hidden layers per pipeline stage as the caller gives them; None when not given."""
    h = model.num_hidden_layers
    if stage_layers is not None:
        layers = tuple(integer(x, "every `stage_layers` value", low=0, parameters=("stage_layers",))
                       for x in stage_layers)
        if sum(layers) != h:
            raise PrismError(f"`stage_layers` {list(layers)} hold {sum(layers)} layers, but model {model.name!r} has "
                             f"{h} hidden layers; give each stage's number of layers", parameters=("stage_layers",))
        if pipeline_stages is not None and pipeline_stages != len(layers):
            raise PrismError(f"`pipeline_stages`={pipeline_stages} but `stage_layers` names {len(layers)} stages; "
                             f"give one of them", parameters=("pipeline_stages", "stage_layers"))
        return layers
    if pipeline_stages is None:
        return None
    p = integer(pipeline_stages, "`pipeline_stages`", low=1, parameters=("pipeline_stages",))
    if h % p:
        raise PrismError(f"model {model.name!r}'s {h} hidden layers do not split evenly into {p} pipeline stages; "
                         f"give `stage_layers` (layers per stage)", parameters=("pipeline_stages",))
    return (h // p,) * p


def _global(sets: dict[int, frozenset[int]], model: ModelSpec, shift: int,
            src: Path) -> dict[int, tuple[int, int]] | None:
    """rank -> (pipeline, shift) when the ranks' layer numbers, less `shift`, are the model's MoE layers, all on
    each rank or split between pipeline stages; None when they are not."""
    numbers = frozenset(x + shift for x in model.layers)
    groups = sorted(set(sets.values()), key=min)
    if sum(map(len, groups)) != len(numbers) or frozenset().union(*groups) != numbers:
        return None
    if len(groups) == 1:
        return {r: (r, shift) for r in sets}
    stages = [sorted(r for r, s in sets.items() if s == g) for g in groups]
    width = len(stages[0])
    if any(ranks != list(range(ranks[0], ranks[0] + width)) for ranks in stages):
        raise PrismError(f"{src}: the ranks of pipeline stages hold layers {[sorted(g) for g in groups]} but are "
                         f"{stages}, not runs of {width} ranks in Megatron's default order (tp-cp-ep-dp-pp); give "
                         f"every rank's trace")
    return {r: (stages[0][0] + i, shift) for ranks in stages for i, r in enumerate(ranks)}


def _misfit(sets: dict[int, frozenset[int]], ranks: set[int], model: ModelSpec, stages: tuple[int, ...]) -> str | None:
    """Why the ranks' layer numbers are not stage-local indices of a pipeline of `stages` (hidden layers per
    stage); None when they are."""
    w, p = max(ranks) + 1, len(stages)
    if w % p:
        return f"{w} ranks do not split into {p} pipeline stages"
    if missing := sorted(set(range(w)) - ranks):
        return f"no trace of rank {missing[0]} (of {w}); give every rank's router_trace_rank<r>.jsonl"
    starts = np.cumsum((0,) + stages)
    seen: set[int] = set()
    for r, s in sorted(sets.items()):
        stage = r // (w // p)
        first, n = int(starts[stage]), stages[stage]
        if max(s) >= n or not {x + first for x in s} <= set(model.layers):
            return (f"rank {r} (stage {stage}, hidden layers {first}..{first + n - 1}) recorded layers {sorted(s)}, "
                    f"not all of them MoE layers of the stage")
        seen |= {x + first for x in s}
    if missing := sorted(set(model.layers) - seen):
        return f"no rank recorded MoE layer {missing[0]}"
    return None


def _layout(by_rank: dict[int, list[Record]], ranks: set[int], model: ModelSpec,
            stages: tuple[int, ...] | None, src: Path) -> dict[int, tuple[int, int]]:
    """rank -> (pipeline, shift): the ranks of one pipeline route the same tokens, and a record's layer less shift
    is the model's layer number."""
    sets = {r: frozenset(rec.layer for rec in recs) for r, recs in by_rank.items()}
    for shift in (0, 1):
        found = _global(sets, model, shift, src)
        if found is not None:
            return found
    if stages is None:
        h, w = model.num_hidden_layers, max(ranks) + 1
        fits = [p for p in range(2, w + 1) if not w % p and not h % p and
                _misfit(sets, ranks, model, (h // p,) * p) is None]
        if len(fits) > 1:
            raise PrismError(f"{src}: the ranks' stage-local layer numbers fit {fits} pipeline stages; pass "
                             f"`pipeline_stages`", parameters=("pipeline_stages",))
        if not fits:
            shown = ", ".join(f"rank {r}: {_span(s)}" for r, s in sorted(sets.items())[:4])
            gaps = sorted(set(range(w)) - ranks)
            fix = (f"give every rank's router_trace_rank<r>.jsonl (rank {gaps[0]} has none)" if gaps else
                   "pass the right `model`, or `stage_layers` (hidden layers per pipeline stage)")
            raise PrismError(f"{src}: the layers ranks recorded ({shown}) do not match model {model.name!r}'s MoE "
                             f"layers {_span(model.layers)} (0-based, or 1-based), nor stage-local numbers of an "
                             f"even pipeline split; {fix}", parameters=("model", "stage_layers"))
        stages = (h // fits[0],) * fits[0]
    if why := _misfit(sets, ranks, model, stages):
        raise PrismError(f"{src}: pipeline stages of {list(stages)} hidden layers do not fit the trace: {why}; pass "
                         f"the right `stage_layers` or `pipeline_stages`",
                         parameters=("stage_layers", "pipeline_stages"))
    width = (max(ranks) + 1) // len(stages)
    starts = np.cumsum((0,) + stages)
    return {r: (r % width, -int(starts[r // width])) for r in sets}


def _micro_batches(by_rank: dict[int, list[Record]], layout: dict[int, tuple[int, int]]
                   ) -> dict[int, dict[tuple[int, int], dict[int, Record]]]:
    """pipeline -> (step, micro-batch) -> model layer -> its record."""
    out: dict[int, dict[tuple[int, int], dict[int, Record]]] = defaultdict(lambda: defaultdict(dict))
    for r, recs in by_rank.items():
        pipeline, shift = layout[r]
        seen: dict[tuple[int, int], int] = defaultdict(int)
        for rec in recs:
            m = seen[rec.step, rec.layer]
            seen[rec.step, rec.layer] += 1
            out[pipeline][rec.step, m][rec.layer - shift] = rec
    return out


def iter_megatron(src: str | Path, model: ModelSpec, origin: str | None = None, *,
                  pipeline_stages: int | None = None, stage_layers: Sequence[int] | None = None) -> Iterator[Trace]:
    """Yield one Trace per micro-batch of each pipeline (one per step in inference).

    pipeline_stages: the number of pipeline stages, layers split evenly; stage_layers: hidden layers per stage, in
    order (uneven splits); both only for stage-local layer numbers, and only when the records leave the split open.
    """
    stages = _stages(model, pipeline_stages, stage_layers)
    meta = TraceMeta.for_model(model, source=f"megatron:{Path(src).name}")
    by_rank, ranks = _read(Path(src), model)
    if not by_rank:
        return
    batches = _micro_batches(by_rank, _layout(by_rank, ranks, model, stages, Path(src)))
    names: list[str] = []
    count: dict[str, int] = defaultdict(int)
    for pipeline, steps in sorted(batches.items()):
        name = origin or f"rank{pipeline}"
        if name not in names:
            names.append(name)
        for (step, m), layers in sorted(steps.items()):
            where = f"{src}: step {step} micro-batch {m} of rank{pipeline}'s pipeline"
            if missing := sorted(set(model.layers) - set(layers)):
                raise PrismError(f"{where} has no record of layer {missing[0]} (a model layer); a rank's trace is "
                                 f"missing or cut short")
            sizes = sorted({len(layers[x].ids) for x in model.layers})
            if len(sizes) != 1:
                raise PrismError(f"{where}: MoE layers saw different token counts {sizes}; a rank's trace is cut "
                                 f"short or from another run")
            ids = np.stack([layers[x].ids for x in model.layers], axis=1)
            n = len(ids)
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), np.full(n, count[name], np.int64),
                        np.arange(n, dtype=np.int32), np.zeros(n, bool), ids)
            count[name] += 1
