"""`incremental`: re-solve from the current placement, paying for what has to move.

    coverage:  maximise  coverage(x) - move_cost * copied(x)
    latency:   minimise  latency(x, y) + move_cost * copied(x)       (the latency MILP's model)
    both:      subject to  copied(x) <= budget  when a budget is given
    copied(x) = sum_{s,l,e} bytes[l] * x[s,l,e] * (1 - current[s,l,e])   (bytes that must arrive somewhere new)

The move cost is linear in x. Coverage with equal expert sizes: it enters the min-cost flow's weights and the
result is exact, like the `exact` solver's (fractional weights are scaled to integers: proven within 1e-6);
among equally good placements the flow keeps the most of the current one (the MILPs below do not break ties
that way: a move cost does). A budget is one more row: Lagrange
multipliers on it (a bisection over flows) give a feasible placement and a bound, and the coverage MILP with
the row closes what gap remains. Sizes that differ: that MILP alone. Latency: the latency MILP with the move
cost on x and the budget row, started from the current placement (or the coverage answer when the current one
no longer fits), with HiGHS' bound and gap.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.placement.cluster import GIB
from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.backends.base import remaining_time
from prism_plan.placement.migration import needed_copy_bytes
from prism_plan.solvers.base import (PlacementProblem, SolveResult, Solver, coverage_value, placement_fits,
                                     relative_gap)
from prism_plan.solvers.exact import MILP_TOLERANCE, ExactSolver, coverage_milp, proven_status
from prism_plan.solvers.flow import solve_flow
from prism_plan.solvers.latency import SCALE, latency_milp, routing_from
from prism_plan.solvers.objectives import latency_terms
from prism_plan.units import human_bytes

# Bisection steps on the budget's multiplier; each is one flow (milliseconds at ESFT scale).
BISECTION_STEPS = 40
# The budgeted coverage MILP is handed to HiGHS only up to this many placement variables.
MAX_MILP_VARIABLES = 250_000


def traffic_move_cost(problem: PlacementProblem, weight: float = 1.0, objective: str = "coverage") -> float:
    """Objective units per byte copied such that copying `weight` bytes costs as much as saving one byte of
    remote traffic over the tables' tokens. A remote activation sends 2 x token_bytes and is worth one
    activation (coverage) or one mean round trip spread over the tokens (latency, seconds per token)."""
    token_bytes = problem.costs.token_bytes if problem.costs is not None else 1
    per_activation = 1.0
    if objective == "latency":
        s = problem.shape[0]
        rtt = problem.round_trip[~np.eye(s, dtype=bool)]
        per_activation = float(rtt.mean()) / (problem.tokens or 1.0) if len(rtt) else 0.0
    return weight * per_activation / (2.0 * token_bytes)


def _with_budget_row(model: MilpModel, row: np.ndarray, budget: float) -> None:
    """Append `row @ x <= budget` ([vars] row, zero past its length)."""
    full = np.zeros(model.A.shape[1])
    full[:len(row)] = row
    model.A = sp.vstack([model.A, sp.csr_matrix(full[None, :])], format="csr")
    model.row_lb = np.append(model.row_lb, -np.inf)
    model.row_ub = np.append(model.row_ub, budget)


class IncrementalSolver(Solver):
    """The objective net of a per-byte move cost from a current placement, optionally under a move budget."""

    name = "incremental"
    objectives = ("coverage", "latency")
    summary = "re-solve from the current plan: objective net of move cost, under a move budget; flow/MILP"

    def __init__(self, time_limit: float | None = None, seed: int = 0, current: np.ndarray | None = None,
                 move_cost: float = 0.0, budget_bytes: int | None = None, backend: str = "highs") -> None:
        """move_cost: objective units per byte copied (see traffic_move_cost); budget_bytes: most bytes to copy."""
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
        """The placement with the best objective net of move cost, with its bound, gap and bytes copied;
        extra["objective_without_moves"] holds the objective itself."""
        if objective not in self.objectives:
            raise PrismError(f"the incremental re-solver optimises {' or '.join(self.objectives)}, not {objective!r}")
        if self.current.shape != problem.shape:
            raise PrismError(f"current placement has shape {list(self.current.shape)}, the problem "
                             f"{list(problem.shape)}")
        start = time.perf_counter()
        routing = None
        if objective == "coverage":
            hosted, status, bound = self._solve(problem)
        else:
            hosted, routing, status, bound = self._solve_latency(problem, start)
        gross = self.gross(problem, hosted, objective, routing)
        maximize = objective == "coverage"
        value = self.net(problem, hosted, objective, routing)
        measure = ("activations served at their origin's server, minus" if maximize else
                   "expected MoE seconds per token (latency model), plus") + " move cost x bytes copied"
        return SolveResult(hosted, self.name, status, value, bound, relative_gap(value, bound, maximize),
                           time.perf_counter() - start, objective, measure, routing,
                           extra={"copied_bytes": self.copied(problem, hosted),
                                  "move_cost_per_byte": self.move_cost, "budget_bytes": self.budget_bytes,
                                  "objective_without_moves": gross})

    @staticmethod
    def gross(problem: PlacementProblem, hosted: np.ndarray, objective: str, routing=None) -> float:
        """The objective without move cost (routing: the latency model's, default nearest replica)."""
        if objective == "coverage":
            return coverage_value(problem, hosted)
        return float(sum(latency_terms(problem, hosted, routing)))

    def net(self, problem: PlacementProblem, hosted: np.ndarray, objective: str = "coverage", routing=None) -> float:
        cost = self.move_cost * self.copied(problem, hosted)
        gross = self.gross(problem, hosted, objective, routing)
        return gross - cost if objective == "coverage" else gross + cost

    def copied(self, problem: PlacementProblem, hosted: np.ndarray) -> int:
        """Bytes that must be copied to go from the current placement to `hosted`."""
        return needed_copy_bytes(self.current, hosted, problem.layer_bytes)

    def _copy_bytes(self, problem: PlacementProblem) -> np.ndarray:
        """bytes: [servers, layers, experts], what hosting each cell costs to copy (0 where it is already)."""
        return np.where(self.current, 0, problem.layer_bytes[None, :, None]).astype(float)

    def _within_budget(self, problem: PlacementProblem, hosted: np.ndarray) -> bool:
        return self.budget_bytes is None or self.copied(problem, hosted) <= self.budget_bytes

    # coverage

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
        return self._coverage_milp(problem, hosted, bound, remaining_time(self.time_limit, began))

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
            moved = self.copied(problem, hosted)
            bound = min(bound, self.net(problem, hosted) - lam * (moved - budget) + slack)
            if moved <= budget:
                value = self.net(problem, hosted)
                if value > best_value:
                    best, best_value = hosted, value
                if i == 0:
                    break  # the budget does not bind: the unconstrained optimum is the answer
                hi = lam
            elif i == 1:
                raise self._too_small(moved)
            else:
                lo = lam
        return best, bound

    def _too_small(self, needed: int) -> InfeasibleError:
        return InfeasibleError(f"move budget {human_bytes(self.budget_bytes)} is too small: any placement that fits "
                               f"the cluster needs at least {human_bytes(needed)} copied from the current one; raise "
                               f"--budget-gib to {needed / GIB:.3f} or more")

    def _coverage_milp(self, problem: PlacementProblem, start: np.ndarray | None, bound: float | None,
                       time_limit: float | None):
        """Coverage MILP with the move cost in its objective and the budget as a row, started from `start`."""
        if problem.weight.size > MAX_MILP_VARIABLES:
            if start is None:
                raise PrismError(f"the move-budget MILP has {problem.weight.size} variables, more than "
                                 f"{MAX_MILP_VARIABLES}; drop --budget-gib and use a move cost")
            return start, "feasible", bound
        copy_bytes = self._copy_bytes(problem)
        model = coverage_milp(replace(problem, weight=problem.weight - self.move_cost * copy_bytes), start)
        if self.budget_bytes is not None:
            _with_budget_row(model, copy_bytes.ravel(), float(self.budget_bytes))
        sol = BACKENDS[self.backend]().solve(model, time_limit)
        if sol.status == "infeasible":
            raise self._too_small(self._fewest_bytes(problem))
        if sol.x is None:
            if start is None:
                raise PrismError(f"the move-budget MILP found no placement within {time_limit} s; raise "
                                 f"--time-limit")
            return start, "timeout", bound
        hosted = sol.x.reshape(problem.shape) > 0.5
        if start is not None and self.net(problem, start) >= self.net(problem, hosted):
            hosted = start
        bounds = [b for b in (bound, sol.bound) if b is not None]
        bound = min(bounds) if bounds else None
        return hosted, proven_status(self.net(problem, hosted), bound, MILP_TOLERANCE), bound

    def _fewest_bytes(self, problem: PlacementProblem) -> int:
        """Bytes the cheapest feasible placement copies (for the error message when a budget is too small)."""
        model = coverage_milp(replace(problem, weight=-self._copy_bytes(problem)))
        sol = BACKENDS[self.backend]().solve(model, 60.0)
        if sol.x is None:
            return int(self.budget_bytes) + 1
        return self.copied(problem, sol.x.reshape(problem.shape) > 0.5)

    # latency

    def _solve_latency(self, problem: PlacementProblem, began: float):
        """(hosted, routing, status, bound) of the latency MILP with move cost and budget."""
        if not ExactSolver.milp_fits(problem):
            raise PrismError("this problem is too large for the incremental latency MILP; migrate with "
                             "--objective coverage")
        start = self.current
        if not (placement_fits(problem, start) and self._within_budget(problem, start)):
            start = IncrementalSolver(current=self.current, budget_bytes=self.budget_bytes)._solve(problem)[0]
        model, cells = latency_milp(problem, start)
        s_n, l_n, e_n = problem.shape
        nx = s_n * l_n * e_n
        model.c[:nx] += SCALE * self.move_cost * self._copy_bytes(problem).ravel()
        if self.budget_bytes is not None:
            _with_budget_row(model, self._copy_bytes(problem).ravel(), float(self.budget_bytes))
        sol = BACKENDS[self.backend]().solve(model, remaining_time(self.time_limit, began))
        best, routing = start, None
        if sol.x is not None:
            hosted = sol.x[:nx].reshape(problem.shape) > 0.5
            milp_routing = routing_from(problem, cells, sol.x[nx:nx + len(cells) * s_n].reshape(len(cells), s_n),
                                        hosted)
            if self.net(problem, hosted, "latency", milp_routing) <= self.net(problem, start, "latency"):
                best, routing = hosted, milp_routing
        bound = None if sol.bound is None else sol.bound / SCALE
        value = self.net(problem, best, "latency", routing)
        status = "timeout" if sol.status == "timeout" and bound is None else \
            proven_status(value, bound, MILP_TOLERANCE, maximize=False)
        return best, routing, status, bound
