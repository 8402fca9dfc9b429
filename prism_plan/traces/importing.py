"""Import routing from other tools' formats into a Parquet trace."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec, resolve_model
from prism_plan.progress import spinner, track
from prism_plan.traces.esft import iter_esft
from prism_plan.traces.jsonl import iter_jsonl
from prism_plan.traces.megatron import iter_megatron
from prism_plan.traces.sglang import iter_sglang, sglang_tables
from prism_plan.traces.trace import TraceWriter
from prism_plan.traces.trtllm import trtllm_tables
from prism_plan.traces.vllm import iter_vllm

# format -> (src, model, quiet, origin, **options) -> Trace batches, under a bar unless quiet (ESFT's counts its
# layer files); options are the format's own keywords
IMPORTERS = {
    "esft": lambda src, model, quiet, origin, **options: iter_esft(src, model, quiet=quiet, **options),
    "jsonl": lambda src, model, quiet, origin, **options: track(
        iter_jsonl(src, model, **options), "reading JSONL routing", quiet=quiet),
    "sglang": lambda src, model, quiet, origin, **options: track(
        iter_sglang(src, model, origin, **options), "reading SGLang dumps", quiet=quiet),
    "vllm": lambda src, model, quiet, origin, **options: track(
        iter_vllm(src, model, origin, **options), "reading vLLM routing", quiet=quiet),
    "megatron": lambda src, model, quiet, origin, **options: track(
        iter_megatron(src, model, origin, **options), "reading Megatron-Core routing", quiet=quiet),
}
# format -> (src, model, origin, **options) -> ActivationTables: dumps of counts only (SGLang stat, TensorRT-LLM)
TABLE_IMPORTERS = {"sglang": sglang_tables, "trtllm": trtllm_tables}
FORMATS = tuple(sorted(set(IMPORTERS) | set(TABLE_IMPORTERS)))
# format -> the keywords its trace reader takes, and those its counts reader (-o .npz) takes
OPTIONS = {"sglang": ("rank",), "vllm": ("prompt_tokens",), "megatron": ("pipeline_stages", "stage_layers")}
TABLE_OPTIONS = {"sglang": ("rank", "counted_by")}


def import_trace(fmt: str, src: str | Path, out: str | Path, *, model: ModelSpec | str | Path | None = None,
                 weights: bool = True, quiet: bool = False, origin: str | None = None, **options) -> dict:
    """Convert `src` in format `fmt` to a Parquet trace at `out` (written atomically); SGLang `stat` dumps and
    TensorRT-LLM statistics (`trtllm`), which hold counts only, become activation tables when `out` ends in `.npz`.

    weights: keep gate weights when the source has them (False makes a much smaller file). origin: the origin
    of every token (formats that do not name one default to the file's name or rank). options: keywords of the
    format's own reader (e.g. `rank` for sglang); None values are left out.
    model: a preset, config.json, model folder or ModelSpec (default for esft: deepseek-v2-lite, the bundled
    data's model). Returns a summary: path, format, tokens, origins, layers, top_k, and requests for a trace, or
    tables: True, coactivation and notes (what the counts mean) for counts-only tables.
    """
    if fmt not in FORMATS:
        raise PrismError(f"unknown trace format {fmt!r}; choose one of {list(FORMATS)}", parameters=("fmt",))
    if model is None and fmt != "esft":
        raise PrismError(f"{fmt} dumps do not say which model they come from: pass `model` (a preset, a config.json "
                         f"or a model folder)", parameters=("model",))
    if origin is not None and not origin.strip():
        raise PrismError("`origin` is empty; give a name, or leave it out to name origins after the files",
                         parameters=("origin",))
    model = resolve_model("deepseek-v2-lite" if model is None else model)
    options = {k: v for k, v in options.items() if v is not None}
    tables = Path(out).suffix == ".npz"
    stray = sorted(set(options) - set((TABLE_OPTIONS if tables else OPTIONS).get(fmt, ())))
    if stray:
        what = "counts (-o .npz)" if tables else "traces"
        raise PrismError(f"`{stray[0]}` does not apply to {fmt} {what}; leave it out", parameters=(stray[0],))
    if fmt not in IMPORTERS and not tables:
        raise PrismError(f"{fmt} dumps hold counts only: write `out` as a .npz file (activation tables)",
                         parameters=("out",))
    if tables:
        if fmt not in TABLE_IMPORTERS:
            raise PrismError(f"{fmt} sources become traces: write `out` as a .parquet file, then build tables from it",
                             parameters=("out",))
        with spinner(f"counting activations in the {fmt} dumps", quiet) as step:
            tables = TABLE_IMPORTERS[fmt](src, model, origin, **options)
            step(f"writing {Path(out).name}")
            tables.save(out)
        return {"path": str(out), "format": fmt, "tables": True, "tokens": int(tables.tokens.sum()),
                "origins": list(tables.origins), "layers": len(tables.layers), "top_k": model.top_k,
                "coactivation": False, "notes": [tables.meta["note"]] if tables.meta.get("note") else []}
    batches = IMPORTERS[fmt](src, model, quiet, origin, **options)
    if not weights:
        batches = (replace(b, weights=None) for b in batches)
    first = next(batches, None)
    empty = PrismError(f"{src} holds no tokens; give routing with at least one token")
    if first is None:
        raise empty
    requests: set[tuple[str, int]] = set()
    with TraceWriter(out, first.meta, first.weights is not None) as writer:
        for batch in itertools.chain([first], batches):
            writer.write(batch)
            pairs = np.unique(np.stack([batch.origin.astype(np.int64), batch.request]), axis=1)
            requests.update((batch.origins[o], r) for o, r in pairs.T.tolist())
        if not writer.rows:
            raise empty
        origins = sorted({o for o, _ in requests})
    return {"path": str(out), "format": fmt, "tokens": writer.rows, "requests": len(requests),
            "origins": origins, "layers": len(first.meta.layers), "top_k": first.meta.top_k}
