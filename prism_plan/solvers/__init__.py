"""Placement solvers behind one interface (`Solver.solve(problem) -> SolveResult`).

SOLVERS plan from scratch; IncrementalSolver re-plans from a current placement (`prism-plan migrate`).
"""

from __future__ import annotations

from prism_plan.errors import PrismError
from prism_plan.solvers.base import PlacementProblem, SolveResult, Solver, build_problem
from prism_plan.solvers.baselines import (EplbSolver, LinearSolver, PopularitySolver, RandomSolver,
                                          RoundRobinSolver)
from prism_plan.solvers.exact import ExactSolver
from prism_plan.solvers.greedy import GreedySolver
from prism_plan.solvers.incremental import IncrementalSolver
from prism_plan.solvers.local_search import LocalSearchSolver

SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (
    ExactSolver, GreedySolver, LocalSearchSolver, LinearSolver, RoundRobinSolver, PopularitySolver, EplbSolver, RandomSolver)}


def get_solver(name: str, time_limit: float | None = None, seed: int = 0, **options) -> Solver:
    """A solver by name, e.g. `get_solver("exact", time_limit=60)`."""
    if name not in SOLVERS:
        raise PrismError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name](time_limit=time_limit, seed=seed, **options)


__all__ = ["SOLVERS", "IncrementalSolver", "PlacementProblem", "SolveResult", "Solver", "build_problem", "get_solver"]
