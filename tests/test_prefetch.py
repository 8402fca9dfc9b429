"""Next-layer expert predictor for prefetch: exact on deterministic routing, counts checked by brute force, and
better than expert popularity on held-out real ESFT routing."""

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.prefetch import NextLayerPredictor, batch_ids, prefetch_accuracy
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import Trace, TraceMeta, load_trace


def _trace(experts: np.ndarray, num_experts: int, requests: np.ndarray) -> Trace:
    n, layers, k = experts.shape
    meta = TraceMeta("tiny", tuple(range(layers)), num_experts, k)
    return Trace(meta, ("a",), np.zeros(n, np.int32), requests.astype(np.int64), np.arange(n, dtype=np.int32),
                 np.zeros(n, bool), experts.astype(np.int16))


def _shifted(seed: int, n: int = 200, layers: int = 4, e: int = 8, k: int = 2) -> Trace:
    """Expert e at layer i is always followed by e + 1 (mod experts) at layer i + 1."""
    rng = np.random.default_rng(seed)
    first = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    experts = (first[:, None, :] + np.arange(layers)[None, :, None]) % e
    return _trace(experts, e, np.arange(n) // 10)


def test_deterministic_transitions_are_predicted_exactly():
    predictor = NextLayerPredictor.from_tables(build_tables([_shifted(0)]), smoothing=1e-6)
    acc = prefetch_accuracy(predictor, _shifted(1), budget=2)
    assert acc["token_precision"] == acc["token_recall"] == 1.0


def _brute(predictor, trace, budget, groups):
    """Per-token and per-batch (hits, predicted, used) by plain loops."""
    tok, bat = np.zeros(3), np.zeros(3)
    for i in range(trace.experts.shape[1] - 1):
        for t in range(trace.num_tokens):
            s = predictor.cond[i][trace.experts[t, i]].mean(axis=0)
            pred = set(np.argsort(-s, kind="stable")[:budget].tolist())
            used = set(trace.experts[t, i + 1].tolist())
            tok += [len(pred & used), len(pred), len(used)]
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            s = sum(predictor.cond[i][trace.experts[t, i]].mean(axis=0) for t in rows)
            pred = set(np.argsort(-s, kind="stable")[:budget].tolist())
            used = set(trace.experts[rows, i + 1].ravel().tolist())
            bat += [len(pred & used), len(pred), len(used)]
    return tok, bat


@pytest.mark.parametrize("batch_tokens", [None, 3])
def test_counts_match_brute_force(batch_tokens):
    rng = np.random.default_rng(2)
    n, layers, e, k = 60, 3, 6, 2
    experts = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(layers)]) for _ in range(n)])
    trace = _trace(experts, e, rng.integers(0, 7, n))
    predictor = NextLayerPredictor.from_tables(build_tables([trace.select(np.arange(30))]))
    held = trace.select(np.arange(30, n))
    acc = prefetch_accuracy(predictor, held, budget=3, batch_tokens=batch_tokens)
    tok, bat = _brute(predictor, held, 3, batch_ids(held, batch_tokens))
    assert acc["token_precision"] == pytest.approx(tok[0] / tok[1])
    assert acc["token_recall"] == pytest.approx(tok[0] / tok[2])
    assert acc["batch_precision"] == pytest.approx(bat[0] / bat[1])
    assert acc["batch_recall"] == pytest.approx(bat[0] / bat[2])


def test_conditionals_are_distributions_and_unseen_experts_stay_possible():
    predictor = NextLayerPredictor.from_tables(build_tables([_shifted(0)]))
    assert np.allclose(predictor.cond.sum(axis=2), 1.0)
    assert (predictor.cond > 0).all()


def test_tables_without_transitions_are_refused():
    with pytest.raises(PrismError, match="pairs") as err:
        NextLayerPredictor.from_tables(build_tables([_shifted(0)], pairs=False))
    assert "tables" in err.value.parameters


def test_transitions_beat_frequency_on_held_out_esft():
    profile, held = load_trace(BUNDLED_TRACE).split_requests(0.5)
    predictor = NextLayerPredictor.from_tables(build_tables([profile]))
    acc = prefetch_accuracy(predictor, held, budget=6)
    assert acc["token_recall"] > acc["frequency"]["token_recall"]
