"""Importer for the ESFT expert-score text format (deepseek-ai/ESFT, `results/expert_scores/`).

A data folder holds one folder per domain; each has `expert_weights_<L>.txt[.xz]` for every MoE layer L.
Line i of every layer file is sequence i: tab-separated expert ids (the flattened [tokens, top_k] matrix,
token-major), a double tab, then the gate weights in the same order. Origin = domain folder name,
request = line number (0-based), phase = prefill.
"""

from __future__ import annotations

import lzma
from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.progress import track
from prism_plan.traces.trace import Trace, TraceMeta


def _layer_file(folder: Path, layer: int) -> Path:
    for name in (f"expert_weights_{layer}.txt.xz", f"expert_weights_{layer}.txt"):
        if (folder / name).exists():
            return folder / name
    raise PrismError(f"{folder}: no expert_weights_{layer}.txt[.xz]; the model has MoE layers "
                     f"{layer} among its layers, so every layer file must be there")


def _read_layer(path: Path, top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids: [tokens, top_k] int16, weights: [tokens, top_k] float32)] per line of one layer file."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    out = []
    for no, line in enumerate(lines, 1):
        ids_text, sep, w_text = line.partition("\t\t")
        if not sep:
            raise PrismError(f"{path} line {no}: no double tab between expert ids and weights")
        try:
            ids = np.array(ids_text.split("\t"), dtype=np.int16)
            w = np.array(w_text.split("\t"), dtype=np.float32)
        except ValueError as e:
            raise PrismError(f"{path} line {no}: not a number ({e})")
        if len(ids) != len(w) or len(ids) % top_k:
            raise PrismError(f"{path} line {no}: {len(ids)} ids and {len(w)} weights; both must be equal and "
                             f"a multiple of top_k={top_k}")
        out.append((ids.reshape(-1, top_k), w.reshape(-1, top_k)))
    return out


def _domains(src: Path) -> list[Path]:
    if not src.is_dir():
        raise PrismError(f"{src} is not a folder of ESFT domain folders")
    if any(src.glob("expert_weights_*.txt*")):
        return [src]
    domains = sorted(p for p in src.iterdir() if p.is_dir() and any(p.glob("expert_weights_*.txt*")))
    if not domains:
        raise PrismError(f"{src} holds no ESFT domain folders (folders with expert_weights_<layer>.txt.xz)")
    return domains


def iter_esft(src: str | Path, model: ModelSpec, quiet: bool = False) -> Iterator[Trace]:
    """Yield one Trace per domain folder under `src` (or `src` itself when it is a domain folder)."""
    src = Path(src)
    meta = TraceMeta.for_model(model, source=f"esft:{src.name}")
    domains = _domains(src)
    steps = [(d, layer) for d in domains for layer in model.layers]
    per_domain: dict[Path, list] = {d: [] for d in domains}
    for domain, layer in track(steps, "reading ESFT layer files", quiet=quiet):
        per_domain[domain].append(_read_layer(_layer_file(domain, layer), model.top_k))
        if len(per_domain[domain]) == model.num_layers:
            yield _domain_trace(domain, per_domain.pop(domain), meta)


def _domain_trace(domain: Path, layers: list[list[tuple[np.ndarray, np.ndarray]]], meta: TraceMeta) -> Trace:
    """Stack per-layer, per-line arrays into one trace, checking that the layer files agree line by line."""
    n_lines = {len(x) for x in layers}
    if len(n_lines) != 1:
        raise PrismError(f"{domain}: layer files have different line counts {sorted(n_lines)}")
    lengths = np.array([[len(ids) for ids, _ in layer] for layer in layers])  # [layers, lines]
    bad = np.nonzero((lengths != lengths[0]).any(axis=0))[0]
    if len(bad):
        raise PrismError(f"{domain}: line {bad[0] + 1} has a different token count in different layer files "
                         f"({sorted(set(lengths[:, bad[0]].tolist()))})")
    ids = np.stack([np.concatenate([i for i, _ in layer]) for layer in layers], axis=1)
    w = np.stack([np.concatenate([x for _, x in layer]) for layer in layers], axis=1)
    request = np.repeat(np.arange(lengths.shape[1], dtype=np.int64), lengths[0])
    starts = np.repeat(np.cumsum(lengths[0]) - lengths[0], lengths[0])
    position = (np.arange(len(request)) - starts).astype(np.int32)
    return Trace(meta, (domain.name,), np.zeros(len(request), np.int32), request, position,
                 np.zeros(len(request), bool), ids, w)
