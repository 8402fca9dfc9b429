"""Trace: per-token routing decisions, and its Parquet file format.

One row per token: `origin` (string), `request` (int64), `position` (int32), `phase` (`prefill`/`decode`),
`experts` (fixed-size list of int16, `layers * top_k` values, layer-major) and optional `weights` (same shape,
float32). The file's key-value metadata `prism_plan` holds JSON: model, layers, num_experts, top_k, source.
Files are written in row groups and can be read batch by batch, so traces larger than memory stream through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prism_plan.fileio import atomic_path
from prism_plan.errors import PrismError

META_KEY = b"prism_plan"
PHASES = ("prefill", "decode")
COLUMNS = ("origin", "request", "position", "phase", "experts")


@dataclass(frozen=True)
class TraceMeta:
    """What a trace describes: the model's name, its MoE layer numbers, experts per layer, top-k, where from, and
    the model's full shape (ModelSpec.to_dict(), when the writer knew it) so later steps need no --model."""

    model: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    source: str = ""
    spec: dict | None = field(default=None, compare=False)

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "layers": list(self.layers), "num_experts": self.num_experts,
                           "top_k": self.top_k, "source": self.source, "spec": self.spec})

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "TraceMeta":
        try:
            d = json.loads(text)
            return cls(str(d["model"]), tuple(int(x) for x in d["layers"]), int(d["num_experts"]),
                       int(d["top_k"]), str(d.get("source", "")), d.get("spec"))
        except (ValueError, KeyError, TypeError) as e:
            raise PrismError(f"{where}: bad `prism_plan` metadata ({e!r}); re-import the trace with prism-plan")

    @classmethod
    def for_model(cls, model, source: str = "") -> "TraceMeta":
        """Metadata for a trace of `model` (a ModelSpec)."""
        return cls(model.name, model.layers, model.num_experts, model.top_k, source, model.to_dict())


@dataclass(frozen=True)
class Trace:
    """Routing of a batch of tokens.

    origin: [tokens] int32, index into `origins`; request: [tokens] int64; position: [tokens] int32;
    decode: [tokens] bool (False = prefill); experts: [tokens, layers, top_k] int16;
    weights: [tokens, layers, top_k] float32 or None.
    A request is identified by (origin, request).
    """

    meta: TraceMeta
    origins: tuple[str, ...]
    origin: np.ndarray
    request: np.ndarray
    position: np.ndarray
    decode: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.origin)
        shape = (n, len(self.meta.layers), self.meta.top_k)
        if self.experts.shape != shape:
            raise PrismError(f"trace experts have shape {list(self.experts.shape)}, expected {list(shape)} "
                             f"(tokens, layers, top_k)")
        for name in ("request", "position", "decode"):
            if len(getattr(self, name)) != n:
                raise PrismError(f"trace column {name} has {len(getattr(self, name))} rows, expected {n}")
        if self.weights is not None and self.weights.shape != shape:
            raise PrismError(f"trace weights have shape {list(self.weights.shape)}, expected {list(shape)}")
        if n:
            lo, hi = int(self.experts.min()), int(self.experts.max())
            if lo < 0 or hi >= self.meta.num_experts:
                raise PrismError(f"trace has expert id {lo if lo < 0 else hi} outside 0..{self.meta.num_experts - 1}")
            if self.origin.min() < 0 or self.origin.max() >= len(self.origins):
                raise PrismError("trace origin index out of range of its origin names")

    @property
    def num_tokens(self) -> int:
        return len(self.origin)

    def select(self, mask: np.ndarray) -> "Trace":
        """The tokens where `mask` ([tokens] bool or index array) holds; origins keep their names."""
        return replace(self, origin=self.origin[mask], request=self.request[mask],
                       position=self.position[mask], decode=self.decode[mask], experts=self.experts[mask],
                       weights=None if self.weights is None else self.weights[mask])

    def split_requests(self, fraction: float = 0.5) -> tuple["Trace", "Trace"]:
        """(first, rest): per origin, the first `fraction` of its requests (by request id) and the others, so
        plans made on one part can be judged on traffic they did not see."""
        if not 0 < fraction < 1:
            raise PrismError(f"split fraction must lie strictly between 0 and 1, got {fraction}")
        first = np.zeros(self.num_tokens, bool)
        for o in np.unique(self.origin):
            mine = self.origin == o
            reqs = np.unique(self.request[mine])
            cut = reqs[min(max(int(round(fraction * len(reqs))), 1), len(reqs) - 1)] if len(reqs) > 1 else None
            first |= mine & (self.request < cut) if cut is not None else mine
        return self.select(first), self.select(~first)

    @staticmethod
    def concat(parts: Iterable["Trace"]) -> "Trace":
        """One trace from several of the same model; origin names are merged."""
        parts = list(parts)
        if not parts:
            raise PrismError("no trace parts to join")
        meta = parts[0].meta
        names: list[str] = []
        for p in parts:
            if (p.meta.layers, p.meta.num_experts, p.meta.top_k) != (meta.layers, meta.num_experts, meta.top_k):
                raise PrismError("cannot join traces of different model shapes")
            names += [o for o in p.origins if o not in names]
        index = {o: i for i, o in enumerate(names)}
        origin = np.concatenate([np.array([index[o] for o in p.origins], np.int32)[p.origin] for p in parts])
        with_w = all(p.weights is not None for p in parts)
        return Trace(meta, tuple(names), origin,
                     np.concatenate([p.request for p in parts]), np.concatenate([p.position for p in parts]),
                     np.concatenate([p.decode for p in parts]), np.concatenate([p.experts for p in parts]),
                     np.concatenate([p.weights for p in parts]) if with_w else None)

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a whole trace file into memory (`load_trace`)."""
        return load_trace(path)

    def save(self, path: str | Path) -> None:
        """Write the trace to Parquet atomically."""
        with TraceWriter(path, self.meta, self.weights is not None) as w:
            w.write(self)


def _schema(meta: TraceMeta, with_weights: bool) -> pa.Schema:
    width = len(meta.layers) * meta.top_k
    fields = [pa.field("origin", pa.dictionary(pa.int32(), pa.string())), pa.field("request", pa.int64()),
              pa.field("position", pa.int32()), pa.field("phase", pa.dictionary(pa.int8(), pa.string())),
              pa.field("experts", pa.list_(pa.int16(), width))]
    if with_weights:
        fields.append(pa.field("weights", pa.list_(pa.float32(), width)))
    return pa.schema(fields, metadata={META_KEY: meta.to_json().encode()})


def _to_table(trace: Trace, schema: pa.Schema) -> pa.Table:
    n = trace.num_tokens
    width = trace.experts.shape[1] * trace.experts.shape[2]
    cols = [
        pa.DictionaryArray.from_arrays(pa.array(trace.origin, pa.int32()), pa.array(trace.origins, pa.string())),
        pa.array(trace.request, pa.int64()),
        pa.array(trace.position, pa.int32()),
        pa.DictionaryArray.from_arrays(pa.array(trace.decode.astype(np.int8)), pa.array(PHASES, pa.string())),
        pa.FixedSizeListArray.from_arrays(pa.array(trace.experts.reshape(n * width).astype(np.int16)), width),
    ]
    if "weights" in schema.names:
        cols.append(pa.FixedSizeListArray.from_arrays(
            pa.array(trace.weights.reshape(n * width).astype(np.float32)), width))
    return pa.Table.from_arrays(cols, schema=schema)


class TraceWriter:
    """Streams Trace batches into a Parquet file, one row group per `row_group_rows` tokens.

    The file appears under its name only when the writer closes without error.
    """

    def __init__(self, path: str | Path, meta: TraceMeta, with_weights: bool, row_group_rows: int = 65536):
        self.meta = meta
        self.schema = _schema(meta, with_weights)
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._atomic = atomic_path(path)
        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd", compression_level=9,
                                        use_dictionary=["origin", "phase"])

    def write(self, trace: Trace) -> None:
        """Append the tokens of `trace` (same model shape as the writer's metadata)."""
        if (trace.meta.layers, trace.meta.top_k, trace.meta.num_experts) != (
                self.meta.layers, self.meta.top_k, self.meta.num_experts):
            raise PrismError("trace batch has a different model shape than the file being written")
        if "weights" in self.schema.names and trace.weights is None:
            raise PrismError("some trace batches have gate weights and some do not; give them for all or none")
        if trace.num_tokens:
            self._writer.write_table(_to_table(trace, self.schema), row_group_size=self.row_group_rows)
            self.rows += trace.num_tokens

    def close(self, ok: bool = True) -> None:
        self._writer.close()
        if ok:
            self._atomic.__exit__(None, None, None)
        else:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def open_trace(path: str | Path) -> tuple[pq.ParquetFile, TraceMeta]:
    """Open a trace file and validate its metadata and columns (reads no rows)."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise PrismError(f"no trace file at {path}")
    except (pa.ArrowInvalid, OSError) as e:
        raise PrismError(f"{path} is not a Parquet trace ({e}); import routing with `prism-plan profile import`")
    md = pf.schema_arrow.metadata or {}
    if META_KEY not in md:
        raise PrismError(f"{path} has no `prism_plan` metadata; import it with `prism-plan profile import`")
    meta = TraceMeta.from_json(md[META_KEY], str(path))
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise PrismError(f"{path} lacks column(s) {missing}; a trace needs {list(COLUMNS)}")
    width = len(meta.layers) * meta.top_k
    for col in ("experts", "weights"):
        if col in pf.schema_arrow.names:
            t = pf.schema_arrow.field(col).type
            if not pa.types.is_fixed_size_list(t) or t.list_size != width:
                raise PrismError(f"{path}: column {col} must be a fixed-size list of {width} values "
                                 f"({len(meta.layers)} layers x top-{meta.top_k}), got {t}")
    return pf, meta


def _from_batch(batch: pa.RecordBatch, meta: TraceMeta, origins: list[str], where: str) -> Trace:
    """Convert one Arrow batch, mapping its origin strings onto the growing list `origins`."""
    n = batch.num_rows
    shape = (n, len(meta.layers), meta.top_k)
    origin_col = batch.column("origin")
    if not pa.types.is_dictionary(origin_col.type):
        origin_col = origin_col.dictionary_encode()
    names = origin_col.dictionary.to_pylist()
    for o in names:
        if o not in origins:
            origins.append(o)
    remap = np.array([origins.index(o) for o in names], dtype=np.int32)
    origin = remap[origin_col.indices.to_numpy(zero_copy_only=False)]
    phase_col = batch.column("phase")
    phase = np.asarray(phase_col.to_pylist() if not pa.types.is_dictionary(phase_col.type) else
                       np.asarray(phase_col.dictionary.to_pylist(), dtype=object)[
                           phase_col.indices.to_numpy(zero_copy_only=False)])
    bad = set(np.unique(phase).tolist()) - set(PHASES)
    if bad:
        raise PrismError(f"{where}: unknown phase value(s) {sorted(map(str, bad))}; use 'prefill' or 'decode'")
    experts = batch.column("experts").flatten().to_numpy(zero_copy_only=False).reshape(shape)
    weights = None
    if "weights" in batch.schema.names:
        weights = batch.column("weights").flatten().to_numpy(zero_copy_only=False).reshape(shape)
    try:
        return Trace(meta, tuple(origins), origin, batch.column("request").to_numpy(zero_copy_only=False),
                     batch.column("position").to_numpy(zero_copy_only=False), phase == "decode",
                     experts.astype(np.int16, copy=False), weights)
    except PrismError as e:
        raise PrismError(f"{where}: {e}")


def iter_trace(path: str | Path, batch_rows: int = 65536) -> Iterator[Trace]:
    """Yield a trace file batch by batch; origin indices are consistent across batches (the `origins` of
    later batches extend those of earlier ones)."""
    pf, meta = open_trace(path)
    origins: list[str] = []
    for batch in pf.iter_batches(batch_size=batch_rows):
        yield _from_batch(batch, meta, origins, str(path))


def load_trace(path: str | Path) -> Trace:
    """Read a whole trace file into memory."""
    pf, meta = open_trace(path)
    parts = list(iter_trace(path))
    if not parts:
        return Trace(meta, (), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                     np.zeros(0, bool), np.zeros((0, len(meta.layers), meta.top_k), np.int16))
    return parts[-1] if len(parts) == 1 else Trace.concat(parts)
