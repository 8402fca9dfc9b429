"""The simulator against hand counts on small hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_plan.cli import main
from prism_plan.errors import PrismError
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.metrics import route
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import fifo_finish, simulate
from prism_plan.traces.trace import Trace, TraceMeta

MODEL = ModelSpec("tiny", layers=(1, 2), num_experts=4, top_k=2, expert_bytes=1000, hidden_size=8, act_bytes=2,
                  expert_flops=10**9)
TB = MODEL.token_bytes  # 16 bytes


def cluster(bw_gbps=(1.0,), lat_ms=1.0):
    return parse_cluster({
        "server": [{"name": "a", "memory_gib": 1, "compute_tflops": 1, "origins": ["x"]},
                   {"name": "b", "memory_gib": 1, "compute_tflops": 2, "origins": ["y"]}],
        "defaults": {"bandwidth_gbps": bw_gbps[0], "latency_ms": lat_ms}})


def plan_for(hosted, cl, origins=("x", "y")):
    routing = route(hosted, cl.homes(list(origins)), cl.hop_seconds(TB))
    return Plan(MODEL, tuple(cl.names), origins, hosted, routing, "coverage", {"name": "test"})


def trace(origin, request, experts, decode=None, position=None):
    n = len(origin)
    return Trace(TraceMeta.for_model(MODEL), ("x", "y"), np.asarray(origin, np.int32),
                 np.asarray(request, np.int64),
                 np.asarray(position if position is not None else np.arange(n), np.int32),
                 np.asarray(decode if decode is not None else np.zeros(n, bool)),
                 np.asarray(experts, np.int16).reshape(n, 2, 2))


def split_hosted():
    """Server a hosts experts 0, 1 of both layers, b hosts 2, 3."""
    hosted = np.zeros((2, 2, 4), bool)
    hosted[0, :, :2] = True
    hosted[1, :, 2:] = True
    return hosted


def test_bytes_equal_a_direct_count():
    cl = cluster()
    rng = np.random.default_rng(0)
    n = 40
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(2 * n)]).reshape(n, 2, 2)
    origin = rng.integers(0, 2, n)
    tr = trace(origin, rng.integers(0, 5, n), experts)
    res = simulate(plan_for(split_hosted(), cl), tr, cl)
    owner = np.array([0, 0, 1, 1])  # server of each expert
    expect = np.zeros((2, 2))
    for t in range(n):
        home = origin[t]
        for l in range(2):
            for s in set(owner[experts[t, l]]) - {home}:  # one trip per remote server, however many experts
                expect[home, s] += TB
                expect[s, home] += TB
    assert np.array_equal(res.link_bytes, expect)
    assert res.summary()["remote_bytes_per_token"] == expect.sum() / n


def test_everything_everywhere_is_pure_local_compute():
    cl = cluster()
    experts = [[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[0, 3], [1, 2]], [[2, 3], [0, 1]], [[0, 2], [1, 3]]]
    origin, request = [0, 0, 0, 1, 1], [7, 7, 9, 4, 4]
    res = simulate(plan_for(np.ones((2, 2, 4), bool), cl), trace(origin, request, experts), cl)
    flops = np.array([1e12, 2e12])
    # each request is one step; its tokens x top_k activations per layer, 2 layers, at its home server
    expect = {(0, 7): 2 * 2 * 2 * 1e9 / flops[0], (0, 9): 2 * 1 * 2 * 1e9 / flops[0],
              (1, 4): 2 * 2 * 2 * 1e9 / flops[1]}
    got = {(int(o), int(r)): t for o, r, t in zip(res.request_origin, res.request_id, res.ttft)}
    assert got.keys() == expect.keys()
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, rel=1e-12)
    assert res.link_bytes.sum() == 0
    assert res.summary()["local_coverage"] == 1.0


def test_remote_trip_and_queueing_by_hand():
    cl = cluster(lat_ms=1.0)
    # origin x (server a) needs experts 2, 3 (both on b) in both layers; origin y (server b) uses 2, 3 locally.
    tr = trace([0, 0, 1], [0, 0, 0], [[[2, 3], [2, 3]], [[2, 3], [2, 3]], [[2, 3], [2, 3]]])
    res = simulate(plan_for(split_hosted(), cl), tr, cl)
    bw = 1e9 / 8
    trip = 1e-3 + 2 * TB / bw  # two tokens in one message, one way
    work_b = 1e9 / 2e12  # one activation on b
    # b starts y's two local activations at 0, x's four arrive at `trip` (after y's are done) and queue behind
    x_layer = max(2 * work_b, trip) + 4 * work_b + trip
    y_layer = 2 * work_b
    got = dict(zip(res.request_origin.tolist(), res.ttft.tolist()))
    assert got[0] == pytest.approx(2 * x_layer, rel=1e-12)
    assert got[1] == pytest.approx(2 * y_layer, rel=1e-12)
    assert res.link_bytes[0, 1] == res.link_bytes[1, 0] == 2 * 2 * TB


def test_decode_steps_give_time_per_output_token():
    cl = cluster()
    # request 0 of x: 2 prompt tokens, then 3 decode tokens; all local
    experts = [[[0, 1], [0, 1]]] * 5
    tr = trace([0] * 5, [0] * 5, experts, decode=[False, False, True, True, True], position=[0, 1, 2, 3, 4])
    res = simulate(plan_for(np.ones((2, 2, 4), bool), cl), tr, cl)
    one = 2 * 2 * 1e9 / 1e12  # one token, two experts, two layers
    assert res.ttft[0] == pytest.approx(2 * one)
    assert res.tpot[0] == pytest.approx(one)
    assert res.simulated_ttft == pytest.approx(2 * one + 3 * one)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 5)), min_size=1, max_size=6))
def test_fifo_matches_an_event_by_event_queue(jobs):
    release = np.array([r for r, _ in jobs])
    work = np.array([p for _, p in jobs])
    got = fifo_finish(release[None, :], work[None, :], axis=1)[0]
    clock, expect = 0.0, np.empty(len(jobs))
    for i in np.argsort(release, kind="stable"):
        clock = max(clock, release[i]) + work[i]
        expect[i] = clock
    assert np.allclose(got, expect)


def test_unknown_origin_is_a_clear_error():
    cl = cluster()
    plan = plan_for(split_hosted(), cl, origins=("x",))
    with pytest.raises(PrismError, match="not in the plan"):
        simulate(plan, trace([1], [0], [[[0, 1], [0, 1]]]), cl)


def test_an_empty_trace_or_a_bad_concurrency_is_refused():
    cl = cluster()
    plan = plan_for(split_hosted(), cl)
    with pytest.raises(PrismError, match="the trace holds no tokens, so there is nothing to replay"):
        simulate(plan, trace([], [], np.zeros((0, 2, 2))), cl)
    one = trace([0], [0], [[[0, 1], [0, 1]]])
    for bad in (True, 0, 1.0, "2"):
        with pytest.raises(PrismError, match="`concurrency` must be an integer of at least 1") as e:
            simulate(plan, one, cl, concurrency=bad)
        assert e.value.parameters == ("concurrency",)


def test_simulate_cli(tmp_path, capsys, esft_tables, edge4, dsv2):
    from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
    from prism_plan.pipeline import solve_placement

    plan = solve_placement(esft_tables, edge4, dsv2, solver="exact", objective="latency", time_limit=60)
    plan.save(tmp_path / "p.json", edge4)
    args = ["simulate", "--plan", str(tmp_path / "p.json"), "--trace", str(BUNDLED_TRACE), "--cluster",
            str(BUNDLED_CLUSTER), "-o", str(tmp_path / "sim.json"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "TTFT mean" in out and "edge-d" in out
    assert (tmp_path / "sim.json").stat().st_size > 0
    bad = tmp_path / "t.parquet"
    trace([0], [0], [[[0, 1], [0, 1]]]).save(bad)
    assert main(args[:4] + [str(bad)] + args[5:]) == 2
    assert "different model" in capsys.readouterr().err
