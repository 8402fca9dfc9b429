import json
import lzma

import numpy as np
import pyarrow.parquet as pq
import pytest

from prism_plan.errors import PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.esft import iter_esft
from prism_plan.traces.importing import import_trace
from prism_plan.traces.trace import Trace, TraceMeta, iter_trace, load_trace, routing_ids

# Per-domain sequences and tokens of the ESFT data (shared/traces/README.md).
ESFT_COUNTS = {"intent": (127, 8222), "law": (33, 8327), "summary": (13, 8479), "translation": (40, 8251)}


@pytest.fixture(scope="module")
def esft_trace(esft_dir, dsv2):
    return Trace.concat(iter_esft(esft_dir, dsv2, quiet=True))


def test_esft_import_matches_source_counts(esft_trace):
    assert esft_trace.origins == tuple(ESFT_COUNTS)
    for i, (name, (seqs, tokens)) in enumerate(ESFT_COUNTS.items()):
        mine = esft_trace.origin == i
        assert mine.sum() == tokens
        assert len(np.unique(esft_trace.request[mine])) == seqs
    assert esft_trace.experts.shape == (33279, 26, 6)
    assert not esft_trace.decode.any()


def test_esft_import_matches_raw_file_line(esft_trace, esft_dir):
    # Line 2 of law's layer-7 file is request 1 of origin law, layer index 6.
    with lzma.open(esft_dir / "law" / "expert_weights_7.txt.xz", "rt") as f:
        line = f.read().splitlines()[1]
    ids_text, _, w_text = line.partition("\t\t")
    ids = np.array(ids_text.split("\t"), dtype=int).reshape(-1, 6)
    w = np.array(w_text.split("\t"), dtype=np.float32).reshape(-1, 6)
    sel = (esft_trace.origin == 1) & (esft_trace.request == 1)
    assert np.array_equal(esft_trace.experts[sel][:, 6], ids)
    assert np.array_equal(esft_trace.weights[sel][:, 6], w)
    assert np.array_equal(esft_trace.position[sel], np.arange(len(ids)))


def test_bundled_trace_is_the_real_data(esft_trace):
    bundled = load_trace(BUNDLED_TRACE)
    assert bundled.origins == esft_trace.origins
    assert np.array_equal(bundled.experts, esft_trace.experts)
    assert np.array_equal(bundled.request, esft_trace.request)
    assert bundled.weights is None  # the compact copy drops gate weights
    meta = json.loads(pq.ParquetFile(BUNDLED_TRACE).schema_arrow.metadata[b"prism_plan"])
    assert meta["layers"] == list(range(1, 27)) and meta["num_experts"] == 64 and meta["top_k"] == 6


def test_parquet_round_trip_streams_in_row_groups(tmp_path, esft_trace):
    part = esft_trace.select(np.arange(5000))
    path = tmp_path / "t.parquet"
    from prism_plan.traces.trace import TraceWriter

    with TraceWriter(path, part.meta, with_weights=True, row_group_rows=1000) as w:
        w.write(part)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    batches = list(iter_trace(path, batch_rows=1200))
    assert len(batches) > 1 and max(b.num_tokens for b in batches) <= 1200
    back = Trace.concat(batches)
    for name in ("origin", "request", "position", "decode", "experts", "weights"):
        assert np.array_equal(getattr(back, name), getattr(part, name)), name


def small_model():
    return ModelSpec("tiny", (1, 3), 8, 2, 100, 16)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_import(tmp_path):
    rows = [{"origin": "a", "request": 0, "experts": [[0, 1], [2, 3]]},
            {"origin": "a", "request": 0, "experts": [[4, 5], [6, 7]], "phase": "decode"},
            {"origin": "b", "request": 5, "position": 9, "layers": [1, 3], "experts": [[1, 2], [3, 4]]}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    summary = import_trace("jsonl", tmp_path / "t.jsonl", tmp_path / "t.parquet", model=small_model())
    assert summary["tokens"] == 3 and summary["requests"] == 2 and summary["origins"] == ["a", "b"]
    t = load_trace(tmp_path / "t.parquet")
    assert t.origins == ("a", "b") and list(t.origin) == [0, 0, 1]
    assert list(t.position) == [0, 1, 9] and list(t.decode) == [False, True, False]
    assert t.experts[1].tolist() == [[4, 5], [6, 7]]


@pytest.mark.parametrize("row, message", [
    ({"origin": "a", "experts": [[0, 1]]}, r"shape \[1, 2\]"),
    ({"origin": "a", "experts": [[0, 1], [2, 99]]}, "outside 0..7"),
    ({"origin": "a", "layers": [1, 2], "experts": [[0, 1], [2, 3]]}, "do not match"),
    ({"experts": [[0, 1], [2, 3]]}, "needs `origin`"),
    ({"origin": "a", "phase": "train", "experts": [[0, 1], [2, 3]]}, "phase"),
])
def test_jsonl_errors_name_the_line(tmp_path, row, message):
    write_jsonl(tmp_path / "t.jsonl", [{"origin": "a", "experts": [[0, 1], [2, 3]]}, row])
    with pytest.raises(PrismError, match=f"line 2: .*{message}"):
        import_trace("jsonl", tmp_path / "t.jsonl", tmp_path / "t.parquet", model=small_model())
    assert not (tmp_path / "t.parquet").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "t.jsonl"]  # no temp file left behind


def test_not_a_trace(tmp_path):
    (tmp_path / "x.parquet").write_text("hello")
    with pytest.raises(PrismError, match="not a Parquet trace"):
        load_trace(tmp_path / "x.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1]}), tmp_path / "y.parquet")
    with pytest.raises(PrismError, match="no `prism_plan` metadata"):
        load_trace(tmp_path / "y.parquet")


def test_esft_malformed(tmp_path):
    dom = tmp_path / "dom"
    dom.mkdir()
    m = small_model()
    (dom / "expert_weights_1.txt").write_text("1\t2\t\t0.5\t0.4\n")
    (dom / "expert_weights_3.txt").write_text("1\t2\t3\t4\t\t0.5\t0.4\t0.1\t0.1\n")
    with pytest.raises(PrismError, match="different token count"):
        list(iter_esft(tmp_path, m, quiet=True))
    (dom / "expert_weights_3.txt").write_text("1\t2\t0.5\t0.4\n")
    with pytest.raises(PrismError, match="no double tab"):
        list(iter_esft(tmp_path, m, quiet=True))


def test_trace_rejects_out_of_range_ids():
    meta = TraceMeta("m", (0,), 4, 1)
    with pytest.raises(PrismError, match="outside 0..3"):
        Trace(meta, ("a",), np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int32),
              np.zeros(1, bool), np.full((1, 1, 1), 4, np.int16))


def test_write_is_atomic(tmp_path, esft_trace):
    path = tmp_path / "t.parquet"
    esft_trace.select(np.arange(10)).save(path)
    before = path.read_bytes()
    bad = esft_trace.select(np.arange(10))
    from prism_plan.traces.trace import TraceWriter

    with pytest.raises(RuntimeError):
        with TraceWriter(path, bad.meta, with_weights=True) as w:
            w.write(bad)
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_split_requests_keeps_whole_requests_per_origin():
    tr = load_trace(BUNDLED_TRACE)
    first, rest = tr.split_requests(0.5)
    assert first.num_tokens + rest.num_tokens == tr.num_tokens
    for o in range(len(tr.origins)):
        a, b = set(first.request[first.origin == o]), set(rest.request[rest.origin == o])
        assert a and b and not a & b and max(a) < min(b)
        assert abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("ids, message", [
    (np.array([[[0, 1]], [[2, 2]]]), "row 1: expert 2 appears twice"),
    (np.array([[[0, 65540]]]), "row 0: expert id 65540 is outside 0..3"),  # would wrap to 4 as int16
    (np.array([[[0.0, 1.0]]]), "must be integers"),
])
def test_routing_ids_are_refused_before_any_cast(ids, message):
    with pytest.raises(PrismError, match=message):
        routing_ids(ids, 4, "t", "fix it", rows=lambda t: f" row {t}")


@pytest.mark.parametrize("change, message", [
    ({"top_k": 2.0}, "`top_k` must be an integer"),
    ({"layers": [1, True]}, "`layers` must be a list of integers"),
    ({"num_experts": 0}, "num_experts 0 is outside"),
    ({"spec": {**small_model().to_dict(), "top_k": 3}}, "spec"),
])
def test_trace_metadata_is_taken_only_as_written(change, message):
    text = json.dumps({"model": "tiny", "layers": [1, 3], "num_experts": 8, "top_k": 2, **change})
    with pytest.raises(PrismError, match=message):
        TraceMeta.from_json(text, "t.parquet")
