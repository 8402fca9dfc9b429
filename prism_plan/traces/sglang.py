"""Importer for SGLang's expert-distribution recorder dumps (`/dump_expert_distribution_record`, `.pt`).

`per_token` mode writes one file per rank, `expert_distribution_recorder_{time}_{rank}.pt`:
`{"records": [...], "last_physical_to_logical_map": [hidden layers, physical slots]}`. A record is one forward pass
of one rank: `forward_pass_id`, `rank`, `forward_mode` (SGLang's ForwardMode: EXTEND=1, DECODE=2, MIXED=3,
IDLE=4, TARGET_VERIFY=5, DRAFT_EXTEND_V2=6, PREBUILT=7, SPLIT_PREFILL=8, DLLM_EXTEND=9), `input_ids` and
`positions` [tokens], `extend_seq_lens` (tokens per request of an extend pass, None otherwise) and
`topk_ids_of_layer` [hidden layers, tokens, 8]: physical slots, -1 for unused slots and dense layers, made
logical experts through the map. What the records tell, and what they do not:
- Phase and requests. An EXTEND or SPLIT_PREFILL pass is prefill, one request per `extend_seq_lens` segment.
  DECODE is decode, one request per token; so is TARGET_VERIFY (speculative verification), whose record does not
  say which request each draft token belongs to. A MIXED pass (`--enable-mixed-chunk`) holds the prefill
  segments first, then the running decode requests as one-token segments: the one-token segments after the last
  one that must be prefill (longer, or starting at position 0) are decode. So a prefill chunk of one token that
  ends the prefill part of a MIXED pass imports as decode, and a decode batch that SGLang runs as an EXTEND pass
  of one-token segments (DP attention, when another rank prefills) as prefill: the records cannot tell them apart.
- Position: the record's `positions`, the token's index in its sequence (a cached prefix counts).
- Request ids: records name no request (SGLang leaves `rids` out), so a prompt prefilled in several chunks gives
  one request per chunk, and a decode token cannot be joined to its prompt or to its request's other decode
  tokens: its input id is the previous token's sample and positions repeat across requests. Requests are
  numbered per origin in file, record and segment order, so each (forward pass, segment) is its own request;
  `forward_pass_id` cannot number them, as it repeats (one per rank, a draft model's runner counts its own, elastic
  EP restarts it at 0).
- Passes without tokens (IDLE) or without any expert id (a speculative draft model's, whose layers SGLang does not
  record) are skipped; a pass of another mode with expert ids is refused, and so is one where only some tokens
  have ids (its rank routed other rows than its tokens, e.g. the batch split across attention-TP ranks).
- Ranks: each file is an origin, named after it (or all are `origin`). With `--moe-a2a-backend none` every rank
  routes the whole batch and records the same tokens; under DP attention each rank then records the first rows of
  the batch gathered from all ranks (the first DP rank's tokens) against its own tokens. Both are refused (two
  ranks with the same ids in one forward pass): import one rank with `rank`. Ranks routing their own tokens (DP
  attention with DeepEP) stay separate origins.

`stat` mode writes one file (rank 0): `{"logical_count": [buffer, hidden layers, experts]}`, one row per forward
pass in a circular buffer (zero rows unused), summed over all ranks, prefill and decode together. Counts only: it
becomes ActivationTables without co-activation, whose `meta["note"]` says what the counts mean (`counted_by`).
SGLang numbers all hidden layers, dense ones included; the model's MoE layers are taken from them. SRC is one
dump or a folder of them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import dump_files, load_torch_file
from prism_plan.traces.tables import MAX_TOKENS, ActivationTables, count_tables
from prism_plan.traces.trace import POSITION_MAX, Trace, TraceMeta, routing_ids

FIX = "pass the right `model` or record the dump again"
AGAIN = "record the dump again with SGLang"
# SGLang's ForwardMode values, as records hold them (srt/model_executor/forward_batch_info.py)
MODES = {1: "EXTEND", 2: "DECODE", 3: "MIXED", 4: "IDLE", 5: "TARGET_VERIFY", 6: "DRAFT_EXTEND_V2", 7: "PREBUILT",
         8: "SPLIT_PREFILL", 9: "DLLM_EXTEND"}
SEGMENTED = {1, 3, 8}  # extend passes: their tokens are extend_seq_lens segments, one per request
DECODING = {2, 5}  # decode passes: one request per token
MIXED = 3


def _moe_rows(arr: np.ndarray, model: ModelSpec, where: str, axis: int) -> np.ndarray:
    """The model's MoE layers out of an array indexed by all hidden layers along `axis`."""
    if arr.shape[axis] != model.num_hidden_layers:
        raise PrismError(f"{where}: {arr.shape[axis]} layers, but model {model.name!r} has "
                         f"{model.num_hidden_layers} hidden layers (SGLang counts dense ones too); pass the right "
                         f"`model`", parameters=("model",))
    return np.take(arr, list(model.layers), axis=axis)


def _array(value: object, name: str, where: str, kinds: str) -> np.ndarray:
    """A tensor of the dump, once its dtype kind is one of `kinds` ("iu": integers, "iuf": numbers)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise PrismError(f"{where}: `{name}` must be a tensor of {'integers' if kinds == 'iu' else 'numbers'}, "
                         f"got {got}; {AGAIN}")
    return value


def _no_dense(used: np.ndarray, model: ModelSpec, where: str, what: str) -> None:
    """Refuse a dump with `what` in a hidden layer that is not one of the model's MoE layers (used: [hidden
    layers] bool): SGLang records MoE layers only, so the model is not the dump's."""
    dense = [layer for layer in np.flatnonzero(used).tolist() if layer not in model.layers]
    if dense:
        raise PrismError(f"{where}: hidden layer {dense[0]} holds {what}, but model {model.name!r} has no MoE layer "
                         f"{dense[0]}; pass the right `model`", parameters=("model",))


def _int_list(value: object, name: str, where: str) -> np.ndarray:
    """`value` (a list of integers or an integer tensor, as a record holds them) as an int64 array [n]."""
    arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        got = type(value).__name__ if arr is None else f"shape {list(arr.shape)} of {arr.dtype}"
        raise PrismError(f"{where}: `{name}` must be a list of integers, got {got}; {AGAIN}")
    return arr.astype(np.int64)


# ------------------------------------------------------------------------------------------ stat dumps


def sglang_tables(src: str | Path, model: ModelSpec, origin: str | None = None, *, rank: int | None = None,
                  counted_by: int | None = None) -> ActivationTables:
    """ActivationTables from `stat` dumps: one origin per file (or `origin` for all).

    counted_by: how many ranks counted each token: with `--moe-a2a-backend none` every rank routes and counts the
    whole batch (give SGLang's TP size), with an all-to-all backend each token is counted once (1); counts and
    tokens are divided by it, once every count is a multiple of it. None: counts as summed, said so in
    `meta["note"]`. rank: per_token dumps only (a stat dump is already summed over the ranks)."""
    if rank is not None:
        raise PrismError("SGLang's stat dumps hold counts summed over all ranks (rank 0 writes them), so `rank` "
                         "selects nothing there; leave it out, or record in per_token mode to import one rank",
                         parameters=("rank",))
    divisor = 1 if counted_by is None else integer(
        counted_by, "`counted_by`", low=1, fix="give the number of ranks that each counted every token",
        parameters=("counted_by",))
    files = dump_files(Path(src), ("*.pt",))
    counts: dict[str, np.ndarray] = {}
    full: list[str] = []
    for path in files:
        c = _logical_count(path, model)
        if c.shape[0] > 1 and c.reshape(c.shape[0], -1).any(axis=1).all():
            full.append(f"{path.name} ({c.shape[0]} rows)")
        moe = _moe_rows(c, model, str(path), axis=1)
        _no_dense(c.any(axis=(0, 2)), model, str(path), "counts")
        c = moe
        if divisor > 1 and (c % divisor).any():
            at = tuple(int(i) for i in np.argwhere(c % divisor)[0])
            raise PrismError(f"{path}: logical_count {c[at]:g} (buffer row {at[0]}, MoE layer {model.layers[at[1]]}, "
                             f"expert {at[2]}) is not a multiple of `counted_by` {divisor}, so not every token was "
                             f"counted by {divisor} ranks; give SGLang's TP size with --moe-a2a-backend none, or "
                             f"leave `counted_by` out", parameters=("counted_by",))
        name = origin or path.stem
        counts[name] = counts.get(name, 0) + c.sum(axis=0) / divisor
    return count_tables(counts, model, f"sglang-stat:{Path(src).name}",
                        f"{src}: the dumps hold no tokens (every logical_count is 0); record while the server handles "
                        f"traffic", _stat_note(counted_by, full))


def _logical_count(path: Path, model: ModelSpec) -> np.ndarray:
    """The `logical_count` [buffer, hidden layers, experts] float64 of one stat dump, every count checked."""
    d = load_torch_file(path)
    if not isinstance(d, dict) or "logical_count" not in d:
        raise PrismError(f"{path}: not an SGLang stat dump (no `logical_count`); per_token dumps become traces "
                         f"(-o trace.parquet)")
    c = _array(d["logical_count"], "logical_count", str(path), "iuf").astype(np.float64)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3 or c.shape[2] != model.num_experts:
        raise PrismError(f"{path}: logical_count has shape {list(c.shape)}, expected [buffer, "
                         f"{model.num_hidden_layers}, {model.num_experts}]; {FIX}", parameters=("model",))
    bad = ~np.isfinite(c) | (c < 0) | (c > MAX_TOKENS)
    if bad.any():
        raise PrismError(f"{path}: logical_count holds {c[bad][0]}; counts must be finite, not negative and at "
                         f"most 2**53: record the dump again")
    return c


def _stat_note(counted_by: int | None, full: list[str]) -> str:
    """What the counts of stat tables mean, for the import summary; full: the dumps whose buffer rows all hold
    counts."""
    parts = ["SGLang's stat counts are summed over all ranks, prefill and decode together (no co-activation)"]
    if counted_by is None:
        parts.append("with an all-to-all MoE backend (DeepEP and DP attention) each rank counts the tokens it "
                     "routes, so each token once; with --moe-a2a-backend none every rank routes the whole batch, "
                     "so counts and tokens are N times the tokens served on N ranks (per-token frequencies are "
                     "right either way): pass counted_by=N (--counted-by N) to divide them")
    else:
        parts.append(f"counts and tokens are divided by counted_by={counted_by}, the ranks that each counted "
                     f"every token")
    parts.append("tokens = the busiest MoE layer's count / top_k")
    if full:
        parts.append(f"every buffer row of {', '.join(full)} holds counts: SGLang's buffer is circular "
                     f"(--expert-distribution-recorder-buffer-size, default 1000), so earlier passes may have "
                     f"been overwritten")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ per_token dumps


class Record(NamedTuple):
    """The fields of one per_token record that say which tokens it holds."""

    where: str
    forward_pass: int
    rank: int
    mode: int
    input_ids: np.ndarray  # [tokens]
    positions: np.ndarray  # [tokens]
    extend_seq_lens: object  # a list of integers, or None outside extend passes


def iter_sglang(src: str | Path, model: ModelSpec, origin: str | None = None, *,
                rank: int | None = None) -> Iterator[Trace]:
    """Yield one Trace per `per_token` record that holds tokens with expert ids.

    rank: keep only the records (files) of this rank, e.g. when every rank recorded the same tokens."""
    if rank is not None:
        rank = integer(rank, "`rank`", low=0, fix="give the rank whose records to import", parameters=("rank",))
    meta = TraceMeta.for_model(model, source=f"sglang:{Path(src).name}")
    names: list[str] = []
    next_request: dict[str, int] = defaultdict(int)
    ranks: set[int] = set()
    same = _SameBatchCheck(model)
    for path in dump_files(Path(src), ("*.pt",)):
        records, p2l = _per_token_dump(path, model)
        name = origin or path.stem
        for i, rec in enumerate(records):
            r = _record(rec, f"{path} record {i}")
            ranks.add(r.rank)
            if rank is not None and r.rank != rank:
                continue
            experts = _experts(rec, r, model, p2l)
            if experts is None:
                continue
            if r.mode not in SEGMENTED | DECODING:
                raise PrismError(f"{r.where}: forward_mode {r.mode} ({MODES.get(r.mode, 'unknown')}) holds expert "
                                 f"ids, but prism-plan cannot tell its tokens' phase or requests (it imports "
                                 f"{', '.join(MODES[m] for m in sorted(SEGMENTED | DECODING))}); record with that "
                                 f"feature off")
            if rank is None:
                same.add(r, experts)
            request, decode, count = _requests(r)
            if name not in names:
                names.append(name)
            n = len(experts)
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), next_request[name] + request,
                        r.positions.astype(np.int32), decode, experts)
            next_request[name] += count
    if rank is not None and rank not in ranks:
        raise PrismError(f"{src}: no record of rank {rank}; the dumps hold ranks {sorted(ranks)}: pick one of them "
                         f"for `rank`", parameters=("rank",))


def _per_token_dump(path: Path, model: ModelSpec) -> tuple[list, np.ndarray | None]:
    """(records, the MoE rows [moe layers, P] of last_physical_to_logical_map or None) of one per_token dump."""
    d = load_torch_file(path)
    if not isinstance(d, dict) or "records" not in d:
        raise PrismError(f"{path}: not an SGLang per_token dump (no `records`); stat dumps become tables "
                         f"(-o tables.npz)")
    if not isinstance(d["records"], list):
        raise PrismError(f"{path}: `records` must be a list of per_token records, got "
                         f"{type(d['records']).__name__}; record the dump again in per_token mode")
    p2l = d.get("last_physical_to_logical_map")
    if p2l is not None:
        p2l = _p2l(_array(p2l, "last_physical_to_logical_map", str(path), "iu"), model, str(path))
    return d["records"], p2l


def _record(rec: object, where: str) -> Record:
    """The checked header of one record: its pass, rank, mode and tokens."""
    if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
        raise PrismError(f"{where}: no `topk_ids_of_layer`; record the dump in per_token mode")
    missing = [k for k in ("forward_pass_id", "rank", "forward_mode", "input_ids", "positions", "extend_seq_lens")
               if k not in rec]
    if missing:
        raise PrismError(f"{where}: no `{missing[0]}`, which SGLang's per_token recorder writes in every record; "
                         f"{AGAIN}")
    number = {k: integer(rec[k], f"{where}: `{k}`", low=0, fix=AGAIN)
              for k in ("forward_pass_id", "rank", "forward_mode")}
    input_ids, positions = (_int_list(rec[k], k, where) for k in ("input_ids", "positions"))
    if len(positions) != len(input_ids):
        raise PrismError(f"{where}: {len(positions)} positions for {len(input_ids)} input_ids; {AGAIN}")
    if positions.size and (positions.min() < 0 or positions.max() > POSITION_MAX):
        raise PrismError(f"{where}: position {positions[(positions < 0) | (positions > POSITION_MAX)][0]} is "
                         f"outside 0..2**31 - 1; {AGAIN}")
    return Record(where, number["forward_pass_id"], number["rank"], number["forward_mode"], input_ids, positions,
                  rec["extend_seq_lens"])


def _experts(rec: dict, r: Record, model: ModelSpec, p2l: np.ndarray | None) -> np.ndarray | None:
    """The logical experts [tokens, moe layers, k] int16 of record `r`, or None when no token has any (an IDLE
    pass, or a model whose layers SGLang does not record)."""
    k, where, n = model.top_k, r.where, len(r.positions)
    ids = _array(rec["topk_ids_of_layer"], "topk_ids_of_layer", where, "iu")
    if ids.ndim != 3 or ids.shape[1] != n or ids.shape[2] < k:
        raise PrismError(f"{where}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
                         f"[{model.num_hidden_layers}, {n} tokens, >= {k}]; {FIX}", parameters=("model",))
    moe = _moe_rows(ids, model, where, axis=0).astype(np.int64)  # [moe layers, tokens, slots]
    _no_dense(ids.max(axis=(1, 2), initial=-1) >= 0, model, where, "expert ids")
    ids = moe
    if ids.size and ids.min() < -1:
        raise PrismError(f"{where}: topk_ids_of_layer holds {ids.min()}; ids are slots >= 0, or -1 for "
                         f"padding: record the dump again")
    if p2l is not None:
        ids = _to_logical(ids, p2l, where)
    if (ids[:, :, k:] >= 0).any():
        raise PrismError(f"{where}: more than top_k={k} experts per token; pass the right `model`",
                         parameters=("model",))
    ids = ids[:, :, :k].transpose(1, 0, 2)  # [tokens, layers, k]
    some = (ids >= 0).any(axis=(1, 2))
    if not some.any():
        return None
    partial = some & ~(ids >= 0).all(axis=(1, 2))
    if partial.any():
        raise PrismError(f"{where}: token {int(np.argmax(partial))} has -1 among its top-{k} ids in some "
                         f"MoE layers only")
    if not some.all():
        missing = np.flatnonzero(~some)
        raise PrismError(f"{where}: {len(missing)} of its {n} tokens (the first: {missing[0]}) have no expert ids "
                         f"while the others have: this rank routed other rows than its tokens (SGLang split the "
                         f"batch across attention-TP ranks), so ids cannot be matched to tokens; record with DP "
                         f"attention at attention-TP size 1, or with --moe-a2a-backend none")
    fix = "pass last_physical_to_logical_map or the right `model`" if p2l is None else FIX
    return routing_ids(ids, model.num_experts, where, fix, rows=lambda t: f" token {t}", parameters=("model",))


def _requests(r: Record) -> tuple[np.ndarray, np.ndarray, int]:
    """(request of each token, counted from 0 in this record [tokens] int64; decode [tokens] bool; requests) of a
    record of an extend or decode mode."""
    n = len(r.positions)
    if r.mode in DECODING:
        return np.arange(n, dtype=np.int64), np.ones(n, bool), n
    lens = _int_list(r.extend_seq_lens, "extend_seq_lens", r.where)
    if (lens < 0).any() or lens.sum() != n:
        raise PrismError(f"{r.where}: extend_seq_lens {lens.tolist()[:8]} must be the request lengths of its "
                         f"{MODES[r.mode]} pass, summing to its {n} tokens; {AGAIN}")
    segment = np.repeat(np.arange(len(lens)), lens)
    decode = _mixed_decode(lens, r.positions)[segment] if r.mode == MIXED else np.zeros(n, bool)
    return segment, decode, len(lens)


def _mixed_decode(lens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Which segments of a MIXED pass are decode [segments] bool. SGLang puts the running decode requests, one
    token each, after the prefill segments; a segment longer than one token, or starting at position 0 (no decode
    token is a sequence's first), is prefill, and so is every segment before it."""
    starts = np.minimum(np.cumsum(lens) - lens, len(positions) - 1)
    prefill = (lens > 1) | ((lens == 1) & (positions[starts] == 0))
    last = int(np.flatnonzero(prefill).max(initial=-1))
    return (np.arange(len(lens)) > last) & (lens == 1)


class _SameBatchCheck:
    """Refuses two ranks' records of one forward pass whose expert ids agree: both routed the same rows, so the
    dumps are copies (same tokens) or the ids are not the tokens' (different tokens)."""

    def __init__(self, model: ModelSpec) -> None:
        # (forward pass, digest of its first token's ids) -> [(record, ids digest per token)]
        self.seen: dict[tuple[int, int], list[tuple[Record, np.ndarray]]] = defaultdict(list)
        self.weights = np.random.default_rng(0).integers(1, 2 ** 63, len(model.layers) * model.top_k,
                                                         dtype=np.uint64)

    def _digests(self, experts: np.ndarray) -> np.ndarray:
        """A 64-bit digest per token of its ids [tokens] uint64, so the ranks' ids need not be kept."""
        flat = experts.reshape(len(experts), -1).astype(np.uint64) + np.uint64(1)
        return flat @ self.weights  # wraps around modulo 2**64, as a hash may

    def add(self, r: Record, experts: np.ndarray) -> None:
        rows = self._digests(experts)
        key = (r.forward_pass, int(rows[0]))
        for other, other_rows in self.seen[key]:
            m = min(len(rows), len(other_rows))
            if other.rank == r.rank or not np.array_equal(rows[:m], other_rows[:m]):
                continue
            low, high = sorted((other.rank, r.rank))
            same = np.array_equal(r.input_ids[:m], other.input_ids[:m]) and np.array_equal(r.positions[:m],
                                                                                           other.positions[:m])
            if same and len(rows) == len(other_rows):
                raise PrismError(f"{r.where}: ranks {low} and {high} recorded the same tokens and expert ids in "
                                 f"forward pass {r.forward_pass} (with --moe-a2a-backend none every rank routes the "
                                 f"whole batch), so their dumps are copies; import one rank with `rank` {low}",
                                 parameters=("rank",))
            if not same:
                raise PrismError(f"{r.where}: ranks {low} and {high} hold the same expert ids for different tokens "
                                 f"in forward pass {r.forward_pass}: with DP attention and --moe-a2a-backend none "
                                 f"each rank records the first rows of the batch gathered from all ranks, the first "
                                 f"DP rank's tokens; import that rank with `rank` {low}", parameters=("rank",))
        self.seen[key].append((r, rows))


def _p2l(p2l: np.ndarray, model: ModelSpec, where: str) -> np.ndarray:
    """The MoE rows [moe layers, physical slots] of last_physical_to_logical_map [hidden layers, P], once every
    slot maps to an expert of the model."""
    where = f"{where} (last_physical_to_logical_map)"
    if p2l.ndim != 2:
        raise PrismError(f"{where}: shape {list(p2l.shape)}, expected [layers, physical slots]")
    p2l = _moe_rows(p2l, model, where, axis=0).astype(np.int64)
    if p2l.size and (p2l.min() < 0 or p2l.max() >= model.num_experts):
        bad = p2l[(p2l < 0) | (p2l >= model.num_experts)][0]
        raise PrismError(f"{where}: maps a slot to expert {bad}, outside 0..{model.num_experts - 1}; {FIX}",
                         parameters=("model",))
    return p2l


def _to_logical(ids: np.ndarray, p2l: np.ndarray, where: str) -> np.ndarray:
    """Physical slot ids [moe layers, tokens, slots] to logical expert ids through p2l [moe layers, P]."""
    if (ids >= p2l.shape[1]).any():
        raise PrismError(f"{where}: physical id >= {p2l.shape[1]}, the slots in last_physical_to_logical_map")
    layer = np.arange(ids.shape[0])[:, None, None]
    return np.where(ids >= 0, p2l[layer, np.maximum(ids, 0)], -1)
