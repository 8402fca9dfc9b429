"""`exact`: the provably optimal coverage placement.

Equal expert sizes: a min-cost flow (integral LP), optimal in well under a second at DeepSeek-V3 scale.
Sizes that differ across layers: a MILP (knapsack rows per server, replica rows per expert) on a MILP back
end, started from the greedy placement where the back end takes a start, with the solver's bound and gap.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.base import PlacementProblem, SolveResult, Solver, coverage_value, relative_gap
from prism_plan.solvers.backends.base import remaining_time
from prism_plan.solvers.latency import MAX_ENUMERATED_SERVERS, SCALE, lagrangian, latency_milp, routing_from
from prism_plan.solvers.flow import solve_flow

# Relative gap under which a solution counts as proven optimal: the flow's only error is the rounding of
# fractional weights; MILP bounds come from floating-point LPs.
FLOW_TOLERANCE = 1e-9
MILP_TOLERANCE = 1e-6
# Past this many routing variables HiGHS' first LP alone outlasts a two-minute limit on two cores (measured:
# Qwen3-30B shape on 8 servers has 393k); such problems get the Lagrangian decomposition only.
MAX_ROUTING_VARIABLES = 150_000


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

        began = time.perf_counter()
        cost = lambda h, r=None: float(sum(latency_terms(problem, h, r)))  # noqa: E731
        starts = [GreedySolver(seed=self.seed)._solve(problem)[0]]
        if problem.uniform:
            starts.append(self._solve(problem)[0])
        bounds = []
        if problem.shape[0] <= MAX_ENUMERATED_SERVERS:
            bound, rounded = lagrangian(problem, min(cost(h) for h in starts))
            bounds.append(bound)
            starts += [] if rounded is None else [rounded]
        best = min(starts, key=cost)
        routing, status = None, "feasible"
        if self.milp_fits(problem):
            model, cells = latency_milp(problem, best if self.warm_start else None)
            sol = BACKENDS[self.backend]().solve(model, remaining_time(self.time_limit, began))
            if sol.bound is not None:
                bounds.append(sol.bound / SCALE)
            if sol.x is not None:
                s, l, e = problem.shape
                nx = s * l * e
                hosted = sol.x[:nx].reshape(problem.shape) > 0.5
                milp_routing = routing_from(problem, cells, sol.x[nx:nx + len(cells) * s].reshape(len(cells), s),
                                            hosted)
                if cost(hosted, milp_routing) <= cost(best):
                    best, routing = hosted, milp_routing
            status = "timeout" if sol.status == "timeout" and not bounds else "feasible"
        value = cost(best, routing)
        bound = max(bounds) if bounds else None
        if status != "timeout":
            status = proven_status(value, bound, MILP_TOLERANCE, maximize=False)
        obj = OBJECTIVES[objective]
        return SolveResult(best, self.name, status, value, bound, relative_gap(value, bound, maximize=False), 0.0,
                           objective, obj.measure, routing)

    @staticmethod
    def milp_fits(problem: PlacementProblem) -> bool:
        """Whether the latency MILP is small enough to be worth handing to HiGHS (else the Lagrangian bound
        and its rounded placement answer alone)."""
        return int((problem.weight > 0).sum()) * problem.shape[0] <= MAX_ROUTING_VARIABLES
