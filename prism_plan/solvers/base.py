"""The one interface every placement solver shares: a PlacementProblem in, a SolveResult out."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.metrics import memory_used
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.simulator import CostModel, Workload, prepare_workload
from prism_plan.units import human_bytes
from prism_plan.traces.tables import ActivationTables

STATUSES = ("optimal", "feasible", "heuristic", "infeasible", "timeout")


@dataclass(frozen=True)
class PlacementProblem:
    """What a solver sees.

    weight: [servers, layers, experts] float64, activations that arrive at the server's origins.
    layer_bytes: [layers] int64, bytes of one expert of each MoE layer.
    budget: [servers] int64, bytes each server has for routed experts.
    hop_seconds: [servers, servers] float64, time to send one token's hidden state between servers.
    min_replicas: copies every expert must have.
    costs: link and compute costs (latency and traffic objectives); tokens: tokens behind `weight`.
    workload: the token-level trace, cut into steps, for objectives judged by replaying it.
    """

    weight: np.ndarray
    layer_bytes: np.ndarray
    budget: np.ndarray
    hop_seconds: np.ndarray
    min_replicas: int = 1
    server_names: tuple[str, ...] = ()
    costs: CostModel | None = None
    tokens: float = 0.0
    workload: Workload | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(servers, layers, experts)."""
        return self.weight.shape

    @property
    def uniform(self) -> bool:
        """True when all experts have one size: memory is then a count of expert slots."""
        return bool(np.all(self.layer_bytes == self.layer_bytes[0]))

    @property
    def slots(self) -> np.ndarray:
        """[servers] int64, experts each server can hold (uniform sizes), at most one per (layer, expert)."""
        s, l, e = self.shape
        return np.minimum(self.budget // self.layer_bytes.max(), l * e)

    @property
    def round_trip(self) -> np.ndarray:
        """seconds: [servers, servers], sending one token's hidden state from row to column server and back."""
        return self.hop_seconds + self.hop_seconds.T

    @property
    def act_seconds(self) -> np.ndarray:
        """seconds: [servers], computing one activation (one token in one expert); 0 without costs."""
        if self.costs is None:
            return np.zeros(self.shape[0])
        return self.costs.expert_flops / self.costs.flops

    @property
    def demand(self) -> np.ndarray:
        """[layers, experts] float64, activations summed over servers (origin-blind load)."""
        return self.weight.sum(axis=0)


def build_problem(tables: ActivationTables, cluster: ClusterSpec, model: ModelSpec, min_replicas: int = 1,
                  trace=None, concurrency: int = 1) -> PlacementProblem:
    """Check that tables, cluster and model describe the same thing, and gather the solver's arrays.

    trace: the Trace the tables were built from, for objectives judged by replaying it (its requests are
    batched `concurrency` per origin and step, as in the simulator).
    """
    if tuple(tables.layers) != tuple(model.layers) or tables.num_experts != model.num_experts:
        raise PrismError(f"tables are for layers {_span(tables.layers)} x {tables.num_experts} experts but model "
                         f"{model.name!r} has layers {_span(model.layers)} x {model.num_experts}; pass the "
                         f"--model the trace was recorded with")
    if min_replicas < 1:
        raise PrismError(f"min_replicas must be at least 1, got {min_replicas}")
    homes = cluster.homes(list(tables.origins))
    weight = np.zeros((cluster.num_servers,) + tables.freq.shape[1:])
    np.add.at(weight, homes, tables.freq)
    workload = None
    if trace is not None:
        model.check_same_shape(trace.meta, "the trace")
        origins = tuple(trace.origins)
        workload = prepare_workload(trace, origins, cluster.homes(list(origins)), concurrency)
    problem = PlacementProblem(weight, model.layer_bytes, cluster.budgets, cluster.hop_seconds(model.token_bytes),
                               min_replicas, tuple(cluster.names), CostModel.of(cluster, model),
                               float(tables.tokens.sum()), workload)
    check_feasible(problem)
    return problem


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "[]"


def check_feasible(problem: PlacementProblem) -> None:
    """Raise InfeasibleError, naming the shortfall in GiB, when the cluster cannot hold every expert
    `min_replicas` times."""
    s, l, e = problem.shape
    r = problem.min_replicas
    if r > s:
        raise InfeasibleError(f"min_replicas={r} needs at least {r} servers, the cluster has {s}; lower "
                              f"--min-replicas or add servers")
    need = r * e * int(problem.layer_bytes.sum())
    if problem.uniform:
        have = int(problem.slots.sum()) * int(problem.layer_bytes[0])
    else:  # a server holds each (layer, expert) once: memory beyond one full copy of the model is no use
        have = int(np.minimum(problem.budget, e * int(problem.layer_bytes.sum())).sum())
    if have < need:
        lines = ", ".join(f"{n} {human_bytes(b)}" for n, b in zip(problem.server_names, problem.budget))
        raise InfeasibleError(f"infeasible budget: {r} cop{'y' if r == 1 else 'ies'} of every expert need "
                              f"{human_bytes(need)} but the servers hold {human_bytes(have)} of whole experts "
                              f"({lines}); short by {human_bytes(need - have)}: raise memory_gib or add a server")


def placement_fits(problem: PlacementProblem, hosted: np.ndarray) -> bool:
    """Whether `hosted` ([servers, layers, experts] bool) keeps every server within its memory and every expert
    at min_replicas copies."""
    return bool((memory_used(hosted, problem.layer_bytes) <= problem.budget).all()
                and hosted.sum(axis=0).min() >= problem.min_replicas)


def coverage_value(problem: PlacementProblem, hosted: np.ndarray) -> float:
    """Activations served at their origin's server: sum of weight where hosted."""
    return float((problem.weight * hosted).sum())


def coverage_upper_bound(problem: PlacementProblem) -> float:
    """A bound no placement can beat: each server's fractional knapsack of its own activations, ignoring
    the replica constraint. O(servers x layers x experts x log) array work."""
    s, l, e = problem.shape
    size = np.broadcast_to(problem.layer_bytes[None, :, None], problem.shape).reshape(s, -1).astype(float)
    w = problem.weight.reshape(s, -1)
    order = np.argsort(-w / size, axis=1, kind="stable")
    w_sorted = np.take_along_axis(w, order, axis=1)
    b_sorted = np.take_along_axis(size, order, axis=1)
    used_before = np.cumsum(b_sorted, axis=1) - b_sorted
    frac = np.clip((problem.budget[:, None] - used_before) / b_sorted, 0.0, 1.0)
    return float((w_sorted * frac).sum())


@dataclass
class SolveResult:
    """A placement with its evidence. hosted: [servers, layers, experts] bool.

    objective: the value of `hosted` under the objective, in the units `measure` names; bound: the best bound
    proven on the optimum (None when unknown); gap: |objective - bound| relative to the bound (maximising) or
    to the objective (minimising). routing: [servers, layers, experts] the server each home server's origins
    use, when the solver chose it (else the nearest replica serves). extra: solver-specific evidence (the
    incremental solver's bytes copied and move cost).
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
    routing: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def evidence(self) -> dict:
        """The `solver` section of a plan file."""
        return {"name": self.solver, "status": self.status, "objective": self.objective, "bound": self.bound,
                "gap": self.gap, "seconds": round(self.seconds, 6), "measure": self.measure, **self.extra}


def relative_gap(objective: float, bound: float | None, maximize: bool = True) -> float | None:
    """How far `objective` may be from the optimum given `bound`: (bound - objective) / |bound| when
    maximising, (objective - bound) / |objective| when minimising; 0 when they differ by under 1e-9 (absolute:
    the rounding of scaled weights, near a zero objective), None without a bound."""
    if bound is None:
        return None
    scale = abs(bound) if maximize else abs(objective)
    if scale < 1e-12 or abs(bound - objective) <= 1e-9:
        return 0.0
    return max(0.0, ((bound - objective) if maximize else (objective - bound)) / scale)


class Solver(ABC):
    """Base of every placement solver. Subclasses implement `_solve` and set `name`.

    `objectives` lists what a solver optimises itself; under any other objective its placement is scored
    and reported as a heuristic.
    """

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def __init__(self, time_limit: float | None = None, seed: int = 0) -> None:
        self.time_limit = time_limit
        self.seed = seed

    @abstractmethod
    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, str, float | None]:
        """Return (hosted [servers, layers, experts] bool, status, proven bound or None) for the coverage
        objective, or a placement the solver makes without one."""

    def _solve_for(self, problem: PlacementProblem, objective: str) -> SolveResult:
        """Optimise `objective` (one of `objectives` other than coverage)."""
        raise NotImplementedError(objective)

    def solve(self, problem: PlacementProblem, objective: str = "coverage") -> SolveResult:
        """Solve `problem` for `objective`, time it, and attach the evidence."""
        from prism_plan.solvers.objectives import OBJECTIVES

        if objective not in OBJECTIVES:
            raise PrismError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        check_feasible(problem)
        start = time.perf_counter()
        if objective != "coverage" and objective in self.objectives:
            result = self._solve_for(problem, objective)
            result.seconds = time.perf_counter() - start
            return result
        hosted, status, bound = self._solve(problem)
        if (hosted.sum(axis=0) < problem.min_replicas).any():
            # Layouts that place one copy of each expert get the further copies where they cost least.
            from prism_plan.solvers.greedy import repair_coverage

            hosted = repair_coverage(problem, hosted)
        seconds = time.perf_counter() - start
        obj = OBJECTIVES[objective]
        if objective != "coverage":  # a placement made without looking at this objective
            status, bound = "heuristic", obj.bound(problem) if obj.bound is not None else None
        elif bound is None and status in ("heuristic", "feasible", "timeout"):
            bound = coverage_upper_bound(problem)
        value = obj.value(problem, hosted)
        return SolveResult(hosted.astype(bool), self.name, status, value, bound,
                           relative_gap(value, bound, obj.maximize), seconds, objective, obj.measure)
