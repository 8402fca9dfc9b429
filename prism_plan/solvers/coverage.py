"""The coverage model, exactly: a min-cost flow for equal expert sizes, a MILP otherwise.

    maximise  sum_{s,l,e} w[s,l,e] x[s,l,e]  -  cost * copied(x)
    s.t.      sum_{l,e} bytes[l] x[s,l,e] <= budget[s],   sum_s x[s,l,e] >= min_replicas,   x binary
              copied(x) <= move budget                      (a re-plan with a budget)
    copied(x) = sum bytes[l] x[s,l,e] (1 - current[s,l,e])  (bytes that must arrive somewhere new)

With one expert size memory is a count of slots and the model is a transportation problem whose LP is
integral: the min-cost flow optimum is the integer optimum. A move cost is linear in x, so it only shifts the
flow's weights, and among equally good placements the flow keeps the most of the current one (a lexicographic
tie-break). A move budget is one more row: bisection on its Lagrange multiplier (one flow per step) gives a
placement within budget and a bound, and the MILP with the row closes what gap remains. Sizes that differ:
the MILP, on any back end, started from a given placement.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
from ortools.graph.python import min_cost_flow

from prism_plan.errors import InfeasibleError, PrismError, TimeLimitError
from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.objectives import MoveTerms, net_objective, proven_status
from prism_plan.solvers.problem import PlacementProblem, Solution
from prism_plan.units import human_bytes

# Integer cost scale for fractional weights: the largest weight becomes 2**40, well inside the cost range
# OR-Tools accepts for graphs of up to ~10**6 nodes.
_COST_SCALE_MAX = float(2**40)
# Bisection steps on the move budget's multiplier; each is one flow (milliseconds at ESFT scale).
BISECTION_STEPS = 40
# The budgeted coverage MILP is handed to a back end only up to this many placement variables.
MAX_MILP_VARIABLES = 250_000


def integer_costs(weight: np.ndarray, limit: float = _COST_SCALE_MAX) -> tuple[np.ndarray, float]:
    """(costs: int64 weights, as `weight` itself when it holds integers within +-limit; scale: the factor
    applied)."""
    top = float(np.abs(weight).max(initial=0.0))
    if np.all(weight == np.round(weight)) and top <= limit:
        return weight.astype(np.int64), 1.0
    scale = limit / top if top > 0 else 1.0
    return np.round(weight * scale).astype(np.int64), scale


def solve_flow(weight: np.ndarray, slots: np.ndarray, min_replicas: int,
               tiebreak: np.ndarray | None = None, fill: bool = True,
               max_copies: int | None = None) -> tuple[np.ndarray, float]:
    """Maximise sum(weight * x) over x: [servers, items] in {0, 1}, with x.sum(1) == slots (`fill`) or
    <= slots, and min_replicas <= x.sum(0) <= max_copies (default servers).

    weight: [servers, items], may be negative; slots: [servers] int, each at most `items`.
    tiebreak: [servers, items] 0/1, among optimal x the one with the fewest chosen 1s (a lexicographic second
    objective: weights are scaled past the largest possible tie-break total).
    Returns (x as bool, rounding slack): the true optimum is at most value(x) + slack.
    """
    s, n = weight.shape
    tiers = int(slots.sum()) + 1 if tiebreak is not None else 1
    costs, scale = integer_costs(weight, _COST_SCALE_MAX / tiers)
    if tiebreak is not None:
        costs = costs * tiers - tiebreak.astype(np.int64)
    flow = min_cost_flow.SimpleMinCostFlow()
    sink = s + n
    tails = np.repeat(np.arange(s, dtype=np.int32), n)
    heads = np.tile(np.arange(s, s + n, dtype=np.int32), s)
    placing = flow.add_arcs_with_capacity_and_unit_cost(tails, heads, np.ones(s * n, np.int64), -costs.ravel())
    top = s if max_copies is None else max_copies
    flow.add_arcs_with_capacity_and_unit_cost(np.arange(s, s + n, dtype=np.int32), np.full(n, sink, np.int32),
                                              np.full(n, top - min_replicas, np.int64), np.zeros(n, np.int64))
    if not fill:  # empty slots: the right choice where a copy costs more than it brings
        flow.add_arcs_with_capacity_and_unit_cost(np.arange(s, dtype=np.int32), np.full(s, sink, np.int32),
                                                  slots.astype(np.int64), np.zeros(s, np.int64))
    supplies = np.concatenate([slots.astype(np.int64), np.full(n, -min_replicas, np.int64),
                               [min_replicas * n - int(slots.sum())]])
    flow.set_nodes_supplies(np.arange(s + n + 1, dtype=np.int32), supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise InfeasibleError(f"the placement flow has no solution (status {status}): the servers cannot give "
                              f"every expert {min_replicas} copies")
    x = flow.flows(placing).reshape(s, n).astype(bool)
    # Each chosen arc's weight was rounded by at most 0.5 / scale, in the solution and in the optimum alike.
    slack = 0.0 if scale == 1.0 else float(slots.sum()) / scale
    return x, slack


def coverage_milp(problem: PlacementProblem, hint: np.ndarray | None = None) -> MilpModel:
    """The coverage MILP over x: [servers, layers, experts] flattened C-order, maximising weight @ x (a move
    cost and budget join it through `move_model`).

    Rows: per server, sum bytes * x <= budget; per (layer, expert), sum over servers x >= min_replicas.
    """
    s, l, e = problem.shape
    n = s * l * e
    var = np.arange(n).reshape(s, l, e)
    memory = sp.csr_matrix((problem.cell_bytes.ravel().astype(float), (np.repeat(np.arange(s), l * e), var.ravel())),
                           shape=(s, n))
    replicas = sp.csr_matrix((np.ones(n), (np.tile(np.arange(l * e), s), var.ravel())), shape=(l * e, n))
    return MilpModel(
        c=problem.weight.ravel().astype(float),
        A=sp.vstack([memory, replicas], format="csr"),
        row_lb=np.concatenate([np.full(s, -np.inf), np.full(l * e, float(problem.min_replicas))]),
        row_ub=np.concatenate([problem.budget.astype(float), np.full(l * e, np.inf)]),
        lb=np.zeros(n), ub=np.ones(n), integer=np.ones(n, bool), maximize=True,
        hint=None if hint is None else hint.ravel().astype(float),
    )


def with_budget_row(model: MilpModel, row: np.ndarray, budget: float) -> MilpModel:
    """`model` with the row `row @ x <= budget` appended ([vars] row, zero past its length)."""
    full = np.zeros(model.A.shape[1])
    full[:len(row)] = row
    return replace(model, A=sp.vstack([model.A, sp.csr_matrix(full[None, :])], format="csr"),
                   row_lb=np.append(model.row_lb, -np.inf), row_ub=np.append(model.row_ub, budget))


def move_model(model: MilpModel, problem: PlacementProblem, moves: MoveTerms | None, scale: float = 1.0) -> MilpModel:
    """`model` (placement variables first) with the move cost on x (objective units x `scale` per byte) and the
    move budget as a row."""
    if moves is None:
        return model
    price = moves.priced_bytes(problem).ravel()
    c = model.c.copy()
    c[:len(price)] += (-1.0 if model.maximize else 1.0) * scale * moves.cost_per_byte * price
    model = replace(model, c=c)
    if moves.budget_bytes is None:
        return model
    return with_budget_row(model, moves.copy_bytes(problem).ravel(), float(moves.budget_bytes))


def _net_weight(problem: PlacementProblem, moves: MoveTerms | None, per_byte: float = 0.0) -> np.ndarray:
    """weight - move cost x priced bytes to copy each cell - per_byte x its bytes."""
    if moves is None:
        return problem.weight
    return problem.weight - moves.cost_per_byte * moves.priced_bytes(problem) - per_byte * moves.copy_bytes(problem)


def flow_optimum(problem: PlacementProblem, moves: MoveTerms | None = None, per_byte: float = 0.0):
    """(hosted, slack): the exact optimum of coverage - (move cost + per_byte) x copied for equal expert
    sizes, or for a slot layout (one flow per layer); with moves, the fewest copies among ties and, without a
    layout, slots may stay empty."""
    s = problem.shape[0]
    if problem.layout is not None:
        current = None if moves is None else moves.current
        return layout_flow(problem, _net_weight(problem, moves, per_byte), current)
    weight = _net_weight(problem, moves, per_byte).reshape(s, -1)
    if moves is None:
        x, slack = solve_flow(weight, problem.slots, problem.min_replicas)
    else:
        x, slack = solve_flow(weight, problem.slots, problem.min_replicas,
                              tiebreak=~moves.current.reshape(s, -1), fill=False)
    return x.reshape(problem.shape), slack


def layout_flow(problem: PlacementProblem, weight: np.ndarray, keep: np.ndarray | None = None
                ) -> tuple[np.ndarray, float]:
    """(hosted, slack): maximise sum(weight * x) with exactly `slots_per_layer` experts per server and layer and
    every expert min_replicas times, one exact flow per layer (the layers share nothing); among optimal x the one
    keeping the most of `keep`. weight: [servers, layers, experts]; keep: [servers, layers, experts] bool."""
    s, l, _ = problem.shape
    slots = np.full(s, problem.layout.slots_per_layer, np.int64)
    hosted = np.zeros(problem.shape, bool)
    slack = 0.0
    for layer in range(l):
        tiebreak = None if keep is None else ~keep[:, layer]
        hosted[:, layer], more = solve_flow(weight[:, layer], slots, problem.min_replicas, tiebreak=tiebreak)
        slack += more
    return hosted, slack


def nearest_layout(problem: PlacementProblem, hosted: np.ndarray) -> np.ndarray:
    """The slot layout keeping the most of `hosted` ([servers, layers, experts] bool), the most valuable
    experts filling what changes (a placement made without the layout, fitted to it)."""
    s, l, e = problem.shape
    scale = float(problem.weight.max(initial=0.0)) * s * l * e + 1.0  # below one kept cell in total
    fitted, _ = layout_flow(problem, hosted + problem.weight / scale)
    return fitted


def solve_coverage(problem: PlacementProblem, *, deadline: Deadline, backend: str = "highs",
                   moves: MoveTerms | None = None, start: np.ndarray | None = None) -> Solution:
    """The coverage optimum (net of the move cost, within the move budget, when `moves` are given), with its
    proven bound. start: a feasible placement for the MILP to start from (sizes that differ)."""
    net = net_objective("coverage", moves).value
    by_flow = problem.uniform or problem.layout is not None
    if by_flow and (moves is None or moves.budget_bytes is None):
        hosted, slack = flow_optimum(problem, moves)
        value = net(problem, hosted)
        return Solution(hosted, proven_status(value, value + slack), value + slack)
    bound = None
    if by_flow:
        start, bound = budget_bisection(problem, moves, deadline)
        if proven_status(net(problem, start), bound) == "optimal":
            return Solution(start, "optimal", bound)
    return _coverage_milp(problem, moves, start, bound, deadline, backend)


def budget_bisection(problem: PlacementProblem, moves: MoveTerms, deadline: Deadline) -> tuple[np.ndarray, float]:
    """(best placement within the move budget, bound): bisection on the budget's multiplier lam; every flow
    at lam gives the bound max_x [net(x) - lam (copied(x) - budget)]. Stops early at the deadline."""
    budget = float(moves.budget_bytes)
    # Past hi one byte outweighs all coverage: the flow there copies the fewest bytes any placement can.
    lo, hi = 0.0, (float(problem.weight.sum()) + 1.0) / float(problem.layer_bytes.min())
    net = net_objective("coverage", moves).value
    best, best_value, bound = None, -np.inf, np.inf
    for i in range(BISECTION_STEPS + 2):
        if i >= 2 and deadline.expired():
            break
        lam = (0.0, hi)[i] if i < 2 else 0.5 * (lo + hi)
        hosted, slack = flow_optimum(problem, moves, lam)
        moved = moves.copied(problem, hosted)
        value = net(problem, hosted)
        bound = min(bound, value - lam * (moved - budget) + slack)
        if moved <= budget:
            if value > best_value:
                best, best_value = hosted, value
            if i == 0:
                break  # the budget does not bind: the unconstrained optimum is the answer
            hi = lam
        elif i == 1:
            raise budget_too_small(moves, moved)
        else:
            lo = lam
    return best, bound


def budget_too_small(moves: MoveTerms, needed: int | None) -> InfeasibleError:
    """The error for a move budget no feasible placement meets (needed: the fewest bytes any needs, if known)."""
    need = f"at least {human_bytes(needed)}" if needed is not None else "more than that"
    return InfeasibleError(f"move budget {human_bytes(moves.budget_bytes)} is too small: any placement that fits "
                           f"the cluster needs {need} copied from the current one; raise `budget_bytes` to at least "
                           f"that", parameters=("budget_bytes",))


def _coverage_milp(problem: PlacementProblem, moves: MoveTerms | None, start: np.ndarray | None,
                   bound: float | None, deadline: Deadline, backend: str) -> Solution:
    """The coverage MILP (move cost in its objective, budget as a row), started from `start`; `bound` is one
    already proven (the bisection's)."""
    if problem.weight.size > MAX_MILP_VARIABLES and moves is not None and moves.budget_bytes is not None:
        if start is None:
            raise PrismError(f"the move-budget MILP has {problem.weight.size} variables, more than "
                             f"{MAX_MILP_VARIABLES}; drop `budget_bytes` and use a move cost",
                             parameters=("budget_bytes",))
        return Solution(start, "feasible", bound)
    model = move_model(coverage_milp(problem, start), problem, moves)
    sol = BACKENDS[backend]().solve(model, deadline.remaining())
    if sol.status == "infeasible":
        if moves is not None and moves.budget_bytes is not None:
            raise budget_too_small(moves, None)
        raise InfeasibleError("no placement fits the memory budgets with every expert hosted; the MILP "
                              "proved it (expert sizes do not pack into the servers)")
    bounds = [b for b in (bound, sol.bound) if b is not None]
    bound = min(bounds) if bounds else None
    if sol.x is None:
        if start is None:
            within = "" if deadline.time_limit is None else f" in the {deadline.time_limit:.3g} s it had"
            raise TimeLimitError(f"the coverage MILP found no placement{within}; raise `time_limit`",
                                 parameters=("time_limit",))
        return Solution(start, "timeout", bound)
    hosted = sol.x.reshape(problem.shape) > 0.5
    net = net_objective("coverage", moves).value
    if start is not None and net(problem, start) >= net(problem, hosted):
        hosted = start  # the back end found nothing better than its start within the limit
    return Solution(hosted, proven_status(net(problem, hosted), bound), bound)
