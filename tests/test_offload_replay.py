"""The offload replay (caches, loads, scheduling, prefetch) against hand counts on tiny hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.metrics import route
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.offload import Offload
from prism_plan.placement.offload_replay import replay_offload
from prism_plan.placement.plan import Plan
from prism_plan.placement.scheduling import schedule_groups
from prism_plan.placement.simulator import CostModel, prepare_workload, simulate
from prism_plan.solvers.deadline import Deadline
from prism_plan.traces.prefetch import NextLayerPredictor
from prism_plan.traces.trace import Trace, TraceMeta

MODEL = ModelSpec("tiny", layers=(1, 2), num_experts=4, top_k=2, expert_bytes=1000, hidden_size=8, act_bytes=2,
                  expert_flops=10**9)
TB = MODEL.token_bytes  # 16 bytes
MS = 1e-3
SIZE = 1000  # bytes of one expert
# One server: 1 TFLOP/s, so one activation takes 1 ms; a load of one expert 1 ms + 1000 B / (1e6 B/s) = 2 ms.
ONE = {"name": "a", "memory_gib": 1, "compute_tflops": 1, "origins": ["x"], "load_gbps": 0.008,
       "load_latency_ms": 1.0}


def one_server():
    return parse_cluster({"server": [ONE]})


def two_servers(bw_gbps=1.0, lat_ms=1.0, load_gbps=0.008, load_latency_ms=1.0):
    slow = {"load_gbps": load_gbps, "load_latency_ms": load_latency_ms}
    return parse_cluster({
        "server": [{"name": "a", "memory_gib": 1, "compute_tflops": 1, "origins": ["x"], **slow},
                   {"name": "b", "memory_gib": 1, "compute_tflops": 2, "origins": ["y"], **slow}],
        "defaults": {"bandwidth_gbps": bw_gbps, "latency_ms": lat_ms}})


def trace(origin, request, experts, origins=("x", "y"), decode=None):
    n = len(origin)
    return Trace(TraceMeta.for_model(MODEL), origins, np.asarray(origin, np.int32), np.asarray(request, np.int64),
                 np.arange(n, dtype=np.int32), np.asarray(decode if decode is not None else np.zeros(n, bool)),
                 np.asarray(experts, np.int16).reshape(n, 2, 2))


def replay(cl, tr, hosted, routing, cache_experts, *, origins=("x", "y"), stored=None, **kw):
    """replay_offload of `tr` with `cache_experts` experts of cache per server, slow tiers holding `stored`
    (everything by default)."""
    origins = origins[:len(cl.servers)]
    w = prepare_workload(tr, origins, cl.homes(list(origins)), kw.pop("concurrency", 1))
    stored = np.ones(hosted.shape, bool) if stored is None else stored
    off = Offload(np.full(len(cl.servers), cache_experts * SIZE), stored)
    return replay_offload(w, hosted, routing, off, CostModel.of(cl, MODEL), MODEL.layer_bytes, cl.load_bandwidth,
                          cl.load_latency, servers=tuple(cl.names), **kw)


def home_routing(cl, origins=("x", "y")):
    """Every origin served at its home server (which loads what it does not pin)."""
    home = cl.homes(list(origins[:len(cl.servers)]))
    return np.broadcast_to(home[:, None, None], (len(home), 2, 4)).copy()


def pins(layer0, layer1, servers=1):
    """hosted [servers, 2, 4]: every server pins `layer0` of layer 0 and `layer1` of layer 1."""
    hosted = np.zeros((servers, 2, 4), bool)
    hosted[:, 0, list(layer0)] = True
    hosted[:, 1, list(layer1)] = True
    return hosted


def random_trace(rng, n, decode=False):
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(2 * n)]).reshape(n, 2, 2)
    origin = rng.integers(0, 2, n)
    dec = rng.random(n) < 0.5 if decode else None
    return trace(origin, rng.integers(0, 4, n), experts, decode=dec)


@pytest.mark.parametrize("everywhere", [True, False])
def test_pinned_plans_load_nothing_and_time_as_simulate(everywhere):
    cl = two_servers()
    hosted = np.ones((2, 2, 4), bool) if everywhere else pins((0, 1), (0, 1), 2)
    if not everywhere:
        hosted[1] = ~hosted[0]
    routing = route(hosted, cl.homes(["x", "y"]), cl.hop_seconds(TB))
    tr = random_trace(np.random.default_rng(0), 40, decode=True)
    plan = Plan(MODEL, tuple(cl.names), ("x", "y"), hosted, routing, "coverage", {"name": "test"})
    want = simulate(plan, tr, cl)
    got = replay(cl, tr, hosted, routing, 0, stored=np.zeros((2, 2, 4), bool))
    assert got.bytes_loaded.sum() == 0 and got.misses.sum() == got.hits.sum() == 0
    assert np.allclose(got.ttft, want.ttft, rtol=1e-12)
    assert np.allclose(got.tpot, want.tpot, rtol=1e-12, equal_nan=True)
    assert np.allclose(got.layer_seconds, want.layer_seconds, rtol=1e-12)
    assert np.array_equal(got.network_bytes, want.link_bytes)
    assert got.summary()["hit_rate"] is None and got.summary()["load_seconds"] == 0


def test_one_load_per_layer_by_hand():
    cl = one_server()
    # expert 0 pinned, expert 1 loaded in both layers; a cache of one expert: layer 1's load evicts layer 0's
    res = replay(cl, trace([0], [0], [[[0, 1], [0, 1]]], ("x",)), pins({0}, {0}), home_routing(cl), 1)
    # layer 0: expert 0 runs 0..1 ms, expert 1's load ends at 2 ms, it runs 2..3 ms; layer 1 the same from 3 ms
    assert res.ttft[0] == pytest.approx(2 * (2 * MS + 1 * MS), rel=1e-12)
    assert res.bytes_loaded.tolist() == [2 * SIZE]
    assert res.misses.tolist() == [2] and res.hits.tolist() == [0]
    assert res.load_seconds[0] == pytest.approx(2 * 2 * MS)
    s = res.summary()
    assert s["hit_rate"] == 0.0 and s["hidden_load_seconds"] == 0.0 and s["prefetch_precision"] is None
    assert s["server"]["a"]["bytes_loaded"] == 2 * SIZE


@pytest.mark.parametrize("cache_experts, misses", [(2, 2), (1, 4)])
def test_lru_reuse_across_steps(cache_experts, misses):
    cl = one_server()
    tr = trace([0, 0], [0, 1], [[[0, 1], [0, 1]]] * 2, ("x",))  # two requests, one step each
    res = replay(cl, tr, pins({0}, {0}), home_routing(cl), cache_experts)
    assert res.misses[0] == misses and res.hits[0] == 4 - misses
    assert res.bytes_loaded[0] == misses * SIZE
    if cache_experts == 2:  # the second request finds both experts: two activations back to back per layer
        assert res.ttft.tolist() == pytest.approx([6 * MS, 4 * MS], rel=1e-12)
        assert res.hit_rate.tolist() == [0.5]


def test_lookups_follow_the_order_rule():
    cl = one_server()
    # layer 0 pins 0 and 3; step 0 needs 1 and 2 (looked up 1 then 2: 2 stays), step 1 needs 1 again: a miss.
    # Looked up in descending order, step 1 would hit.
    tr = trace([0, 0], [0, 1], [[[1, 2], [0, 3]], [[1, 0], [0, 3]]], ("x",))
    res = replay(cl, tr, pins({0, 3}, range(4)), home_routing(cl), 1)
    assert res.misses[0] == 3 and res.hits[0] == 0
    # step 0: loads end at 2 and 4 ms, experts 1, 2 run until 3 and 5 ms; layer 1 two pinned activations: 2 ms.
    # step 1 starts at 7 ms: the load of 1 ends at 9 ms, it runs until 10 ms; layer 1 again 2 ms.
    assert res.ttft.tolist() == pytest.approx([7 * MS, 5 * MS], rel=1e-12)


def schedule_case(**cluster):
    """Origin x (server a) needs experts 0 and 1 of layer 0; a pins 0, b pins 1; the plan loads 1 at a."""
    cl = two_servers(**cluster)
    hosted = np.ones((2, 2, 4), bool)
    hosted[:, 0] = False
    hosted[0, 0, 0] = hosted[1, 0, 1] = True
    tr = trace([0], [0], [[[0, 1], [0, 2]]])
    return cl, tr, hosted, home_routing(cl)


def test_scheduling_sends_tokens_over_a_fast_network_instead_of_loading():
    cl, tr, hosted, routing = schedule_case(bw_gbps=100.0, lat_ms=0.001)
    plain = replay(cl, tr, hosted, routing, 1)
    sched = replay(cl, tr, hosted, routing, 1, schedule=True)
    assert plain.bytes_loaded.tolist() == [SIZE, 0] and plain.network_bytes.sum() == 0
    assert sched.bytes_loaded.sum() == 0
    assert sched.network_bytes[0, 1] == sched.network_bytes[1, 0] == TB
    assert sched.ttft[0] < plain.ttft[0]


def test_scheduling_loads_locally_when_the_network_is_slow():
    cl, tr, hosted, routing = schedule_case(bw_gbps=1.0, lat_ms=100.0, load_gbps=800.0, load_latency_ms=0.0)
    sched = replay(cl, tr, hosted, routing, 1, schedule=True)
    assert sched.bytes_loaded.tolist() == [SIZE, 0] and sched.network_bytes.sum() == 0


def sched(n, cached, latency, load_seconds=(1.0, np.inf)):
    """schedule_groups on 2 servers (origin i at server i) and 2 experts, nothing pinned, server 0 storing all."""
    stored = np.array([[True, True], [False, False]])
    lat = np.array([[0.0, latency], [latency, 0.0]])
    bw = np.array([[np.inf, 1e9], [1e9, np.inf]])
    return schedule_groups(np.asarray(n), np.arange(len(n)), np.zeros((2, 2), bool), np.asarray(cached), stored,
                           np.asarray(load_seconds), np.zeros((len(n), 2), np.int64), latency=lat, bandwidth=bw,
                           token_bytes=16, act_seconds=np.array([1e-3, 1e-3]))


def test_schedule_prefers_a_cached_copy_until_the_trip_costs_more_than_a_load():
    cached = [[False, False], [False, True]]
    assert sched([[0, 3]], cached, 1e-4)[0, 1] == 1  # 0.2 ms of trips + 3 ms compute < 1 s load + 3 ms
    assert sched([[0, 3]], cached, 10.0)[0, 1] == 0  # 20 s of trips > 1 s load
    assert sched([[0, 3]], [[False, False], [False, False]], 1e-4)[0, 1] == 0  # nobody holds it: load


def test_schedule_counts_the_queue_a_server_got_in_the_first_pass():
    cached = [[False, False], [False, True]]
    # origin 1 gives server 1 900 activations (0.9 s) of its cached expert 1: origin 0's three tokens would
    # queue behind them, so loading (0.5 s) at home is cheaper.
    got = sched([[0, 3], [0, 900]], cached, 1e-4, load_seconds=(0.5, np.inf))
    assert got[0, 1] == 0 and got[1, 1] == 1
    assert sched([[0, 3], [0, 0]], cached, 1e-4, load_seconds=(0.5, np.inf))[0, 1] == 1


def perfect_predictor():
    """Layer 0 expert 0 is followed by expert 2, expert 1 by 3."""
    cond = np.full((1, 4, 4), 0.25)
    cond[0, 0], cond[0, 1] = np.eye(4)[2], np.eye(4)[3]
    return NextLayerPredictor(cond, np.full((2, 4), 0.25), 2)


def test_a_perfect_prefetch_hides_the_load():
    cl = one_server()
    tr = trace([0], [0], [[[0, 1], [2, 3]]], ("x",))
    hosted = pins({0, 1}, {3})  # layer 1's expert 2 must be loaded
    plain = replay(cl, tr, hosted, home_routing(cl), 1)
    pre = replay(cl, tr, hosted, home_routing(cl), 1, predictor=perfect_predictor(), prefetch=1)
    # layer 0 takes 2 ms; without prefetch expert 2 is ready at 2 ms into layer 1 and done at 3 ms
    assert plain.ttft[0] == pytest.approx(5 * MS, rel=1e-12)
    # the prefetch loads it during layer 0 (0..2 ms): layer 1 is two activations back to back
    assert pre.ttft[0] == pytest.approx(4 * MS, rel=1e-12)
    s = pre.summary()
    assert s["hidden_load_seconds"] == pytest.approx(2 * MS) and s["hidden_share"] == pytest.approx(1.0)
    assert s["prefetch_precision"] == 1.0 and s["prefetch_recall"] == 1.0
    assert pre.bytes_loaded[0] == plain.bytes_loaded[0] == pre.prefetch_bytes[0] == SIZE
    assert pre.hits[0] == 1 and pre.misses[0] == 0


@pytest.mark.parametrize("schedule", [False, True])
def test_prefetch_accounting_holds_on_a_random_trace(schedule):
    rng = np.random.default_rng(1)
    cl = two_servers()
    hosted = rng.random((2, 2, 4)) < 0.4
    cond = rng.dirichlet(np.ones(4), size=(1, 4))
    predictor = NextLayerPredictor(cond, np.full((2, 4), 0.25), 2)
    tr = random_trace(rng, 60, decode=True)
    res = replay(cl, tr, hosted, home_routing(cl), 2, predictor=predictor, prefetch=2, schedule=schedule,
                 concurrency=2)
    assert np.array_equal(res.bytes_loaded, (res.misses + res.prefetches) * SIZE)
    assert res.prefetches.sum() > 0
    assert np.all(res.hidden_load_seconds <= res.load_seconds + 1e-15)
    s = res.summary()
    assert 0 <= s["hidden_share"] <= 1 and 0 <= s["prefetch_precision"] <= 1 and 0 <= s["prefetch_recall"] <= 1
    assert s["tpot_mean_s"] > 0 and s["requests"] == len(res.ttft)


def test_deadline_and_bad_inputs_are_refused():
    cl = one_server()
    tr = trace([0], [0], [[[0, 1], [0, 1]]], ("x",))
    with pytest.raises(PrismError, match="ran out of time") as e:
        replay(cl, tr, pins({0}, {0}), home_routing(cl), 1, deadline=Deadline(0.0))
    assert e.value.parameters == ("deadline",)
    with pytest.raises(PrismError, match="needs a `predictor`"):
        replay(cl, tr, pins({0}, {0}), home_routing(cl), 1, prefetch=1)
    with pytest.raises(PrismError, match="neither pins nor can load"):
        replay(cl, tr, pins({0}, {0}), home_routing(cl), 1, stored=np.zeros((1, 2, 4), bool))
    with pytest.raises(PrismError, match="`routing` has shape"):
        replay(cl, tr, pins({0}, {0}), home_routing(cl)[:, :1], 1)


def test_lookups_find_what_the_cache_holds_first():
    cl = one_server()
    # a cache of one expert; step 0 loads expert 2 of layer 0, step 1 needs 1 and 2: 2 is found first (a hit),
    # then 1 is loaded. Ascending ids would load 1 over 2 and then miss 2 as well.
    tr = trace([0, 0], [0, 1], [[[2, 0], [0, 1]], [[1, 2], [0, 1]]], ("x",))
    res = replay(cl, tr, pins({0}, range(4)), home_routing(cl), 1)
    assert res.misses[0] == 2 and res.hits[0] == 1


def test_schedule_joins_a_load_another_server_makes_anyway():
    lat = np.array([[0.0, 1e-4], [1e-4, 0.0]])
    bw = np.full((2, 2), 1e9)
    nobody = np.zeros((2, 2), bool)

    def serve(n):
        return schedule_groups(np.asarray(n), np.arange(2), nobody, nobody, np.ones((2, 2), bool), np.ones(2),
                               np.array([[0, 0], [1, 1]]), latency=lat, bandwidth=bw, token_bytes=16,
                               act_seconds=np.array([1e-3, 1e-3]), backlog=np.array([0.0, 5.0]))

    # server b's load path is busy for 5 s: y's group joins the load a makes of expert 1 for x
    assert serve([[0, 3], [0, 3]])[1, 1] == 0
    # when x does not need expert 1, a makes no load of it and y loads at home rather than have a load for it
    assert serve([[0, 0], [0, 3]])[1, 1] == 1


@pytest.mark.parametrize("schedule", [True, False])
def test_an_idle_server_prefetches_for_a_busy_one_when_tokens_can_go_there(schedule):
    cl = two_servers(lat_ms=0.1)
    hosted = np.zeros((2, 2, 4), bool)  # nothing pinned: a loads experts 0 and 1 of layer 0 (0..4 ms)
    tr = trace([0], [0], [[[0, 1], [2, 3]]])  # only origin x (server a) has tokens
    res = replay(cl, tr, hosted, home_routing(cl), 2, predictor=perfect_predictor(), prefetch=2,
                 schedule=schedule)
    if schedule:  # b's path idles: it prefetches 2 and 3 (0..4 ms, before layer 1 starts at 5 ms)
        assert res.prefetches.tolist() == [0, 2] and res.prefetch_used.tolist() == [0, 2]
        assert res.hidden_load_seconds[1] == pytest.approx(4 * MS)
        assert res.bytes_loaded.tolist() == [2 * SIZE, 2 * SIZE] and res.network_bytes[0, 1] > 0
    else:  # only a, which loads them, may: expert 2 from 4 ms (1 ms before layer 1); 3 would start too late
        assert res.prefetches.tolist() == [1, 0] and res.prefetch_used.tolist() == [1, 0]
        assert res.hidden_load_seconds[0] == pytest.approx(1 * MS)


def test_no_server_prefetches_for_tokens_that_would_rather_load_at_home():
    cl = two_servers(lat_ms=5.0)  # a round trip to b (10 ms) costs more than a's own load (2 ms)
    res = replay(cl, trace([0], [0], [[[0, 1], [2, 3]]]), np.zeros((2, 2, 4), bool), home_routing(cl), 2,
                 predictor=perfect_predictor(), prefetch=2, schedule=True)
    assert res.prefetches[1] == 0 and res.prefetches[0] >= 1
