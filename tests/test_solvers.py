import json
import numpy as np
import pytest
from hypothesis import given, settings

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.pipeline import solve_placement
from prism_plan.placement.cluster import GIB, parse_cluster
from prism_plan.solvers import SOLVERS, get_solver

COVERAGE_SOLVERS = [name for name in SOLVERS if name != "local-search"]  # it improves latency or traffic only
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
