"""Serving layouts: nodes and slot layouts in the cluster file, the layout's metrics checked against brute force,
the exact layout coverage flow, every solver's placement fitted to the slots, and plans that export unpadded."""

import itertools
import json

import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.pipeline import make_plan
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.export import export_plan
from prism_plan.placement.layout import balance_metrics, gpu_load, layout_violation, node_round_trip, node_visits
from prism_plan.placement.plan import PlanError
from prism_plan.solvers import SOLVERS, build_problem, get_solver
from prism_plan.solvers.coverage import layout_flow
from prism_plan.traces.trace import Trace
from prism_plan.studies.bundled import BUNDLED_TRACE


def layout_doc(slots=10, dispatch="even", gpus=8, per_node=4, origins=("intent", "law", "summary", "translation"),
               memory=40.0):
    servers = [{"name": f"g{i}", "node": f"n{i // per_node}", "memory_gib": memory, "compute_tflops": 100.0,
                "origins": [origins[i]] if i < len(origins) else []} for i in range(gpus)]
    nodes = [{"name": f"n{j}", "bandwidth_gbps": 1200.0, "latency_ms": 0.005} for j in range(gpus // per_node)]
    return {"server": servers, "node": nodes, "defaults": {"bandwidth_gbps": 400.0, "latency_ms": 0.02},
            "layout": {"slots_per_layer": slots, "dispatch": dispatch}}


@pytest.fixture(scope="module")
def esft_trace():
    return Trace.load(BUNDLED_TRACE)


def test_nodes_set_links_inside_nodes_node_links_between_and_server_links_over_both():
    doc = layout_doc(gpus=4, per_node=2, origins=("a", "b", "c", "d"))
    doc["link"] = [{"a": "n0", "b": "n1", "bandwidth_gbps": 200.0, "latency_ms": 0.03},
                   {"a": "g0", "b": "g3", "bandwidth_gbps": 100.0}]
    c = parse_cluster(doc)
    gbps = c.bandwidth * 8 / 1e9
    assert gbps[0, 1] == gbps[2, 3] == 1200.0  # inside a node
    assert gbps[1, 2] == gbps[0, 2] == 200.0  # the node link
    assert gbps[0, 3] == gbps[3, 0] == 100.0  # the server link outranks the node link
    assert c.latency[0, 1] * 1e3 == pytest.approx(0.005) and c.latency[1, 2] * 1e3 == pytest.approx(0.03)
    assert c.layout.slots_per_layer == 10 and c.layout.dispatch == "even"
    assert list(c.node_index) == [0, 0, 1, 1]
    plain = {"server": doc["server"], "defaults": doc["defaults"]}
    assert "nodes" not in parse_cluster(plain).to_dict()  # clusters without them hash as before


@pytest.mark.parametrize("change, message", [
    (lambda d: d["node"].append({"name": "n9", "bandwidth_gbps": 1.0}), "no server is in it"),
    (lambda d: d["node"].append(dict(d["node"][0])), "duplicate node name"),
    (lambda d: d["node"][0].update(name="g0"), "a server has the same name"),
    (lambda d: d.update(link=[{"a": "n0", "b": "g5", "bandwidth_gbps": 1.0}]), "not server and node"),
    (lambda d: d.update(link=[{"a": "n0", "b": "nx", "bandwidth_gbps": 1.0}]), "must name a server or a node"),
    (lambda d: d.update(link=[{"a": "n0", "b": "n1", "bandwidth_gbps": 1.0}] * 2), "list each pair once"),
    (lambda d: d["layout"].update(dispatch="random"), "`dispatch` must be one of even, static"),
    (lambda d: d["layout"].update(slots_per_layer=0), "slots_per_layer"),
    (lambda d: d["layout"].pop("slots_per_layer"), "missing `slots_per_layer`"),
    (lambda d: d["layout"].update(spare=1), "unknown key"),
    (lambda d: d["node"][0].update(bandwidth_gbps=float("nan")), "bandwidth_gbps"),
])
def test_bad_nodes_links_and_layouts_are_refused(change, message):
    doc = layout_doc()
    change(doc)
    with pytest.raises(PrismError, match=message):
        parse_cluster(doc)


@pytest.mark.parametrize("slots, memory, message", [
    (65, 40.0, "more than the 64 experts"),
    (7, 40.0, "give slots_per_layer at least 8"),
    (10, 1.0, "infeasible budget: .*slots_per_layer 10 needs"),
])
def test_layouts_no_placement_can_meet_are_refused(esft_tables, slots, memory, message):
    with pytest.raises(InfeasibleError, match=message):
        build_problem(esft_tables, parse_cluster(layout_doc(slots, memory=memory)))


def random_layout(rng, servers, layers, experts, slots):
    hosted = np.zeros((servers, layers, experts), bool)
    for l in range(layers):
        for e, s in enumerate(rng.permutation(np.resize(np.arange(servers), experts))):
            hosted[s, l, e] = True
        for s in range(servers):
            free = np.flatnonzero(~hosted[s, l])
            hosted[s, l, rng.choice(free, slots - hosted[s, l].sum(), replace=False)] = True
    return hosted


@pytest.mark.parametrize("static", [False, True])
def test_node_visits_equal_the_brute_force_expectation(static):
    rng = np.random.default_rng(3)
    s_n, l_n, e_n, k, tokens = 4, 2, 6, 3, 30
    node = np.array([0, 0, 1, 1])
    hosted = random_layout(rng, s_n, l_n, e_n, 3)
    experts = np.stack([[rng.choice(e_n, k, replace=False) for _ in range(l_n)] for _ in range(tokens)])
    home = rng.integers(s_n, size=tokens)
    routing = np.argmax(hosted[None] * rng.random((s_n, s_n, 1, 1)), axis=1) if static else None
    cost = rng.random((s_n, 2))
    want = 0.0
    for t in range(tokens):
        for l in range(l_n):
            if static:
                choices = [[routing[home[t], l, e] for e in experts[t, l]]]
            else:
                choices = list(itertools.product(*[np.flatnonzero(hosted[:, l, e]) for e in experts[t, l]]))
            seen = [{node[g] for g in c} - {node[home[t]]} for c in choices]
            want += np.mean([sum(cost[home[t], n] for n in v) for v in seen])
    assert node_visits(experts, home, hosted, node, routing, cost) == pytest.approx(want / tokens)


def test_load_split_evenly_or_by_routing_and_balance_metrics():
    hosted = np.array([[[1, 1, 0]], [[1, 0, 1]]], bool)  # [2 servers, 1 layer, 3 experts]
    weight = np.array([[[4.0, 2.0, 0.0]], [[2.0, 0.0, 6.0]]])
    even = gpu_load(hosted, weight)
    assert even[:, 0].tolist() == [3.0 + 2.0, 3.0 + 6.0]  # expert 0's 6 activations half on each copy
    routed = gpu_load(hosted, weight, np.array([[[0, 0, 1]], [[1, 0, 1]]]))
    assert routed[:, 0].tolist() == [6.0, 8.0]
    m = balance_metrics(even)
    assert m["balancedness"] == pytest.approx(7 / 9) and m["overload"] == pytest.approx(2 / 7)
    # A server twice as fast should carry twice the load: 14 activations as 9.33 and 4.67 are balanced.
    assert balance_metrics(np.array([[28 / 3], [14 / 3]]), np.array([2.0, 1.0]))["overload"] == pytest.approx(0)
    assert node_round_trip(np.array([[0, 1, 3], [1, 0, 2], [3, 2, 0.]]), np.array([0, 0, 1]))[:, 1].tolist() == \
        [3.0, 2.0, 0.0]


def test_layout_flow_is_the_exact_coverage_optimum_under_the_layout():
    rng = np.random.default_rng(0)
    weight = rng.random((3, 1, 4)) * (rng.random((3, 1, 4)) > 0.3)

    class Layout:
        slots_per_layer = 2

    problem = type("P", (), {"shape": weight.shape, "layout": Layout, "min_replicas": 1})
    hosted, slack = layout_flow(problem, weight)
    best = -1.0
    rows = [np.array(c) for c in itertools.product([0, 1], repeat=4) if sum(c) == 2]
    for a, b, c in itertools.product(rows, repeat=3):
        x = np.stack([a, b, c])[:, None, :]
        if x.sum(axis=0).min() >= 1:
            best = max(best, float((weight * x).sum()))
    assert float((weight * hosted).sum()) + slack >= best - 1e-9
    assert float((weight * hosted).sum()) == pytest.approx(best, abs=1e-6)
    assert layout_violation(hosted, 2) is None


@pytest.mark.parametrize("name", sorted(name for name, cls in SOLVERS.items()
                                         if name != "local-search" and not cls.needs_offload))
def test_every_solver_places_exactly_the_layout_slots(esft_tables, name):
    problem = build_problem(esft_tables, parse_cluster(layout_doc()))
    result = get_solver(name, time_limit=30).solve(problem, "coverage")
    assert layout_violation(result.hosted, 10) is None
    assert result.hosted.sum(axis=0).min() >= 1
    plan = make_plan(problem, result)
    for key in ("balancedness", "overload", "cross_node_bytes_per_token"):
        assert key in plan.metrics
    if name == "exact":
        assert result.status == "optimal" and result.gap == 0.0


def test_layout_metrics_count_tokens_on_the_trace_and_activations_without(esft_tables, esft_trace):
    cluster = parse_cluster(layout_doc())
    with_trace = build_problem(esft_tables, cluster, trace=esft_trace)
    tables_only = build_problem(esft_tables, cluster)
    result = get_solver("eplb").solve(with_trace, "balance")
    per_token = make_plan(with_trace, result).metrics
    per_activation = make_plan(tables_only, result).metrics
    assert per_token["cross_node_counted"].startswith("per token")
    # Co-activated experts on one node share a trip, so counting activations can only give more.
    assert 0 < per_token["cross_node_bytes_per_token"] < per_activation["cross_node_bytes_per_token"]
    assert per_token["overload"] == per_activation["overload"] < 0.1  # EPLB balances the even split
    # Without shared trips, the bytes are the activations served elsewhere, each a hidden state out and back.
    activations_per_token = esft_tables.freq.sum() / esft_tables.tokens.sum()
    share = per_activation["cross_node_bytes_per_token"] / (2 * tables_only.costs.token_bytes * activations_per_token)
    assert per_token["cross_node_dispatch_share"] == pytest.approx(share)
    assert 0.2 < share < 0.6  # two nodes: about half the activations go to the other one


def test_a_layout_plan_exports_without_padding_and_other_layouts_refuse_it(esft_tables, tmp_path):
    cluster = parse_cluster(layout_doc())
    problem = build_problem(esft_tables, cluster)
    plan = make_plan(problem, get_solver("exact").solve(problem, "coverage"))
    for fmt, name in (("sglang", "s.json"), ("vllm-ascend", "v.json"), ("eplb", "e.npz"), ("trtllm", "t.yaml")):
        summary = export_plan(plan, fmt, tmp_path / name, cluster=cluster)
        assert summary["slots_per_gpu"] == 10 and set(summary["padding_slots"].values()) == {0}
    p2l = np.array(json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"])
    assert p2l.shape[1] == 80
    with pytest.raises(PlanError, match="needs exactly 9 on every server"):
        plan.check(parse_cluster(layout_doc(9)))


def test_solve_cli_on_a_layout_cluster_prints_and_writes_its_metrics(esft_tables, tmp_path, capsys):
    tables, cluster, out = tmp_path / "t.npz", tmp_path / "c.toml", tmp_path / "p.json"
    esft_tables.save(tables)
    write_cluster(cluster, layout_doc())
    code = main(["solve", "--tables", str(tables), "--cluster", str(cluster), "--model", "deepseek-v2-lite",
                 "--solver", "eplb", "--objective", "balance", "-o", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    metrics = json.loads(out.read_text())["metrics"]
    assert 0 < metrics["overload"] < 0.1 and metrics["balancedness"] > 0.9
    assert summary["objective"] == "balance"
    (tmp_path / "small.toml").write_text(cluster.read_text().replace("slots_per_layer = 10", "slots_per_layer = 7"))
    assert main(["solve", "--tables", str(tables), "--cluster", str(tmp_path / "small.toml"), "-o",
                 str(tmp_path / "q.json")]) == 2
    assert capsys.readouterr().err.startswith("error: [layout] 8 servers x 7 slots")
    assert not (tmp_path / "q.json").exists()


def write_cluster(path, doc):
    lines = [f'[defaults]\nbandwidth_gbps = {doc["defaults"]["bandwidth_gbps"]}\nlatency_ms = '
             f'{doc["defaults"]["latency_ms"]}\n']
    for n in doc["node"]:
        lines.append(f'[[node]]\nname = "{n["name"]}"\nbandwidth_gbps = {n["bandwidth_gbps"]}\n'
                     f'latency_ms = {n["latency_ms"]}\n')
    for s in doc["server"]:
        lines.append(f'[[server]]\nname = "{s["name"]}"\nnode = "{s["node"]}"\nmemory_gib = {s["memory_gib"]}\n'
                     f'compute_tflops = {s["compute_tflops"]}\norigins = {json.dumps(s["origins"])}\n')
    lines.append(f'[layout]\nslots_per_layer = {doc["layout"]["slots_per_layer"]}\n'
                 f'dispatch = "{doc["layout"]["dispatch"]}"\n')
    path.write_text("\n".join(lines))


def test_synthetic_routing_is_seeded_skewed_origin_dependent_and_drifts(dsv2):
    from prism_plan.traces.synthetic import synthetic_trace, synthetic_windows
    from prism_plan.traces.tables import build_tables

    origins = ["a", "b", "c", "d"]
    one = synthetic_trace(dsv2, origins, 256, seed=1)
    assert one.experts.shape == (1024, 26, 6) and (np.diff(np.sort(one.experts, axis=2), axis=2) > 0).all()
    assert (synthetic_trace(dsv2, origins, 256, seed=1).experts == one.experts).all()

    def similarity(trace):
        f = build_tables([trace]).freq.reshape(len(origins), -1)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        return float((f @ f.T)[np.triu_indices(len(origins), 1)].mean())

    assert similarity(synthetic_trace(dsv2, origins, 512, affinity=0.9)) < \
        similarity(synthetic_trace(dsv2, origins, 512, affinity=0.0)) - 0.2
    first, last = synthetic_windows(dsv2, origins, 512, 4, affinity=0.9)[::3]
    f0, f3 = (build_tables([w]).freq.reshape(len(origins), -1) for w in (first, last))
    # By the last window origin a routes as origin b did in the first.
    assert np.corrcoef(f3[0], f0[1])[0, 1] > np.corrcoef(f3[0], f0[0])[0, 1] + 0.3
    assert last.request.min() > first.request.max()
    with pytest.raises(PrismError, match="`affinity`"):
        synthetic_trace(dsv2, origins, 8, affinity=1.5)
