"""The latency model: placement and routing together, a capacitated facility-location MILP, and a Lagrangian
decomposition for clusters too large for it.

    minimise  (1/tokens) [ sum_{h,s,l,e} w[h,l,e] rtt[h,s] y[h,s,l,e]  +  sum_l z[l] ]  +  cost * copied(x)
    s.t.      sum_s y[h,s,l,e] = 1                  every activation of home server h is served somewhere
              y[h,s,l,e] <= x[s,l,e]                 only by a server that hosts the expert
              sum_{h,e} w[h,l,e] c[s] y[h,s,l,e] <= z[l]   z: the layer's compute makespan
              sum_{l,e} bytes[l] x[s,l,e] <= budget[s],  sum_s x[s,l,e] >= min_replicas
              copied(x) <= move budget               (a re-plan with a budget)
              x binary, y >= 0

w: activations whose origins arrive at h; rtt: one hidden state there and back (0 at home); c: seconds per
activation. y exists only where w > 0, so the model grows with the demand actually seen. Built as sparse
arrays, started from the best of the given placements and the coverage optimum. Past the MILP and the
enumeration of server sets below, latency_decomposition.py bounds the model and improves the placement.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.coverage import move_model, solve_coverage
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.latency_decomposition import decompose
from prism_plan.solvers.objectives import (MoveTerms, balanced_compute, latency_lower_bound, layer_makespan,
                                           nearest_routing, net_objective, proven_status)
from prism_plan.solvers.problem import PlacementProblem, Solution, placement_fits

# The model is solved in microseconds per token, so the back ends' absolute tolerances do not swallow it.
SCALE = 1e6
# Past this many routing variables HiGHS' first LP alone outlasts a two-minute limit on two cores (measured:
# Qwen3-30B shape on 8 servers has 393k); such problems get the Lagrangian decomposition only.
MAX_ROUTING_VARIABLES = 150_000


def milp_fits(problem: PlacementProblem) -> bool:
    """Whether the latency MILP is small enough to be worth handing to a back end (else the Lagrangian bound
    and its rounded placement answer alone)."""
    return int((problem.weight > 0).sum()) * problem.shape[0] <= MAX_ROUTING_VARIABLES


def latency_milp(problem: PlacementProblem, start: np.ndarray | None = None) -> tuple[MilpModel, np.ndarray]:
    """The latency MILP (objective in seconds per token x SCALE) and the (h, l, e) cell of each demand
    triple: [triples, 3].

    Variables, in order: x [servers, layers, experts]; y [triples, servers]; z [layers].
    start: hosted [servers, layers, experts] bool, sent as a starting solution with nearest routing.
    """
    s_n, l_n, e_n = problem.shape
    nx = s_n * l_n * e_n
    cells = np.argwhere(problem.weight > 0)  # [triples, 3] (home, layer, expert)
    k_n = len(cells)
    ny = k_n * s_n
    n = nx + ny + l_n
    w = problem.weight[cells[:, 0], cells[:, 1], cells[:, 2]]
    y = nx + np.arange(ny).reshape(k_n, s_n)
    x_of = np.ravel_multi_index((np.arange(s_n)[None, :], cells[:, 1:2], cells[:, 2:3]), (s_n, l_n, e_n))
    srv = np.broadcast_to(np.arange(s_n)[None, :], (k_n, s_n))

    c = np.zeros(n)
    c[y] = w[:, None] * problem.round_trip[cells[:, 0]] * SCALE * problem.per_token
    c[nx + ny:] = SCALE * problem.per_token

    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(r, cc, v, lb, ub):
        base = sum(len(b) for b in lo)
        rows.append(np.asarray(r).ravel() + base)
        cols.append(np.asarray(cc).ravel())
        vals.append(np.broadcast_to(np.asarray(v, float), np.shape(cc)).ravel())
        lo.append(lb)
        hi.append(ub)

    # assignment
    add(np.repeat(np.arange(k_n), s_n), y, 1.0, np.ones(k_n), np.ones(k_n))
    # linking y <= x
    add(np.repeat(np.arange(ny), 2), np.stack([y.ravel(), x_of.ravel()], axis=1), np.tile([1.0, -1.0], (ny, 1)),
        np.full(ny, -np.inf), np.zeros(ny))
    # makespan per (server, layer)
    ms_row = srv * l_n + cells[:, 1:2]
    add(np.concatenate([ms_row.ravel(), np.arange(s_n * l_n)]),
        np.concatenate([y.ravel(), nx + ny + np.tile(np.arange(l_n), s_n)]),
        np.concatenate([(w[:, None] * problem.act_seconds[None, :]).ravel(), -np.ones(s_n * l_n)]),
        np.full(s_n * l_n, -np.inf), np.zeros(s_n * l_n))
    # memory per server and replicas per expert
    x = np.arange(nx).reshape(s_n, l_n, e_n)
    add(np.repeat(np.arange(s_n), l_n * e_n), x, problem.cell_bytes, np.full(s_n, -np.inf),
        problem.budget.astype(float))
    add(np.tile(np.arange(l_n * e_n), s_n), x, 1.0, np.full(l_n * e_n, float(problem.min_replicas)),
        np.full(l_n * e_n, np.inf))

    row_lb, row_ub = np.concatenate(lo), np.concatenate(hi)
    a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(row_lb), n))
    integer = np.zeros(n, bool)
    integer[:nx] = True
    ub = np.ones(n)
    ub[nx + ny:] = np.inf
    hint = None if start is None else latency_start(problem, start, cells)
    return MilpModel(c, a, row_lb, row_ub, np.zeros(n), ub, integer, maximize=False, hint=hint), cells


def latency_start(problem: PlacementProblem, hosted: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The MILP's variables for `hosted` with nearest-replica routing."""
    routing = nearest_routing(problem, hosted)
    y = np.zeros((len(cells), problem.shape[0]))
    y[np.arange(len(cells)), routing[cells[:, 0], cells[:, 1], cells[:, 2]]] = 1.0
    z = layer_makespan(problem, routing)
    return np.concatenate([hosted.ravel().astype(float), y.ravel(), z])


def decode(problem: PlacementProblem, cells: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hosted, routing) from the MILP's variables: routing [servers, layers, experts] is each home server's
    serving server, the MILP's largest routing share where it has demand, the nearest replica elsewhere."""
    s_n = problem.shape[0]
    nx = int(np.prod(problem.shape))
    hosted = x[:nx].reshape(problem.shape) > 0.5
    shares = x[nx:nx + len(cells) * s_n].reshape(len(cells), s_n)
    routing = nearest_routing(problem, hosted)
    choice = np.argmax(np.where(hosted[:, cells[:, 1], cells[:, 2]].T, shares, -1.0), axis=1)
    routing[cells[:, 0], cells[:, 1], cells[:, 2]] = choice
    return hosted, routing


def solve_latency(problem: PlacementProblem, starts: list[np.ndarray], *, deadline: Deadline,
                  backend: str = "highs", moves: MoveTerms | None = None, warm_start: bool = True) -> Solution:
    """The latency model's best placement and routing (net of the move cost, within the move budget, when
    `moves` are given) with the best bound proven: the cheap `latency_lower_bound` (marked weak when nothing
    beats it), the Lagrangian bound (enumerating server sets when `lagrangian_fits`, else the decomposition
    of latency_decomposition.py, which also improves the best start) and the MILP's (when `milp_fits`). starts:
    feasible placements to begin from; the coverage optimum (with the move cost in coverage units) joins them.
    The MILP gets what time is left."""
    objective = net_objective("latency", moves)
    ok = lambda h: placement_fits(problem, h) and (moves is None or moves.within_budget(problem, h))  # noqa: E731
    candidates = [h for h in starts if ok(h)]
    if problem.uniform or not candidates:
        in_coverage = None if moves is None else moves.in_units_of(problem, "latency", "coverage")
        candidates.append(solve_coverage(problem, deadline=deadline, backend=backend, moves=in_coverage).hosted)
    bounds = [latency_lower_bound(problem)]
    if lagrangian_fits(problem) and not deadline.expired():
        bound, rounded = lagrangian(problem, min(objective.value(problem, h) for h in candidates), deadline)
        bounds.append(bound)
        candidates += [] if rounded is None or not ok(rounded) else [rounded]
    elif not deadline.expired():  # past the enumeration: the decomposition, with half the time if the MILP runs
        began = time.perf_counter()
        start = min(candidates, key=lambda h: objective.value(problem, h))
        # Left for judging every candidate again, the final choice and the solver's report, each as long as
        # judging one start took.
        reserve = (len(candidates) + 4) * (time.perf_counter() - began) / len(candidates)
        within = deadline.split(0.5 if milp_fits(problem) else 1.0)
        bound, improved = decompose(problem, start, within if within.time_limit is None else
                                    Deadline(max(within.time_limit - reserve, 0.01)))
        bounds.append(bound)
        candidates += [improved] if ok(improved) else []
    best = min(candidates, key=lambda h: objective.value(problem, h))
    routing = None
    if milp_fits(problem) and not deadline.expired():
        model, cells = latency_milp(problem, best if warm_start else None)
        sol = BACKENDS[backend]().solve(move_model(model, problem, moves, SCALE), deadline.remaining())
        if sol.bound is not None:
            bounds.append(sol.bound / SCALE)
        if sol.x is not None:
            hosted, milp_routing = decode(problem, cells, sol.x)
            if objective.value(problem, hosted, milp_routing) <= objective.value(problem, best):
                best, routing = hosted, milp_routing
    value = objective.value(problem, best, routing)
    bound = max(bounds)
    status = proven_status(value, bound, maximize=False)
    return Solution(best, status, bound, routing, weak_bound=bound == bounds[0])


# Lagrangian decomposition for clusters too large for the MILP: relaxing memory with multipliers mu (seconds
# per byte) splits the model into one tiny facility-location problem per expert, solved by enumerating which
# servers host it (2^servers - 1 subsets). The makespan term is bounded below by perfectly balanced compute.
MAX_ENUMERATED_SERVERS = 12
# Its arrays hold one entry per (layer, expert) and server set: past this many (160 MB a float array) the
# decomposition costs more memory and time than it brings.
MAX_SUBSET_CELLS = 20_000_000


def lagrangian_fits(problem: PlacementProblem) -> bool:
    """Whether the decomposition's enumeration of server sets is small enough to run."""
    s_n, l_n, e_n = problem.shape
    return s_n <= MAX_ENUMERATED_SERVERS and l_n * e_n * (2**s_n - 1) <= MAX_SUBSET_CELLS


def _subsets(s_n: int) -> np.ndarray:
    """[2^s_n - 1, s_n] bool: every non-empty set of servers; row i is the set with bit mask i + 1."""
    masks = np.arange(1, 2**s_n)
    return (masks[:, None] >> np.arange(s_n)[None, :]) & 1 == 1


def lagrangian(problem: PlacementProblem, upper: float, deadline: Deadline | None = None, iterations: int = 400):
    """(bound, hosted): the best Lagrangian lower bound on the latency model found by subgradient steps (until
    `deadline`), and a memory-feasible placement rounded from the best multipliers (None when rounding fails).

    upper: the value of any feasible placement (sets the step length). Seconds per token.
    """
    s_n, l_n, e_n = problem.shape
    subsets = _subsets(s_n)
    subsets = subsets[subsets.sum(axis=1) >= problem.min_replicas]
    reach = np.where(subsets[:, None, :], problem.round_trip[None, :, :], np.inf).min(axis=2)  # [sets, homes]
    service = problem.weight.transpose(1, 2, 0).reshape(l_n * e_n, s_n) @ reach.T * problem.per_token  # [cells, sets]
    size = np.repeat(problem.layer_bytes, e_n).astype(float)  # [cells]
    budget = problem.budget.astype(float)
    balanced = balanced_compute(problem)
    mu, best, best_mu = np.zeros(s_n), -np.inf, np.zeros(s_n)
    for i in range(iterations):
        if i and deadline is not None and deadline.expired():
            break
        total = service + size[:, None] * (subsets @ mu)[None, :]
        pick = np.argmin(total, axis=1)
        value = float(total[np.arange(len(pick)), pick].sum() - mu @ budget) + balanced
        if value > best:
            best, best_mu = value, mu.copy()
        grad = (size[:, None] * subsets[pick]).sum(axis=0) - budget
        norm = float((grad**2).sum())
        if norm == 0 or upper - value <= 1e-12 * abs(upper):
            break
        mu = np.maximum(0.0, mu + 0.5 * (upper - value) / norm * grad)
    rounded = None if deadline is not None and deadline.expired() else _round(problem, subsets, service, size, best_mu)
    return best, rounded


def _round(problem: PlacementProblem, subsets: np.ndarray, service: np.ndarray, size: np.ndarray,
           mu: np.ndarray) -> np.ndarray | None:
    """The multipliers' placement, made to fit: over-full servers drop the copies whose loss per byte is
    smallest, then servers with room add the copies that save the most per byte."""
    s_n, l_n, e_n = problem.shape
    pick = np.argmin(service + size[:, None] * (subsets @ mu)[None, :], axis=1)
    x = subsets[pick].copy()  # [cells, servers]
    cells = np.arange(len(x))
    lookup = np.full((len(x), 2**s_n), np.inf)  # service cost of each cell by the bit mask of its servers
    lookup[:, (subsets * (1 << np.arange(s_n))).sum(axis=1)] = service
    mask = (x * (1 << np.arange(s_n))).sum(axis=1)
    for s in range(s_n):
        bit = 1 << s
        over = float(size @ x[:, s]) - problem.budget[s]
        if over > 0:
            can = x[:, s] & (x.sum(axis=1) > problem.min_replicas)
            loss = np.where(can, (lookup[cells, mask & ~bit] - lookup[cells, mask]) / size, np.inf)
            order = np.argsort(loss, kind="stable")
            freed = np.cumsum(size[order])
            drop = order[: int(np.searchsorted(freed, over)) + 1]
            if not np.isfinite(loss[drop]).all():
                return None
            x[drop, s] = False
            mask[drop] &= ~bit
    for s in range(s_n):
        bit = 1 << s
        room = problem.budget[s] - float(size @ x[:, s])
        gain = np.where(~x[:, s], (lookup[cells, mask] - lookup[cells, mask | bit]) / size, -np.inf)
        order = np.argsort(-gain, kind="stable")
        fits = np.cumsum(size[order]) <= room
        add = order[fits & (gain[order] > 0)]
        x[add, s] = True
        mask[add] |= bit
    return x.T.reshape(s_n, l_n, e_n)
