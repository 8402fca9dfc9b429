"""ActivationTables: how often each origin activates each expert, and which experts fire together.

Built from a trace batch by batch with array code (no per-token Python), saved as `.npz`. Tables are always
counts a solver can use: finite, not negative, consistent with their token counts, and with at least one token
(tables of no tokens are refused wherever they are made or loaded: every ratio they feed would be 0 / 0).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import zipfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

import numpy as np

from prism_plan.fileio import atomic_path
from prism_plan.errors import MissingInputError, PrismError
from prism_plan.progress import track
from prism_plan.traces.counting import count_batch
from prism_plan.traces.dumps import read_npz
from prism_plan.traces.trace import Trace, checked_spec, iter_trace, open_trace

if TYPE_CHECKING:
    from prism_plan.placement.model import ModelSpec

T = TypeVar("T")
BATCH_ROWS = 32768  # rows counted at once: three batches in flight (read ahead, queued, counted) stay small
PREFIX = "activation tables: "
MAX_TOKENS = 2 ** 53  # counts stay exact in float64
MAX_COUNT = 2.0 ** 63  # larger counts are no counts, and their sums would overflow
PAIR_BYTES_MAX = 2 ** 32  # co-activation and transition arrays larger than this are refused, not swapped


@dataclass
class ActivationTables:
    """Activation statistics of one trace (or one window of it).

    freq: [origins, layers, experts] float64, activations (top-k slots) per origin.
    tokens: [origins] int64, tokens seen per origin.
    coact: [layers, experts, experts] float64 or None, tokens in which both experts fired in the layer,
        summed over origins; the diagonal is each expert's activation count.
    trans: [layers - 1, experts, experts] float64 or None, tokens routed to expert e at MoE layer i and
        expert e' at MoE layer i + 1.
    layers: the model's MoE layer numbers; meta: model, top_k, source, window, requests ({origin: inclusive
        [first, last] runs of the request ids counted}; absent from counts-only tables).
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
        if self.freq.ndim != 3:
            raise PrismError(f"{PREFIX}freq has shape {list(self.freq.shape)}, expected [origins, layers, experts]")
        o, l, e = len(self.origins), len(self.layers), self.freq.shape[2]
        checks = [("freq", self.freq, (o, l, e)), ("tokens", self.tokens, (o,)),
                  ("coact", self.coact, (l, e, e)), ("trans", self.trans, (max(l - 1, 0), e, e))]
        for name, arr, shape in checks:
            if arr is not None and arr.shape != shape:
                raise PrismError(f"{PREFIX}{name} has shape {list(arr.shape)}, expected {list(shape)}")
        self._check_values()

    def _check_values(self) -> None:
        """Counts a solver can trust: finite, not negative, no more activations than tokens x top_k, and some
        tokens at all (every ratio is per token; zero-token tables would give 100% of nothing)."""
        if len(set(self.origins)) != len(self.origins) or len(set(self.layers)) != len(self.layers):
            raise PrismError(f"{PREFIX}origins {list(self.origins)} and layers {list(self.layers)} must not repeat")
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() > MAX_TOKENS):
            raise PrismError(f"{PREFIX}tokens {self.tokens.tolist()[:8]} must lie in 0..2**53")
        total = int(self.tokens.sum())
        if total == 0:
            raise PrismError(f"{PREFIX}no tokens at all, so every coverage or traffic figure would be 0 / 0")
        for name, arr in (("freq", self.freq), ("coact", self.coact), ("trans", self.trans)):
            if arr is None or not arr.size:
                continue
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > MAX_COUNT:
                bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr) | (arr < 0) | (arr > MAX_COUNT))[0])
                raise PrismError(f"{PREFIX}{name} holds {arr[bad]} at {list(bad)}; counts must be finite, not "
                                 f"negative and below 2**63")
            if name != "freq" and arr.max() > total:
                raise PrismError(f"{PREFIX}{name} counts {arr.max():g} token pairs, more than the {total} tokens")
        per_token = self.top_k or self.num_experts
        over = self.freq.sum(axis=2) > self.tokens[:, None] * per_token * (1 + 1e-9)
        if over.any():
            i, j = (int(x) for x in np.argwhere(over)[0])
            raise PrismError(f"{PREFIX}origin {self.origins[i]!r} has {self.freq[i, j].sum():g} activations in layer "
                             f"{self.layers[j]} but {self.tokens[i]} tokens, each choosing {per_token} experts; "
                             f"freq and tokens do not belong together")

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
            # what np.savez_compressed writes, at deflate level 1: 9x faster on large tables for 13% more bytes
            z = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1)
            try:
                for name, array in arrays.items():
                    with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
                z.close()
            except BaseException:
                # a stop (Ctrl-C, SIGTERM) inside an entry: finishing the archive would raise over it, so the
                # half-written file is closed as it is (atomic_path removes it) and the stop goes on
                fp, z.fp = z.fp, None
                if fp is not None:
                    fp.close()
                raise

    @classmethod
    def load(cls, path: str | Path) -> "ActivationTables":
        """Read a `.npz` written by `save`, every array and field checked; a clear error for anything else."""
        path = Path(path)
        if not path.exists():
            raise MissingInputError(f"no tables file at {path}")
        fix = "build one with `prism-plan profile tables`"
        z = read_npz(path, "prism-plan tables file", fix)
        missing = {"freq", "tokens", "origins", "layers"} - set(z)
        if missing:
            raise PrismError(f"{path} is not a prism-plan tables file: missing array(s) {sorted(missing)}; {fix}")
        kinds = {"freq": ("iuf", 3), "tokens": ("iu", 1), "origins": ("U", 1), "layers": ("iu", 1),
                 "coact": ("iuf", 3), "trans": ("iuf", 3), "meta": ("U", 0)}
        for name, (kind, ndim) in kinds.items():
            if name in z and (z[name].dtype.kind not in kind or z[name].ndim != ndim):
                what = {"iuf": "numbers", "iu": "integers", "U": "strings"}[kind]
                raise PrismError(f"{path}: array {name} must hold {what} in {ndim} dimension(s), got "
                                 f"{z[name].dtype} of shape {list(z[name].shape)}; {fix}")
        if any(o == "" for o in z["origins"].tolist()) or (z["layers"] < 0).any():
            raise PrismError(f"{path}: origins must be non-empty names and layers non-negative numbers; {fix}")
        meta = _meta(str(z["meta"]), path) if "meta" in z else {}
        try:
            tables = cls(tuple(z["origins"].tolist()), tuple(z["layers"].tolist()), z["freq"].astype(np.float64),
                         z["tokens"].astype(np.int64), *(z[k].astype(np.float64) if k in z else None
                                                         for k in ("coact", "trans")), meta)
        except PrismError as e:
            raise PrismError(f"{path}: {str(e).removeprefix(PREFIX)}; build the tables again with "
                             f"`prism-plan profile tables`")
        checked_spec(meta.get("spec"), tables.layers, tables.num_experts, meta.get("top_k"), str(path))
        return tables


def _meta(text: str, path: Path) -> dict:
    """The `meta` JSON of a tables file, its known fields of the right types."""
    fix = "build the tables again with `prism-plan profile tables`"
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrismError(f"{path}: its `meta` is not JSON ({e.msg}); {fix}")
    if not isinstance(meta, dict):
        raise PrismError(f"{path}: its `meta` is not a JSON object; {fix}")
    types = {"model": (str, "a string"), "source": (str, "a string"), "top_k": (int, "a positive integer"),
             "window": (dict, "a JSON object"), "coactivation": (bool, "true or false"),
             "requests": (dict, "a JSON object")}
    for key, (kind, want) in types.items():
        value = meta.get(key)
        if value is not None and (type(value) is not kind or kind is int and value < 1):
            raise PrismError(f"{path}: `meta` field {key} must be {want}, got {json.dumps(value)}; {fix}")
    return meta


def build_tables(batches: Iterable[Trace], pairs: bool = True, window: dict | None = None, *,
                 where: str | None = None, first_row: int = 0) -> ActivationTables:
    """Accumulate ActivationTables over trace batches (one pass; memory independent of trace length).

    pairs: also count co-activation and cross-layer transitions (the costly part; `counting.count_batch`);
    where, first_row: the file the batches come from and the row of its first token, named with the row of a
    bad id (default the trace's source, 0).
    """
    freq = tokens = coact = trans = None
    origins: tuple[str, ...] = ()
    meta = None
    seen: list[np.ndarray] = []  # per batch, its distinct (origin, request) pairs
    first = first_row
    for t in batches:
        if meta is None:
            meta = t.meta
            l, e = len(meta.layers), meta.num_experts
            freq, tokens = np.zeros((0, l, e), np.int64), np.zeros(0, np.int64)
            need = (2 * l - 1) * e * e * 8
            if pairs and need > PAIR_BYTES_MAX:
                raise PrismError(f"counting expert pairs of {e} experts over {l} layers needs "
                                 f"{need / 2 ** 30:.0f} GiB; count without them (--no-pairs on the command line, "
                                 f"pairs=False in Python)")
            if pairs:
                coact, trans = np.zeros((l, e, e), np.int64), np.zeros((max(l - 1, 0), e, e), np.int64)
        if len(t.origins) > len(origins):  # later batches may bring new origins
            grow = len(t.origins) - len(origins)
            freq = np.concatenate([freq, np.zeros((grow,) + freq.shape[1:], np.int64)])
            tokens = np.concatenate([tokens, np.zeros(grow, np.int64)])
            origins = t.origins
        count_batch(t.origin, t.experts, meta.num_experts, freq, coact, trans,
                    where=where or meta.source or "the trace", first_row=first)
        first += t.num_tokens
        tokens += np.bincount(t.origin, minlength=len(origins))
        seen.append(np.unique(_request_runs(t.origin, t.request), axis=0))
    if meta is None:
        raise PrismError("the trace holds no tokens; tables need at least one")
    if pairs:  # only pairs above the diagonal were counted; mirror them and put activation counts on it
        coact += coact.transpose(0, 2, 1)
        idx = np.arange(meta.num_experts)
        coact[:, idx, idx] = freq.sum(axis=0)
    keys = np.unique(np.concatenate(seen), axis=0)  # [distinct (origin, request), 2], sorted
    requests = {origins[o]: _id_ranges(keys[keys[:, 0] == o, 1]) for o in np.unique(keys[:, 0])}
    as_float = (lambda a: None if a is None else a.astype(np.float64))
    return ActivationTables(origins, meta.layers, as_float(freq), tokens, as_float(coact), as_float(trans),
                            {"model": meta.model, "top_k": meta.top_k, "source": meta.source, "spec": meta.spec,
                             "window": window, "requests": requests})


def _request_runs(origin: np.ndarray, request: np.ndarray) -> np.ndarray:
    """[runs, 2] (origin, request) at the start of every run of rows of one request: the batch's requests in far
    fewer rows than it has tokens where requests come in runs (prefill), for np.unique to finish cheaply."""
    start = np.ones(len(origin), bool)
    start[1:] = (origin[1:] != origin[:-1]) | (request[1:] != request[:-1])
    return np.stack([origin[start].astype(np.int64), request[start]], axis=1)


def _id_ranges(ids: np.ndarray) -> list[list[int]]:
    """Sorted unique ids as inclusive [first, last] runs of consecutive ids: what a report needs to tell whether a
    replayed request was counted (held-out or in-sample), in a few numbers per origin."""
    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)
    return [[int(r[0]), int(r[-1])] for r in runs]


def count_tables(counts: dict[str, np.ndarray], model: ModelSpec, source: str, empty: str,
                 note: str | None = None) -> ActivationTables:
    """Counts-only ActivationTables (no co-activation) from {origin: freq [MoE layers, experts]} of a dump that
    counts activations (SGLang stat, TensorRT-LLM statistics). model: the ModelSpec; empty: the message when
    every count is zero; note: what the counts mean, kept in meta["note"]."""
    freq = np.stack(list(counts.values()))
    if not freq.any():
        raise PrismError(empty)
    # every token activates top_k experts in each MoE layer: the busiest layer bounds the tokens from below
    tokens = np.ceil(freq.sum(axis=2).max(axis=1) / model.top_k).astype(np.int64)
    meta = {"model": model.name, "top_k": model.top_k, "source": source, "spec": model.to_dict(), "window": None,
            "coactivation": False}
    return ActivationTables(tuple(counts), model.layers, freq, tokens, None, None,
                            meta if note is None else {**meta, "note": note})


def tables_from_trace(path: str | Path, pairs: bool = True, quiet: bool = True) -> ActivationTables:
    """ActivationTables of a whole trace file, streamed batch by batch (a progress bar unless quiet)."""
    if not open_trace(path)[0].metadata.num_rows:
        raise PrismError(f"{path} holds no tokens; tables need at least one")
    # count_batch checks that each token's ids are distinct as it counts: the reader need not
    with closing(read_ahead(iter_trace(path, BATCH_ROWS, distinct=False))) as batches:  # the reader stops too
        return build_tables(track(batches, f"counting activations in {Path(path).name}", quiet=quiet),
                            pairs=pairs, where=str(path))


def read_ahead(batches: Iterator[T], depth: int = 1) -> Iterator[T]:
    """`batches`, produced by a thread that reads up to `depth` ahead: Parquet decoding and the counting
    kernel both let go of the GIL, so reading the next batch overlaps counting this one. An error in the
    reader comes out here, at its place in the sequence."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand_over(item) -> bool:
        """Put `item` in the box unless the consumer has stopped; whether it went in."""
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for b in batches:
                if not hand_over((b, None)):
                    return
        except BaseException as e:  # handed over, raised in the consumer
            hand_over((done, e))
            return
        hand_over((done, None))

    reader = threading.Thread(target=produce, name="prism-plan-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            try:
                item, error = box.get(timeout=0.1)  # a timeout keeps Ctrl-C prompt
            except queue.Empty:
                continue
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
