"""`incremental`: re-solve from the current placement, paying for what has to move.

    coverage:  maximise  coverage(x) - move_cost * copied(x)
    latency:   minimise  latency(x, y) + move_cost * copied(x)
    balance:   minimise  balance(x) + move_cost * copied(x)     (a slot layout: a copy staying on its GPU is free)
    both:      subject to  copied(x) <= budget  when a budget is given
    copied(x) = sum_{s,l,e} bytes[l] * x[s,l,e] * (1 - current[s,l,e])   (bytes that must arrive somewhere new)

The move cost is linear in x, so it is a shift of the same coverage or latency model's weights and the budget
is one more row of it (solvers.coverage, solvers.latency); results are exact where those models are, with
their bounds and gaps. The latency model starts from the current placement when it still fits.
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer, number
from prism_plan.solvers.balance import solve_layout_balance
from prism_plan.solvers.base import Solver
from prism_plan.solvers.coverage import solve_coverage
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.exact import check_backend
from prism_plan.solvers.latency import solve_latency
from prism_plan.solvers.objectives import MoveTerms, Objective, activation_value, get_objective, with_moves
from prism_plan.solvers.problem import PlacementProblem, Solution


def traffic_move_cost(problem: PlacementProblem, weight: float = 1.0, objective: str = "coverage") -> float:
    """Objective units per byte copied such that copying `weight` bytes costs as much as saving one byte of
    remote traffic over the tables' tokens: a remote activation sends 2 x token_bytes and is worth
    `activation_value` (one activation, or one mean round trip per token)."""
    token_bytes = problem.costs.token_bytes if problem.costs is not None else 1
    return weight * activation_value(problem, objective) / (2.0 * token_bytes)


class IncrementalSolver(Solver):
    """The objective net of a per-byte move cost from a current placement, optionally under a move budget.

    current: [servers, layers, experts] bool; move_cost: objective units per byte copied (see
    traffic_move_cost); budget_bytes: most bytes to copy (None: no limit).
    """

    name = "incremental"
    objectives = ("coverage", "latency", "balance")
    only_own_objectives = True
    summary = "re-solve from the current plan: objective net of move cost, under a move budget; flow/MILP"

    def __init__(self, current: np.ndarray, *, move_cost: float = 0.0, budget_bytes: int | None = None,
                 time_limit: float | None = None, seed: int = 0, backend: str = "highs") -> None:
        super().__init__(time_limit=time_limit, seed=seed)
        move_cost = number(move_cost, "`move_cost`", low=0.0, fix="0 prefers the fewest moves among equal placements",
                           parameters=("move_cost",))
        if budget_bytes is not None:
            budget_bytes = integer(budget_bytes, "`budget_bytes`", low=0, fix="give whole bytes, or None for no limit",
                                   parameters=("budget_bytes",))
        self.moves = MoveTerms(np.asarray(current, bool), move_cost, budget_bytes)
        self.backend = check_backend(backend)

    def objective(self, name: str) -> Objective:
        return with_moves(get_objective(name), self.moves)

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        current = self.moves.current
        if current.shape != problem.shape:
            raise PrismError(f"current placement has shape {list(current.shape)}, the problem "
                             f"{list(problem.shape)}: pass the `current` placement of this cluster",
                             parameters=("current",))
        if objective.name == "coverage":
            sol = solve_coverage(problem, deadline=deadline, backend=self.backend, moves=self.moves)
        elif objective.name == "balance":
            sol = solve_layout_balance(problem, deadline, self.moves)
        else:
            sol = solve_latency(problem, [current], deadline=deadline, backend=self.backend, moves=self.moves)
        gross = get_objective(objective.name).value(problem, sol.hosted, sol.routing)
        sol.extra = {"copied_bytes": self.moves.copied(problem, sol.hosted),
                     "move_cost_per_byte": self.moves.cost_per_byte, "budget_bytes": self.moves.budget_bytes,
                     "objective_without_moves": gross}
        return sol
