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

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.progress import track
from prism_plan.traces.dumps import reason
from prism_plan.traces.trace import Trace, TraceMeta, gate_weights, routing_ids


def _layer_file(folder: Path, layer: int) -> Path:
    for name in (f"expert_weights_{layer}.txt.xz", f"expert_weights_{layer}.txt"):
        if (folder / name).exists():
            return folder / name
    raise PrismError(f"{folder}: no expert_weights_{layer}.txt[.xz]; the model has MoE layer {layer}, so its file "
                     f"must be there (or pass the right `model`)", parameters=("model",))


def _read_text(path: Path) -> str:
    """The UTF-8 text of a layer file (xz-compressed when its name says so)."""
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except IsADirectoryError:
        raise PrismError(f"{path} is a folder, not a layer file; remove it or put the layer's file there")
    except (lzma.LZMAError, EOFError) as e:
        raise PrismError(f"{path} is not a complete .xz file ({reason(e, 'it ends early')}); download or compress "
                         f"it again")
    except OSError as e:
        raise PrismError(f"cannot read {path}: {e.strerror or e}; check its permissions")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PrismError(f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x}); the file is damaged: "
                         f"download it again")


def _numbers(parts: list[str], dtype: type, what: str, where: str) -> np.ndarray:
    try:
        return np.array(parts, dtype=dtype)
    except (ValueError, OverflowError):
        for x in parts:  # name the culprit
            try:
                np.array([x], dtype=dtype)
            except (ValueError, OverflowError):
                raise PrismError(f"{where}: {x!r} is not {what}; fix or download the file again")
        raise


def _read_layer(path: Path, model: ModelSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids: [tokens, top_k] int16, weights: [tokens, top_k] float32)] per line of one layer file, every id in
    range and distinct within its token, every weight finite."""
    top_k = model.top_k
    out = []
    for no, line in enumerate(_read_text(path).splitlines(), 1):
        where = f"{path} line {no}"
        ids_text, sep, w_text = line.partition("\t\t")
        if not sep:
            raise PrismError(f"{where}: no double tab between expert ids and weights")
        ids = _numbers(ids_text.split("\t"), np.int64, "an integer expert id (in the int64 range)", where)
        w = _numbers(w_text.split("\t"), np.float64, "a number", where)
        if len(ids) != len(w) or len(ids) % top_k:
            raise PrismError(f"{where}: {len(ids)} ids and {len(w)} weights; both must be equal and "
                             f"a multiple of top_k={top_k}")
        fix = "pass the right `model` or download the file again"
        out.append((routing_ids(ids.reshape(-1, top_k), model.num_experts, where, fix, parameters=("model",)),
                    gate_weights(w.reshape(-1, top_k), where, "download the file again")))
    return out


def _domains(src: Path) -> list[Path]:
    if not src.exists():
        raise MissingInputError(f"no ESFT folder at {src}")
    if not src.is_dir():
        raise PrismError(f"{src} is a file; give the folder of ESFT domain folders (or one domain folder)")
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
        per_domain[domain].append(_read_layer(_layer_file(domain, layer), model))
        if len(per_domain[domain]) == model.num_layers:
            yield _domain_trace(domain, per_domain.pop(domain), meta)


def _domain_trace(domain: Path, layers: list[list[tuple[np.ndarray, np.ndarray]]], meta: TraceMeta) -> Trace:
    """Stack per-layer, per-line arrays into one trace, checking that the layer files agree line by line."""
    n_lines = {len(x) for x in layers}
    if len(n_lines) != 1:
        raise PrismError(f"{domain}: layer files have different line counts {sorted(n_lines)}; each holds one "
                         f"line per sequence, so some file is cut short or from elsewhere")
    if not n_lines.pop():
        raise PrismError(f"{domain}: its layer files are empty; remove the folder or put its data back")
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
