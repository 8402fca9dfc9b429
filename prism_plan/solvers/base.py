"""The one interface every placement solver shares: a PlacementProblem in, a SolveResult out."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.placement.cluster import GIB, ClusterSpec
from prism_plan.placement.model import ModelSpec
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
    """

    weight: np.ndarray
    layer_bytes: np.ndarray
    budget: np.ndarray
    hop_seconds: np.ndarray
    min_replicas: int = 1
    server_names: tuple[str, ...] = ()

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
    def demand(self) -> np.ndarray:
        """[layers, experts] float64, activations summed over servers (origin-blind load)."""
        return self.weight.sum(axis=0)


def build_problem(tables: ActivationTables, cluster: ClusterSpec, model: ModelSpec,
                  min_replicas: int = 1) -> PlacementProblem:
    """Check that tables, cluster and model describe the same thing, and gather the solver's arrays."""
    if tuple(tables.layers) != tuple(model.layers) or tables.num_experts != model.num_experts:
        raise PrismError(f"tables are for layers {_span(tables.layers)} x {tables.num_experts} experts but model "
                         f"{model.name!r} has layers {_span(model.layers)} x {model.num_experts}; pass the "
                         f"--model the trace was recorded with")
    if min_replicas < 1:
        raise PrismError(f"min_replicas must be at least 1, got {min_replicas}")
    homes = cluster.homes(list(tables.origins))
    weight = np.zeros((cluster.num_servers,) + tables.freq.shape[1:])
    np.add.at(weight, homes, tables.freq)
    problem = PlacementProblem(weight, model.layer_bytes, cluster.budgets, cluster.hop_seconds(model.token_bytes),
                               min_replicas, tuple(cluster.names))
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
        lines = ", ".join(f"{n} {b / GIB:.2f} GiB" for n, b in zip(problem.server_names, problem.budget))
        raise InfeasibleError(f"infeasible budget: {r} cop{'y' if r == 1 else 'ies'} of every expert need "
                              f"{need / GIB:.2f} GiB but the servers hold {have / GIB:.2f} GiB of whole experts "
                              f"({lines}); short by {(need - have) / GIB:.2f} GiB: raise memory_gib or add a server")


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

    objective: the solver's objective value for `hosted` (coverage: activations served locally).
    bound: the best bound proven on the optimum (None when unknown); gap: (bound - objective) / bound.
    """

    hosted: np.ndarray
    solver: str
    status: str
    objective: float
    bound: float | None
    gap: float | None
    seconds: float
    objective_name: str = "coverage"

    def evidence(self) -> dict:
        """The `solver` section of a plan file."""
        return {"name": self.solver, "status": self.status, "objective": self.objective, "bound": self.bound,
                "gap": self.gap, "seconds": round(self.seconds, 6)}


def relative_gap(objective: float, bound: float | None) -> float | None:
    """(bound - objective) / |bound| for a maximisation, 0 when both are 0, None without a bound."""
    if bound is None:
        return None
    if abs(bound) < 1e-12:
        return 0.0
    return max(0.0, (bound - objective) / abs(bound))


class Solver(ABC):
    """Base of every placement solver. Subclasses implement `_solve` and set `name`."""

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]] = ("coverage",)
    summary: ClassVar[str] = ""

    def __init__(self, time_limit: float | None = None, seed: int = 0) -> None:
        self.time_limit = time_limit
        self.seed = seed

    @abstractmethod
    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, str, float | None]:
        """Return (hosted [servers, layers, experts] bool, status, proven bound or None)."""

    def solve(self, problem: PlacementProblem, objective: str = "coverage") -> SolveResult:
        """Solve `problem` for `objective`, time it, and attach the evidence."""
        if objective not in self.objectives:
            raise PrismError(f"solver {self.name!r} does not handle objective {objective!r} "
                             f"(it handles {', '.join(self.objectives)})")
        check_feasible(problem)
        start = time.perf_counter()
        hosted, status, bound = self._solve(problem)
        if (hosted.sum(axis=0) < problem.min_replicas).any():
            # Layouts that place one copy of each expert get the further copies where they cost least.
            from prism_plan.solvers.greedy import repair_coverage

            hosted = repair_coverage(problem, hosted)
        seconds = time.perf_counter() - start
        value = coverage_value(problem, hosted)
        if bound is None and status in ("heuristic", "feasible", "timeout"):
            bound = coverage_upper_bound(problem)
        return SolveResult(hosted.astype(bool), self.name, status, value, bound, relative_gap(value, bound),
                           seconds, objective)
