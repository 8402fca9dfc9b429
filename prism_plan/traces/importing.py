"""Import routing from other tools' formats into a Parquet trace."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.esft import iter_esft
from prism_plan.traces.jsonl import iter_jsonl
from prism_plan.traces.trace import TraceWriter

IMPORTERS = {
    "esft": lambda src, model, quiet: iter_esft(src, model, quiet=quiet),
    "jsonl": lambda src, model, quiet: iter_jsonl(src, model),
}


def import_trace(fmt: str, src: str | Path, out: str | Path, model: ModelSpec, weights: bool = True,
                 quiet: bool = False) -> dict:
    """Convert `src` in format `fmt` to a Parquet trace at `out` (written atomically).

    weights: keep gate weights when the source has them (False makes a much smaller file).
    Returns a summary: tokens, requests, origins, layers, top_k.
    """
    if fmt not in IMPORTERS:
        raise PrismError(f"unknown trace format {fmt!r}; choose one of {sorted(IMPORTERS)}")
    batches = IMPORTERS[fmt](src, model, quiet)
    if not weights:
        batches = (replace(b, weights=None) for b in batches)
    first = next(batches, None)
    if first is None:
        raise PrismError(f"{src} holds no tokens")
    requests: set[tuple[str, int]] = set()
    with TraceWriter(out, first.meta, first.weights is not None) as writer:
        for batch in itertools.chain([first], batches):
            writer.write(batch)
            pairs = np.unique(np.stack([batch.origin.astype(np.int64), batch.request]), axis=1)
            requests.update((batch.origins[o], r) for o, r in pairs.T.tolist())
        origins = sorted({o for o, _ in requests})
    return {"path": str(out), "format": fmt, "tokens": writer.rows, "requests": len(requests),
            "origins": origins, "layers": len(first.meta.layers), "top_k": first.meta.top_k}
