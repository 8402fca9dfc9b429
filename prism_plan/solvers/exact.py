"""`exact`: the models solved with proof.

coverage: the min-cost flow for equal expert sizes (optimal in well under a second at DeepSeek-V3 scale), the
coverage MILP otherwise, started from greedy; with a slot layout, one flow per layer. latency: the latency MILP
with routing, started from the best of greedy and the coverage optimum, bounded by it and by the Lagrangian
decomposition; with a slot layout, the topology search (solvers.topology) and its weak bound. balance (slot
layouts): solvers.balance. Clusters whose GPUs cannot hold the model: the pin flow of solvers.offload. Every
result carries the bound and gap the model proves.
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import PrismError, TimeLimitError
from prism_plan.placement.layout import layout_violation
from prism_plan.solvers.backends import BACKENDS
from prism_plan.solvers.baselines import eplb_placement
from prism_plan.solvers.balance import solve_layout_balance
from prism_plan.solvers.base import Solver
from prism_plan.solvers.coverage import nearest_layout, solve_coverage
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.greedy import greedy_placement
from prism_plan.solvers.latency import solve_latency
from prism_plan.solvers.objectives import Objective, even_dispatch
from prism_plan.solvers.offload import plan_offload
from prism_plan.solvers.problem import PlacementProblem, Solution, placement_fits
from prism_plan.solvers.static_dispatch import static_balance_routing
from prism_plan.solvers.topology import topology_latency_bound, topology_solution


def check_backend(backend: str) -> str:
    """`backend` when it names a MILP back end, else a PrismError listing them."""
    if backend not in BACKENDS:
        raise PrismError(f"unknown MILP back end {backend!r}; choose one of {', '.join(BACKENDS)}",
                         parameters=("backend",))
    return backend


class ExactSolver(Solver):
    """Provably optimal coverage (min-cost flow for equal expert sizes, a MILP otherwise), and the latency
    MILP with its proven bound and gap."""

    name = "exact"
    objectives = ("coverage", "latency", "balance")
    plans_offload = True
    summary = ("optimal coverage (min-cost flow; MILP when expert sizes differ; a flow per layer for a slot "
               "layout); latency MILP; layout balance with bounds; with proof")

    def __init__(self, *, time_limit: float | None = None, seed: int = 0, backend: str = "highs",
                 warm_start: bool = True) -> None:
        super().__init__(time_limit=time_limit, seed=seed)
        self.backend = check_backend(backend)
        if not isinstance(warm_start, bool):
            raise PrismError(f"`warm_start` must be True or False, got {warm_start!r}", parameters=("warm_start",))
        self.warm_start = warm_start

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        if problem.offload is not None:
            return plan_offload(problem, objective.name, deadline)
        if objective.name == "balance":
            sol = solve_layout_balance(problem, deadline.split(0.8))
            if not even_dispatch(problem):  # each home's activations of an expert go to one copy the plan names
                sol.routing = static_balance_routing(problem, sol.hosted, deadline)
            return sol
        if objective.name == "latency" and problem.layout is not None:
            # The bound first, within a share of the time; the placement search leaves a share for scoring the
            # plan on the whole trace (seconds at 256 GPUs).
            bound = topology_latency_bound(problem, deadline.split(0.2))
            # EPLB's layout (fitted to the slots where it doubles a copy on a GPU), routed as the serving system
            # routes it, competes layer by layer: the plan is never slower than EPLB's.
            eplb = eplb_placement(problem)[0]
            if layout_violation(eplb, problem.layout.slots_per_layer) is not None:
                eplb = nearest_layout(problem, eplb)
            others = [(eplb, None)] if placement_fits(problem, eplb) else []
            hosted, routing = topology_solution(problem, deadline.split(0.85), others=others)
            return Solution(hosted, "feasible", bound, routing, weak_bound=True)
        if objective.name == "latency":
            return solve_latency(problem, greedy_start(problem, deadline), deadline=deadline, backend=self.backend,
                                 warm_start=self.warm_start)
        # The coverage MILP alone often finds nothing quickly: its start may have half the time.
        starts = greedy_start(problem, deadline, 0.5) if not problem.uniform and self.warm_start else []
        return solve_coverage(problem, deadline=deadline, backend=self.backend, start=(starts or [None])[0])


def greedy_start(problem: PlacementProblem, deadline: Deadline, share: float = 0.1) -> list[np.ndarray]:
    """[greedy's placement] as a start for the models, within `share` of the time left (the models get the
    rest); [] when its repair cannot finish in that share."""
    try:
        return [greedy_placement(problem, deadline.split(share))]
    except TimeLimitError:
        return []
