"""`exact`: the provably optimal coverage placement.

Equal expert sizes: a min-cost flow (integral LP), optimal in well under a second at DeepSeek-V3 scale.
Sizes that differ across layers: a MILP (knapsack rows per server, replica rows per expert) on a MILP back
end, started from the greedy placement where the back end takes a start, with the solver's bound and gap.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.base import PlacementProblem, SolveResult, Solver, coverage_value, relative_gap
from prism_plan.solvers.latency import SCALE, latency_milp, routing_from
from prism_plan.solvers.flow import solve_flow

# Relative gap under which a solution counts as proven optimal: the flow's only error is the rounding of
# fractional weights; MILP bounds come from floating-point LPs.
FLOW_TOLERANCE = 1e-9
MILP_TOLERANCE = 1e-6


def proven_status(value: float, bound: float | None, tolerance: float, maximize: bool = True) -> str:
    """`optimal` when the bound proves `value` within `tolerance`, else `feasible`."""
    gap = relative_gap(value, bound, maximize)
    return "optimal" if gap is not None and gap <= tolerance else "feasible"


def coverage_milp(problem: PlacementProblem, hint: np.ndarray | None = None) -> MilpModel:
    """The coverage MILP over x: [servers, layers, experts] flattened C-order.

    Rows: per server, sum bytes * x <= budget; per (layer, expert), sum over servers x >= min_replicas.
    """
    s, l, e = problem.shape
    n = s * l * e
    var = np.arange(n).reshape(s, l, e)
    size = np.broadcast_to(problem.layer_bytes[None, :, None], (s, l, e)).astype(float)
    memory = sp.csr_matrix((size.ravel(), (np.repeat(np.arange(s), l * e), var.ravel())), shape=(s, n))
    replicas = sp.csr_matrix((np.ones(n), (np.tile(np.arange(l * e), s), var.ravel())), shape=(l * e, n))
    return MilpModel(
        c=problem.weight.ravel().astype(float),
        A=sp.vstack([memory, replicas], format="csr"),
        row_lb=np.concatenate([np.full(s, -np.inf), np.full(l * e, float(problem.min_replicas))]),
        row_ub=np.concatenate([problem.budget.astype(float), np.full(l * e, np.inf)]),
        lb=np.zeros(n), ub=np.ones(n), integer=np.ones(n, bool), maximize=True,
        hint=None if hint is None else hint.ravel().astype(float),
    )


class ExactSolver(Solver):
    """Provably optimal coverage (min-cost flow for equal expert sizes, a MILP otherwise), and the latency
    MILP with its proven bound and gap."""

    name = "exact"
    objectives = ("coverage", "latency")
    summary = "optimal coverage (min-cost flow; MILP when expert sizes differ); latency MILP; with proof"

    def __init__(self, time_limit: float | None = None, seed: int = 0, backend: str = "highs",
                 warm_start: bool = True) -> None:
        super().__init__(time_limit, seed)
        if backend not in BACKENDS:
            raise PrismError(f"unknown MILP back end {backend!r}; choose one of {sorted(BACKENDS)}")
        self.backend = backend
        self.warm_start = warm_start

    def _solve(self, problem: PlacementProblem):
        s, l, e = problem.shape
        if problem.uniform:
            x, slack = solve_flow(problem.weight.reshape(s, l * e), problem.slots, problem.min_replicas)
            hosted = x.reshape(s, l, e)
            value = coverage_value(problem, hosted)
            return hosted, proven_status(value, value + slack, FLOW_TOLERANCE), value + slack
        return self._solve_milp(problem)

    def _solve_milp(self, problem: PlacementProblem):
        from prism_plan.solvers.greedy import GreedySolver

        start = GreedySolver(seed=self.seed)._solve(problem)[0] if self.warm_start else None
        sol = BACKENDS[self.backend]().solve(coverage_milp(problem, start), self.time_limit)
        if sol.status == "infeasible":
            raise InfeasibleError("no placement fits the memory budgets with every expert hosted; the MILP "
                                  "proved it (expert sizes do not pack into the servers)")
        if sol.x is None:
            if start is None:
                raise PrismError(f"the MILP found no placement within {self.time_limit} s; raise --time-limit")
            return start, "timeout", sol.bound
        hosted = sol.x.reshape(problem.shape) > 0.5
        if start is not None and coverage_value(problem, hosted) < coverage_value(problem, start):
            hosted = start  # the back end found nothing better than its start within the limit
        return hosted, proven_status(coverage_value(problem, hosted), sol.bound, MILP_TOLERANCE), sol.bound

    def _solve_for(self, problem: PlacementProblem, objective: str) -> SolveResult:
        from prism_plan.solvers.greedy import GreedySolver
        from prism_plan.solvers.objectives import OBJECTIVES, latency_terms

        starts = [GreedySolver(seed=self.seed)._solve(problem)[0]]
        if problem.uniform:
            starts.append(self._solve(problem)[0])
        start = min(starts, key=lambda h: sum(latency_terms(problem, h)))
        model, cells = latency_milp(problem, start if self.warm_start else None)
        sol = BACKENDS[self.backend]().solve(model, self.time_limit)
        best, routing = start, None
        if sol.x is not None:
            s, l, e = problem.shape
            nx = s * l * e
            hosted = sol.x[:nx].reshape(problem.shape) > 0.5
            routing = routing_from(problem, cells, sol.x[nx:nx + len(cells) * s].reshape(len(cells), s), hosted)
            if sum(latency_terms(problem, hosted, routing)) <= sum(latency_terms(problem, start)):
                best = hosted
            else:
                routing = None
        value = float(sum(latency_terms(problem, best, routing)))
        bound = None if sol.bound is None else sol.bound / SCALE
        obj = OBJECTIVES[objective]
        status = proven_status(value, bound, MILP_TOLERANCE, maximize=False) if sol.status != "timeout" else "timeout"
        return SolveResult(best, self.name, status, value, bound, relative_gap(value, bound, maximize=False), 0.0,
                           objective, obj.measure, routing)
