import time
from dataclasses import replace

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.studies.convergence import convergence, format_convergence, mean_jaccard, settled_step, top_sets
from prism_plan.traces.sampling import request_draws, sampled
from prism_plan.traces.trace import Trace, iter_trace, load_trace


@pytest.fixture(scope="module")
def esft():
    return load_trace(BUNDLED_TRACE)


def keys(t: Trace) -> set[tuple[str, int]]:
    """The (origin name, request id) pairs of a trace."""
    return {(t.origins[o], int(r)) for o, r in zip(t.origin, t.request)}


def rows(t: Trace) -> list[tuple]:
    """Every token as (origin name, request, position, decode, experts), in order."""
    return [(t.origins[o], int(r), int(p), bool(d), e.tobytes())
            for o, r, p, d, e in zip(t.origin, t.request, t.position, t.decode, t.experts)]


def test_keeps_whole_requests(esft):
    kept = Trace.concat(sampled([esft], fraction=0.3, seed=4))
    for name, request in keys(kept):
        o = esft.origins.index(name)
        assert (kept.request[np.array(kept.origins)[kept.origin] == name] == request).sum() == \
            ((esft.origin == o) & (esft.request == request)).sum()


def test_share_of_requests(esft):
    total = len(keys(esft))
    for fraction in (0.25, 0.5):
        shares = [len(keys(Trace.concat(sampled([esft], fraction=fraction, seed=s)))) / total for s in range(10)]
        assert abs(np.mean(shares) - fraction) < 0.05
    # one token per request: 33k requests, so the draw's share is close to the fraction
    singles = replace(esft, request=np.arange(esft.num_tokens, dtype=np.int64))
    share = Trace.concat(sampled([singles], fraction=0.3)).num_tokens / singles.num_tokens
    assert abs(share - 0.3) < 0.01


def test_independent_of_batches_order_and_nested(esft):
    streams = [rows(Trace.concat(sampled(iter_trace(BUNDLED_TRACE, n), fraction=0.5, seed=7)))
               for n in (777, 4096, 100_000)]
    assert streams[0] == streams[1] == streams[2]
    backwards = esft.select(np.arange(esft.num_tokens)[::-1])
    assert keys(Trace.concat(sampled([backwards], fraction=0.5, seed=7))) == {(o, r) for o, r, *_ in streams[0]}
    assert keys(Trace.concat(sampled([esft], fraction=0.25, seed=7))) <= keys(
        Trace.concat(sampled([esft], fraction=0.5, seed=7)))
    assert keys(Trace.concat(sampled([esft], fraction=0.5, seed=8))) != {(o, r) for o, r, *_ in streams[0]}


def test_draws_are_per_request(esft):
    d = request_draws(esft, seed=3)
    assert d.shape == (esft.num_tokens,) and (d >= 0).all() and (d < 1).all()
    for o in range(len(esft.origins)):
        for r in np.unique(esft.request[esft.origin == o])[:5]:
            assert len(np.unique(d[(esft.origin == o) & (esft.request == r)])) == 1


def test_max_tokens_exact(esft):
    for n in (1, 999, 1000, 12_345):
        kept = list(sampled(iter_trace(BUNDLED_TRACE, 1000), max_tokens=n))
        assert sum(t.num_tokens for t in kept) == n
        assert rows(Trace.concat(kept)) == rows(esft.select(np.arange(n)))
    thinned = Trace.concat(sampled(iter_trace(BUNDLED_TRACE, 1000), fraction=0.5, seed=1))
    both = Trace.concat(sampled(iter_trace(BUNDLED_TRACE, 1000), fraction=0.5, seed=1, max_tokens=5000))
    assert rows(both) == rows(thinned)[:5000]
    assert sum(t.num_tokens for t in sampled([esft], max_tokens=10 ** 9)) == esft.num_tokens


def test_max_tokens_stops_reading(esft):
    def batches():
        yield esft.select(np.arange(100))
        raise AssertionError("read past max_tokens")

    assert sum(t.num_tokens for t in sampled(batches(), max_tokens=100)) == 100


@pytest.mark.parametrize("kwargs, name", [({"fraction": 0}, "fraction"), ({"fraction": 1.5}, "fraction"),
                                          ({"fraction": float("nan")}, "fraction"), ({"fraction": True}, "fraction"),
                                          ({"fraction": "0.5"}, "fraction"), ({"max_tokens": 0}, "max_tokens"),
                                          ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                                          ({"seed": "x"}, "seed")])
def test_argument_errors_up_front(kwargs, name):
    def untouched():
        raise AssertionError("batches read before the arguments were checked")
        yield

    with pytest.raises(PrismError, match=f"`{name}`") as e:
        sampled(untouched(), **kwargs)
    assert e.value.parameters == (name,)


def test_top_sets_and_jaccard():
    freq = np.array([[[5, 4, 0, 1]], [[0, 0, 0, 0]]], float)  # [origins, layers, experts]
    top = top_sets(freq, 2)
    assert top[0, 0].tolist() == [True, True, False, False] and not top[1].any()
    other = top_sets(np.array([[[5, 0, 4, 1]], [[0, 0, 0, 0]]], float), 2)
    assert mean_jaccard(top, other) == pytest.approx((1 / 3 + 1) / 2)


def test_convergence_on_esft(esft, edge4):
    start = time.perf_counter()
    out = convergence(esft, edge4, steps=(0.125, 0.5, 1))
    assert time.perf_counter() - start < 30
    assert [r["step"] for r in out] == [0.125, 0.5, 1.0]
    assert all(a["tokens"] < b["tokens"] and a["requests"] < b["requests"] for a, b in zip(out, out[1:]))
    assert out[-1]["tokens"] == esft.num_tokens
    assert out[-1]["topk_full"] == 1.0 and out[-1]["plan_full"] == 1.0
    assert out[-1]["coverage_full"] == out[-1]["coverage_best"] == out[-1]["coverage"]
    assert out[0]["topk_prev"] is None and all(0 <= r["topk_prev"] <= 1 for r in out[1:])
    assert all(r["coverage_full"] <= r["coverage_best"] + 1e-12 and 0 < r["plan_full"] <= 1 for r in out)
    assert settled_step(out, topk=0, plan=0) is out[0]
    assert len(format_convergence(out).splitlines()) == 4


def test_convergence_arguments(esft, edge4):
    for steps in ((), (0.5, 0.25), (0, 1), (1.5,)):
        with pytest.raises(PrismError, match="`steps`"):
            convergence(esft, edge4, steps=steps)
    with pytest.raises(PrismError, match="`top_k`"):
        convergence(esft, edge4, steps=(1,), top_k=65)


def test_cli_convergence_prints_the_rows(capsys):
    import json

    from prism_plan.cli import main

    assert main(["profile", "convergence", str(BUNDLED_TRACE), "--cluster", "edge-4", "--steps", "0.25,1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in out["rows"]] == [0.25, 1.0] and out["settled"] is None
    assert main(["profile", "convergence", str(BUNDLED_TRACE), "--cluster", "edge-4", "--steps", "half"]) == 2
    assert "comma-separated" in capsys.readouterr().err
