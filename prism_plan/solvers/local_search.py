"""`local-search`: improve a placement by swaps judged by replaying the trace (simulated latency or traffic).

A move swaps, on one server and within one layer, a hosted expert for one the server lacks: memory stays the
same and no expert loses its last copies, so every step is feasible. Each layer's cost is its own replay
(the objectives add over layers), so a move is scored by replaying one layer. Candidates per (server, layer):
the experts whose activations would reach this server fastest in, the least used hosted ones out; the best
improving swap is taken, sweeps repeat until none improves or the time is up. Starts from the latency MILP
(latency) or the coverage optimum (traffic) unless given a start.
"""

from __future__ import annotations

import time

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.metrics import route
from prism_plan.placement.simulator import layer_objective, layer_traffic, replay_layer
from prism_plan.solvers.base import PlacementProblem, SolveResult, Solver, relative_gap
from prism_plan.solvers.objectives import OBJECTIVES, SIMULATED_LATENCY

DEFAULT_SECONDS = 60.0


class LocalSearchSolver(Solver):
    """Swap search judged by the replayed trace."""

    name = "local-search"
    objectives = ("latency", "traffic")
    summary = "swaps judged by the simulator (latency) or replayed traffic, from the best model solution"

    def __init__(self, time_limit: float | None = None, seed: int = 0, start: np.ndarray | None = None,
                 candidates: int = 4) -> None:
        super().__init__(time_limit, seed)
        self.start = start
        self.candidates = candidates

    def _solve(self, problem: PlacementProblem):
        raise PrismError("local-search improves latency or traffic; pass --objective latency or traffic")

    def _solve_for(self, problem: PlacementProblem, objective: str) -> SolveResult:
        from prism_plan.solvers.exact import ExactSolver

        budget = self.time_limit if self.time_limit is not None else DEFAULT_SECONDS
        deadline = time.perf_counter() + budget
        obj = SIMULATED_LATENCY if objective == "latency" else OBJECTIVES["traffic"]
        if problem.workload is None:
            raise PrismError(f"local-search judges {objective} by replaying the trace: pass the trace the tables "
                             f"were built from (--trace)")
        hosted = self.start
        if hosted is None and objective == "latency":
            hosted = ExactSolver(time_limit=budget / 2, seed=self.seed).solve(problem, "latency").hosted
        elif hosted is None:
            hosted = ExactSolver(seed=self.seed)._solve(problem)[0]
        hosted = improve(problem, hosted.copy(), objective, deadline, self.candidates)
        value = obj.value(problem, hosted)
        bound = obj.bound(problem)
        return SolveResult(hosted, self.name, "heuristic", value, bound, relative_gap(value, bound, False), 0.0,
                           objective, obj.measure)


def _layer_cost(problem: PlacementProblem, hosted_l: np.ndarray, l: int, objective: str) -> float:
    """One layer's share of the objective for hosted_l: [servers, experts]."""
    w, costs = problem.workload, problem.costs
    routing = route(hosted_l[:, None, :], w.home, problem.hop_seconds)[:, 0, :]  # [origins, experts]
    rep = replay_layer(w, routing[w.origin[:, None], w.experts[:, l, :]], costs)
    return layer_objective(w, rep) if objective == "latency" else layer_traffic(w, rep, costs)


def _candidates(problem: PlacementProblem, hosted_l: np.ndarray, l: int, s: int, m: int):
    """(experts to bring to server s, hosted experts it may drop) in layer l, most promising first."""
    rt = problem.round_trip
    homes = np.arange(problem.shape[0])
    serving = route(hosted_l[:, None, :], homes, problem.hop_seconds)[:, 0, :]  # [servers, experts]
    now = rt[homes[:, None], serving]  # [servers, experts] current round trip of each home's activations
    w = problem.weight[:, l, :]
    gain = (w * np.maximum(now - rt[:, s][:, None], 0.0)).sum(axis=0)
    gain[hosted_l[s]] = -np.inf
    copies = hosted_l.sum(axis=0)
    served_here = (serving == s)
    loss = (w * served_here).sum(axis=0)
    loss[~hosted_l[s] | (copies <= problem.min_replicas)] = np.inf
    ins = np.argsort(-gain, kind="stable")[:m]
    outs = np.argsort(loss, kind="stable")[:m]
    return ins[np.isfinite(gain[ins])], outs[np.isfinite(loss[outs])]


def improve(problem: PlacementProblem, hosted: np.ndarray, objective: str, deadline: float,
            candidates: int = 4) -> np.ndarray:
    """Best-improvement swaps per (server, layer) until a sweep finds none or `deadline` (perf_counter) passes."""
    s_n, l_n, _ = problem.shape
    cost = np.array([_layer_cost(problem, hosted[:, l], l, objective) for l in range(l_n)])
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for l in np.argsort(-cost, kind="stable"):
            for s in range(s_n):
                if time.perf_counter() >= deadline:
                    return hosted
                ins, outs = _candidates(problem, hosted[:, l], l, s, candidates)
                best, move = cost[l] * (1 - 1e-9), None
                for e_in in ins:
                    for e_out in outs:
                        trial = hosted[:, l].copy()
                        trial[s, e_in], trial[s, e_out] = True, False
                        c = _layer_cost(problem, trial, l, objective)
                        if c < best:
                            best, move = c, (e_in, e_out)
                if move is not None:
                    hosted[s, l, move[0]], hosted[s, l, move[1]] = True, False
                    cost[l] = best
                    improved = True
    return hosted
