"""Windowed tables and the drifting ESFT workload."""

from dataclasses import replace

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.fileio import DATA_DIR
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.drift import drifting_workload, rotation_mix
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import Trace, load_trace
from prism_plan.traces.windows import iter_windows, window_tables


@pytest.fixture(scope="module")
def esft():
    return load_trace(BUNDLED_TRACE)


def batches(trace: Trace, rows: int):
    for i in range(0, trace.num_tokens, rows):
        yield trace.select(slice(i, i + rows))


@pytest.mark.parametrize("rows", [7, 1000, 40000])
def test_token_windows_partition_the_trace_whatever_the_batches(esft, rows):
    windows = list(iter_windows(batches(esft, rows), 5000))
    assert [w.num_tokens for w in windows] == [5000] * 6 + [esft.num_tokens - 30000]
    assert np.array_equal(np.concatenate([w.experts for w in windows]), esft.experts)


@pytest.mark.parametrize("rows", [13, 4096])
def test_request_windows_end_where_the_next_request_begins(esft, rows):
    windows = list(iter_windows(batches(esft, rows), 20, "requests"))
    counts = [len(set(zip(np.array(w.origins)[w.origin], w.request.tolist()))) for w in windows]
    assert counts == [20] * 10 + [13]  # 213 requests
    assert np.array_equal(np.concatenate([w.request for w in windows]), esft.request)


def test_window_tables_add_up_to_the_whole(tmp_path, esft):
    whole = build_tables([esft], pairs=False)
    parts = list(window_tables(BUNDLED_TRACE, 7000, pairs=False))
    assert [p.meta["window"]["index"] for p in parts] == list(range(5))
    assert parts[1].meta["window"]["first_token"] == 7000
    total = sum(p.freq.sum(axis=0) for p in parts)
    assert np.array_equal(total, whole.freq.sum(axis=0))


def test_bad_window_arguments(esft):
    with pytest.raises(PrismError, match="window unit"):
        next(iter_windows([esft], 10, "seconds"))
    with pytest.raises(PrismError, match="must be an integer from 1"):
        next(iter_windows([esft], 0))


def test_drifting_workload_rotates_each_stream_to_the_next_domain(tmp_path, esft):
    windows = drifting_workload(esft, 5, 1500, seed=1)
    assert all(w.num_tokens == 4 * 1500 for w in windows)
    assert all(np.array_equal(np.bincount(w.origin), [1500] * 4) for w in windows)
    mix = rotation_mix(5, 4)
    assert np.allclose(mix[0], np.eye(4)) and np.allclose(mix[-1], np.roll(np.eye(4), 1, axis=1))
    # The first window's streams serve their own domain, the last the next one: compare with each domain's profile.
    domain = build_tables([esft], pairs=False).freq.reshape(4, -1)
    domain /= domain.sum(axis=1, keepdims=True)
    for w, shift in ((windows[0], 0), (windows[-1], 1)):
        f = build_tables([w], pairs=False).freq.reshape(4, -1)
        nearest = (((f / f.sum(axis=1, keepdims=True))[:, None] - domain[None]) ** 2).sum(axis=2).argmin(axis=1)
        assert nearest.tolist() == np.roll(np.arange(4), -shift).tolist()
    # Written as one trace, `--window` of 4 x 1500 tokens gives the same windows back.
    Trace.concat(windows).save(tmp_path / "drift.parquet")
    again = list(window_tables(tmp_path / "drift.parquet", 6000, pairs=False))
    assert len(again) == 5
    assert np.array_equal(again[3].freq, build_tables([windows[3]], pairs=False).freq)


def test_drift_rejects_a_bad_mix(esft):
    with pytest.raises(PrismError, match="sum to 1"):
        drifting_workload(esft, 2, 100, mix=np.full((2, 4, 4), 0.5))


def test_request_ids_far_apart_are_different_requests():
    t = load_trace(DATA_DIR / "tiny" / "trace.parquet")
    half = t.num_tokens // 2
    one_origin = replace(t, origin=np.zeros_like(t.origin),
                         request=np.where(np.arange(t.num_tokens) < half, 0, 2**40).astype(t.request.dtype))
    assert [w.num_tokens for w in iter_windows([one_origin], 1, "requests")] == [half, t.num_tokens - half]
