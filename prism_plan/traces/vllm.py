"""Importer for vLLM's routed-experts output: per request, the experts each token was routed to,
`[tokens, moe_layers, top_k]` (MoE layers only, in order).

SRC is a `.npy` (one request), a `.npz` (one request per array, in key order) or a `.pt` (a tensor, a list of
tensors or a dict of them, one request each), or a folder of such files. The origin is --origin, else each
file's name; requests are numbered per origin in file order; every token is recorded as prefill (the output
does not tell prompt from generated tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import dump_files, load_torch_file, read_npy, read_npz
from prism_plan.traces.trace import Trace, TraceMeta, routing_ids


def _requests(path: Path) -> list[tuple[str, object]]:
    """[(label, array)] of the requests in one file."""
    fix = "save the routed experts with numpy (np.save, np.savez) or torch.save"
    if path.suffix == ".npy":
        return [("0", read_npy(path, ".npy array file", fix))]
    if path.suffix == ".npz":
        return list(read_npz(path, ".npz archive of arrays", fix).items())
    obj = load_torch_file(path)
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, list):
        return [(str(i), v) for i, v in enumerate(obj)]
    return [("0", obj)]


def iter_vllm(src: str | Path, model: ModelSpec, origin: str | None = None) -> Iterator[Trace]:
    """Yield one Trace per request."""
    meta = TraceMeta.for_model(model, source=f"vllm:{Path(src).name}")
    names: list[str] = []
    next_request: dict[str, int] = {}
    shape = (model.num_layers, model.top_k)
    for path in dump_files(Path(src), ("*.npy", "*.npz", "*.pt")):
        name = origin or path.stem
        if name not in names:
            names.append(name)
        for label, arr in _requests(path):
            where = f"{path} request {label}"
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
                got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise PrismError(f"{where}: expected an integer array [tokens, moe_layers, top_k], got {got}")
            if arr.ndim != 3 or arr.shape[1:] != shape:
                raise PrismError(f"{where}: routed experts have shape {list(arr.shape)}, model {model.name!r} needs "
                                 f"[tokens, {shape[0]}, {shape[1]}] (MoE layers only); pass the right `model`",
                                 parameters=("model",))
            experts = routing_ids(arr, model.num_experts, where, "pass the right `model`",
                                  rows=lambda t: f" token {t}", parameters=("model",))
            n = len(arr)
            request = next_request.get(name, 0)
            next_request[name] = request + 1
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), np.full(n, request, np.int64),
                        np.arange(n, dtype=np.int32), np.zeros(n, bool), experts)
