"""The topology layout: its node-visit models against direct counts, its layouts on the bundled ESFT trace and
small synthetic ones (valid slots, whole experts per node, overload held, fewer node visits than EPLB), its
latency bound against brute force, and the co-activation baseline."""

import itertools
from dataclasses import replace

import numpy as np
import pytest

from prism_plan import build_tables
from prism_plan.errors import PrismError
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.layout import balance_metrics, gpu_load, node_visits
from prism_plan.placement.model import ModelSpec
from prism_plan.solvers import build_problem, get_solver
from prism_plan.solvers.balance import solve_balance
from prism_plan.solvers.baselines import (CoactivationSolver, capped_copies, coactivation_nodes,
                                          coactivation_placement, eplb_placement)
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.objectives import latency_value, layer_latency, serving_metrics
from prism_plan.solvers.problem import placement_fits
from prism_plan.solvers.static_dispatch import spare_ladder, static_balance_routing
from prism_plan.solvers.topology import (TableVisits, TokenVisits, layer_overload, plan_topology, swap_gain,
                                         topology_latency_bound, topology_network_bound, topology_placement,
                                         topology_solution)
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.trace import Trace, TraceMeta


def cluster_doc(origins, per_node, slots, dispatch="even"):
    servers = [{"name": f"g{i}", "node": f"n{i // per_node}", "memory_gib": 80.0, "compute_tflops": 100.0,
                "origins": [o] if o else []} for i, o in enumerate(origins)]
    nodes = [{"name": f"n{j}", "bandwidth_gbps": 1200.0, "latency_ms": 0.005} for j in range(len(origins) // per_node)]
    return {"server": servers, "node": nodes, "defaults": {"bandwidth_gbps": 400.0, "latency_ms": 0.02},
            "layout": {"slots_per_layer": slots, "dispatch": dispatch}}


def split_by_parity(trace):
    """Each origin's requests in two (by request id parity): 8 origins from the ESFT trace's 4."""
    origin = (2 * trace.origin.astype(np.int64) + trace.request % 2).astype(np.int32)
    return replace(trace, origins=tuple(f"{o}-{p}" for o in trace.origins for p in "ab"), origin=origin)


@pytest.fixture(scope="module")
def esft8():
    """ESFT on 8 GPUs in 2 nodes of 4, 10 slots: node 0 serves intent and law, node 1 summary and translation."""
    trace = split_by_parity(Trace.load(BUNDLED_TRACE))
    return trace, build_tables([trace])


def esft_problem(esft8, dispatch="even"):
    trace, tables = esft8
    return build_problem(tables, parse_cluster(cluster_doc(list(trace.origins), 4, 10, dispatch)), trace=trace)


def tiny_trace(tokens=400, experts=8, layers=2, top_k=2, origins=4, seed=0):
    """Origin-skewed routing: origin o prefers experts o, o + origins, ... (and a random one)."""
    rng = np.random.default_rng(seed)
    spec = ModelSpec("tiny-topology", tuple(range(layers)), experts, top_k, 1 << 20, 64, expert_flops=1 << 20)
    meta = TraceMeta(spec.name, spec.layers, experts, top_k, "test", spec.to_dict())
    origin = rng.integers(0, origins, tokens).astype(np.int32)
    liked = (origin[:, None] + origins * rng.integers(0, experts // origins, (tokens, layers))) % experts
    other = (liked + 1 + rng.integers(0, experts - 1, (tokens, layers))) % experts
    chosen = np.stack([liked, other], axis=2)[:, :, :top_k].astype(np.int16)
    return Trace(meta, tuple(f"o{i}" for i in range(origins)), origin, np.arange(tokens, dtype=np.int64),
                 np.zeros(tokens, np.int32), np.zeros(tokens, bool), chosen)


def tiny_problem(gpus=4, per_node=2, slots=3, dispatch="even", **kw):
    trace = tiny_trace(**kw)
    origins = list(trace.origins) + [""] * (gpus - len(trace.origins))
    return build_problem(build_tables([trace]), parse_cluster(cluster_doc(origins, per_node, slots, dispatch)),
                         trace=trace)


def one_node_per_expert(hosted, node):
    """Whether every (layer, expert)'s copies sit in one node."""
    nodes = [np.flatnonzero(node == n) for n in range(node.max() + 1)]
    on = np.stack([hosted[m].any(axis=0) for m in nodes])  # [nodes, layers, experts]
    return bool((on.sum(axis=0) == 1).all())


# ------------------------------------------------------------------------------------------ node visit models


def test_token_visits_gains_moves_and_swaps_match_direct_counts():
    rng = np.random.default_rng(3)
    tokens, k, n_nodes, e = 300, 3, 3, 12
    experts = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)])
    home = rng.integers(0, n_nodes, tokens)
    m = TokenVisits(experts, home, n_nodes, e)
    for x in range(e):
        m.place(x, x % n_nodes)

    def direct(assign):
        visited = np.zeros((tokens, n_nodes), bool)
        visited[np.arange(tokens)[:, None], assign[experts]] = True
        visited[np.arange(tokens), home] = False
        return visited.sum() / tokens

    assert m.cost() == pytest.approx(direct(m.node))
    gains = m.gains()
    for x, b in itertools.product(range(e), range(n_nodes)):
        moved = m.node.copy()
        moved[x] = b
        assert gains[x, b] == pytest.approx(direct(m.node) - direct(moved), abs=1e-12)
        assert m.move_gain(x, b) == pytest.approx(gains[x, b], abs=1e-12)
    x, y = 0, 1  # on nodes 0 and 1
    swapped = m.node.copy()
    swapped[[x, y]] = swapped[[y, x]]
    before = m.node.copy()
    assert swap_gain(m, x, y) == pytest.approx(direct(before) - direct(swapped))
    assert (m.node == before).all()  # swap_gain leaves the state as it was


def test_token_visits_count_what_node_visits_counts_for_whole_experts():
    problem = tiny_problem()
    hosted = eplb_placement(problem)[0]
    w = problem.workload
    # Whole experts: put every expert's copies on the node of its first copy.
    node = problem.nodes
    for l in range(problem.shape[1]):
        assign = node[np.argmax(hosted[:, l], axis=0)]
        m = TokenVisits(w.experts[:, l].astype(np.int64), node[w.home[w.origin]], 2, problem.shape[2])
        for x, n in enumerate(assign):
            m.place(x, int(n))
        one = np.zeros_like(hosted[:, l:l + 1])
        one[:, 0] = node[:, None] == assign[None, :]
        assert m.cost() == pytest.approx(node_visits(w.experts[:, l:l + 1], w.home[w.origin], one, node))


def test_table_visits_gains_match_its_cost_and_prices_add_linearly():
    rng = np.random.default_rng(5)
    e, n_nodes = 10, 3
    demand = rng.uniform(0, 1, (n_nodes, e))
    coact = rng.uniform(0, 0.2, (e, e))
    coact = coact + coact.T
    linear = rng.uniform(0, 0.1, (e, n_nodes))
    m = TableVisits(demand, coact, np.full(n_nodes, 1 / n_nodes), visit_price=2.0, linear=linear)
    for x in range(e):
        m.place(x, x % n_nodes)
    gains = m.gains()
    for x, b in itertools.product(range(e), range(n_nodes)):
        a, before = int(m.node[x]), m.cost()
        m.place(x, b)
        assert gains[x, b] == pytest.approx(before - m.cost(), abs=1e-12)
        m.place(x, a)


# ------------------------------------------------------------------------------------------ layouts


def test_esft_layout_crosses_nodes_less_than_eplb_within_its_overload(esft8):
    problem = esft_problem(esft8)
    plan = plan_topology(problem, objective="cross_node")
    eplb = eplb_placement(problem)[0]
    assert placement_fits(problem, plan.hosted)
    assert one_node_per_expert(plan.hosted[:, ~plan.reference], problem.nodes)
    ours, theirs = serving_metrics(problem, plan.hosted), serving_metrics(problem, eplb)
    assert ours["cross_node_bytes_per_token"] < 0.9 * theirs["cross_node_bytes_per_token"]
    assert ours["overload"] <= theirs["overload"] + 0.05
    assert latency_value(problem, plan.hosted) < latency_value(problem, eplb)


def test_each_layer_stays_within_the_reference_overload_plus_slack():
    problem = tiny_problem(tokens=600, experts=16, layers=3, gpus=4, slots=5)
    reference = eplb_placement(problem)[0]
    plan = plan_topology(problem, reference=reference, overload_slack=0.02)
    assert placement_fits(problem, plan.hosted)
    for l in range(problem.shape[1]):
        assert layer_overload(problem, plan.hosted[:, l], l) <= layer_overload(problem, reference[:, l], l) + 0.02
    kept = plan.reference
    assert (plan.hosted[:, kept] == reference[:, kept]).all()
    assert np.isnan(plan.cap_share[kept]).all() and not np.isnan(plan.cap_share[~kept]).any()


@pytest.mark.parametrize("dispatch", ["even", "static"])
def test_latency_search_from_tables_alone_and_static_dispatch_give_valid_layouts(dispatch):
    problem = tiny_problem(experts=16, layers=2, gpus=4, slots=5, dispatch=dispatch)
    for p in (problem, replace(problem, workload=None)):
        hosted = topology_placement(p)
        assert placement_fits(p, hosted)
        assert latency_value(problem, hosted) >= topology_latency_bound(problem) * (1 - 1e-9)


def test_an_expired_deadline_keeps_the_reference():
    problem = tiny_problem(experts=16, gpus=4, slots=5)
    deadline = Deadline(1e-9)
    plan = plan_topology(problem, deadline)
    assert plan.reference.all() and placement_fits(problem, plan.hosted)


def test_nodes_too_small_for_whole_experts_keep_the_reference():
    problem = tiny_problem(gpus=4, per_node=1, slots=3)  # 4 nodes x 3 slots > 8 experts
    plan = plan_topology(problem)
    assert plan.reference.all() and placement_fits(problem, plan.hosted)


@pytest.mark.parametrize("change, message", [
    (dict(objective="bytes"), "`objective` must be one of latency, cross_node"),
    (dict(reference=np.zeros((2, 2, 2), bool)), "`reference` must be a"),
])
def test_bad_options_are_refused(change, message):
    with pytest.raises(PrismError, match=message):
        plan_topology(tiny_problem(), **change)


def test_problems_without_a_layout_are_refused():
    problem = tiny_problem()
    with pytest.raises(PrismError, match=r"\[layout\]"):
        plan_topology(replace(problem, layout=None))


# ------------------------------------------------------------------------------------------ static dispatch


def assert_valid_static(problem, hosted, routing):
    """The slot layout, min replicas, and a routing that serves only from hosting servers, from the home server
    when it hosts the expert, and inside the home node whenever the node hosts it."""
    s, layers, e = problem.shape
    node = problem.nodes
    assert placement_fits(problem, hosted) and (hosted.sum(axis=2) == problem.layout.slots_per_layer).all()
    assert (hosted.sum(axis=0) >= problem.min_replicas).all()
    assert routing.shape == problem.shape
    lay, exp = np.arange(layers)[None, :, None], np.arange(e)[None, None, :]
    assert hosted[routing, lay, exp].all()
    home = np.arange(s)[:, None, None]
    assert (routing[hosted] == np.broadcast_to(home, routing.shape)[hosted]).all()
    in_node = np.stack([hosted[node == node[h]].any(axis=0) for h in range(s)])  # [homes, layers, experts]
    assert (node[routing][in_node] == np.broadcast_to(node[:, None, None], routing.shape)[in_node]).all()


def test_static_plan_on_esft_crosses_nodes_a_quarter_less_than_eplb_within_its_overload(esft8):
    problem = esft_problem(esft8, "static")
    hosted, routing = topology_solution(problem)
    assert_valid_static(problem, hosted, routing)
    eplb = eplb_placement(problem)[0]
    ours, theirs = serving_metrics(problem, hosted, routing), serving_metrics(problem, eplb)
    assert ours["cross_node_bytes_per_token"] <= 0.75 * theirs["cross_node_bytes_per_token"]
    assert ours["overload"] <= theirs["overload"] + 0.05


def test_static_plan_keeps_hot_experts_in_every_node_that_uses_them():
    """Two nodes whose origins share one hot expert: each node gets a copy, so no token leaves its node for it."""
    problem = tiny_problem(tokens=800, experts=16, layers=2, gpus=4, slots=5, dispatch="static", seed=4)
    weight = problem.weight.copy()
    weight[:, :, 0] += weight.sum(axis=2).max()  # expert 0 hot for every origin
    problem = replace(problem, weight=weight)
    plan = plan_topology(problem)
    assert_valid_static(problem, plan.hosted, plan.routing)
    node = problem.nodes
    for l in np.flatnonzero(~plan.reference):
        assert all(plan.hosted[node == n, l, 0].any() for n in range(node.max() + 1))
    eplb = eplb_placement(problem)[0]
    ours, theirs = serving_metrics(problem, plan.hosted, plan.routing), serving_metrics(problem, eplb)
    assert ours["cross_node_bytes_per_token"] < theirs["cross_node_bytes_per_token"]


@pytest.mark.parametrize("seed", [0, 1])
def test_static_plan_beats_eplb_on_small_seeded_cases(seed):
    # 12 slots per node for 20 experts: each node holds its origins' favourites, not every expert.
    problem = tiny_problem(tokens=1200, experts=20, layers=3, gpus=8, per_node=4, slots=3, dispatch="static",
                           origins=8, seed=seed)
    plan = plan_topology(problem, overload_slack=0.03)
    assert_valid_static(problem, plan.hosted, plan.routing)
    eplb = eplb_placement(problem)[0]
    ours, theirs = serving_metrics(problem, plan.hosted, plan.routing), serving_metrics(problem, eplb)
    assert ours["cross_node_bytes_per_token"] <= 0.75 * theirs["cross_node_bytes_per_token"]
    assert ours["overload"] <= theirs["overload"] + 0.05
    reference = solve_balance_reference(problem)
    for l in np.flatnonzero(~plan.reference):
        load = gpu_load(plan.hosted[:, l:l + 1], problem.weight[:, l:l + 1], plan.routing[:, l:l + 1])
        assert balance_metrics(load, problem.speed)["overload"] <= layer_overload(problem, reference[:, l], l) + 0.03


def solve_balance_reference(problem):
    return solve_balance(problem.demand, problem.speed, problem.layout.slots_per_layer, problem.min_replicas).hosted


def test_even_dispatch_has_no_routing_and_static_tables_alone_still_plan():
    even = tiny_problem(experts=16, gpus=4, slots=5)
    assert topology_solution(even)[1] is None
    static = replace(tiny_problem(experts=16, gpus=4, slots=5, dispatch="static"), workload=None)
    hosted, routing = topology_solution(static)
    assert_valid_static(static, hosted, routing)


def test_spare_ladder_keeps_every_expert_and_distinct_gpus():
    capacity = np.array([40, 40])
    ladder = spare_ladder(capacity, 10, 64, 1)
    assert (ladder[0] == 0).all() and len(ladder) > 1
    for spare in ladder:
        assert ((capacity - spare) >= 10).all() and (capacity - spare).sum() >= 64
    assert spare_ladder(capacity, 10, 64, 3) == []  # 3 copies on 3 distinct nodes of 2
    assert spare_ladder(np.array([12, 12]), 3, 40, 1) == []  # 24 slots for 40 experts


# ------------------------------------------------------------------------------------------ the bound


def all_layouts(problem):
    s, _, e = problem.shape
    rows = [np.isin(np.arange(e), c) for c in itertools.combinations(range(e), problem.layout.slots_per_layer)]
    for pick in itertools.product(rows, repeat=s):
        hosted = np.stack(pick)[:, None, :]
        if hosted.any(axis=0).all():
            yield hosted


@pytest.mark.parametrize("dispatch", ["even", "static"])
def test_latency_bound_is_below_every_layout(dispatch):
    problem = tiny_problem(tokens=120, experts=4, layers=1, gpus=4, per_node=2, slots=2, origins=4,
                           dispatch=dispatch)
    best = min(latency_value(problem, h) for h in all_layouts(problem))
    bound = topology_latency_bound(problem)
    assert 0 < topology_network_bound(problem) <= bound <= best * (1 + 1e-9)


# ------------------------------------------------------------------------------------------ the baseline


def test_capped_copies_replicate_the_hottest_within_the_cap():
    assert capped_copies(np.array([10.0, 1.0, 4.0]), 6, 3, 1).tolist() == [3, 1, 2]
    assert capped_copies(np.array([10.0, 1.0]), 9, 3, 1).tolist() == [3, 3]  # all at the cap


def test_coactivation_nodes_keep_co_activated_experts_together():
    # Experts 0-3 fire together, so do 4-7; two nodes of 2 GPUs x 2 slots each hold 4 experts.
    coact = np.zeros((8, 8))
    coact[:4, :4] = coact[4:, 4:] = 5.0
    demand = np.array([4.0, 3.0, 3.0, 3.0, 3.5, 3.0, 3.0, 3.0])
    assign = coactivation_nodes(demand, coact, np.array([0, 0, 1, 1]), np.ones(4), 2, 1, alpha=1.0)
    assert len(set(assign[:4])) == 1 and len(set(assign[4:])) == 1 and assign[0] != assign[4]


def test_coactivation_layout_is_valid_and_whole_experts(esft8):
    problem = esft_problem(esft8)
    hosted = coactivation_placement(problem)
    assert placement_fits(problem, hosted)
    assert one_node_per_expert(hosted, problem.nodes)
    assert CoactivationSolver().solve(problem, "latency").status == "heuristic"
    with pytest.raises(PrismError, match="co-activation counts"):
        coactivation_placement(replace(problem, tables=replace(problem.tables, coact=None)))


@pytest.mark.parametrize("dispatch", ["even", "static"])
def test_latency_layout_is_never_slower_than_the_balance_layout_in_any_layer(esft8, dispatch):
    problem = esft_problem(esft8, dispatch)
    reference = solve_balance_reference(problem)
    plan = plan_topology(problem, reference=reference)
    ref_routing = None if dispatch == "even" else static_balance_routing(problem, reference)
    ours = sum(layer_latency(problem, plan.hosted, plan.routing))
    theirs = sum(layer_latency(problem, reference, ref_routing))
    assert (ours <= theirs + 1e-15).all()
    assert (plan.hosted[:, plan.reference] == reference[:, plan.reference]).all()
    assert not plan.reference.all()  # the node layout wins somewhere on ESFT


@pytest.mark.parametrize("dispatch", ["even", "static"])
def test_exact_latency_layout_is_never_slower_than_eplb_or_the_balance_layout(esft8, dispatch):
    problem = esft_problem(esft8, dispatch)
    latency = get_solver("exact", time_limit=30).solve(problem, "latency")
    assert placement_fits(problem, latency.hosted)
    mine = latency_value(problem, latency.hosted, latency.routing)
    for name in ("eplb", "exact"):
        other = get_solver(name, time_limit=30).solve(problem, "balance")
        assert mine <= latency_value(problem, other.hosted, other.routing) * (1 + 1e-12)
