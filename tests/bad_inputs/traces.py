"""Bad routing sources and table files: every reader of `profile import` (JSONL, ESFT, SGLang, vLLM, Megatron),
the Parquet trace (`profile tables`, `profile drift`, `simulate`), `profile run`'s model and prompts, and the
tables file (`solve`, `migrate`, `export`) refuses them with one line naming the file."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bad_inputs import Case, writes

OK_ROW = {"origin": "a", "request": 0, "experts": [[0, 1], [2, 3], [4, 5]]}


def jsonl(*rows: object) -> Callable[[Path], None]:
    """t.jsonl: a good row, then `rows` (dicts as JSON, strings as they are)."""
    lines = [json.dumps(OK_ROW)] + [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return writes("t.jsonl", "\n".join(lines) + "\n")


def row(**changes: object) -> dict:
    """OK_ROW with `changes`."""
    return {**OK_ROW, **changes}


JSONL = ("profile", "import", "--format", "jsonl", "t.jsonl", "--model", "model", "-o", "out.parquet")


def esft(**layers: str | bytes) -> Callable[[Path], None]:
    """esft/dom/expert_weights_<L>.txt for layers 0..2 (one sequence of two tokens), `layers` replacing some
    (keyword l0, l1, l2; a name ending in _xz writes expert_weights_<L>.txt.xz)."""
    def setup(d: Path) -> None:
        dom = d / "esft" / "dom"
        dom.mkdir(parents=True)
        for layer in range(3):
            key = next((k for k in layers if k.startswith(f"l{layer}")), None)
            content = layers[key] if key else "0\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n"
            name = f"expert_weights_{layer}.txt" + (".xz" if key and key.endswith("_xz") else "")
            (dom / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


ESFT = ("profile", "import", "--format", "esft", "esft", "--model", "model", "-o", "out.parquet")


def xz(text: str) -> bytes:
    import lzma

    return lzma.compress(text.encode())


def torch_file(name: str, make: Callable[[object], object]) -> Callable[[Path], None]:
    """`name`: torch.save(make(torch))."""
    def setup(d: Path) -> None:
        import torch

        torch.save(make(torch), d / name)
    return setup


def sglang_records(torch, ids=None, p2l=None, **record):
    """A per_token dump of 2 tokens over the tiny model's 3 layers (8 slots, -1 padded)."""
    if ids is None:
        ids = torch.full((3, 2, 8), -1, dtype=torch.int64)
        ids[:, :, :2] = torch.tensor([[0, 1], [2, 3]])
    dump = {"records": [{"forward_pass_id": 0, "rank": 0, "forward_mode": 1, "input_ids": [5, 9], "positions": [0, 1],
                         "extend_seq_lens": [2], "topk_ids_of_layer": ids, **record}]}
    if p2l is not None:
        dump["last_physical_to_logical_map"] = p2l
    return dump


def sglang_ranks(make: Callable[[object, int], object]) -> Callable[[Path], None]:
    """sg/r0.pt and sg/r1.pt: torch.save(make(torch, rank)), one per_token dump per rank."""
    def setup(d: Path) -> None:
        (d / "sg").mkdir()
        for rank in (0, 1):
            torch_file(f"sg/r{rank}.pt", lambda t: make(t, rank))(d)
    return setup


def sglang_without(key: str) -> Callable[[object], object]:
    """A per_token dump whose record lacks `key`."""
    def make(torch) -> object:
        dump = sglang_records(torch)
        del dump["records"][0][key]
        return dump
    return make


SGLANG = ("profile", "import", "--format", "sglang", "d.pt", "--model", "model", "-o", "out.parquet")
SGLANG_RANKS = ("profile", "import", "--format", "sglang", "sg", "--model", "model", "-o", "out.parquet")
SGLANG_STAT = ("profile", "import", "--format", "sglang", "d.pt", "--model", "model", "-o", "out.npz")
VLLM = ("profile", "import", "--format", "vllm", "r.npy", "--model", "model", "-o", "out.parquet")
VLLM_JSON = ("profile", "import", "--format", "vllm", "r.json", "--model", "model", "-o", "out.parquet")


def npy_b64(arr: np.ndarray) -> str:
    """`arr` as vLLM's server writes routed_experts: base64 of its .npy bytes (object arrays pickled, for the
    case that tries one)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return base64.b64encode(buf.getvalue()).decode()


def vllm_response(*choices: object) -> Callable[[Path], None]:
    """r.json: a completion response with `choices`."""
    return writes("r.json", json.dumps({"object": "text_completion", "choices": list(choices)}))


def megatron(*records: object) -> Callable[[Path], None]:
    """router_trace_rank0.jsonl with `records` (dicts as JSON, strings as they are)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return writes("mt/router_trace_rank0.jsonl", "\n".join(lines) + "\n")


def mrec(layer: int, **changes: object) -> dict:
    return {"rank": 0, "step": 0, "layer": layer, "num_tokens": 1, "topk": 2, "top_indices": [[0, 1]], **changes}


def mstep(**changes: object) -> list[dict]:
    """One step's records for Megatron layers 1..3 (the tiny model's 0..2), `changes` in the first."""
    return [mrec(1, **changes), mrec(2), mrec(3)]


def megatron_ranks(ranks: dict[int, list[dict]]) -> Callable[[Path], None]:
    """mt/router_trace_rank{r}.jsonl for each rank r: its records."""
    def setup(d: Path) -> None:
        for r, records in ranks.items():
            writes(f"mt/router_trace_rank{r}.jsonl", "".join(json.dumps(x) + "\n" for x in records))(d)
    return setup


MEGATRON = ("profile", "import", "--format", "megatron", "mt", "--model", "model", "-o", "out.parquet")


def parquet(name: str = "bad.parquet", column: str | None = None,
            make: Callable[[pa.Table], pa.Array] | None = None,
            meta: Callable[[dict], object] | None = None) -> Callable[[Path], None]:
    """`name`: the bundled trace with `column` replaced by make(table) and its metadata by meta(metadata)."""
    def setup(d: Path) -> None:
        table = pq.read_table(d / "trace.parquet")
        md = json.loads(table.schema.metadata[b"prism_plan"])
        if column is not None:
            i = table.schema.get_field_index(column)
            values = make(table)
            table = table.set_column(i, column, values) if i >= 0 else table.append_column(column, values)
        new = meta(md) if meta is not None else md
        table = table.replace_schema_metadata({b"prism_plan": new if isinstance(new, bytes) else json.dumps(new)})
        pq.write_table(table, d / name)
    return setup


def experts_col(change: Callable[[np.ndarray], np.ndarray], dtype=pa.int16()) -> Callable[[pa.Table], pa.Array]:
    """The experts column [tokens, 6] changed by `change` (on an int64 copy), written as `dtype`."""
    def make(table: pa.Table) -> pa.Array:
        e = np.asarray(table.column("experts").combine_chunks().flatten()).reshape(-1, 6).astype(np.int64)
        e = change(e)
        return pa.FixedSizeListArray.from_arrays(pa.array(e.ravel().tolist(), dtype), 6)
    return make


def null_first(column: str, dtype: pa.DataType) -> Callable[[pa.Table], pa.Array]:
    """The column `column` with its first value null."""
    return lambda t: pa.array([None] + t.column(column).to_pylist()[1:], dtype)


def changed(a: np.ndarray, index, value) -> np.ndarray:
    """A copy of `a` with a[index] = value."""
    a = a.copy()
    a[index] = value
    return a


def meta_with(**changes: object) -> Callable[[dict], dict]:
    """Metadata (a trace's or a tables file's) with `changes`."""
    return lambda md: {**md, **changes}


def spec_with(**changes: object) -> Callable[[dict], dict]:
    """Metadata whose model description `spec` has `changes`."""
    return lambda md: {**md, "spec": {**md["spec"], **changes}}


TABLES = ("profile", "tables", "bad.parquet", "-o", "out.npz")


def tables(name: str = "bad.npz", **changes: object) -> Callable[[Path], None]:
    """`name`: the arrays of tables-0.npz with `changes` (None removes an array)."""
    def setup(d: Path) -> None:
        with np.load(d / "tables-0.npz") as z:
            arrays = {k: z[k] for k in z.files}
        for k, v in changes.items():
            if v is None:
                arrays.pop(k)
            else:
                arrays[k] = v(arrays) if callable(v) else v
        np.savez(d / name, **arrays)
    return setup


def freq_with(index, value) -> Callable[[dict], np.ndarray]:
    return lambda a: changed(a["freq"], index, value)


def tables_meta(change: Callable[[dict], object]) -> Callable[[dict], np.ndarray]:
    """The `meta` array of tables-0.npz, its JSON changed by `change`."""
    return lambda a: np.array(json.dumps(change(json.loads(str(a["meta"])))))


SOLVE = ("solve", "--tables", "bad.npz", "--cluster", "cluster.toml", "-o", "out.json")


def cut(source: str, name: str) -> Callable[[Path], None]:
    """`name`: the first half of the file `source` (both relative to the case's folder)."""
    def setup(d: Path) -> None:
        data = (d / source).read_bytes()
        (d / name).write_bytes(data[:len(data) // 2])
    return setup


def copy_model(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """m/: a copy of the tiny model folder, then change(m)."""
    def setup(d: Path) -> None:
        import shutil

        shutil.copytree(d / "model", d / "m")
        change(d / "m")
    return setup


RUN = ("profile", "run", "model", "--prompts", "p.jsonl", "-o", "out.parquet")


def prompts(*rows: object) -> Callable[[Path], None]:
    return writes("p.jsonl", "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


CASES = [
    # --- generic JSONL traces ---
    Case("traces-jsonl-not-utf8", JSONL, "not UTF-8", writes("t.jsonl", b'{"origin": "a\xff", "experts": []}\n')),
    Case("traces-jsonl-float-id", JSONL, "integer", jsonl(row(experts=[[3.7, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-integral-float-id", JSONL, "integer", jsonl(row(experts=[[3.0, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-bool-id", JSONL, "integer", jsonl(row(experts=[[True, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-all-bool-ids", JSONL, "integer", jsonl(row(experts=[[True, False]] * 3))),
    Case("traces-jsonl-string-id", JSONL, "integer", jsonl(row(experts=[["3", "1"], [2, 3], [4, 5]]))),
    Case("traces-jsonl-null-id", JSONL, "integer", jsonl(row(experts=[[None, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-huge-id", JSONL, "`experts`", jsonl(row(experts=[[2 ** 70, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-int16-id", JSONL, "outside 0..5", jsonl(row(experts=[[65537, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-negative-id", JSONL, "outside 0..5", jsonl(row(experts=[[-1, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-id-too-big", JSONL, "outside 0..5", jsonl(row(experts=[[6, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-duplicate-id", JSONL, "twice", jsonl(row(experts=[[1, 1], [2, 3], [4, 5]]))),
    Case("traces-jsonl-ragged-experts", JSONL, "t.jsonl line 2", jsonl(row(experts=[[0, 1], [2], [4, 5]]))),
    Case("traces-jsonl-experts-not-list", JSONL, "t.jsonl line 2", jsonl(row(experts=5))),
    Case("traces-jsonl-origin-null", JSONL, "`origin`", jsonl(row(origin=None))),
    Case("traces-jsonl-origin-number", JSONL, "`origin`", jsonl(row(origin=7))),
    Case("traces-jsonl-origin-empty", JSONL, "`origin`", jsonl(row(origin=""))),
    Case("traces-jsonl-request-bool", JSONL, "`request`", jsonl(row(request=True))),
    Case("traces-jsonl-request-string", JSONL, "`request`", jsonl(row(request="3"))),
    Case("traces-jsonl-request-float", JSONL, "`request`", jsonl(row(request=1.5))),
    Case("traces-jsonl-request-negative", JSONL, "`request`", jsonl(row(request=-1))),
    Case("traces-jsonl-request-huge", JSONL, "`request`", jsonl(row(request=2 ** 64))),
    Case("traces-jsonl-position-negative", JSONL, "`position`", jsonl(row(position=-2))),
    Case("traces-jsonl-position-huge", JSONL, "`position`", jsonl(row(position=2 ** 31))),
    Case("traces-jsonl-position-float", JSONL, "`position`", jsonl(row(position=0.5))),
    Case("traces-jsonl-phase-unknown", JSONL, "phase", jsonl(row(phase="train"))),
    Case("traces-jsonl-phase-number", JSONL, "phase", jsonl(row(phase=1))),
    Case("traces-jsonl-layers-int", JSONL, "`layers`", jsonl(row(layers=5))),
    Case("traces-jsonl-layers-string", JSONL, "`layers`", jsonl(row(layers="012"))),
    Case("traces-jsonl-layers-float", JSONL, "`layers`", jsonl(row(layers=[0.5, 1, 2]))),
    Case("traces-jsonl-layers-bool", JSONL, "`layers`", jsonl(row(layers=[False, True, 2]))),
    Case("traces-jsonl-layers-other-model", JSONL, "do not match", jsonl(row(layers=[1, 2, 3]))),
    Case("traces-jsonl-weights-nan", JSONL, "finite", jsonl('{"origin": "a", "experts": [[0, 1], [2, 3], [4, 5]], '
                                                             '"weights": [[NaN, 0.5], [0.5, 0.5], [0.5, 0.5]]}')),
    Case("traces-jsonl-weights-string", JSONL, "`weights`", jsonl(row(weights=[["a", 0.5]] * 3))),
    Case("traces-jsonl-weights-shape", JSONL, "`weights`", jsonl(row(weights=[[0.5, 0.5]]))),
    Case("traces-jsonl-weights-bool", JSONL, "`weights`", jsonl(row(weights=[[True, 0.5]] * 3))),
    Case("traces-jsonl-not-an-object", JSONL, "JSON object", jsonl("[1, 2]")),
    Case("traces-jsonl-invalid-json", JSONL, "invalid JSON", jsonl('{"origin": ')),
    Case("traces-jsonl-empty", JSONL, "no tokens", writes("t.jsonl", "")),
    Case("traces-jsonl-folder", JSONL, "folder", lambda d: (d / "t.jsonl").mkdir()),
    Case("traces-jsonl-weights-beyond-float32", JSONL, "float32",
         writes("t.jsonl", json.dumps(row(weights=[[1e40, 0.5]] * 3)) + "\n")),
    Case("traces-jsonl-empty-origin-flag", JSONL + ("--origin", ""), "--origin is empty", jsonl()),
    Case("traces-jsonl-missing", JSONL, "no JSONL file"),
    # --- ESFT expert-score folders ---
    Case("traces-esft-not-utf8", ESFT, "not UTF-8", esft(l1=b"0\t1\xff\t\t0.5\t0.5\n")),
    Case("traces-esft-truncated-xz", ESFT, "expert_weights_1.txt.xz",
         esft(l1_xz=xz("0\t1\t\t0.5\t0.5\n" * 50)[:40])),
    Case("traces-esft-xz-garbage", ESFT, "expert_weights_1.txt.xz", esft(l1_xz=b"not xz at all")),
    Case("traces-esft-id-beyond-int16", ESFT, "outside 0..5", esft(l1="40000\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-id-beyond-int64", ESFT, "expert_weights_1.txt",
         esft(l1="99999999999999999999\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-id-negative", ESFT, "outside 0..5", esft(l1="-1\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-id-too-big", ESFT, "outside 0..5", esft(l2="6\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-id-float", ESFT, "not an integer", esft(l1="3.7\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-duplicate-id", ESFT, "twice", esft(l0="1\t1\t2\t3\t\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-weight-nan", ESFT, "finite", esft(l0="0\t1\t2\t3\t\tnan\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-weight-word", ESFT, "not a number", esft(l0="0\t1\t2\t3\t\tabc\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-no-double-tab", ESFT, "double tab", esft(l0="0\t1\t2\t3\t0.5\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-empty-layer-files", ESFT, "empty", esft(l0="", l1="", l2="")),
    Case("traces-esft-line-counts-differ", ESFT, "line counts", esft(l0="0\t1\t\t0.5\t0.5\n" * 2)),
    Case("traces-esft-layer-file-is-folder", ESFT, "folder",
         lambda d: (esft()(d), (d / "esft/dom/expert_weights_1.txt").unlink(),
                    (d / "esft/dom/expert_weights_1.txt").mkdir())),
    Case("traces-esft-missing-layer", ESFT, "expert_weights_2",
         lambda d: (esft()(d), (d / "esft/dom/expert_weights_2.txt").unlink())),
    Case("traces-esft-weight-beyond-float32", ESFT, "float32", esft(l0="0\t1\t2\t3\t\t1e40\t0.5\t0.6\t0.4\n")),
    Case("traces-esft-src-is-file", ESFT, "is a file", writes("esft", "x")),
    Case("traces-esft-empty-folder", ESFT, "no ESFT domain folders", lambda d: (d / "esft").mkdir()),
    # --- SGLang dumps ---
    Case("traces-sglang-counted-by-on-a-trace", (*SGLANG, "--counted-by", "2"),
         "--counted-by does not apply to sglang traces",
         torch_file("d.pt", lambda t: sglang_records(t, ids=t.zeros((3, 2, 8), dtype=t.int32)))),
    Case("traces-sglang-float-ids", SGLANG, "integer",
         torch_file("d.pt", lambda t: sglang_records(t, ids=t.full((3, 2, 8), 0.5)))),
    Case("traces-sglang-ids-below-minus-one", SGLANG, "-2",
         torch_file("d.pt", lambda t: sglang_records(t, ids=t.tensor([[[-2, 1] + [-1] * 6] * 2] * 3)))),
    Case("traces-sglang-duplicate-ids", SGLANG, "twice",
         torch_file("d.pt", lambda t: sglang_records(t, ids=t.tensor([[[1, 1] + [-1] * 6] * 2] * 3)))),
    Case("traces-sglang-p2l-negative", SGLANG, "last_physical_to_logical_map",
         torch_file("d.pt", lambda t: sglang_records(t, p2l=t.full((3, 8), -1)))),
    Case("traces-sglang-p2l-float", SGLANG, "last_physical_to_logical_map",
         torch_file("d.pt", lambda t: sglang_records(t, p2l=t.arange(8).repeat(3, 1).float() / 2))),
    Case("traces-sglang-forward-pass-string", SGLANG, "forward_pass_id",
         torch_file("d.pt", lambda t: sglang_records(t, forward_pass_id="one"))),
    Case("traces-sglang-forward-pass-negative", SGLANG, "forward_pass_id",
         torch_file("d.pt", lambda t: sglang_records(t, forward_pass_id=-3))),
    Case("traces-sglang-records-not-list", SGLANG, "records",
         torch_file("d.pt", lambda t: {"records": t.zeros(3)})),
    Case("traces-sglang-not-a-dict", SGLANG, "not an SGLang", torch_file("d.pt", lambda t: t.zeros(3))),
    Case("traces-sglang-random-bytes", SGLANG, "not a readable torch file", writes("d.pt", bytes(range(256)))),
    Case("traces-sglang-empty-file", SGLANG, "d.pt", writes("d.pt", b"")),
    Case("traces-sglang-stat-negative", SGLANG_STAT, "negative",
         torch_file("d.pt", lambda t: {"logical_count": -t.ones((1, 3, 6))})),
    Case("traces-sglang-stat-nan", SGLANG_STAT, "finite",
         torch_file("d.pt", lambda t: {"logical_count": t.full((1, 3, 6), float("nan"))})),
    Case("traces-sglang-stat-huge", SGLANG_STAT, "2**53",
         torch_file("d.pt", lambda t: {"logical_count": t.full((4, 3, 6), 1e308, dtype=t.float64)})),
    Case("traces-sglang-stat-zero", SGLANG_STAT, "no tokens",
         torch_file("d.pt", lambda t: {"logical_count": t.zeros((2, 3, 6), dtype=t.int64)})),
    Case("traces-sglang-stat-bool", SGLANG_STAT, "logical_count",
         torch_file("d.pt", lambda t: {"logical_count": t.ones((1, 3, 6), dtype=t.bool)})),
    Case("traces-sglang-stat-not-tensor", SGLANG_STAT, "logical_count",
         torch_file("d.pt", lambda t: {"logical_count": "many"})),
    Case("traces-sglang-stat-wrong-experts", SGLANG_STAT, "logical_count has shape",
         torch_file("d.pt", lambda t: {"logical_count": t.ones((1, 3, 5))})),
    Case("traces-sglang-no-forward-mode", SGLANG, "no `forward_mode`",
         torch_file("d.pt", sglang_without("forward_mode"))),
    Case("traces-sglang-no-positions", SGLANG, "no `positions`", torch_file("d.pt", sglang_without("positions"))),
    Case("traces-sglang-mode-unknown", SGLANG, "forward_mode 42 (unknown)",
         torch_file("d.pt", lambda t: sglang_records(t, forward_mode=42))),
    Case("traces-sglang-mode-draft", SGLANG, "DRAFT_EXTEND_V2",
         torch_file("d.pt", lambda t: sglang_records(t, forward_mode=6))),
    Case("traces-sglang-extend-lens-sum", SGLANG, "summing to its 2 tokens",
         torch_file("d.pt", lambda t: sglang_records(t, extend_seq_lens=[3]))),
    Case("traces-sglang-extend-lens-none", SGLANG, "extend_seq_lens",
         torch_file("d.pt", lambda t: sglang_records(t, extend_seq_lens=None))),
    Case("traces-sglang-position-negative", SGLANG, "position -1",
         torch_file("d.pt", lambda t: sglang_records(t, positions=[0, -1]))),
    Case("traces-sglang-positions-string", SGLANG, "`positions` must be a list of integers",
         torch_file("d.pt", lambda t: sglang_records(t, positions="0 1"))),
    Case("traces-sglang-unrouted-token", SGLANG, "have no expert ids",
         torch_file("d.pt", lambda t: sglang_records(t, ids=t.tensor([[[0, 1] + [-1] * 6, [-1] * 8]] * 3)))),
    Case("traces-sglang-same-tokens-two-ranks", SGLANG_RANKS, "dumps are copies; import one rank with --rank 0",
         sglang_ranks(lambda t, rank: sglang_records(t, rank=rank))),
    Case("traces-sglang-same-ids-other-tokens", SGLANG_RANKS, "same expert ids for different tokens",
         sglang_ranks(lambda t, rank: sglang_records(t, rank=rank, input_ids=[5 + rank, 9]))),
    Case("traces-sglang-rank-absent", SGLANG + ("--rank", "3"), "no record of rank 3; the dumps hold ranks [0]",
         torch_file("d.pt", sglang_records)),
    Case("traces-sglang-stat-rank", SGLANG_STAT + ("--rank", "0"), "so --rank selects nothing",
         torch_file("d.pt", lambda t: {"logical_count": t.ones((1, 3, 6))})),
    Case("traces-sglang-bfloat16", SGLANG, "bfloat16",
         torch_file("d.pt", lambda t: sglang_records(t, ids=t.zeros((3, 2, 8), dtype=t.bfloat16)))),
    # --- vLLM routed experts ---
    Case("traces-vllm-no-tokens", VLLM, "holds no tokens",
         lambda d: np.save(d / "r.npy", np.zeros((0, 3, 2), np.int64))),
    Case("traces-jsonl-key-twice", JSONL, "gives the key 'experts' twice",
         writes("t.jsonl", '{"origin": "a", "request": 0, "experts": [[0, 1], [2, 3], [4, 5]], '
                           '"experts": [[1, 0], [3, 2], [5, 4]]}\n')),
    Case("traces-vllm-duplicate-ids", VLLM, "twice", lambda d: np.save(d / "r.npy", np.ones((2, 3, 2), np.int64))),
    Case("traces-vllm-float-array", VLLM, "integer", lambda d: np.save(d / "r.npy", np.zeros((2, 3, 2)))),
    Case("traces-vllm-bool-array", VLLM, "integer", lambda d: np.save(d / "r.npy", np.zeros((2, 3, 2), bool))),
    Case("traces-vllm-negative-ids", VLLM, "outside 0..5",
         lambda d: np.save(d / "r.npy", np.array([[[0, -1]] * 3] * 2))),
    Case("traces-vllm-uint-wrap", VLLM, "outside 0..5",
         lambda d: np.save(d / "r.npy", np.array([[[0, 65537]] * 3] * 2, np.uint32))),
    Case("traces-vllm-random-bytes", VLLM, "not a .npy array", writes("r.npy", bytes(range(256)) * 4)),
    Case("traces-vllm-empty-file", VLLM, "r.npy", writes("r.npy", b"")),
    Case("traces-vllm-truncated-npz", ("profile", "import", "--format", "vllm", "r.npz", "--model", "model", "-o",
                                       "out.parquet"), "r.npz",
         lambda d: (np.savez(d / "full.npz", a=np.zeros((50, 3, 2), np.int64)),
                    (d / "r.npz").write_bytes((d / "full.npz").read_bytes()[:200]), (d / "full.npz").unlink())),
    Case("traces-vllm-pickled-npy", VLLM, "r.npy",
         lambda d: np.save(d / "r.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)),
    Case("traces-vllm-wrong-shape", VLLM, "(all hidden layers, as vLLM returns them)",
         lambda d: np.save(d / "r.npy", np.zeros((2, 4, 2), int))),
    Case("traces-vllm-only-folders", ("profile", "import", "--format", "vllm", "v", "--model", "model", "-o",
                                      "out.parquet"), "holds no",
         lambda d: (d / "v" / "x.npy").mkdir(parents=True)),
    Case("traces-vllm-npy-named-npz", ("profile", "import", "--format", "vllm", "r.npz", "--model", "model", "-o",
                                       "out.parquet"), "single .npy array",
         lambda d: (np.save(d / "r.npy", np.zeros((2, 3, 2), int)), (d / "r.npy").rename(d / "r.npz"))),
    Case("traces-vllm-response-no-choices", VLLM_JSON, "no list of `choices`", writes("r.json", '{"id": "x"}')),
    Case("traces-vllm-response-list-of-numbers", VLLM_JSON, "no list of `choices`", writes("r.json", "[1, 2]")),
    Case("traces-vllm-response-no-routing", VLLM_JSON, "--enable-return-routed-experts",
         vllm_response({"index": 0, "text": "hi", "routed_experts": None})),
    Case("traces-vllm-response-choice-not-object", VLLM_JSON, "a choice must be an object", vllm_response(3)),
    Case("traces-vllm-response-not-base64", VLLM_JSON, "not base64", vllm_response({"routed_experts": "@@@"})),
    Case("traces-vllm-response-number", VLLM_JSON, "base64 .npy string", vllm_response({"routed_experts": 7})),
    Case("traces-vllm-response-not-npy", VLLM_JSON, "is not a .npy array",
         vllm_response({"routed_experts": base64.b64encode(b"not numpy").decode()})),
    Case("traces-vllm-response-empty-npy", VLLM_JSON, "empty or cut short", vllm_response({"routed_experts": ""})),
    Case("traces-vllm-response-pickled", VLLM_JSON, "Python objects",
         vllm_response({"routed_experts": npy_b64(np.array([{"a": 1}], dtype=object))})),
    Case("traces-vllm-response-float-lists", VLLM_JSON, "integers only",
         vllm_response({"routed_experts": [[[0.5, 1]] * 3]})),
    Case("traces-vllm-response-bool-lists", VLLM_JSON, "integers only",
         vllm_response({"routed_experts": [[[True, False]] * 3]})),
    Case("traces-vllm-response-token-ids-string", VLLM_JSON, "`token_ids` must be a list",
         vllm_response({"routed_experts": npy_b64(np.zeros((1, 3, 2), np.uint8)), "token_ids": "12"})),
    Case("traces-vllm-response-too-many-rows", VLLM_JSON, "3 rows of routed experts for 1 prompt and 2 generated",
         vllm_response({"routed_experts": npy_b64(np.tile(np.array([0, 1], np.uint8), (3, 3, 1))),
                        "prompt_token_ids": [5], "token_ids": [6, 7]})),
    Case("traces-vllm-response-jsonl-bad-line", ("profile", "import", "--format", "vllm", "r.jsonl", "--model",
                                                 "model", "-o", "out.parquet"), "r.jsonl line 2",
         writes("r.jsonl", json.dumps({"choices": [{"routed_experts": npy_b64(np.tile(np.array([0, 1], np.uint8),
                                                                                      (1, 3, 1)))}]})
                + "\n{not json\n")),
    # --- Megatron router traces ---
    Case("traces-megatron-float-ids", MEGATRON, "integer", megatron(*mstep(top_indices=[[3.7, 1]]))),
    Case("traces-megatron-string-ids", MEGATRON, "integer", megatron(*mstep(top_indices=[["3", "1"]]))),
    Case("traces-megatron-bool-ids", MEGATRON, "integer", megatron(*mstep(top_indices=[[True, 0]]))),
    Case("traces-megatron-huge-ids", MEGATRON, "router_trace_rank0.jsonl",
         megatron(*mstep(top_indices=[[2 ** 70, 1]]))),
    Case("traces-megatron-duplicate-ids", MEGATRON, "twice", megatron(*mstep(top_indices=[[2, 2]]))),
    Case("traces-megatron-rank-float", MEGATRON, "`rank`", megatron(*mstep(rank=0.5))),
    Case("traces-megatron-step-string", MEGATRON, "`step`", megatron(*mstep(step="0"))),
    Case("traces-megatron-step-negative", MEGATRON, "`step`", megatron(*mstep(step=-1))),
    Case("traces-megatron-layer-bool", MEGATRON, "`layer`", megatron(mrec(True), mrec(2), mrec(3))),
    Case("traces-megatron-num-tokens-string", MEGATRON, "num_tokens", megatron(*mstep(num_tokens="1"))),
    Case("traces-megatron-not-utf8", MEGATRON, "not UTF-8", writes("mt/router_trace_rank0.jsonl", b"\xff\xfe\n")),
    Case("traces-megatron-wrong-top-k", MEGATRON, "top_k=2", megatron(*mstep(top_indices=[[0, 1, 2]]))),
    Case("traces-megatron-topk-other", MEGATRON, "topk=3", megatron(*mstep(topk=3))),
    Case("traces-megatron-rank-in-two-files", MEGATRON, "also has records in",
         megatron_ranks({0: mstep(), 1: mstep()})),
    Case("traces-megatron-micro-batch-missing-layer", MEGATRON, "micro-batch 1 of rank0's pipeline has no record",
         megatron(*mstep(), mrec(1), mrec(2))),
    Case("traces-megatron-micro-batch-token-counts", MEGATRON, "different token counts",
         megatron(*mstep(num_tokens=2, top_indices=[[0, 1], [2, 3]]))),
    Case("traces-megatron-pipeline-rank-missing", MEGATRON, "rank 1 has none",
         megatron_ranks({0: [mrec(0, rank=0), mrec(1, rank=0)], 2: [mrec(0, rank=2)]})),
    Case("traces-megatron-stage-ranks-out-of-order", MEGATRON, "default order",
         megatron_ranks({0: [mrec(1, rank=0)], 1: [mrec(2, rank=1), mrec(3, rank=1)], 2: [mrec(1, rank=2)]})),
    # --- Parquet traces ---
    Case("traces-parquet-null-expert", TABLES, "null",
         parquet(column="experts", make=lambda t: pa.FixedSizeListArray.from_arrays(pa.array(
             [None] + np.asarray(t.column("experts").combine_chunks().flatten()).tolist()[1:], pa.int16()), 6))),
    Case("traces-parquet-null-request", TABLES, "null",
         parquet(column="request", make=null_first("request", pa.int64()))),
    Case("traces-parquet-null-origin", TABLES, "null",
         parquet(column="origin", make=null_first("origin", pa.string()))),
    Case("traces-parquet-null-phase", TABLES, "phase",
         parquet(column="phase", make=null_first("phase", pa.string()))),
    Case("traces-parquet-unknown-phase", TABLES, "phase",
         parquet(column="phase", make=lambda t: pa.array(["train"] + t.column("phase").to_pylist()[1:]))),
    Case("traces-parquet-origin-ints", TABLES, "origin",
         parquet(column="origin", make=lambda t: pa.array(np.arange(t.num_rows) % 2))),
    Case("traces-parquet-request-strings", TABLES, "request",
         parquet(column="request", make=lambda t: pa.array([str(r) for r in t.column("request").to_pylist()]))),
    Case("traces-parquet-request-negative", TABLES, "request",
         parquet(column="request", make=lambda t: pa.array([-1] * t.num_rows, pa.int64()))),
    Case("traces-parquet-position-negative", TABLES, "position",
         parquet(column="position", make=lambda t: pa.array([-5] * t.num_rows, pa.int32()))),
    Case("traces-parquet-position-huge", TABLES, "position",
         parquet(column="position", make=lambda t: pa.array([2 ** 40] * t.num_rows, pa.int64()))),
    Case("traces-parquet-float-experts", TABLES, "integer",
         parquet(column="experts", make=experts_col(lambda e: e + 0.25, pa.float32()))),
    Case("traces-parquet-int64-wraps", TABLES, "outside 0..5",
         parquet(column="experts", make=experts_col(lambda e: changed(e, (0, 0), 65536 + 1), pa.int64()))),
    Case("traces-parquet-negative-id", TABLES, "outside 0..5",
         parquet(column="experts", make=experts_col(lambda e: changed(e, (3, 2), -1)))),
    Case("traces-parquet-duplicate-id", TABLES, "twice",
         parquet(column="experts", make=experts_col(lambda e: changed(e, (4, 1), e[4, 0])))),
    Case("traces-parquet-weights-nan", TABLES, "finite",
         parquet(column="weights", make=lambda t: pa.FixedSizeListArray.from_arrays(pa.array(
             [float("nan")] * (6 * t.num_rows), pa.float32()), 6))),
    Case("traces-parquet-weights-ints", TABLES, "weights",
         parquet(column="weights", make=lambda t: pa.FixedSizeListArray.from_arrays(pa.array(
             [1] * (6 * t.num_rows), pa.int32()), 6))),
    Case("traces-parquet-meta-list", TABLES, "metadata", parquet(meta=lambda md: [md])),
    Case("traces-parquet-meta-not-json", TABLES, "metadata", parquet(meta=lambda md: b"{not json")),
    Case("traces-parquet-meta-not-utf8", TABLES, "metadata", parquet(meta=lambda md: b"\xff\xfe")),
    Case("traces-parquet-meta-layers-int", TABLES, "layers", parquet(meta=meta_with(layers=5))),
    Case("traces-parquet-meta-layers-float", TABLES, "layers", parquet(meta=meta_with(layers=[0.5, 1, 2]))),
    Case("traces-parquet-meta-layers-repeat", TABLES, "layers", parquet(meta=meta_with(layers=[0, 0, 2]))),
    Case("traces-parquet-meta-experts-float", TABLES, "num_experts", parquet(meta=meta_with(num_experts=6.5))),
    Case("traces-parquet-meta-experts-zero", TABLES, "num_experts", parquet(meta=meta_with(num_experts=0))),
    Case("traces-parquet-meta-experts-huge", TABLES, "num_experts", parquet(meta=meta_with(num_experts=2 ** 20))),
    Case("traces-parquet-meta-top-k-bool", TABLES, "top_k", parquet(meta=meta_with(top_k=True))),
    Case("traces-parquet-meta-top-k-string", TABLES, "top_k", parquet(meta=meta_with(top_k="2"))),
    Case("traces-parquet-meta-top-k-over-experts", TABLES, "top_k",
         parquet(meta=meta_with(layers=[0, 1], top_k=3, num_experts=2, spec=None))),
    Case("traces-parquet-meta-model-null", TABLES, "model", parquet(meta=meta_with(model=None))),
    Case("traces-parquet-meta-reshaped", TABLES, "spec",
         parquet(meta=meta_with(layers=[0, 1], top_k=3))),  # 2 x 3 = 6 values: fits the column, not the model
    Case("traces-parquet-meta-spec-other", TABLES, "spec", parquet(meta=spec_with(num_experts=8))),
    Case("traces-parquet-meta-spec-not-object", TABLES, "spec", parquet(meta=meta_with(spec=[1, 2]))),
    Case("traces-parquet-meta-spec-garbage", TABLES, "spec", parquet(meta=spec_with(hidden_size="big"))),
    Case("traces-parquet-missing-column", TABLES, "lacks column",
         lambda d: pq.write_table(pq.read_table(d / "trace.parquet").drop_columns(["phase"]), d / "bad.parquet")),
    Case("traces-parquet-truncated", TABLES, "bad.parquet", cut("trace.parquet", "bad.parquet")),
    Case("traces-parquet-empty-file", TABLES, "bad.parquet", writes("bad.parquet", b"")),
    Case("traces-parquet-folder", TABLES, "folder", lambda d: (d / "bad.parquet").mkdir()),
    Case("traces-parquet-zero-rows", TABLES, "no tokens",
         lambda d: pq.write_table(pq.read_table(d / "trace.parquet").slice(0, 0), d / "bad.parquet")),
    Case("traces-parquet-empty-origin", TABLES, "empty",
         parquet(column="origin", make=lambda t: pa.array([""] + t.column("origin").to_pylist()[1:]))),
    Case("traces-parquet-null-weights", TABLES, "null",
         parquet(column="weights", make=lambda t: pa.FixedSizeListArray.from_arrays(pa.array(
             [None] * 6 + [0.5] * (6 * t.num_rows - 6), pa.float32()), 6))),
    Case("traces-parquet-meta-source-number", TABLES, "source", parquet(meta=meta_with(source=3))),
    Case("traces-parquet-pairs-too-big", TABLES, "--no-pairs",
         parquet(meta=meta_with(num_experts=2 ** 15, spec=None))),
    Case("traces-drift-zero-rows", ("profile", "drift", "bad.parquet", "-o", "out.parquet"), "no tokens",
         lambda d: pq.write_table(pq.read_table(d / "trace.parquet").slice(0, 0), d / "bad.parquet")),
    Case("traces-simulate-bad-trace", ("simulate", "--plan", "plan-0.json", "--trace", "bad.parquet", "--cluster",
                                       "cluster.toml"), "twice",
         parquet(column="experts", make=experts_col(lambda e: changed(e, (4, 1), e[4, 0])))),
    Case("traces-drift-bad-trace", ("profile", "drift", "bad.parquet", "-o", "out.parquet"), "null",
         parquet(column="request", make=null_first("request", pa.int64()))),
    # --- tables files ---
    Case("traces-tables-truncated", SOLVE, "bad.npz", cut("tables-0.npz", "bad.npz")),
    Case("traces-tables-random-bytes", SOLVE, "not a prism-plan tables file",
         writes("bad.npz", bytes(range(256)))),
    Case("traces-tables-empty-file", SOLVE, "bad.npz", writes("bad.npz", b"")),
    Case("traces-tables-npy", SOLVE, "not a prism-plan tables file",
         lambda d: np.save(d / "bad.npy", np.zeros(3)) or (d / "bad.npy").rename(d / "bad.npz")),
    Case("traces-tables-folder", SOLVE, "folder", lambda d: (d / "bad.npz").mkdir()),
    Case("traces-tables-pickled-array", SOLVE, "bad.npz",
         lambda d: np.savez(d / "bad.npz", freq=np.array([{}], dtype=object), tokens=np.zeros(2), origins=["a"],
                            layers=[0])),
    Case("traces-tables-meta-list", SOLVE, "meta", tables(meta=np.array(json.dumps([1, 2])))),
    Case("traces-tables-meta-not-json", SOLVE, "meta", tables(meta=np.array("{oops"))),
    Case("traces-tables-meta-not-string", SOLVE, "meta", tables(meta=np.zeros(3))),
    Case("traces-tables-meta-top-k-string", SOLVE, "top_k", tables(meta=tables_meta(meta_with(top_k="2")))),
    Case("traces-tables-meta-spec-other", SOLVE, "spec", tables(meta=tables_meta(spec_with(num_experts=8)))),
    Case("traces-tables-negative-freq", SOLVE, "negative", tables(freq=freq_with((0, 1, 2), -5.0))),
    Case("traces-tables-nan-freq", SOLVE, "finite", tables(freq=freq_with((1, 0, 3), np.nan))),
    Case("traces-tables-inf-freq", SOLVE, "finite", tables(freq=freq_with((1, 0, 3), np.inf))),
    Case("traces-tables-string-freq", SOLVE, "freq", tables(freq=lambda a: a["freq"].astype(str))),
    Case("traces-tables-bool-freq", SOLVE, "freq", tables(freq=lambda a: a["freq"] > 3)),
    Case("traces-tables-complex-freq", SOLVE, "freq", tables(freq=lambda a: a["freq"] + 1j)),
    Case("traces-tables-freq-2d", SOLVE, "freq", tables(freq=lambda a: a["freq"][0])),
    Case("traces-tables-zero-tokens", SOLVE, "no tokens",
         tables(freq=lambda a: np.zeros_like(a["freq"]), tokens=np.zeros(2, np.int64),
                coact=lambda a: np.zeros_like(a["coact"]), trans=lambda a: np.zeros_like(a["trans"]))),
    Case("traces-tables-negative-tokens", SOLVE, "tokens", tables(tokens=np.array([-52, 63]))),
    Case("traces-tables-float-tokens", SOLVE, "tokens", tables(tokens=np.array([52.5, 63.0]))),
    Case("traces-tables-activations-without-tokens", SOLVE, "tokens", tables(tokens=np.array([0, 63]))),
    Case("traces-tables-huge-freq", SOLVE, "do not belong together", tables(freq=freq_with((0, 1, 2), 1e15))),
    Case("traces-tables-freq-overflows", SOLVE, "below 2**63", tables(freq=lambda a: np.full_like(a["freq"], 1e308))),
    Case("traces-tables-huge-tokens", SOLVE, "tokens", tables(tokens=np.array([2 ** 62, 2 ** 62]))),
    Case("traces-tables-coact-too-many", SOLVE, "coact", tables(coact=lambda a: changed(a["coact"], 2, 1e9))),
    Case("traces-tables-meta-window-string", SOLVE, "window",
         tables(meta=tables_meta(meta_with(window="all")))),
    Case("traces-tables-origins-ints", SOLVE, "origins", tables(origins=np.array([0, 1]))),
    Case("traces-tables-origins-repeat", SOLVE, "origins", tables(origins=np.array(["a", "a"]))),
    Case("traces-tables-layers-float", SOLVE, "layers", tables(layers=np.array([0.5, 1, 2]))),
    Case("traces-tables-layers-repeat", SOLVE, "layers", tables(layers=np.array([0, 0, 2]))),
    Case("traces-tables-layers-negative", SOLVE, "layers", tables(layers=np.array([-1, 1, 2]))),
    Case("traces-tables-coact-nan", SOLVE, "coact", tables(coact=lambda a: changed(a["coact"], 0, np.nan))),
    Case("traces-tables-trans-negative", SOLVE, "trans", tables(trans=lambda a: changed(a["trans"], 1, -1.0))),
    Case("traces-tables-trans-shape", SOLVE, "trans", tables(trans=lambda a: a["trans"][:1])),
    Case("traces-tables-missing-freq", SOLVE, "missing array", tables(freq=None)),
    Case("traces-migrate-nan-tables", ("migrate", "--plan", "plan-0.json", "--tables", "bad.npz", "--cluster",
                                       "cluster.toml", "-o", "new.json", "--moves", "mv.json"), "finite",
         tables(freq=freq_with((1, 0, 3), np.nan))),
    Case("traces-export-negative-tables", ("export", "--plan", "plan-0.json", "--format", "eplb", "--tables",
                                           "bad.npz", "-o", "out.npz"), "negative",
         tables(freq=freq_with((0, 1, 2), -5.0))),
    Case("traces-report-zero-token-tables", ("report", "--plan", "plan-0.json", "--tables", "bad.npz", "-o",
                                             "r.html"), "no tokens",
         tables(freq=lambda a: np.zeros_like(a["freq"]), tokens=np.zeros(2, np.int64), coact=None, trans=None)),
    # --- profile run: model folders and prompts ---
    Case("traces-run-missing-model", ("profile", "run", "./missing", "--prompts", "prompts.jsonl", "-o",
                                      "out.parquet"), "no model folder at"),
    Case("traces-run-truncated-safetensors", ("profile", "run", "m", "--prompts", "prompts.jsonl", "-o",
                                              "out.parquet"), "model.safetensors",
         lambda d: (copy_model(lambda m: None)(d), cut("m/model.safetensors", "m/model.safetensors")(d))),
    Case("traces-run-garbage-config", ("profile", "run", "m", "--prompts", "prompts.jsonl", "-o", "out.parquet"),
         "config.json", copy_model(lambda m: (m / "config.json").write_text("{oops"))),
    Case("traces-run-model-without-config", ("profile", "run", "m", "--prompts", "prompts.jsonl", "-o",
                                             "out.parquet"), "no config.json",
         copy_model(lambda m: (m / "config.json").unlink())),
    Case("traces-run-model-is-file", ("profile", "run", "prompts.jsonl", "--prompts", "prompts.jsonl", "-o",
                                      "out.parquet"), "model folder"),
    Case("traces-run-prompts-not-utf8", RUN, "not UTF-8",
         writes("p.jsonl", b'{"origin": "\xff", "input_ids": [1]}\n')),
    Case("traces-run-prompts-bool-ids", RUN, "input_ids", prompts({"origin": "a", "input_ids": [True, 3]})),
    Case("traces-run-prompts-origin-null", RUN, "origin", prompts({"origin": None, "input_ids": [1, 3]})),
    Case("traces-run-prompts-origin-number", RUN, "origin", prompts({"origin": 3, "input_ids": [1, 3]})),
    Case("traces-run-prompts-huge-id", RUN, "input_ids", prompts({"origin": "a", "input_ids": [2 ** 70]})),
    Case("traces-run-prompts-nested-ids", RUN, "input_ids", prompts({"origin": "a", "input_ids": [[1, 2]]})),
    Case("traces-run-prompts-empty", RUN, "no prompts", writes("p.jsonl", "\n")),
    Case("traces-run-prompts-folder", RUN, "folder", lambda d: (d / "p.jsonl").mkdir()),
    Case("traces-run-prompts-text-not-string", RUN, "`text` must be a non-empty string",
         prompts({"origin": "a", "text": 5})),
    Case("traces-run-prompts-id-beyond-vocabulary", RUN, "vocabulary",
         prompts({"origin": "a", "input_ids": [64]})),
]
