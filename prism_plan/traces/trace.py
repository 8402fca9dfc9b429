"""Trace: per-token routing decisions, and its Parquet file format.

One row per token: `origin` (string), `request` (int64), `position` (int32), `phase` (`prefill`/`decode`),
`experts` (fixed-size list of int16, `layers * top_k` values, layer-major) and optional `weights` (same shape,
float32). The file's key-value metadata `prism_plan` holds JSON: model, layers, num_experts, top_k, source.
Files are written in row groups and can be read batch by batch, so traces larger than memory stream through.
Reading checks every value as it comes from a file: metadata fields of their exact types (and agreeing with the
stored model description), no nulls, ids in 0..num_experts - 1 and distinct within a token's top-k, finite
weights, non-negative request ids and positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prism_plan.fileio import atomic_path
from prism_plan.errors import MissingInputError, PrismError
from prism_plan.placement.checks import is_integer
from prism_plan.placement.model import MAX_EXPERTS, ModelSpec
from prism_plan.traces.dumps import INT64_MAX, reason

META_KEY = b"prism_plan"
PHASES = ("prefill", "decode")
COLUMNS = ("origin", "request", "position", "phase", "experts")
POSITION_MAX = 2 ** 31 - 1  # positions are int32


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

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise PrismError(f"trace of {self.model!r}: MoE layers {list(self.layers)} must be distinct "
                             f"non-negative numbers, at least one")
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise PrismError(f"trace of {self.model!r}: num_experts {self.num_experts} is outside 1..{MAX_EXPERTS} "
                             f"(trace files store expert ids as int16)")
        if not 1 <= self.top_k <= self.num_experts:
            raise PrismError(f"trace of {self.model!r}: top_k {self.top_k} is outside 1..num_experts "
                             f"({self.num_experts})")

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "layers": list(self.layers), "num_experts": self.num_experts,
                           "top_k": self.top_k, "source": self.source, "spec": self.spec})

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "TraceMeta":
        """The metadata of the trace file `where`, every field checked."""
        fix = "re-import the trace with prism-plan"
        try:
            d = json.loads(text)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise PrismError(f"{where}: its `prism_plan` metadata is not JSON ({reason(e)}); {fix}")
        if not isinstance(d, dict):
            raise PrismError(f"{where}: its `prism_plan` metadata is not a JSON object; {fix}")
        if not isinstance(d.get("model"), str) or not isinstance(d.get("source", ""), str):
            raise PrismError(f"{where}: `prism_plan` metadata needs a string `model` (and `source`); {fix}")
        layers = d.get("layers")
        if not isinstance(layers, list) or not all(is_integer(x) for x in layers):
            raise PrismError(f"{where}: `prism_plan` metadata `layers` must be a list of integers, got "
                             f"{json.dumps(layers)[:60]}; {fix}")
        for key in ("num_experts", "top_k"):
            if not is_integer(d.get(key)):
                raise PrismError(f"{where}: `prism_plan` metadata `{key}` must be an integer, got "
                                 f"{json.dumps(d.get(key))}; {fix}")
        try:
            meta = cls(d["model"], tuple(layers), d["num_experts"], d["top_k"], d.get("source", ""))
        except PrismError as e:
            raise PrismError(f"{where}: {e}; {fix}")
        return replace(meta, spec=checked_spec(d.get("spec"), meta.layers, meta.num_experts, meta.top_k, where))

    @classmethod
    def for_model(cls, model, source: str = "") -> "TraceMeta":
        """Metadata for a trace of `model` (a ModelSpec)."""
        return cls(model.name, model.layers, model.num_experts, model.top_k, source, model.to_dict())


def checked_spec(spec: object, layers: tuple[int, ...], num_experts: int, top_k: int | None,
                 where: str) -> dict | None:
    """The model description `spec` stored in the metadata of file `where`, when it is one (or None) and agrees
    with the shape the file's data has (`top_k` None: not known)."""
    if spec is None:
        return None
    fix = "the file was edited or mixed up; rebuild it with prism-plan"
    try:
        model = ModelSpec.from_dict(spec) if isinstance(spec, dict) else None
    except (PrismError, TypeError, ValueError) as e:
        raise PrismError(f"{where}: the model description `spec` in its metadata is invalid ({reason(e)}); {fix}")
    if model is None:
        raise PrismError(f"{where}: the model description `spec` in its metadata is not a JSON object; {fix}")
    for name, mine, theirs in (("layers", layers, model.layers), ("num_experts", num_experts, model.num_experts),
                               ("top_k", top_k, model.top_k)):
        if mine is not None and mine != theirs:
            raise PrismError(f"{where}: its data has {name} {list(mine) if name == 'layers' else mine} but the "
                             f"model description `spec` in its metadata says {_brief(theirs)}; {fix}")
    return spec


def _brief(v: object) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v)


def routing_ids(ids: np.ndarray, num_experts: int, where: str, fix: str, rows: Callable[[int], str] | None = None,
                parameters: tuple[str, ...] = (), distinct: bool = True) -> np.ndarray:
    """`ids` [tokens, ..., top_k] as int16, once no value is other than an integer in 0..num_experts - 1 and
    (with `distinct`) no token names an expert twice among its top-k. rows(t): where token t is (" line 5"),
    for the message; fix: what the user should do."""
    def error(t: int, what: str) -> PrismError:
        return PrismError(f"{where}{rows(t) if rows else ''}: {what}; {fix}", parameters=parameters)

    if ids.dtype.kind not in "iu":
        raise PrismError(f"{where}: expert ids must be integers, got {ids.dtype} values; {fix}", parameters=parameters)
    if not ids.size:
        return ids.astype(np.int16)
    if ids.min() < 0 or ids.max() >= num_experts:
        t, *_ = np.argwhere((ids < 0) | (ids >= num_experts))[0]
        value = ids[t].ravel()[((ids[t] < 0) | (ids[t] >= num_experts)).ravel()][0]
        raise error(int(t), f"expert id {value} is outside 0..{num_experts - 1}")
    k = ids.shape[-1]
    if not distinct:
        return ids.astype(np.int16, copy=False)
    twice = np.zeros(ids.shape[:-1], bool)
    for i in range(k):  # pairs of slots: k is small, and this keeps to array passes
        for j in range(i + 1, k):
            twice |= ids[..., i] == ids[..., j]
    if twice.any():
        at = tuple(np.argwhere(twice)[0])
        chosen = np.sort(ids[at])
        raise error(int(at[0]) if ids.ndim > 1 else 0, f"expert {chosen[1:][np.diff(chosen) == 0][0]} appears twice "
                    f"among one token's top-{k} ids (they must be distinct)")
    return ids.astype(np.int16, copy=False)


def gate_weights(w: np.ndarray, where: str, fix: str) -> np.ndarray:
    """`w` as float32 once every value is a finite number."""
    if w.dtype.kind not in "iuf":
        raise PrismError(f"{where}: gate weights must be numbers, got {w.dtype} values; {fix}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = w.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise PrismError(f"{where}: gate weight {w.ravel()[~np.isfinite(out.ravel())][0]} is not a finite float32; "
                         f"{fix}")
    return out


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


def _is_text(t: pa.DataType) -> bool:
    """A string column, plain or dictionary-encoded."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def open_trace(path: str | Path) -> tuple[pq.ParquetFile, TraceMeta]:
    """Open a trace file and validate its metadata and column types (reads no rows)."""
    path = Path(path)
    if path.is_dir():
        raise PrismError(f"{path} is a folder; give a trace file (.parquet)")
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # row group by row group: memory stays flat
    except FileNotFoundError:
        raise MissingInputError(f"no trace file at {path}")
    except (pa.ArrowException, OSError) as e:
        raise PrismError(f"{path} is not a Parquet trace ({reason(e)}); import routing with "
                         f"`prism-plan profile import`")
    schema = pf.schema_arrow
    md = schema.metadata or {}
    if META_KEY not in md:
        raise PrismError(f"{path} has no `prism_plan` metadata; import it with `prism-plan profile import`")
    meta = TraceMeta.from_json(md[META_KEY], str(path))
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise PrismError(f"{path} lacks column(s) {missing}; a trace needs {list(COLUMNS)}")
    width = len(meta.layers) * meta.top_k
    kinds = {"origin": (_is_text, "strings"), "phase": (_is_text, "strings"),
             "request": (pa.types.is_integer, "integers"), "position": (pa.types.is_integer, "integers")}
    for col, (ok, what) in kinds.items():
        if not ok(schema.field(col).type):
            raise PrismError(f"{path}: column {col} must hold {what}, got {schema.field(col).type}; re-import the "
                             f"trace with prism-plan")
    values = {"experts": (pa.types.is_integer, "integer expert ids"), "weights": (pa.types.is_floating, "floats")}
    for col, (ok, what) in values.items():
        if col in schema.names:
            t = schema.field(col).type
            if not pa.types.is_fixed_size_list(t) or t.list_size != width or not ok(t.value_type):
                raise PrismError(f"{path}: column {col} must be a fixed-size list of {width} {what} "
                                 f"({len(meta.layers)} layers x top-{meta.top_k}), got {t}")
    return pf, meta


def _labels(col: pa.Array, name: str, where: str) -> tuple[list[str], np.ndarray]:
    """(the distinct values used, the index of each row's value) of a string column, plain or dictionary-encoded;
    nulls and empty strings are refused."""
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    if col.null_count:
        raise PrismError(f"{where}: column {name} has a null value; every row needs one")
    idx = col.indices.to_numpy(zero_copy_only=False)
    names = col.dictionary.to_pylist()
    used = np.unique(idx)
    if any(names[i] is None or names[i] == "" for i in used):
        raise PrismError(f"{where}: column {name} has a null or empty value; every row needs one")
    return names, idx


def _int_column(batch: pa.RecordBatch, name: str, hi: int, where: str) -> np.ndarray:
    """An integer column as int64, once it has no null and every value lies in 0..hi."""
    col = batch.column(name)
    if col.null_count:
        raise PrismError(f"{where}: column {name} has a null value; every row needs one")
    values = col.to_numpy(zero_copy_only=False)
    if len(values) and (values.min() < 0 or values.max() > hi):
        bad = values[(values < 0) | (values > hi)][0]
        raise PrismError(f"{where}: column {name} holds {bad}, outside 0..{hi}; re-import the trace with prism-plan")
    return values.astype(np.int64)


def _from_batch(batch: pa.RecordBatch, meta: TraceMeta, origins: list[str], where: str, first_row: int,
                distinct: bool = True) -> Trace:
    """Convert one Arrow batch (rows first_row.. of the file), mapping its origin strings onto the growing list
    `origins`; every value is checked, as it comes from a file (that a token's top-k ids are distinct only
    with `distinct`: a reader that checks it on its own way skips it)."""
    n = batch.num_rows
    shape = (n, len(meta.layers), meta.top_k)
    fix = "re-import the trace with prism-plan"
    names, idx = _labels(batch.column("origin"), "origin", where)
    for i in np.unique(idx):
        if names[i] not in origins:
            origins.append(names[i])
    remap = np.array([origins.index(o) if o in origins else -1 for o in names], dtype=np.int32)
    phases, idx_phase = _labels(batch.column("phase"), "phase", where)
    bad = {phases[i] for i in np.unique(idx_phase)} - set(PHASES)
    if bad:
        raise PrismError(f"{where}: unknown phase value(s) {sorted(bad)}; use 'prefill' or 'decode'")
    decode = np.array([p == "decode" for p in phases], dtype=bool)[idx_phase]
    lists = {}
    for col in ("experts", "weights"):
        if col in batch.schema.names:
            c = batch.column(col)
            values = c.flatten()
            if c.null_count or values.null_count or len(values) != n * shape[1] * shape[2]:
                raise PrismError(f"{where}: column {col} has a null value; every token needs "
                                 f"{shape[1] * shape[2]} values")
            lists[col] = values.to_numpy(zero_copy_only=False).reshape(shape)
    experts = routing_ids(lists["experts"], meta.num_experts, where, fix, rows=lambda t: f" row {first_row + t}",
                          distinct=distinct)
    weights = gate_weights(lists["weights"], where, fix) if "weights" in lists else None
    request = _int_column(batch, "request", INT64_MAX, where)
    position = _int_column(batch, "position", POSITION_MAX, where).astype(np.int32)
    return Trace(meta, tuple(origins), remap[idx], request, position, decode, experts, weights)


def iter_trace(path: str | Path, batch_rows: int = 65536, *, distinct: bool = True) -> Iterator[Trace]:
    """Yield a trace file batch by batch; origin indices are consistent across batches (the `origins` of
    later batches extend those of earlier ones). distinct=False leaves out the check that each token's top-k
    ids are distinct, for readers that make it themselves (counting.count_batch)."""
    pf, meta = open_trace(path)
    origins: list[str] = []
    first = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield _from_batch(batch, meta, origins, str(path), first, distinct)
            first += batch.num_rows
    except (pa.ArrowException, OSError) as e:  # a damaged page or row group
        raise PrismError(f"{path}: cannot read its rows ({reason(e)}); the file is damaged: write it again")


def load_trace(path: str | Path) -> Trace:
    """Read a whole trace file into memory."""
    pf, meta = open_trace(path)
    parts = list(iter_trace(path))
    if not parts:
        return Trace(meta, (), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                     np.zeros(0, bool), np.zeros((0, len(meta.layers), meta.top_k), np.int16))
    return parts[-1] if len(parts) == 1 else Trace.concat(parts)
