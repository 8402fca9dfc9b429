"""Importer for TensorRT-LLM's expert statistics: what its MoE layers record while `EXPERT_STATISTIC_ITER_RANGE=
start-stop` is set, written to `EXPERT_STATISTIC_PATH` (the input of
examples/wide_ep/ep_load_balancer/generate_eplb_config.py).

A dump is a folder: `meta_info.json` (`{"num_experts", "num_experts_per_token", ...}`, from rank 0) and one
`rank<r>.safetensors` per rank, whose tensors are named `<iteration>_<layer>` and hold the bincount [num_experts] of
the experts that rank's tokens selected in that iteration and layer (`rank<r>_raw.safetensors` hold raw ids and are
not read). Layers are hidden-layer indices (dense layers have none); those numbered num_hidden_layers and up are the
multi-token-prediction layers, which are not the model's and are left out. Counts are summed over ranks and
iterations, as generate_eplb_config.py sums them: with attention DP each rank counts its own tokens; without it
every rank counts the same tokens, so the token estimate is ep_size times too high (the shares placement uses are
right). With `moe_config.load_balancer` set TensorRT-LLM counts slots, not experts: record without one.
Counts only, so dumps become ActivationTables (no co-activation), one origin per dump folder (or `origin`).
SRC is a dump folder or a folder of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.fileio import read_user_json
from prism_plan.placement.checks import integer
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import read_error, reason
from prism_plan.traces.tables import MAX_TOKENS, ActivationTables, count_tables

META = "meta_info.json"
RECORD = re.compile(r"^(\d+)_(\d+)$")  # <iteration>_<layer>
AGAIN = "record the statistics again with TensorRT-LLM"


NOTE = ("TensorRT-LLM's statistics are summed over every rank's file, as its generate_eplb_config.py sums them: "
        "without attention DP every rank counts the same tokens, so tokens are EP-size times those served "
        "(per-token frequencies are right either way)")


def trtllm_tables(src: str | Path, model: ModelSpec, origin: str | None = None) -> ActivationTables:
    """ActivationTables from TensorRT-LLM statistics dumps: one origin per dump folder (or `origin` for all)."""
    counts: dict[str, np.ndarray] = {}
    for folder in dump_folders(Path(src)):
        name = origin or folder.name
        counts[name] = counts.get(name, 0) + dump_counts(folder, model)
    return count_tables(counts, model, f"trtllm-stat:{Path(src).name}",
                        f"{src}: the statistics hold no tokens (every count is 0); set EXPERT_STATISTIC_ITER_RANGE to "
                        f"iterations in which the server handles traffic", NOTE)


def dump_folders(src: Path) -> list[Path]:
    """The dump folders (each holding meta_info.json) that `src` names: itself, or its sub-folders."""
    if not src.exists():
        raise MissingInputError(f"no TensorRT-LLM statistics at {src}")
    if src.is_file():
        if src.name != META:
            raise PrismError(f"{src} is a file; give the folder TensorRT-LLM wrote (EXPERT_STATISTIC_PATH), which "
                             f"holds {META} and rank*.safetensors")
        src = src.parent
    if (src / META).is_file():
        return [src]
    found = sorted(p.parent for p in src.glob(f"*/{META}") if p.is_file())
    if not found:
        raise PrismError(f"{src} holds no {META}; give the folder TensorRT-LLM wrote (EXPERT_STATISTIC_PATH) or a "
                         f"folder of such folders")
    return found


def dump_counts(folder: Path, model: ModelSpec) -> np.ndarray:
    """[MoE layers, experts] counts of one dump, summed over its ranks and iterations."""
    num_experts = _check_meta(folder / META, model)
    files = [p for p in sorted(folder.glob("rank*.safetensors")) if not p.name.endswith("_raw.safetensors")]
    if not files:
        raise PrismError(f"{folder} holds no rank*.safetensors; TensorRT-LLM writes them when the iteration range "
                         f"ends: let the server run past the range's stop")
    total: dict[tuple[int, int], np.ndarray] = {}
    for path in files:
        for key, c in rank_counts(path, num_experts).items():
            total[key] = total.get(key, 0) + c
    layers = _check_grid(folder, total)
    unknown = [x for x in layers if x < model.num_hidden_layers and x not in model.layers]
    missing = [x for x in model.layers if x not in layers]
    if unknown or missing:
        what = f"counts for layer {unknown[0]}, not a MoE layer" if unknown else f"no counts for MoE layer {missing[0]}"
        raise PrismError(f"{folder}: {what} of model {model.name!r}; pass the right `model`", parameters=("model",))
    c = np.stack([sum(v for (_, x), v in total.items() if x == layer) for layer in model.layers]).astype(np.float64)
    if (c > MAX_TOKENS).any():
        raise PrismError(f"{folder}: counts add up past 2**53; import fewer iterations")
    return c


def _check_meta(path: Path, model: ModelSpec) -> int:
    """num_experts of meta_info.json, once it and num_experts_per_token are the model's."""
    meta = read_user_json(path, "TensorRT-LLM meta_info.json")
    if not isinstance(meta, dict):
        raise PrismError(f"{path}: must be a JSON object with num_experts and num_experts_per_token; {AGAIN}")
    n = integer(meta.get("num_experts"), f"{path}: `num_experts`", low=1, fix=AGAIN)
    k = integer(meta.get("num_experts_per_token"), f"{path}: `num_experts_per_token`", low=1, fix=AGAIN)
    if n != model.num_experts:
        raise PrismError(f"{path}: {n} experts, but model {model.name!r} has {model.num_experts}; pass the right "
                         f"`model` (a dump recorded with moe_config.load_balancer counts its slots: record without "
                         f"it)", parameters=("model",))
    if k != model.top_k:
        raise PrismError(f"{path}: top-{k} routing, but model {model.name!r} routes top-{model.top_k}; pass the right "
                         f"`model`", parameters=("model",))
    return n


def rank_counts(path: Path, num_experts: int) -> dict[tuple[int, int], np.ndarray]:
    """(iteration, layer) -> int64 [num_experts] counts of one rank*.safetensors file."""
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise PrismError(f"{path} is a safetensors file; reading it needs safetensors: pip install safetensors")
    try:
        tensors = load_file(str(path))
    except OSError as e:
        raise read_error(path, "statistics file", e)
    except (SafetensorError, TypeError) as e:  # TypeError: a dtype numpy lacks (bfloat16)
        raise PrismError(f"{path} is not a readable statistics file ({reason(e)}); give the rank*.safetensors "
                         f"TensorRT-LLM wrote")
    out = {}
    for name, c in tensors.items():
        m = RECORD.match(name)
        if m is None:
            raise PrismError(f"{path}: tensor {name!r} is not named <iteration>_<layer>; {AGAIN}")
        if c.shape != (num_experts,) or c.dtype.kind not in "iu":
            raise PrismError(f"{path}: tensor {name!r} is {c.dtype} {list(c.shape)}, expected integer counts "
                             f"[{num_experts}] (meta_info.json's num_experts); {AGAIN}")
        if c.min(initial=0) < 0:
            raise PrismError(f"{path}: tensor {name!r} holds {c.min()}; counts are never negative: {AGAIN}")
        out[(int(m.group(1)), int(m.group(2)))] = c.astype(np.int64)
    return out


def _check_grid(folder: Path, total: dict[tuple[int, int], np.ndarray]) -> list[int]:
    """The dump's layers, once its records cover consecutive iterations and every layer in each (what
    generate_eplb_config.py asserts)."""
    if not total:
        raise PrismError(f"{folder}: the rank files hold no counts; {AGAIN}")
    iters = sorted({i for i, _ in total})
    layers = sorted({x for _, x in total})
    gap = next(((i, x) for i in range(iters[0], iters[-1] + 1) for x in layers if (i, x) not in total), None)
    if gap is not None:
        raise PrismError(f"{folder}: no counts for iteration {gap[0]} of layer {gap[1]} (iterations {iters[0]}.."
                         f"{iters[-1]} must each hold every layer); a rank file is missing or cut short: {AGAIN}")
    return layers
