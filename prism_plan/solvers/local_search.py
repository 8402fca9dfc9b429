"""`local-search`: improve a placement by swaps judged by replaying the trace (simulated time to first token
or traffic).

A move swaps, on one server and within one layer, a hosted expert for one the server lacks: memory stays the
same and no expert loses its last copies, so every step is feasible. Each layer's cost is its own replay
(the objectives add over layers), so a move is scored by replaying one layer. Candidates per (server, layer):
the experts whose activations would reach this server fastest in, the least used hosted ones out; the best
improving swap is taken, sweeps repeat until none improves or the time is up. Starts from the latency model's
answer within half the time (simulated_ttft) or the coverage optimum (traffic) unless given a start.

A search cut by the clock depends on how fast the machine was; with `max_iterations` (neighbourhoods examined)
the work is fixed instead and the result is the same on every run: a time limit that would cut it is an error.
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import PrismError, TimeLimitError
from prism_plan.placement.checks import integer
from prism_plan.placement.metrics import route
from prism_plan.placement.simulator import layer_objective, layer_traffic, replay_layer
from prism_plan.solvers.base import Solver
from prism_plan.solvers.coverage import solve_coverage
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.greedy import greedy_placement
from prism_plan.solvers.latency import solve_latency
from prism_plan.solvers.objectives import Objective
from prism_plan.solvers.problem import PlacementProblem, Solution


class LocalSearchSolver(Solver):
    """Swap search judged by the replayed trace, from `start` ([servers, layers, experts] bool) when given.

    candidates: experts tried in and out per (server, layer); max_iterations: the most (layer, server)
    neighbourhoods to examine (None: until no swap improves, or the time limit), after which the result is the
    same on every run.
    """

    name = "local-search"
    objectives = ("simulated_ttft", "traffic")
    only_own_objectives = True
    summary = "swaps judged by the simulator (simulated_ttft) or replayed traffic, from the best model solution"

    def __init__(self, *, time_limit: float | None = None, seed: int = 0, start: np.ndarray | None = None,
                 candidates: int = 4, max_iterations: int | None = None) -> None:
        super().__init__(time_limit=time_limit, seed=seed)
        self.start = None if start is None else np.asarray(start, bool)
        self.candidates = integer(candidates, "`candidates`", low=1, parameters=("candidates",))
        self.max_iterations = None if max_iterations is None else integer(
            max_iterations, "`max_iterations`", low=0, fix="give a whole number, or None to stop at the time limit",
            parameters=("max_iterations",))

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        if problem.workload is None:
            raise PrismError(f"local-search judges {objective.name} by replaying the trace: pass the `trace` the "
                             f"tables were built from", parameters=("trace",))
        if self.start is not None and self.start.shape != problem.shape:
            raise PrismError(f"start placement has shape {list(self.start.shape)}, the problem "
                             f"{list(problem.shape)}: pass a `start` plan for this model and cluster",
                             parameters=("start",))
        hosted = self.start
        if hosted is None and objective.name == "simulated_ttft":
            half = deadline.split(0.5)
            hosted = solve_latency(problem, [greedy_placement(problem, half)], deadline=half).hosted
            self._check_uncut(half, "its start, the latency model, ran out of its half of")
        elif hosted is None:
            hosted = solve_coverage(problem, deadline=deadline).hosted
            self._check_uncut(deadline, "its start, the coverage optimum, used up")
        return Solution(improve(problem, hosted.copy(), objective.name, deadline, self.candidates,
                                self.max_iterations), "heuristic")

    def _check_uncut(self, deadline: Deadline, what: str) -> None:
        """With `max_iterations`, a step the clock stopped is an error: its result would differ between runs."""
        if self.max_iterations is not None and deadline.expired():
            raise TimeLimitError(f"local-search with `max_iterations` gives the same result on every run, but {what} "
                                 f"`time_limit`; raise `time_limit` or pass a `start` plan",
                                 parameters=("max_iterations", "time_limit", "start"))


def _layer_cost(problem: PlacementProblem, hosted_l: np.ndarray, l: int, objective: str) -> float:
    """One layer's share of the objective for hosted_l: [servers, experts]."""
    w, costs = problem.workload, problem.costs
    routing = route(hosted_l[:, None, :], w.home, problem.hop_seconds)[:, 0, :]  # [origins, experts]
    rep = replay_layer(w, routing[w.origin[:, None], w.experts[:, l, :]], costs)
    return layer_objective(w, rep) if objective == "simulated_ttft" else layer_traffic(w, rep, costs)


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


def improve(problem: PlacementProblem, hosted: np.ndarray, objective: str, deadline: Deadline = UNLIMITED,
            candidates: int = 4, max_iterations: int | None = None) -> np.ndarray:
    """Best-improvement swaps per (server, layer) until a sweep finds none, `max_iterations` (server, layer)
    neighbourhoods were examined, or `deadline` passes; with `max_iterations`, reaching the deadline first raises
    TimeLimitError, so that a result never depends on time. objective: simulated_ttft or traffic."""
    s_n, l_n, _ = problem.shape
    cost = np.array([_layer_cost(problem, hosted[:, l], l, objective) for l in range(l_n)])
    improved, done = True, 0
    while improved:
        improved = False
        for l in np.argsort(-cost, kind="stable"):
            for s in range(s_n):
                if max_iterations is not None and done >= max_iterations:
                    return hosted
                if deadline.expired():
                    if max_iterations is None:
                        return hosted
                    raise TimeLimitError(f"local-search reached `time_limit` after {done} of `max_iterations` "
                                         f"{max_iterations} iterations; raise `time_limit` or lower `max_iterations`",
                                         parameters=("time_limit", "max_iterations"))
                done += 1
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
