"""`incremental`: re-solve from the current placement, paying for what has to move.

    maximise  coverage(x) - move_cost * copied(x)      subject to  copied(x) <= budget  (when given)
    copied(x) = sum_{s,l,e} bytes[l] * x[s,l,e] * (1 - current[s,l,e])   (bytes that must arrive somewhere new)

The move cost is linear in x, so with equal expert sizes it enters the min-cost flow's weights and the result
is exact, like the `exact` solver's (fractional weights are scaled to integers: proven within 1e-6); among
equally good placements the flow keeps the most of the current one.
A budget is one more row: Lagrange multipliers on it (a bisection over flows) give a feasible placement and a
bound, and the coverage MILP with the row closes what gap remains. Sizes that differ: the MILP alone.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.placement.cluster import GIB
from prism_plan.solvers.backends import BACKENDS
from prism_plan.solvers.backends.base import remaining_time
from prism_plan.solvers.base import PlacementProblem, SolveResult, Solver, coverage_value, relative_gap
from prism_plan.solvers.exact import MILP_TOLERANCE, coverage_milp, proven_status
from prism_plan.solvers.flow import solve_flow

# Bisection steps on the budget's multiplier; each is one flow (milliseconds at ESFT scale).
BISECTION_STEPS = 40
# The budgeted MILP is handed to HiGHS only up to this many placement variables.
MAX_MILP_VARIABLES = 250_000


def copied_bytes(current: np.ndarray, hosted: np.ndarray, layer_bytes: np.ndarray) -> int:
    """Bytes that must be copied to go from `current` to `hosted` ([servers, layers, experts] bool)."""
    return int(((hosted & ~current).sum(axis=(0, 2)) * layer_bytes).sum())


def traffic_move_cost(problem: PlacementProblem, weight: float = 1.0) -> float:
    """Coverage units (activations) per byte copied such that moving `weight` bytes costs as much as one byte of
    remote traffic saved over the tables' tokens: a remote activation sends 2 x token_bytes."""
    token_bytes = problem.costs.token_bytes if problem.costs is not None else 1
    return weight / (2.0 * token_bytes)


class IncrementalSolver(Solver):
    """Coverage minus a per-byte move cost from a current placement, optionally under a move budget."""

    name = "incremental"
    objectives = ("coverage",)
    summary = "re-solve from the current plan: coverage minus move cost, under a move budget; exact flow/MILP"

    def __init__(self, time_limit: float | None = None, seed: int = 0, current: np.ndarray | None = None,
                 move_cost: float = 0.0, budget_bytes: int | None = None, backend: str = "highs") -> None:
        super().__init__(time_limit, seed)
        if current is None:
            raise PrismError("the incremental solver needs the current placement (current=hosted array)")
        if move_cost < 0 or (budget_bytes is not None and budget_bytes < 0):
            raise PrismError("move cost and move budget must be non-negative")
        self.current = np.asarray(current, bool)
        self.move_cost = float(move_cost)
        self.budget_bytes = budget_bytes
        self.backend = backend

    def solve(self, problem: PlacementProblem, objective: str = "coverage") -> SolveResult:
        """The placement with the best coverage net of move cost, with its bound, gap and bytes copied."""
        if objective not in self.objectives:
            raise PrismError(f"the incremental re-solver optimises coverage (net of move cost), not {objective!r}")
        if self.current.shape != problem.shape:
            raise PrismError(f"current placement has shape {list(self.current.shape)}, the problem "
                             f"{list(problem.shape)}")
        start = time.perf_counter()
        hosted, status, bound = self._solve(problem)
        value = self.net(problem, hosted)
        moved = copied_bytes(self.current, hosted, problem.layer_bytes)
        return SolveResult(hosted, self.name, status, value, bound, relative_gap(value, bound),
                           time.perf_counter() - start, "coverage",
                           "activations served at their origin's server, minus move cost x bytes copied",
                           extra={"copied_bytes": moved, "move_cost_per_byte": self.move_cost,
                                  "budget_bytes": self.budget_bytes,
                                  "coverage": coverage_value(problem, hosted)})

    def net(self, problem: PlacementProblem, hosted: np.ndarray) -> float:
        return coverage_value(problem, hosted) - self.move_cost * copied_bytes(self.current, hosted,
                                                                                problem.layer_bytes)

    def _copy_bytes(self, problem: PlacementProblem) -> np.ndarray:
        """bytes: [servers, layers, experts], what hosting each cell costs to copy (0 where it is already)."""
        return np.where(self.current, 0, problem.layer_bytes[None, :, None]).astype(float)

    def _flow(self, problem: PlacementProblem, per_byte: float) -> tuple[np.ndarray, float]:
        """(hosted, slack): the exact optimum of coverage - per_byte * copied, fewest copies among ties."""
        s = problem.shape[0]
        weight = problem.weight - per_byte * self._copy_bytes(problem)
        x, slack = solve_flow(weight.reshape(s, -1), problem.slots, problem.min_replicas,
                              tiebreak=~self.current.reshape(s, -1), fill=False)
        return x.reshape(problem.shape), slack

    def _solve(self, problem: PlacementProblem):
        began = time.perf_counter()
        if problem.uniform:
            if self.budget_bytes is None:
                hosted, slack = self._flow(problem, self.move_cost)
                value = self.net(problem, hosted)
                return hosted, proven_status(value, value + slack, MILP_TOLERANCE), value + slack
            hosted, bound = self._lagrangian(problem)
            if proven_status(self.net(problem, hosted), bound, MILP_TOLERANCE) == "optimal":
                return hosted, "optimal", bound
        else:
            hosted, bound = None, None
        return self._milp(problem, hosted, bound, remaining_time(self.time_limit, began))

    def _lagrangian(self, problem: PlacementProblem) -> tuple[np.ndarray, float]:
        """(best placement within the budget, bound): bisection on the budget's multiplier lam; every flow
        at lam gives the bound max_x [net(x) - lam (copied(x) - budget)]."""
        budget = float(self.budget_bytes)
        # Past hi one byte outweighs all coverage: the flow there copies the fewest bytes any placement can.
        lo, hi = 0.0, (float(problem.weight.sum()) + 1.0) / float(problem.layer_bytes.min())
        best, best_value, bound = None, -np.inf, np.inf
        for i in range(BISECTION_STEPS + 2):
            lam = (0.0, hi)[i] if i < 2 else 0.5 * (lo + hi)
            hosted, slack = self._flow(problem, self.move_cost + lam)
            moved = copied_bytes(self.current, hosted, problem.layer_bytes)
            bound = min(bound, self.net(problem, hosted) - lam * (moved - budget) + slack)
            if moved <= budget:
                value = self.net(problem, hosted)
                if value > best_value:
                    best, best_value = hosted, value
                if i == 0:
                    break  # the budget does not bind: the unconstrained optimum is the answer
                hi = lam
            elif i == 1:
                raise self._too_small(problem, moved)
            else:
                lo = lam
        return best, bound

    def _too_small(self, problem: PlacementProblem, needed: int) -> InfeasibleError:
        return InfeasibleError(f"move budget {self.budget_bytes / GIB:.3f} GiB is too small: any placement that "
                               f"fits the cluster needs at least {needed / GIB:.3f} GiB copied from the current "
                               f"one; raise --budget-gib to {needed / GIB:.3f} or more")

    def _milp(self, problem: PlacementProblem, start: np.ndarray | None, bound: float | None,
              time_limit: float | None):
        """Coverage MILP with the move cost in its objective and the budget as a row, started from `start`."""
        copy_bytes = self._copy_bytes(problem)
        if problem.weight.size > MAX_MILP_VARIABLES:
            if start is None:
                raise PrismError(f"the move-budget MILP has {problem.weight.size} variables, more than "
                                 f"{MAX_MILP_VARIABLES}; drop --budget-gib and use a move cost")
            return start, "feasible", bound
        ties = 1.0 / (problem.weight.size + 1.0)  # less than one activation over all cells: keeps, among ties
        model = coverage_milp(replace(problem, weight=problem.weight - self.move_cost * copy_bytes
                                      - ties * ~self.current), start)
        if self.budget_bytes is not None:
            model.A = sp.vstack([model.A, sp.csr_matrix(copy_bytes.reshape(1, -1))], format="csr")
            model.row_lb = np.append(model.row_lb, -np.inf)
            model.row_ub = np.append(model.row_ub, float(self.budget_bytes))
        sol = BACKENDS[self.backend]().solve(model, time_limit)
        if sol.status == "infeasible":
            raise self._too_small(problem, self._fewest_bytes(problem))
        if sol.x is None:
            if start is None:
                raise PrismError(f"the move-budget MILP found no placement within {time_limit} s; raise "
                                 f"--time-limit")
            return start, "timeout", bound
        hosted = sol.x.reshape(problem.shape) > 0.5
        if start is not None and self.net(problem, start) >= self.net(problem, hosted):
            hosted = start
        milp_bound = None if sol.bound is None else sol.bound + ties * problem.weight.size
        bounds = [b for b in (bound, milp_bound) if b is not None]
        bound = min(bounds) if bounds else None
        return hosted, proven_status(self.net(problem, hosted), bound, MILP_TOLERANCE), bound

    def _fewest_bytes(self, problem: PlacementProblem) -> int:
        """Bytes the cheapest feasible placement copies (for the error message when a budget is too small)."""
        copy_bytes = self._copy_bytes(problem)
        model = coverage_milp(replace(problem, weight=-copy_bytes))
        sol = BACKENDS[self.backend]().solve(model, 60.0)
        if sol.x is None:
            return int(self.budget_bytes) + 1
        return copied_bytes(self.current, sol.x.reshape(problem.shape) > 0.5, problem.layer_bytes)
