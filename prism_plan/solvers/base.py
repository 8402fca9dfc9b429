"""The one interface every placement solver shares: a PlacementProblem in, a SolveResult out.

A solver implements one hook, `_solve(problem, objective, deadline) -> Solution`; `solve` checks the request,
measures the time, repairs layouts that place too few copies, scores the placement under the objective asked
for and attaches the evidence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.offload import Offload
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.objectives import Objective, get_objective, relative_gap
from prism_plan.solvers.coverage import nearest_layout
from prism_plan.solvers.problem import PlacementProblem, Solution, check_feasible, placement_fits, with_offload
from prism_plan.solvers.repair import repair_coverage


@dataclass
class SolveResult:
    """A placement with its evidence. hosted: [servers, layers, experts] bool.

    objective: the value of `hosted` under the objective, in the units `measure` names; bound: the best bound
    proven on the optimum (None when unknown), `weak_bound` when it is loose by construction; gap:
    |objective - bound| relative to the bound (maximising) or to the objective (minimising). routing:
    [servers, layers, experts] the server each home server's origins use, when the solver chose it (else the
    nearest replica serves). extra: solver-specific evidence (the incremental solver's bytes copied).
    offload: cache sizes and slow-tier contents of a plan whose GPUs cannot hold the model.
    """

    hosted: np.ndarray
    solver: str
    status: str
    objective: float
    bound: float | None
    gap: float | None
    seconds: float
    objective_name: str = "coverage"
    measure: str = ""
    weak_bound: bool = False
    routing: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    offload: Offload | None = None

    def evidence(self) -> dict:
        """The `solver` section of a plan file: what a run with the same inputs and seed reproduces."""
        return {"name": self.solver, "status": self.status, "objective": self.objective, "bound": self.bound,
                "gap": self.gap, "measure": self.measure, "weak_bound": self.weak_bound, **self.extra}

    def timing(self) -> dict:
        """The `timing` section of a plan file: how long the solve took, which differs between runs."""
        return {"solve_seconds": round(self.seconds, 6)}


def check_time_limit(time_limit: float | None) -> float | None:
    """`time_limit` as float seconds, or a PrismError naming it when it is not a positive number."""
    if time_limit is None:
        return None
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0 \
            or not np.isfinite(time_limit):
        raise PrismError(f"`time_limit` must be a positive number of seconds or None, got {time_limit!r}",
                         parameters=("time_limit",))
    return float(time_limit)


class Solver(ABC):
    """Base of every placement solver. Subclasses set `name` and implement `_solve`.

    objectives: what the solver optimises itself; under any other objective its placement is scored and
    reported as a heuristic, unless `only_own_objectives`, when asking for another one is an error.
    needs_layout: it plans slot layouts only (clusters with a [layout]). plans_offload: it plans clusters whose
    GPUs cannot hold the model (problems with `offload` terms), scoring its plans itself; needs_offload: only
    those.
    """

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]] = ()
    only_own_objectives: ClassVar[bool] = False
    needs_layout: ClassVar[bool] = False
    plans_offload: ClassVar[bool] = False
    needs_offload: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def __init__(self, *, time_limit: float | None = None, seed: int = 0) -> None:
        self.time_limit = check_time_limit(time_limit)
        self.seed = integer(seed, "`seed`", low=0, fix="seeds are 0, 1, 2, ...", parameters=("seed",))

    @abstractmethod
    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        """A placement for `problem`; `objective` is the one asked for (optimise it when it is one of
        `objectives`); finish by `deadline`."""

    def objective(self, name: str) -> Objective:
        """How this solver scores placements under the objective `name`."""
        return get_objective(name)

    def solve(self, problem: PlacementProblem, objective: str = "coverage") -> SolveResult:
        """Solve `problem` for `objective` within the time limit and attach the evidence."""
        obj = self.objective(objective)
        if self.only_own_objectives and objective not in self.objectives:
            raise PrismError(f"solver {self.name!r} optimises {' or '.join(self.objectives)}, not {objective!r}: "
                             f"pass `objective` {self.objectives[0]!r} or another `solver`",
                             parameters=("objective", "solver"))
        if self.needs_layout and problem.layout is None:
            raise PrismError(f"solver {self.name!r} plans serving layouts: add a [layout] table with slots_per_layer "
                             f"to the cluster file, or pass another `solver`", parameters=("solver",))
        if self.needs_offload and problem.offload is None:
            if problem.cluster is None or not problem.cluster.has_slow_tier:
                raise PrismError(f"solver {self.name!r} loads experts from slow tiers: give the servers `load_gbps` "
                                 f"in the cluster file, or pass another `solver`", parameters=("solver",))
            problem = with_offload(problem)  # a baseline even where the model fits
        check_feasible(problem)
        deadline = Deadline(self.time_limit)
        if problem.offload is not None:
            return self._solve_offload(problem, objective, deadline)
        sol = self._solve(problem, obj, deadline)
        hosted, routing = sol.hosted, sol.routing
        status, bound, weak = sol.status, sol.bound, sol.weak_bound
        if problem.layout is not None and not placement_fits(problem, hosted):
            # A placement made for memory alone, fitted to the serving system's equal slots: no longer what
            # the solver proved anything about.
            hosted, routing = nearest_layout(problem, hosted), None
            status = "heuristic" if status == "heuristic" else "feasible"
        elif (hosted.sum(axis=0) < problem.min_replicas).any():
            # Layouts that place one copy of each expert get the further copies where they cost least.
            hosted = repair_coverage(problem, hosted, deadline)
        if objective not in self.objectives:  # a placement made without looking at this objective
            status, bound, weak = "heuristic", None, False
        if bound is None and status != "optimal" and obj.bound is not None:
            bound, weak = obj.bound(problem), obj.weak_bound
        value = obj.value(problem, hosted, routing)
        seconds = deadline.elapsed()
        return SolveResult(hosted.astype(bool), self.name, status, value, bound,
                           relative_gap(value, bound, obj.maximize), seconds, objective, obj.measure,
                           weak, routing, sol.extra)

    def _solve_offload(self, problem: PlacementProblem, objective: str, deadline: Deadline) -> SolveResult:
        """A plan with pins, caches and loads; the solver's Solution carries its own value (extra["value"])."""
        if not self.plans_offload:
            raise PrismError(f"the cluster's GPUs cannot hold the model and experts load from its slow tiers; "
                             f"solver {self.name!r} does not plan that: pass `solver` exact (or swap, each server "
                             f"alone)", parameters=("solver",))
        sol = self._solve(problem, get_objective(objective), deadline)
        extra = dict(sol.extra)
        value = extra.pop("value")
        maximize = get_objective(objective).maximize
        return SolveResult(sol.hosted.astype(bool), self.name, sol.status, value, sol.bound,
                           relative_gap(value, sol.bound, maximize), deadline.elapsed(), objective,
                           extra.pop("measure"), sol.weak_bound, sol.routing, extra, sol.offload)
