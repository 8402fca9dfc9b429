"""The counting kernel (numba) and its numpy twin against counts made one token at a time, on random routing of
many shapes, and their checks of bad ids."""

from __future__ import annotations

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.traces import counting
from prism_plan.traces.counting import count_batch

PATHS = [False] + ([True] if counting.numba is not None else [])


def routing(rng, tokens: int, layers: int, experts: int, k: int, origins: int):
    """Random distinct top-k ids [tokens, layers, k] int16 and origins [tokens]."""
    ids = np.argsort(rng.random((tokens, layers, experts)), axis=2)[:, :, :k].astype(np.int16)
    return rng.integers(0, origins, tokens), ids


def by_hand(origin, ids, experts: int, origins: int):
    """freq, coact (slot i < j), trans, counted token by token."""
    n, layers, k = ids.shape
    freq = np.zeros((origins, layers, experts), np.int64)
    coact = np.zeros((layers, experts, experts), np.int64)
    trans = np.zeros((max(layers - 1, 0), experts, experts), np.int64)
    for t in range(n):
        for l in range(layers):
            for i in range(k):
                freq[origin[t], l, ids[t, l, i]] += 1
                for j in range(i + 1, k):
                    coact[l, ids[t, l, i], ids[t, l, j]] += 1
                if l + 1 < layers:
                    for j in range(k):
                        trans[l, ids[t, l, i], ids[t, l + 1, j]] += 1
    return freq, coact, trans


@pytest.mark.parametrize("use_numba", PATHS)
@pytest.mark.parametrize("tokens, layers, experts, k, origins", [
    (200, 3, 8, 2, 2), (57, 1, 5, 3, 1), (300, 4, 16, 1, 5), (1, 2, 4, 4, 1), (400, 2, 64, 6, 3)])
def test_counts_equal_the_hand_count(use_numba, tokens, layers, experts, k, origins):
    rng = np.random.default_rng(tokens * layers + k)
    origin, ids = routing(rng, tokens, layers, experts, k, origins)
    want = by_hand(origin, ids, experts, origins)
    for pairs in (True, False):
        freq = np.zeros((origins, layers, experts), np.int64)
        coact = np.zeros((layers, experts, experts), np.int64) if pairs else None
        trans = np.zeros((max(layers - 1, 0), experts, experts), np.int64) if pairs else None
        for part in np.array_split(np.arange(tokens), 3):  # batches add up
            count_batch(origin[part], ids[part], experts, freq, coact, trans, use_numba=use_numba)
        assert np.array_equal(freq, want[0])
        if pairs:
            assert np.array_equal(coact, want[1]) and np.array_equal(trans, want[2])


@pytest.mark.parametrize("use_numba", PATHS)
@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("value, words", [(9, "expert id 9 is outside 0..7"), (-1, "expert id -1 is outside"),
                                          ("repeat", "expert 3 appears twice")])
def test_bad_ids_name_the_row(use_numba, pairs, value, words):
    rng = np.random.default_rng(0)
    origin, ids = routing(rng, 50, 3, 8, 2, 2)
    if value == "repeat":
        ids[17, 1] = [3, 3]
    else:
        ids[17, 2, 1] = value
    ids[30, 0, 0] = ids[30, 0, 1]  # a later bad row: the first one is named
    freq = np.zeros((2, 3, 8), np.int64)
    coact, trans = (np.zeros((3, 8, 8), np.int64), np.zeros((2, 8, 8), np.int64)) if pairs else (None, None)
    with pytest.raises(PrismError, match=words) as e:
        count_batch(origin, ids, 8, freq, coact, trans, where="t.parquet", first_row=100, use_numba=use_numba)
    assert "t.parquet row 117" in str(e.value)


@pytest.mark.parametrize("use_numba", PATHS)
def test_arrays_that_do_not_fit_are_refused_before_counting(use_numba):
    rng = np.random.default_rng(2)
    origin, ids = routing(rng, 20, 2, 8, 2, 2)
    cases = [
        (dict(freq=np.zeros((1, 2, 8), np.int64)), "origin"),  # origin 1 has no row in freq
        (dict(freq=np.zeros((2, 2, 4), np.int64)), "freq"),  # fewer experts than ids may name
        (dict(freq=np.zeros((2, 1, 8), np.int64)), "freq"),  # fewer layers
        (dict(coact=np.zeros((2, 8, 8), np.int64)), "trans"),  # one of the pair tables alone
        (dict(freq=np.zeros((2, 2, 8))), "int64"),
    ]
    for given, words in cases:
        args = {"freq": np.zeros((2, 2, 8), np.int64), "coact": None, "trans": None, **given}
        with pytest.raises(PrismError, match=words):
            count_batch(origin, ids, 8, args["freq"], args["coact"], args["trans"], use_numba=use_numba)


def test_windowed_tables_name_the_file_and_its_row(tmp_path):
    from prism_plan.placement.model import ModelSpec
    from prism_plan.traces.trace import Trace, TraceMeta
    from prism_plan.traces.windows import window_tables

    model = ModelSpec("tiny-count", layers=(0, 1), num_experts=8, top_k=2, expert_bytes=64, hidden_size=4)
    origin, ids = routing(np.random.default_rng(3), 40, 2, 8, 2, 1)
    ids[27, 1] = [5, 5]
    path = tmp_path / "bad.parquet"
    Trace(TraceMeta.for_model(model), ("a",), origin.astype(np.int32), np.arange(40) // 10,
          np.arange(40, dtype=np.int32) % 10, np.zeros(40, bool), ids).save(path)
    with pytest.raises(PrismError, match=f"{path} row 27: expert 5 appears twice"):
        list(window_tables(path, 10))
