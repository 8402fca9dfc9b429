"""ActivationTables: how often each origin activates each expert, and which experts fire together.

Built from a trace batch by batch with array code (no per-token Python), saved as `.npz`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from prism_plan.fileio import atomic_path
from prism_plan.errors import MissingInputError, PrismError
from prism_plan.progress import track
from prism_plan.traces.trace import Trace, iter_trace

@dataclass
class ActivationTables:
    """Activation statistics of one trace (or one window of it).

    freq: [origins, layers, experts] float64, activations (top-k slots) per origin.
    tokens: [origins] int64, tokens seen per origin.
    coact: [layers, experts, experts] float64 or None, tokens in which both experts fired in the layer,
        summed over origins; the diagonal is each expert's activation count.
    trans: [layers - 1, experts, experts] float64 or None, tokens routed to expert e at MoE layer i and
        expert e' at MoE layer i + 1.
    layers: the model's MoE layer numbers; meta: model, top_k, source, window.
    """

    origins: tuple[str, ...]
    layers: tuple[int, ...]
    freq: np.ndarray
    tokens: np.ndarray
    coact: np.ndarray | None = None
    trans: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.origins = tuple(str(o) for o in self.origins)
        self.layers = tuple(int(x) for x in self.layers)
        o, l, e = len(self.origins), len(self.layers), self.freq.shape[-1] if self.freq.ndim == 3 else -1
        checks = [("freq", self.freq, (o, l, e)), ("tokens", self.tokens, (o,)),
                  ("coact", self.coact, (l, e, e)), ("trans", self.trans, (max(l - 1, 0), e, e))]
        for name, arr, shape in checks:
            if arr is not None and arr.shape != shape:
                raise PrismError(f"activation tables: {name} has shape {list(arr.shape)}, expected {list(shape)}")

    @property
    def num_experts(self) -> int:
        return self.freq.shape[2]

    @property
    def top_k(self) -> int:
        return int(self.meta.get("top_k", 0))

    def sha256(self) -> str:
        """Hash of the tables' content (for plan provenance)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.origins, self.layers]).encode())
        for arr in (self.freq, self.tokens, self.coact, self.trans):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        """Headline figures: origins, tokens per origin, shape, activations and the window it covers."""
        return {"origins": list(self.origins), "tokens": self.tokens.tolist(), "layers": len(self.layers),
                "experts": self.num_experts, "activations": float(self.freq.sum()), "window": self.meta.get("window")}

    def save(self, path: str | Path) -> None:
        """Write to `.npz` atomically (DESIGN.md, "Tables file")."""
        arrays = {"freq": self.freq, "tokens": self.tokens, "origins": np.array(self.origins, dtype=str),
                  "layers": np.array(self.layers, dtype=np.int64), "meta": np.array(json.dumps(self.meta))}
        if self.coact is not None:
            arrays["coact"] = self.coact
        if self.trans is not None:
            arrays["trans"] = self.trans
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationTables":
        """Read a `.npz` written by `save`; a clear error for anything else."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"freq", "tokens", "origins", "layers"} - set(z.files)
                if missing:
                    raise PrismError(f"{path} is not a tables file: missing array(s) {sorted(missing)}; "
                                     f"build one with `prism-plan profile tables`")
                return cls(tuple(z["origins"].tolist()), tuple(z["layers"].tolist()),
                           z["freq"].astype(np.float64), z["tokens"].astype(np.int64),
                           z["coact"] if "coact" in z.files else None, z["trans"] if "trans" in z.files else None,
                           json.loads(str(z["meta"])) if "meta" in z.files else {})
        except FileNotFoundError:
            raise MissingInputError(f"no tables file at {path}")
        except (ValueError, OSError) as e:
            raise PrismError(f"{path} is not a readable .npz tables file ({e})")


def _pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int, out: np.ndarray, upper: bool = False) -> None:
    """Add to out [pairs_of_layers, E, E] the count of (a, b) co-occurrences.

    a, b: [tokens, pairs_of_layers, k] expert ids; slot i of a pairs with slot j of b (only i < j when
    `upper`). One bincount per slot pair keeps the index arrays at tokens x layers.
    """
    _, p, k = a.shape
    e = num_experts
    base = (np.arange(p, dtype=np.int64) * e * e)[None, :]
    rows = [(base + a[:, :, i].astype(np.int64) * e).ravel() for i in range(k)]
    cols = [b[:, :, j].astype(np.int64).ravel() for j in range(k)]
    flat = out.reshape(-1)
    for i in range(k):
        for j in range(i + 1 if upper else 0, k):
            flat += np.bincount(rows[i] + cols[j], minlength=flat.size)


def build_tables(batches: Iterable[Trace], pairs: bool = True, window: dict | None = None) -> ActivationTables:
    """Accumulate ActivationTables over trace batches (one pass; memory independent of trace length).

    pairs: also count co-activation and cross-layer transitions (the costly part).
    """
    freq = tokens = coact = trans = None
    origins: tuple[str, ...] = ()
    meta = None
    for t in batches:
        if meta is None:
            meta = t.meta
            l, e = len(meta.layers), meta.num_experts
            freq, tokens = np.zeros((0, l, e)), np.zeros(0, np.int64)
            if pairs:
                coact, trans = np.zeros((l, e, e)), np.zeros((max(l - 1, 0), e, e))
        if len(t.origins) > len(origins):  # later batches may bring new origins
            grow = len(t.origins) - len(origins)
            freq = np.concatenate([freq, np.zeros((grow,) + freq.shape[1:])])
            tokens = np.concatenate([tokens, np.zeros(grow, np.int64)])
            origins = t.origins
        l, e = len(meta.layers), meta.num_experts
        o = len(origins)
        idx = ((t.origin.astype(np.int64)[:, None, None] * l + np.arange(l)[None, :, None]) * e + t.experts)
        freq += np.bincount(idx.ravel(), minlength=o * l * e).reshape(o, l, e)
        tokens += np.bincount(t.origin, minlength=o)
        if pairs:
            _pair_counts(t.experts, t.experts, e, coact, upper=True)
            if l > 1:
                _pair_counts(t.experts[:, :-1], t.experts[:, 1:], e, trans)
    if meta is None:
        raise PrismError("the trace holds no tokens; tables need at least one")
    if pairs:  # only pairs above the diagonal were counted; mirror them and put activation counts on it
        coact += coact.transpose(0, 2, 1)
        idx = np.arange(meta.num_experts)
        coact[:, idx, idx] = freq.sum(axis=0)
    return ActivationTables(origins, meta.layers, freq, tokens, coact, trans,
                            {"model": meta.model, "top_k": meta.top_k, "source": meta.source, "spec": meta.spec,
                             "window": window})


def tables_from_trace(path: str | Path, pairs: bool = True, quiet: bool = True) -> ActivationTables:
    """ActivationTables of a whole trace file, streamed batch by batch (a progress bar unless quiet)."""
    return build_tables(track(iter_trace(path), "counting activations", quiet=quiet), pairs=pairs)
