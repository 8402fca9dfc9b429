import json
import numpy as np
import pytest
from hypothesis import given, settings

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.pipeline import solve_placement
from prism_plan.placement.cluster import GIB, parse_cluster
from prism_plan.solvers import SOLVERS, get_solver

# local-search improves latency or traffic only; layout solvers need a cluster with a [layout] (test_layout.py)
COVERAGE_SOLVERS = [name for name, cls in SOLVERS.items()
                    if name != "local-search" and not cls.needs_layout and not cls.needs_offload]
from prism_plan.solvers.objectives import coverage_upper_bound
from prism_plan.solvers.problem import PlacementProblem, build_problem
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace
from tiny import feasible_placements, tiny_problems

ONE_COPY_GIB = 26 * 64 * 17301504 / GIB  # DeepSeek-V2-Lite, every routed expert once


def lp_optimum(problem: PlacementProblem) -> float:
    """The coverage LP relaxation for equal expert sizes, modelled independently of prism_plan and solved by
    GLOP's simplex. Memory rows count whole experts (floor(budget / size)), which for integer placements is
    the same constraint as bytes <= budget. It bounds every placement from above; one that reaches it is
    optimal."""
    from ortools.linear_solver import pywraplp

    s, l, e = problem.shape
    solver = pywraplp.Solver.CreateSolver("GLOP")
    x = [[[solver.NumVar(0, 1, "") for _ in range(e)] for _ in range(l)] for _ in range(s)]
    for i in range(s):
        solver.Add(sum(x[i][j][k] for j in range(l) for k in range(e))
                   <= int(problem.budget[i]) // int(problem.layer_bytes[0]))
    for j in range(l):
        for k in range(e):
            solver.Add(sum(x[i][j][k] for i in range(s)) >= problem.min_replicas)
    solver.Maximize(sum(float(problem.weight[i, j, k]) * x[i][j][k]
                        for i in range(s) for j in range(l) for k in range(e)))
    assert solver.Solve() == pywraplp.Solver.OPTIMAL
    return solver.Objective().Value()


def split_origins(n_servers: int):
    """ESFT tables with each domain's requests split over enough origins to give every server its own."""
    trace = load_trace(BUNDLED_TRACE)
    per = -(-n_servers // 4)
    names = [f"{d}-{i}" for d in trace.origins for i in range(per)]
    origin = (trace.origin * per + trace.request % per).astype(np.int32)
    from dataclasses import replace

    return build_tables([replace(trace, origins=tuple(names), origin=origin)], pairs=False), names


def mixed_cluster(n_servers: int, origins: list[str], seed: int):
    rng = np.random.default_rng(seed)
    share = rng.uniform(0.4, 1.6, n_servers)
    memory = share / share.sum() * ONE_COPY_GIB * rng.uniform(1.15, 1.8)
    owner = np.arange(len(origins)) % n_servers
    servers = [{"name": f"s{i}", "memory_gib": float(memory[i]),
                "origins": [o for o, w in zip(origins, owner) if w == i]} for i in range(n_servers)]
    return parse_cluster({"defaults": {"bandwidth_gbps": 10.0}, "server": servers})


@pytest.mark.parametrize("n_servers, seed", [(2, 0), (3, 1), (4, 2), (6, 3), (8, 4), (12, 5), (16, 6)])
def test_exact_is_optimal_and_greedy_close_on_esft(n_servers, seed, dsv2):
    tables, origins = split_origins(n_servers)
    cluster = mixed_cluster(n_servers, origins, seed)
    problem = build_problem(tables, cluster, dsv2)
    exact = get_solver("exact").solve(problem)
    assert exact.status == "optimal" and exact.gap == 0.0 and exact.bound == exact.objective
    assert exact.objective == pytest.approx(lp_optimum(problem), rel=1e-9)
    greedy = get_solver("greedy").solve(problem)
    assert greedy.objective >= 0.99 * exact.objective
    assert greedy.objective <= exact.objective


def brute_force(problem: PlacementProblem) -> float:
    return max((float((problem.weight * x).sum()) for x in feasible_placements(problem)), default=-1.0)


@settings(max_examples=60, deadline=None)
@given(tiny_problems(uniform=True))
def test_flow_matches_brute_force(problem):
    result = get_solver("exact").solve(problem)
    assert result.status == "optimal"
    assert result.objective == brute_force(problem)


@settings(max_examples=40, deadline=None)
@given(tiny_problems(uniform=False))
def test_milp_matches_brute_force(problem):
    best = brute_force(problem)
    if best < 0:
        with pytest.raises(InfeasibleError):
            get_solver("exact").solve(problem)
        return
    result = get_solver("exact", time_limit=30).solve(problem)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(best)


@settings(max_examples=40, deadline=None)
@given(tiny_problems(uniform=True))
def test_every_solver_gives_a_valid_placement(problem):
    bound = coverage_upper_bound(problem)
    size = problem.layer_bytes[None, :, None]
    for name in COVERAGE_SOLVERS:
        res = get_solver(name, seed=3).solve(problem)
        assert (res.hosted.sum(axis=0) >= problem.min_replicas).all(), name
        assert ((res.hosted * size).sum(axis=(1, 2)) <= problem.budget).all(), name
        assert res.objective <= bound + 1e-9


def test_milp_on_unequal_sizes_at_esft_scale(esft_tables, edge4, dsv2):
    from dataclasses import replace

    sizes = tuple(int(b) for b in np.where(np.arange(26) % 2, dsv2.expert_bytes, dsv2.expert_bytes // 2))
    model = replace(dsv2, expert_bytes=sizes)
    problem = build_problem(esft_tables, edge4, model)
    res = get_solver("exact", time_limit=60).solve(problem)
    assert res.status in ("optimal", "feasible")
    assert res.bound is not None and res.bound >= res.objective - 1e-6
    greedy = get_solver("greedy").solve(problem)
    assert res.objective >= greedy.objective


def test_plan_for_every_solver_on_bundled_data(esft_tables, edge4, dsv2):
    values = {}
    for name in COVERAGE_SOLVERS:
        plan = solve_placement(esft_tables, edge4, dsv2, solver=name)
        assert (plan.memory_bytes() <= edge4.budgets).all()
        assert plan.hosted.sum(axis=0).min() >= 1
        values[name] = plan.metrics["local_coverage"]
        if name in ("linear", "round-robin"):
            assert plan.hosted.sum() == 26 * 64  # one copy each, leftover memory unused
    assert values["exact"] == max(values.values())
    assert values["greedy"] > max(v for k, v in values.items() if k not in ("exact", "greedy"))


def test_linear_blocks_are_contiguous_and_sized_by_memory(esft_tables, edge4, dsv2):
    plan = solve_placement(esft_tables, edge4, dsv2, solver="linear")
    owner = plan.hosted.argmax(axis=0)  # [layers, experts]
    assert (np.diff(owner, axis=1) >= 0).all()
    # 64 experts in proportion to 6, 8, 10 and 12 GiB, largest remainder first, in every layer
    assert (plan.hosted.sum(axis=2) == np.array([11, 14, 18, 21])[:, None]).all()


def test_min_replicas_two(esft_tables, edge4, dsv2):
    plan = solve_placement(esft_tables, parse_cluster({
        "defaults": {}, "server": [{"name": s.name, "memory_gib": 16.0, "origins": list(s.origins)}
                                   for s in edge4.servers]}), dsv2, min_replicas=2)
    assert plan.hosted.sum(axis=0).min() >= 2 and plan.solver["status"] == "optimal"


def test_infeasible_budget_names_shortfall(esft_tables, dsv2):
    cluster = parse_cluster({"defaults": {}, "server": [
        {"name": "a", "memory_gib": 10.0, "origins": ["intent", "law"]},
        {"name": "b", "memory_gib": 12.0, "origins": ["summary", "translation"]}]})
    with pytest.raises(InfeasibleError, match=r"short by 4\.\d\d GiB"):
        build_problem(esft_tables, cluster, dsv2)


def test_mismatched_inputs(esft_tables, edge4):
    from prism_plan.placement.model import resolve_model

    with pytest.raises(PrismError, match="different|pass the `model`"):
        build_problem(esft_tables, edge4, resolve_model("mixtral-8x7b"))
    cluster = parse_cluster({"defaults": {}, "server": [{"name": "a", "memory_gib": 40.0}]})
    with pytest.raises(PrismError, match="have no server"):
        build_problem(esft_tables, cluster, resolve_model("deepseek-v2-lite"))


def test_unknown_solver():
    with pytest.raises(PrismError, match="unknown solver"):
        get_solver("magic")


@pytest.mark.parametrize("name, options, message", [
    ("random", {"seed": -1}, "`seed` must be an integer of at least 0, got -1"),
    ("random", {"seed": 2.0}, "got 2.0"),
    ("random", {"seed": True}, "got True"),
    ("exact", {"warm_start": "no"}, "`warm_start` must be True or False"),
    ("exact", {"time_limit": float("nan")}, "`time_limit` must be a positive number"),
    ("greedy", {"time_limit": -1}, "`time_limit` must be a positive number"),
])
def test_solver_options_are_checked(name, options, message):
    with pytest.raises(PrismError, match=message):
        get_solver(name, **options)


@pytest.mark.parametrize("solver", ["exact", "random"])
def test_two_runs_give_the_same_plan_file_but_for_its_timing(esft_tables, edge4, dsv2, solver):
    runs = [json.loads(solve_placement(esft_tables, edge4, dsv2, solver=solver, seed=3).to_json()) for _ in range(2)]
    assert "seconds" not in runs[0]["solver"]
    assert [{k: v for k, v in d.items() if k != "timing"} for d in runs] == [
        {k: v for k, v in runs[0].items() if k != "timing"}] * 2


def even_cluster(memory_gib: float, servers: int = 4, nodes: list[str] | None = None):
    """`servers` servers of equal memory, the ESFT domains on the first four; `nodes`: each server's node."""
    origins = ["intent", "law", "summary", "translation"]
    return parse_cluster({"defaults": {}, "server": [
        {"name": f"g{i}", "memory_gib": memory_gib, "origins": origins[i:i + 1] if i < 4 else [f"none{i}"],
         **({"node": nodes[i]} if nodes else {})} for i in range(servers)]})


def layout_of(phy2log: np.ndarray, ranks: list[int], experts: int) -> np.ndarray:
    """[servers, layers, experts] bool: slot j of each layer on server ranks[j // (slots / len(ranks))]."""
    layers, slots = phy2log.shape
    hosted = np.zeros((len(ranks), layers, experts), bool)
    for l in range(layers):
        for j, e in enumerate(phy2log[l]):
            hosted[ranks[j * len(ranks) // slots], l, e] = True
    return hosted


def test_eplb_on_an_equal_cluster_is_deepseeks_layout(esft_tables, dsv2):
    from prism_plan.solvers.eplb import rebalance

    problem = build_problem(esft_tables, even_cluster(7.0), dsv2)  # 7 GiB hold 16 experts of each layer
    res = get_solver("eplb").solve(problem)
    phy2log = rebalance(problem.demand, 64, 1, 4, 4)[0]
    assert (res.hosted == layout_of(phy2log, [0, 1, 2, 3], 64)).all()
    assert (res.hosted.sum(axis=2) == 16).all() and "note" not in res.extra
    roomy = build_problem(esft_tables, even_cluster(9.0), dsv2)  # 21 per layer: 84 slots for 64 experts
    res = get_solver("eplb").solve(roomy)
    assert (res.hosted == layout_of(rebalance(roomy.demand, 84, 1, 4, 4)[0], [0, 1, 2, 3], 64)).all()
    twice = 84 * 26 - int(res.hosted.sum())
    assert twice > 0 and res.extra["note"] == f"eplb: {twice} copies EPLB put on a GPU that held the expert " \
                                              f"already count once"


def test_eplb_on_edge4_keeps_eplbs_layout_within_memory_and_says_how(esft_tables, edge4, dsv2):
    from prism_plan.solvers.eplb import rebalance

    plan = solve_placement(esft_tables, edge4, dsv2, solver="eplb")
    assert (plan.memory_bytes() <= edge4.budgets).all() and plan.hosted.sum(axis=0).min() == 1
    note = plan.solver["note"]
    assert note.startswith("eplb: EPLB needs 16 slots per GPU and layer (64 experts on 4 GPUs) but edge-a's "
                           "6.00 GiB holds 14; EPLB's layout with 16 per GPU, then edge-a kept the copies of most "
                           "load its memory holds: 44 experts moved to the least loaded servers with room, 0 spare "
                           "copies dropped; ")
    assert "memory left unused: 9.19 GiB in all (edge-d 5.04 GiB" in note
    problem = build_problem(esft_tables, edge4, dsv2)
    eplb = layout_of(rebalance(problem.demand, 64, 1, 4, 4)[0], [0, 1, 2, 3], 64)
    assert not (plan.hosted[0] & ~eplb[0]).any()  # edge-a keeps part of its EPLB share, the others all of theirs
    assert (plan.hosted[1:] >= eplb[1:]).all()
    load = (plan.hosted * (problem.demand / plan.hosted.sum(axis=0))).sum(axis=2)  # [servers, layers]
    assert (load.mean(axis=0) / load.max(axis=0)).mean() > 0.95  # EPLB's aim: about equal load per GPU


def test_eplb_follows_nodes_and_expert_groups(esft_tables, dsv2):
    from dataclasses import replace

    from prism_plan.solvers.eplb import rebalance

    model = replace(dsv2, expert_groups=4)
    nodes = ["n0", "n1"] * 4  # servers of a node need not be adjacent in the file
    problem = build_problem(esft_tables, even_cluster(4.0, 8, nodes), model)  # 9 slots per layer each
    res = get_solver("eplb").solve(problem)
    ranks = [0, 2, 4, 6, 1, 3, 5, 7]  # EPLB numbers GPUs node by node
    assert (res.hosted == layout_of(rebalance(problem.demand, 72, 4, 2, 8)[0], ranks, 64)).all()
    on_node = np.stack([res.hosted[0::2].any(axis=0), res.hosted[1::2].any(axis=0)])  # [nodes, layers, experts]
    groups = on_node.reshape(2, 26, 4, 16)
    assert (groups.all(axis=3) == groups.any(axis=3)).all() and (on_node.sum(axis=0) == 1).all()
    uneven = build_problem(esft_tables, even_cluster(8.0, 4, ["n0", "n0", "n0", "n1"]), model)
    note = get_solver("eplb").solve(uneven).extra["note"]
    assert note.startswith("eplb: its nodes hold unequal numbers of servers (3, 1): one node")


def test_adaptation_notes_print_under_the_comparison_table():
    from prism_plan.studies.comparison import format_rows

    row = {"objective": "coverage", "ttft_mean_s": 0.01, "ttft_p99_s": 0.02, "remote_bytes_per_token": 1e3,
           "local_coverage": 0.5, "seconds": 0.1, "status": "heuristic", "gap": None, "weak_bound": False,
           "simulated_ttft_s": 0.01}
    rows = [{**row, "label": "linear"}, {**row, "label": "eplb", "note": "eplb: adapted " + "so " * 60},
            {**row, "label": "greedy"}]
    lines = format_rows(rows).splitlines()
    assert lines[5].startswith("eplb: adapted so") and lines[6].startswith("  so")  # wrapped, after 3 rows


def test_eplb_memory_fills_each_servers_memory(esft_tables, edge4, dsv2):
    plan = solve_placement(esft_tables, edge4, dsv2, solver="eplb-memory")
    assert (edge4.budgets - plan.memory_bytes() < 26 * dsv2.expert_bytes).all()


@pytest.mark.parametrize("args, message, parameters", [
    ((np.ones((2, 4)), 6, 1, 1, 4), "`num_replicas` 6 must be a multiple of `num_gpus` 4",
     ("num_replicas", "num_gpus")),
    ((np.ones((2, 4)), 3, 1, 1, 1), "`num_replicas` must be an integer of at least 4", ("num_replicas",)),
    ((np.ones((2, 6)), 6, 4, 1, 1), "`num_groups` 4 must divide the 6 experts", ("num_groups",)),
    ((np.ones((2, 4)), 6, 2, 2, 3), "`num_gpus` 3 must be a multiple of `num_nodes` 2", ("num_gpus", "num_nodes")),
    ((np.ones(4), 4, 1, 1, 1), r"`weight` must be a \[layers, experts\] array", ("weight",)),
    ((-np.ones((2, 4)), 4, 1, 1, 1), "`weight` must hold finite loads >= 0", ("weight",)),
    ((np.full((2, 4), np.nan), 4, 1, 1, 1), "`weight` must hold finite loads", ("weight",)),
])
def test_rebalance_checks_its_arguments(args, message, parameters):
    from prism_plan.solvers.eplb import rebalance

    with pytest.raises(PrismError, match=message) as e:
        rebalance(*args)
    assert e.value.parameters == parameters
