"""The latency model's Lagrangian decomposition for clusters past the enumeration of every server set (see
latency.py for the model and for the full enumeration on small clusters).

Relaxing memory with prices mu (seconds per token per byte) splits the model into one facility-location
problem per (layer, expert) cell: choose the servers S that host it, paying

    cost(S) = sum_{s in S} mu[s] bytes[l]  +  per_token sum_h w[h,l,e] min_{s in S} rtt[h,s]

and the makespan is bounded below by perfectly balanced compute. Each cell's minimum is bounded without
enumerating all 2^servers sets: the sets of up to k servers are enumerated (one matrix product, once), and
every larger set costs at least what its servers' memory costs plus, for each home outside the set, a round
trip to its nearest other server:

    cost(S) >= per_token sum_h w[h] d[h] + sum_{s in S} (mu[s] bytes[l] - per_token w[s] d[s]),
    d[h] = min_{s != h} rtt[h,s],

whose minimum over |S| > k is the k + 1 smallest terms plus the negative rest. The cell's bound is the
smaller of the two; summed, minus mu @ budget, it bounds the model, and projected subgradient steps on mu (one
multiplier per server) raise it. After the first round the cells whose bound comes from the larger sets get
the next set size enumerated too. Placements: each cell's minimising set at the round's prices, fitted to the
memory slots by the coverage flow, then improved by a best response per server (each in turn re-chooses its
cells given the other servers' copies, routing to the nearest replica).

The makespan rows are not priced: measured on Zipf demand at Qwen3-30B and DeepSeek-V3 shapes, the compute
makespan is under 0.02% of the objective, so the balanced bound loses nothing visible.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from math import comb

import numpy as np

from prism_plan.solvers.coverage import solve_flow
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.objectives import OPTIMALITY_TOLERANCE, balanced_compute, latency_value, relative_gap
from prism_plan.solvers.problem import PlacementProblem

# Entries of the [cells, enumerated sets] cost table (80 MB a float array, evaluated once per subgradient step):
# sets are enumerated up to the largest size that keeps the table within this.
MAX_SET_CELLS = 12_000_000
# Subgradient steps without a better bound before the step length halves.
PATIENCE = 10
# Share of the time left that each round's subgradient steps take (the rest: its placement, later rounds).
ROUND_SHARE = 0.4
# Sets in one table at most: building them is a Python loop (about 10 us a set).
MAX_SETS = 10_000
# Subgradient steps in one round at most (they also stop at the round's deadline).
ROUND_STEPS = 200
# A round that raises the bound and lowers the best value by less than this share of the value is the last.
PROGRESS = 1e-4
# Passes of the best response over all servers.
RESPONSE_PASSES = 10


@dataclass(frozen=True)
class Beyond:
    """What bounds the sets too large to enumerate, per cell ((layer, expert) in C order). far: seconds per
    token, [cells], every home served by its nearest other server; own: seconds per token, [cells, servers],
    what home s saves on that by hosting the cell; size: bytes, [cells]."""

    far: np.ndarray
    own: np.ndarray
    size: np.ndarray


@dataclass(frozen=True)
class SetCosts:
    """One table of enumerated sets, computed once. cells: [n] indices of the cells it covers; sets: [sets,
    servers] bool, every set of `smallest` to `largest` servers; service: seconds per token, [n, sets], each
    set's network cost of each cell."""

    cells: np.ndarray
    sets: np.ndarray
    smallest: int
    largest: int
    service: np.ndarray


def demand_per_token(problem: PlacementProblem) -> np.ndarray:
    """[cells, homes]: activations per token of each (layer, expert) cell from each home server."""
    s_n, l_n, e_n = problem.shape
    return problem.weight.transpose(1, 2, 0).reshape(l_n * e_n, s_n) * problem.per_token


def beyond_terms(problem: PlacementProblem) -> Beyond:
    """The per-cell terms of the bound on sets too large to enumerate."""
    s_n, _, e_n = problem.shape
    rtt = problem.round_trip
    nearest_other = np.where(np.eye(s_n, dtype=bool), np.inf, rtt).min(axis=1) if s_n > 1 else np.zeros(1)
    own = demand_per_token(problem) * nearest_other[None, :]
    return Beyond(own.sum(axis=1), own, np.repeat(problem.layer_bytes.astype(float), e_n))


def sets_within(problem: PlacementProblem, cells: int, smallest: int, max_entries: int = MAX_SET_CELLS) -> int:
    """The largest set size k whose sets of `smallest`..k servers for `cells` cells keep the table within
    `max_entries` (at least `smallest`)."""
    s_n = problem.shape[0]
    k, count = smallest, comb(s_n, smallest)
    while k < s_n and cells * (count + comb(s_n, k + 1)) <= max_entries and count + comb(s_n, k + 1) <= MAX_SETS:
        k, count = k + 1, count + comb(s_n, k + 1)
    return k


def set_costs(problem: PlacementProblem, cells: np.ndarray, smallest: int, largest: int) -> SetCosts:
    """The table of every set of `smallest` to `largest` servers for `cells` ([n] cell indices)."""
    s_n = problem.shape[0]
    sets = np.array([np.isin(np.arange(s_n), chosen) for k in range(smallest, largest + 1)
                     for chosen in itertools.combinations(range(s_n), k)]).reshape(-1, s_n)
    reach = np.where(sets[:, None, :], problem.round_trip[None, :, :], np.inf).min(axis=2)  # [sets, homes]
    return SetCosts(cells, sets, smallest, largest, demand_per_token(problem)[cells] @ reach.T)


def capacities(problem: PlacementProblem) -> np.ndarray:
    """bytes: [servers] each server can fill; with one expert size, whole slots only (a valid tightening:
    no placement uses the rest)."""
    if problem.uniform:
        return (problem.slots * problem.layer_bytes[0]).astype(float)
    return problem.budget.astype(float)


def cell_minima(tables: list[SetCosts], beyond: Beyond, mu: np.ndarray):
    """(bound: seconds per token, [cells], a lower bound on each cell's cost at memory prices mu; chosen:
    [cells, servers] bool, the set attaining it; margin: seconds per token, [cells], how far the bound on
    larger sets lies below the best enumerated set, 0 where it does not). tables: the first covers every
    cell with sets of min_replicas servers up; each later one continues the sizes of some cells."""
    n, s_n = beyond.own.shape
    enumerated, chosen = np.full(n, np.inf), np.zeros((n, s_n), bool)
    done = np.zeros(n, np.int64)  # the largest set size enumerated per cell
    for t in tables:
        total = t.service + beyond.size[t.cells, None] * (t.sets @ mu)[None, :]
        pick = np.argmin(total, axis=1)
        value = total[np.arange(len(pick)), pick]
        better = value < enumerated[t.cells]
        enumerated[t.cells[better]], chosen[t.cells[better]] = value[better], t.sets[pick[better]]
        done[t.cells] = t.largest
    term = beyond.size[:, None] * mu[None, :] - beyond.own  # [cells, servers]
    order = np.argsort(term, axis=1, kind="stable")
    ranked = np.take_along_axis(term, order, axis=1)
    first = np.arange(s_n)[None, :] <= done[:, None]  # the done + 1 smallest terms, then any negative ones
    larger = first | (ranked < 0)
    bound_larger = np.where(done < s_n, beyond.far + (ranked * larger).sum(axis=1), np.inf)
    use = bound_larger < enumerated
    chosen[use] = np.take_along_axis(larger, np.argsort(order, axis=1), axis=1)[use]
    return np.minimum(enumerated, bound_larger), chosen, np.where(use, enumerated - bound_larger, 0.0)


def memory_prices(problem: PlacementProblem, tables: list[SetCosts], beyond: Beyond, mu: np.ndarray,
                  upper: float, deadline: Deadline, theta: float = 2.0) -> tuple[float, np.ndarray, float]:
    """(bound, mu, theta): the best Lagrangian bound (seconds per token, balanced compute included) found by
    up to ROUND_STEPS projected subgradient steps from `mu` with Polyak lengths against `upper` (a feasible
    value), until the deadline or the bound is within OPTIMALITY_TOLERANCE of upper; mu: seconds per token
    per byte, [servers]; theta: the Polyak factor (halved after PATIENCE steps without a better bound), to go
    on with."""
    capacity, compute = capacities(problem), balanced_compute(problem)
    best, best_mu, stale = -np.inf, mu, 0
    for _ in range(ROUND_STEPS):
        if deadline.expired():
            break
        minima, chosen, _ = cell_minima(tables, beyond, mu)
        value = float(minima.sum() - mu @ capacity) + compute
        if value > best:
            best, best_mu, stale = value, mu, 0
        else:
            stale += 1
            theta, stale = (theta / 2, 0) if stale >= PATIENCE else (theta, stale)
        grad = beyond.size @ chosen - capacity
        norm = float(grad @ grad)
        if norm == 0 or relative_gap(upper, best, maximize=False) <= OPTIMALITY_TOLERANCE:
            break
        mu = np.maximum(0.0, mu + theta * max(upper - value, 1e-12 * abs(upper)) / norm * grad)
    return best, best_mu, theta


def refinement(problem: PlacementProblem, tables: list[SetCosts], beyond: Beyond,
               mu: np.ndarray) -> SetCosts | None:
    """A table of the next set size for the cells whose bound on larger sets is furthest below their best
    enumerated set at mu (as many as MAX_SET_CELLS allows); None when no cell's bound comes from there."""
    margin = cell_minima(tables, beyond, mu)[2]
    smallest = tables[-1].largest + 1
    if smallest > problem.shape[0] or comb(problem.shape[0], smallest) > MAX_SETS or not (margin > 0).any():
        return None
    count = max(1, MAX_SET_CELLS // comb(problem.shape[0], smallest))
    cells = np.argsort(-margin, kind="stable")[:min(count, int((margin > 0).sum()))]
    largest = sets_within(problem, len(cells), smallest)
    return set_costs(problem, np.sort(cells), smallest, largest)


def fitted(problem: PlacementProblem, chosen: np.ndarray) -> np.ndarray | None:
    """[servers, layers, experts] bool: the cells' chosen sets ([cells, servers]) fitted to every server's
    slots with min_replicas copies each, keeping as many chosen copies as possible and filling with the
    heaviest home demand (the coverage flow); None when expert sizes differ (the flow counts slots)."""
    if not problem.uniform:
        return None
    s_n = problem.shape[0]
    demand = problem.weight.reshape(s_n, -1)
    weight = chosen.T + 1e-3 * demand / max(float(demand.max()), 1e-300)
    return solve_flow(weight, problem.slots, problem.min_replicas)[0].reshape(problem.shape)


def cheapest_hosts(problem: PlacementProblem, hosted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best, best server, second best): round trips in seconds, [homes, layers, experts], from each home to
    its nearest and second nearest hosting server (inf where there is none)."""
    rtt = problem.round_trip
    best = np.full(problem.shape, np.inf)
    second, arg = best.copy(), np.zeros(problem.shape, np.int64)
    for s in range(problem.shape[0]):
        trip = np.where(hosted[s][None], rtt[:, s, None, None], np.inf)
        closer = trip < best
        second = np.where(closer, best, np.minimum(second, trip))
        best, arg = np.where(closer, trip, best), np.where(closer, s, arg)
    return best, arg, second


def best_response(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline,
                  passes: int = RESPONSE_PASSES) -> np.ndarray:
    """`hosted` improved server by server: each re-chooses the cells that save the most round-trip seconds
    given the other servers' copies (keeping those whose copy count would fall below min_replicas), within its
    memory. Stops after `passes` passes, when a pass changes nothing, or at the deadline."""
    hosted = hosted.copy()
    rtt = problem.round_trip
    best, arg, second = cheapest_hosts(problem, hosted)
    size = np.broadcast_to(problem.layer_bytes.astype(float)[:, None], problem.shape[1:])
    for _ in range(passes):
        changed = False
        for s in range(problem.shape[0]):
            if deadline.expired():
                return hosted
            other = np.where(arg == s, second, best)  # inf where s holds the only copy: kept below
            saving = np.where(np.isfinite(other), other - rtt[:, s, None, None], 0.0)
            gain = (problem.weight * np.maximum(0.0, saving)).sum(axis=0)
            must = hosted.sum(axis=0) - hosted[s] < problem.min_replicas
            pick = _fill(np.where(must, np.inf, gain), size, must, float(problem.budget[s]))
            moved = pick != hosted[s]
            if moved.any():
                changed = True
                hosted[s] = pick
                _refresh(rtt, hosted, moved, best, arg, second)
        if not changed:
            break
    return hosted


def _fill(gain: np.ndarray, size: np.ndarray, must: np.ndarray, budget: float) -> np.ndarray:
    """[layers, experts] bool: the cells taken in order of gain per byte while they fit, `must` first (they
    fit: the server held them all), otherwise only gains > 0."""
    order = np.argsort(-(gain / size).ravel(), kind="stable")
    fits = np.cumsum(size.ravel()[order]) <= budget
    take = order[fits & ((gain.ravel()[order] > 0) | must.ravel()[order])]
    pick = np.zeros(gain.size, bool)
    pick[take] = True
    return pick.reshape(gain.shape)


def _refresh(rtt: np.ndarray, hosted: np.ndarray, moved: np.ndarray, best: np.ndarray, arg: np.ndarray,
             second: np.ndarray) -> None:
    """Recompute the nearest two hosts, in place, of the cells whose copies moved ([layers, experts] bool)."""
    layer, expert = np.nonzero(moved)
    trips = np.where(hosted[None, :, layer, expert], rtt[:, :, None], np.inf)  # [homes, servers, cells]
    ranked = np.sort(trips, axis=1)
    best[:, layer, expert] = ranked[:, 0]
    second[:, layer, expert] = ranked[:, 1] if ranked.shape[1] > 1 else np.inf
    arg[:, layer, expert] = np.argmin(trips, axis=1)


def decompose(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline) -> tuple[float, np.ndarray]:
    """(bound, placement): the best Lagrangian lower bound on the latency model (seconds per token) found by
    the deadline, and the best placement found from `hosted` (a feasible start), the bound's chosen sets and
    best responses. Works in rounds (subgradient steps, then a placement rounded from the prices) until the
    deadline, a round that improves neither, or a gap within OPTIMALITY_TOLERANCE."""
    best = best_response(problem, hosted, deadline.split(0.1))
    upper = latency_value(problem, best)
    beyond, cells = beyond_terms(problem), np.arange(problem.shape[1] * problem.shape[2])
    tables = [set_costs(problem, cells, problem.min_replicas, sets_within(problem, len(cells), problem.min_replicas))]
    bound, mu, rounding, theta = -np.inf, np.zeros(problem.shape[0]), 0.0, 2.0
    while not deadline.expired() and relative_gap(upper, bound, maximize=False) > OPTIMALITY_TOLERANCE:
        found, mu, theta = memory_prices(problem, tables, beyond, mu, upper, deadline.split(ROUND_SHARE), theta)
        extra = refinement(problem, tables, beyond, mu) if len(tables) == 1 and not deadline.expired() else None
        tables += [] if extra is None else [extra]
        candidate, value = None, np.inf
        if (deadline.remaining() or np.inf) > rounding:  # the flow cannot be interrupted: start it only in time
            began = time.perf_counter()
            candidate = _rounded(problem, tables, beyond, mu, deadline)
            rounding = time.perf_counter() - began
            value = np.inf if candidate is None else latency_value(problem, candidate)
        if found <= bound + PROGRESS * upper and value >= upper * (1 - PROGRESS) and extra is None:
            break
        bound = max(bound, found)
        best, upper = (candidate, value) if value < upper else (best, upper)
    return bound, best


def _rounded(problem: PlacementProblem, tables: list[SetCosts], beyond: Beyond, mu: np.ndarray,
             deadline: Deadline) -> np.ndarray | None:
    """The placement of the cells' sets at prices mu, fitted and improved by best responses (None when
    the time is up or sizes differ)."""
    start = None if deadline.expired() else fitted(problem, cell_minima(tables, beyond, mu)[1])
    return None if start is None or deadline.expired() else best_response(problem, start, deadline)
