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
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import dump_files, load_torch_file
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import Trace, TraceMeta

def _moe_rows(arr: np.ndarray, model: ModelSpec, where: str, axis: int) -> np.ndarray:
    """The model's MoE layers out of an array indexed by all hidden layers along `axis`."""
    if arr.shape[axis] != model.num_hidden_layers:
        raise PrismError(f"{where}: {arr.shape[axis]} layers, but model {model.name!r} has "
                         f"{model.num_hidden_layers} hidden layers (SGLang counts dense ones too); pass the right `model`",
                         parameters=("model",))
    return np.take(arr, list(model.layers), axis=axis)


def sglang_tables(src: str | Path, model: ModelSpec, origin: str | None = None) -> ActivationTables:
    """ActivationTables from `stat` dumps: one origin per file (or `origin` for all)."""
    files = dump_files(Path(src), ("*.pt",))
    counts: dict[str, np.ndarray] = {}
    for path in files:
        d = load_torch_file(path)
        if not isinstance(d, dict) or "logical_count" not in d:
            raise PrismError(f"{path}: not an SGLang stat dump (no `logical_count`); per_token dumps become traces "
                             f"(-o trace.parquet)")
        c = np.asarray(d["logical_count"], dtype=np.float64)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3 or c.shape[2] != model.num_experts:
            raise PrismError(f"{path}: logical_count has shape {list(c.shape)}, expected [buffer, "
                             f"{model.num_hidden_layers}, {model.num_experts}]")
        c = _moe_rows(c.sum(axis=0), model, str(path), axis=0)
        name = origin or path.stem
        counts[name] = counts.get(name, 0) + c
    freq = np.stack(list(counts.values()))
    tokens = np.round(freq.sum(axis=2).mean(axis=1) / model.top_k).astype(np.int64)
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
        p2l = d.get("last_physical_to_logical_map")
        name = origin or path.stem
        if name not in names:
            names.append(name)
        for i, rec in enumerate(d["records"]):
            where = f"{path} record {i}"
            if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
                raise PrismError(f"{where}: no `topk_ids_of_layer`; record the dump in per_token mode")
            ids = np.asarray(rec["topk_ids_of_layer"])
            if ids.ndim != 3 or ids.shape[2] < k:
                raise PrismError(f"{where}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
                                 f"[{model.num_hidden_layers}, tokens, >= {k}]")
            ids = _moe_rows(ids, model, where, axis=0).astype(np.int64)  # [moe layers, tokens, slots]
            if p2l is not None:
                ids = _to_logical(ids, np.asarray(p2l), model, where)
            if (ids[:, :, k:] >= 0).any():
                raise PrismError(f"{where}: more than top_k={k} experts per token; pass the right `model`",
                                 parameters=("model",))
            ids = ids[:, :, :k].transpose(1, 0, 2)  # [tokens, layers, k]
            real = (ids >= 0).all(axis=(1, 2))
            partial = ~real & (ids >= 0).any(axis=(1, 2))
            if partial.any():
                raise PrismError(f"{where}: token {int(np.argmax(partial))} has -1 among its top-{k} ids in some "
                                 f"MoE layers only")
            if (ids[real] >= model.num_experts).any():
                raise PrismError(f"{where}: expert id >= {model.num_experts}; pass last_physical_to_logical_map "
                                 f"or the right `model`", parameters=("model",))
            n = int(real.sum())
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32),
                        np.full(n, int(rec.get("forward_pass_id", i)), np.int64), np.arange(n, dtype=np.int32),
                        np.zeros(n, bool), ids[real].astype(np.int16))


def _to_logical(ids: np.ndarray, p2l: np.ndarray, model: ModelSpec, where: str) -> np.ndarray:
    """Physical slot ids [moe layers, tokens, slots] to logical expert ids through p2l [hidden layers, P]."""
    if p2l.ndim != 2:
        raise PrismError(f"{where}: last_physical_to_logical_map has shape {list(p2l.shape)}, expected [layers, "
                         f"physical slots]")
    p2l = _moe_rows(p2l, model, where + " (last_physical_to_logical_map)", axis=0).astype(np.int64)
    if (ids >= p2l.shape[1]).any():
        raise PrismError(f"{where}: physical id >= {p2l.shape[1]}, the slots in last_physical_to_logical_map")
    layer = np.arange(ids.shape[0])[:, None, None]
    return np.where(ids >= 0, p2l[layer, np.maximum(ids, 0)], -1)
