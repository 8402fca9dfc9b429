"""Placement solvers behind one interface (`Solver.solve(problem, objective) -> SolveResult`).

SOLVERS plan from scratch; IncrementalSolver re-plans from a current placement (`prism-plan migrate`).
"""

from __future__ import annotations

import inspect

from prism_plan.errors import PrismError
from prism_plan.solvers.backends import BACKENDS
from prism_plan.solvers.base import SolveResult, Solver
from prism_plan.solvers.baselines import (CoactivationSolver, EplbMemorySolver, EplbSolver, LinearSolver,
                                          PopularitySolver, RandomSolver, RoundRobinSolver)
from prism_plan.solvers.exact import ExactSolver
from prism_plan.solvers.greedy import GreedySolver
from prism_plan.solvers.incremental import IncrementalSolver
from prism_plan.solvers.local_search import LocalSearchSolver
from prism_plan.solvers.objectives import OBJECTIVES
from prism_plan.solvers.offload import SwapSolver
from prism_plan.solvers.problem import PlacementProblem, build_problem

SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (
    ExactSolver, GreedySolver, LocalSearchSolver, LinearSolver, RoundRobinSolver, PopularitySolver, EplbSolver,
    EplbMemorySolver, CoactivationSolver, RandomSolver, SwapSolver)}


def get_solver(name: str, **options) -> Solver:
    """A solver by name with its keyword options, e.g. `get_solver("exact", time_limit=60, backend="cbc")`."""
    if name not in SOLVERS:
        raise PrismError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}", parameters=("solver",))
    cls = SOLVERS[name]
    takes = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - takes)
    if unknown:
        raise PrismError(f"`solver` {name!r} does not take {', '.join(f'`{u}`' for u in unknown)}",
                         parameters=("solver", *unknown))
    return cls(**options)


__all__ = ["BACKENDS", "OBJECTIVES", "SOLVERS", "IncrementalSolver", "PlacementProblem", "SolveResult", "Solver",
           "build_problem", "get_solver"]
