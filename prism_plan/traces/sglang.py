"""Importer for SGLang's expert-distribution recorder dumps (`/dump_expert_distribution_record`, `.pt`).

- `per_token` mode: `{"records": [{"forward_pass_id", "rank", "topk_ids_of_layer": [layers, tokens, 8]}, ...],
  "last_physical_to_logical_map": [layers, physical]}`; ids are physical slots (-1 pads unused slots and dense
  layers) and become logical experts through the map when it is there. Each record is one forward pass of one
  rank: request = forward_pass_id, position = the token's row, phase prefill (the dump does not say).
- `stat` mode: `{"logical_count": [buffer, layers, experts]}` (zero rows for unused buffer entries): counts only,
  so it becomes ActivationTables directly, flagged as having no co-activation data.
SGLang numbers all hidden layers, dense ones included; the model's MoE layers are taken from them. SRC is one
dump or a folder of them; the origin is --origin, else each file's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import dump_files, load_torch_file
from prism_plan.traces.tables import MAX_TOKENS, ActivationTables
from prism_plan.traces.trace import Trace, TraceMeta, routing_ids

FIX = "pass the right `model` or record the dump again"


def _moe_rows(arr: np.ndarray, model: ModelSpec, where: str, axis: int) -> np.ndarray:
    """The model's MoE layers out of an array indexed by all hidden layers along `axis`."""
    if arr.shape[axis] != model.num_hidden_layers:
        raise PrismError(f"{where}: {arr.shape[axis]} layers, but model {model.name!r} has "
                         f"{model.num_hidden_layers} hidden layers (SGLang counts dense ones too); pass the right "
                         f"`model`", parameters=("model",))
    return np.take(arr, list(model.layers), axis=axis)


def _array(value: object, name: str, where: str, kinds: str) -> np.ndarray:
    """A tensor of the dump, once its dtype kind is one of `kinds` ("iu": integers, "iuf": numbers)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise PrismError(f"{where}: `{name}` must be a tensor of {'integers' if kinds == 'iu' else 'numbers'}, "
                         f"got {got}; record the dump again with SGLang")
    return value


def sglang_tables(src: str | Path, model: ModelSpec, origin: str | None = None) -> ActivationTables:
    """ActivationTables from `stat` dumps: one origin per file (or `origin` for all)."""
    files = dump_files(Path(src), ("*.pt",))
    counts: dict[str, np.ndarray] = {}
    for path in files:
        d = load_torch_file(path)
        if not isinstance(d, dict) or "logical_count" not in d:
            raise PrismError(f"{path}: not an SGLang stat dump (no `logical_count`); per_token dumps become traces "
                             f"(-o trace.parquet)")
        c = _array(d["logical_count"], "logical_count", str(path), "iuf").astype(np.float64)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3 or c.shape[2] != model.num_experts:
            raise PrismError(f"{path}: logical_count has shape {list(c.shape)}, expected [buffer, "
                             f"{model.num_hidden_layers}, {model.num_experts}]; {FIX}", parameters=("model",))
        bad = ~np.isfinite(c) | (c < 0) | (c > MAX_TOKENS)
        if bad.any():
            raise PrismError(f"{path}: logical_count holds {c[bad][0]}; counts must be finite, not negative and at "
                             f"most 2**53: record the dump again")
        c = _moe_rows(c.sum(axis=0), model, str(path), axis=0)
        name = origin or path.stem
        counts[name] = counts.get(name, 0) + c
    freq = np.stack(list(counts.values()))
    if not freq.any():
        raise PrismError(f"{src}: the dumps hold no tokens (every logical_count is 0); record while the server "
                         f"handles traffic")
    # every token activates top_k experts in each layer: the busiest layer bounds the tokens from below
    tokens = np.ceil(freq.sum(axis=2).max(axis=1) / model.top_k).astype(np.int64)
    return ActivationTables(tuple(counts), model.layers, freq, tokens, None, None,
                            {"model": model.name, "top_k": model.top_k, "source": f"sglang-stat:{Path(src).name}",
                             "spec": model.to_dict(), "window": None, "coactivation": False})


def iter_sglang(src: str | Path, model: ModelSpec, origin: str | None = None) -> Iterator[Trace]:
    """Yield one Trace per `per_token` record."""
    meta = TraceMeta.for_model(model, source=f"sglang:{Path(src).name}")
    names: list[str] = []
    k = model.top_k
    for path in dump_files(Path(src), ("*.pt",)):
        d = load_torch_file(path)
        if not isinstance(d, dict) or "records" not in d:
            raise PrismError(f"{path}: not an SGLang per_token dump (no `records`); stat dumps become tables "
                             f"(-o tables.npz)")
        if not isinstance(d["records"], list):
            raise PrismError(f"{path}: `records` must be a list of per_token records, got "
                             f"{type(d['records']).__name__}; record the dump again in per_token mode")
        p2l = d.get("last_physical_to_logical_map")
        if p2l is not None:
            p2l = _p2l(_array(p2l, "last_physical_to_logical_map", str(path), "iu"), model, str(path))
        name = origin or path.stem
        if name not in names:
            names.append(name)
        for i, rec in enumerate(d["records"]):
            where = f"{path} record {i}"
            if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
                raise PrismError(f"{where}: no `topk_ids_of_layer`; record the dump in per_token mode")
            ids = _array(rec["topk_ids_of_layer"], "topk_ids_of_layer", where, "iu")
            if ids.ndim != 3 or ids.shape[2] < k:
                raise PrismError(f"{where}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
                                 f"[{model.num_hidden_layers}, tokens, >= {k}]; {FIX}", parameters=("model",))
            request = integer(rec.get("forward_pass_id", i), f"{where}: `forward_pass_id`", low=0,
                              fix="record the dump again with SGLang")
            ids = _moe_rows(ids, model, where, axis=0).astype(np.int64)  # [moe layers, tokens, slots]
            if ids.size and ids.min() < -1:
                raise PrismError(f"{where}: topk_ids_of_layer holds {ids.min()}; ids are slots >= 0, or -1 for "
                                 f"padding: record the dump again")
            if p2l is not None:
                ids = _to_logical(ids, p2l, where)
            if (ids[:, :, k:] >= 0).any():
                raise PrismError(f"{where}: more than top_k={k} experts per token; pass the right `model`",
                                 parameters=("model",))
            ids = ids[:, :, :k].transpose(1, 0, 2)  # [tokens, layers, k]
            real = (ids >= 0).all(axis=(1, 2))
            partial = ~real & (ids >= 0).any(axis=(1, 2))
            if partial.any():
                raise PrismError(f"{where}: token {int(np.argmax(partial))} has -1 among its top-{k} ids in some "
                                 f"MoE layers only")
            fix = "pass last_physical_to_logical_map or the right `model`" if p2l is None else FIX
            experts = routing_ids(ids[real], model.num_experts, where, fix, rows=lambda t: f" token {t}",
                                  parameters=("model",))
            n = len(experts)
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), np.full(n, request, np.int64),
                        np.arange(n, dtype=np.int32), np.zeros(n, bool), experts)


def _p2l(p2l: np.ndarray, model: ModelSpec, where: str) -> np.ndarray:
    """The MoE rows [moe layers, physical slots] of last_physical_to_logical_map [hidden layers, P], once every
    slot maps to an expert of the model."""
    where = f"{where} (last_physical_to_logical_map)"
    if p2l.ndim != 2:
        raise PrismError(f"{where}: shape {list(p2l.shape)}, expected [layers, physical slots]")
    p2l = _moe_rows(p2l, model, where, axis=0).astype(np.int64)
    if p2l.size and (p2l.min() < 0 or p2l.max() >= model.num_experts):
        bad = p2l[(p2l < 0) | (p2l >= model.num_experts)][0]
        raise PrismError(f"{where}: maps a slot to expert {bad}, outside 0..{model.num_experts - 1}; {FIX}",
                         parameters=("model",))
    return p2l


def _to_logical(ids: np.ndarray, p2l: np.ndarray, where: str) -> np.ndarray:
    """Physical slot ids [moe layers, tokens, slots] to logical expert ids through p2l [moe layers, P]."""
    if (ids >= p2l.shape[1]).any():
        raise PrismError(f"{where}: physical id >= {p2l.shape[1]}, the slots in last_physical_to_logical_map")
    layer = np.arange(ids.shape[0])[:, None, None]
    return np.where(ids >= 0, p2l[layer, np.maximum(ids, 0)], -1)
