"""The coverage and latency models give the same optimum on every MILP back end (HiGHS, SCIP, CBC)."""

from __future__ import annotations

import numpy as np
import pytest

from prism_plan.solvers import BACKENDS, get_solver
from prism_plan.solvers.coverage import solve_coverage
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.objectives import MoveTerms, latency_value
from prism_plan.solvers.problem import PlacementProblem
from tiny import feasible_placements, small_latency_problem


def unequal_problem(seed: int) -> PlacementProblem:
    """3 servers, 2 layers of different expert sizes x 3 experts: the coverage MILP path, not the flow."""
    rng = np.random.default_rng(seed)
    return PlacementProblem(rng.integers(0, 30, (3, 2, 3)).astype(float), np.array([2, 3]),
                            np.array([9, 8, 7]), np.zeros((3, 3)), 1, ("a", "b", "c"))


@pytest.mark.parametrize("seed", range(3))
def test_backends_agree_on_the_coverage_milp(seed):
    problem = unequal_problem(seed)
    best = max(float((problem.weight * x).sum()) for x in feasible_placements(problem))
    for backend in BACKENDS:
        res = get_solver("exact", backend=backend, time_limit=30).solve(problem)
        assert res.status == "optimal", backend
        assert res.objective == pytest.approx(best), backend


@pytest.mark.parametrize("seed", range(3))
def test_backends_agree_on_the_latency_milp(seed):
    problem = small_latency_problem(seed)
    best = min(latency_value(problem, x) for x in feasible_placements(problem))
    for backend in BACKENDS:
        res = get_solver("exact", backend=backend, time_limit=30).solve(problem, "latency")
        assert res.status == "optimal", backend
        assert res.objective == pytest.approx(best, rel=1e-6), backend


def test_backends_agree_on_the_move_budget_milp():
    problem = unequal_problem(7)
    current = np.zeros(problem.shape, bool)
    current[0] = True  # server a starts with every expert but one, more than it can hold: some must move
    current[0, 1, 2] = False
    moves = MoveTerms(current, cost_per_byte=0.5, budget_bytes=9)
    feasible = [x for x in feasible_placements(problem) if moves.copied(problem, x) <= 9]
    best = max(float((problem.weight * x).sum()) - 0.5 * moves.copied(problem, x) for x in feasible)
    for backend in BACKENDS:
        sol = solve_coverage(problem, deadline=Deadline(30), backend=backend, moves=moves)
        value = float((problem.weight * sol.hosted).sum()) - 0.5 * moves.copied(problem, sol.hosted)
        assert sol.status == "optimal" and value == pytest.approx(best), backend
