"""The incremental re-solver against brute force, and migrate_placement on the real ESFT traces."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.pipeline import make_plan, migrate_placement
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.migration import needed_copy_bytes, verify_migration
from prism_plan.solvers import IncrementalSolver, build_problem, get_solver
from prism_plan.solvers.objectives import coverage_value
from prism_plan.solvers.problem import PlacementProblem
from prism_plan.solvers.objectives import latency_terms
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace
from tiny import feasible_placements, small_latency_problem, tiny_problems


def brute_net(problem, current, per_byte, budget, objective="coverage"):
    """Best objective net of move cost over every feasible placement within the budget."""
    best = None
    for x in feasible_placements(problem):
        moved = needed_copy_bytes(current, x, problem.layer_bytes)
        if budget is not None and moved > budget:
            continue
        if objective == "coverage":
            value = coverage_value(problem, x) - per_byte * moved
            best = value if best is None else max(best, value)
        else:
            value = sum(latency_terms(problem, x)) + per_byte * moved
            best = value if best is None else min(best, value)
    return best


@st.composite
def incremental_cases(draw, uniform):
    problem = draw(tiny_problems(uniform=uniform))
    options = list(feasible_placements(problem))
    assume(options)
    current = options[draw(st.integers(0, len(options) - 1))]
    per_byte = draw(st.sampled_from([0.0, 0.5, 2.0]))
    budget = draw(st.sampled_from([None, 0, 3, 6, 12]))
    return problem, current, per_byte, budget


@settings(max_examples=60, deadline=None)
@given(incremental_cases(uniform=True))
def test_coverage_with_move_cost_and_budget_matches_brute_force(case):
    problem, current, per_byte, budget = case
    res = IncrementalSolver(current, move_cost=per_byte, budget_bytes=budget, time_limit=30).solve(problem)
    best = brute_net(problem, current, per_byte, budget)
    assert res.status == "optimal"
    assert res.objective == pytest.approx(best, abs=1e-6)
    assert res.bound >= best - 1e-6
    assert budget is None or res.extra["copied_bytes"] <= budget
    if per_byte == 0 and budget is None:  # no cost: the plain optimum, and the fewest copies that reach it
        assert res.objective == pytest.approx(get_solver("exact").solve(problem).objective)
        fewest = min(needed_copy_bytes(current, x, problem.layer_bytes) for x in feasible_placements(problem)
                     if coverage_value(problem, x) == pytest.approx(best))
        assert res.extra["copied_bytes"] == fewest


@settings(max_examples=30, deadline=None)
@given(incremental_cases(uniform=False))
def test_mixed_sizes_go_through_the_milp_and_match_brute_force(case):
    problem, current, per_byte, budget = case
    res = IncrementalSolver(current, move_cost=per_byte, budget_bytes=budget, time_limit=30).solve(problem)
    assert res.status == "optimal"
    assert res.objective == pytest.approx(brute_net(problem, current, per_byte, budget), abs=1e-3)


@pytest.mark.parametrize("seed, budget", [(0, None), (1, 10), (2, 20), (3, 0)])
def test_latency_with_move_cost_and_budget_matches_brute_force(seed, budget):
    problem = small_latency_problem(seed)
    current = next(x for x in feasible_placements(problem) if x.sum() == 4)
    per_byte = 1e-6  # seconds per token per byte: one 10-byte expert costs 10 us a token
    res = IncrementalSolver(current, move_cost=per_byte, budget_bytes=budget, time_limit=30).solve(
        problem, "latency")
    best = brute_net(problem, current, per_byte, budget, "latency")
    assert res.status == "optimal"
    assert res.objective == pytest.approx(best, rel=1e-6)
    assert budget is None or res.extra["copied_bytes"] <= budget
    if budget == 0:
        assert np.array_equal(res.hosted, current)


def test_budget_too_small_for_a_feasible_placement_says_how_much():
    # Server 1 holds both experts but has room for one since it shrank; server 0 holds none: one must move.
    problem = PlacementProblem(np.ones((2, 1, 2)), np.array([4]), np.array([8, 4]), np.zeros((2, 2)), 1)
    current = np.array([[[False, False]], [[True, True]]])
    with pytest.raises(InfeasibleError, match=r"move budget 0 B is too small.*at least 4 B copied"):
        IncrementalSolver(current, budget_bytes=0).solve(problem)
    res = IncrementalSolver(current, budget_bytes=4).solve(problem)
    assert res.status == "optimal" and res.extra["copied_bytes"] == 4


# migrate_placement on the bundled real traces: plan on the first half of each domain, migrate for the second.

@pytest.fixture(scope="module")
def halves(dsv2, edge4):
    first, second = load_trace(BUNDLED_TRACE).split_requests(0.5)
    old_tables, new_tables = build_tables([first]), build_tables([second])
    problem = build_problem(old_tables, edge4, dsv2)
    old = make_plan(problem, get_solver("exact").solve(problem))
    return old, new_tables


def test_zero_budget_moves_nothing(halves, edge4):
    old, new_tables = halves
    new, moves = migrate_placement(old, new_tables, edge4, budget_bytes=0)
    assert moves.bytes == 0 and not moves.stages
    assert np.array_equal(new.hosted, old.hosted)


def test_free_migration_reaches_the_optimum_with_fewer_copies_than_from_scratch(halves, edge4, dsv2):
    old, new_tables = halves
    new, moves = migrate_placement(old, new_tables, edge4)
    problem = build_problem(new_tables, edge4, dsv2)
    scratch = get_solver("exact").solve(problem)
    assert new.solver["status"] == "optimal"
    assert new.solver["objective"] == pytest.approx(scratch.objective)
    assert moves.bytes == needed_copy_bytes(old.hosted, new.hosted, dsv2.layer_bytes)
    assert moves.bytes <= needed_copy_bytes(old.hosted, scratch.hosted, dsv2.layer_bytes)
    verify_migration(moves, old.hosted, new.hosted, edge4)


def test_budget_and_move_cost_trade_gain_for_bytes(halves, edge4):
    old, new_tables = halves
    gains, sent = [], []
    for budget in (2**28, 2**30, None):
        new, moves = migrate_placement(old, new_tables, edge4, budget_bytes=budget)
        assert budget is None or moves.bytes <= budget
        gains.append(new.solver["predicted_gain"])
        sent.append(moves.bytes)
    assert gains == sorted(gains) and sent == sorted(sent) and gains[0] > 0
    costly, moves = migrate_placement(old, new_tables, edge4, move_cost=1.0)
    assert moves.bytes < sent[-1]


def test_min_gain_keeps_the_current_plan(halves, edge4):
    old, new_tables = halves
    new, moves = migrate_placement(old, new_tables, edge4, min_gain=0.5)
    assert not new.solver["migrated"] and new.solver["predicted_gain"] < 0.5
    assert np.array_equal(new.hosted, old.hosted) and not moves.stages


def test_shrunk_server_forces_a_migration_that_fits(halves, dsv2):
    old, new_tables = halves
    doc = {"defaults": {"bandwidth_gbps": 1.0, "latency_ms": 2.0},
           "server": [{"name": n, "memory_gib": m, "origins": [o]} for n, m, o in
                      zip(old.servers, (6.0, 8.0, 10.0, 3.0), new_tables.origins)]}
    small = parse_cluster(doc)
    with pytest.raises(InfeasibleError, match="too small"):
        migrate_placement(old, new_tables, small, budget_bytes=2**28, min_gain=1.0)
    new, moves = migrate_placement(old, new_tables, small, min_gain=1.0)  # must move although gain is small
    assert new.solver["migrated"]
    new.check(small)
    verify_migration(moves, old.hosted, new.hosted, small)


def test_drift_replay_counts_moves_and_zero_budget_moves_nothing(dsv2, edge4):
    from prism_plan.studies.drift import Strategy, replay_drift, with_benefit
    from prism_plan.traces.drift import drifting_workload

    windows = drifting_workload(load_trace(BUNDLED_TRACE), 3, 1000)
    strategies = [Strategy("never", "never", objective="coverage"),
                  Strategy("from scratch", "scratch", objective="coverage"),
                  Strategy("free", "incremental", objective="coverage"),
                  Strategy("zero", "incremental", budget_bytes=0, objective="coverage")]
    rows = {r["label"]: r for r in with_benefit(replay_drift(windows, edge4, dsv2, strategies=strategies))}
    assert rows["never"]["total_bytes"] == rows["zero"]["total_bytes"] == 0
    assert rows["zero"]["mean_ttft_s"] == rows["never"]["mean_ttft_s"]
    # Re-planning for coverage raises local coverage on the next window; from the same plan, the
    # fewest-moves optimum copies no more than a fresh optimum.
    assert rows["free"]["mean_local_coverage"] > rows["never"]["mean_local_coverage"]
    assert rows["free"]["copied_bytes"][0] == rows["from scratch"]["copied_bytes"][0] == 0  # window 0 again
    assert 0 < rows["free"]["copied_bytes"][1] <= rows["from scratch"]["copied_bytes"][1]
    assert len(rows["free"]["ttft_s"]) == 2


def test_a_latency_move_cost_moves_less(esft_tables, edge4, dsv2, monkeypatch):
    """The coverage start of the latency re-solve carries the move cost in coverage units: with a current
    placement that no longer fits (rolled one server over) and no MILP to fix it (as on clusters too large
    for one), a cost must cut the bytes copied."""
    from prism_plan.solvers import latency
    from prism_plan.solvers.incremental import traffic_move_cost

    monkeypatch.setattr(latency, "milp_fits", lambda problem: False)
    problem = build_problem(esft_tables, edge4, dsv2)
    current = np.roll(get_solver("exact").solve(problem).hosted, 1, axis=0)
    copied = {}
    for weight in (0.0, 1.0):
        res = IncrementalSolver(current, move_cost=traffic_move_cost(problem, weight, "latency"),
                                time_limit=10).solve(problem, "latency")
        assert (problem.memory(res.hosted) <= problem.budget).all() and res.bound <= res.objective * (1 + 1e-9)
        copied[weight] = res.extra["copied_bytes"]
    assert copied[1.0] < 0.5 * copied[0.0]


@pytest.mark.parametrize("options, message", [
    ({"move_cost": float("nan")}, "`move_cost` must be a finite number of at least 0, got nan"),
    ({"move_cost": float("inf")}, "got inf"),
    ({"move_cost": -1.0}, "got -1.0"),
    ({"move_cost": True}, "got True"),
    ({"move_cost": "1"}, "got '1'"),
    ({"budget_bytes": float("nan")}, "`budget_bytes` must be an integer of at least 0, got nan"),
    ({"budget_bytes": float("inf")}, "got inf"),
    ({"budget_bytes": 3.7}, "got 3.7"),
    ({"budget_bytes": -1}, "got -1"),
    ({"seed": -1}, "`seed` must be an integer of at least 0"),
    ({"time_limit": float("inf")}, "`time_limit` must be a positive number"),
])
def test_incremental_options_are_checked(options, message):
    with pytest.raises(PrismError, match=message) as e:
        IncrementalSolver(np.zeros((2, 1, 2), bool), **options)
    assert e.value.parameters == tuple(options)
