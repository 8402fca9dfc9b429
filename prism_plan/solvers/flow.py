"""Coverage with equal expert sizes as a min-cost flow (OR-Tools SimpleMinCostFlow).

With one expert size, memory is a count of slots and the coverage problem is a transportation problem:
servers supply slots, each (layer, expert) takes at least `min_replicas` of them and at most one from each
server. Its LP is integral, so the min-cost flow optimum is the integer optimum.
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import InfeasibleError

# Integer cost scale for fractional weights: the largest weight becomes 2**40, well inside the cost range
# OR-Tools accepts for graphs of up to ~10**6 nodes.
_COST_SCALE_MAX = float(2**40)


def integer_costs(weight: np.ndarray, limit: float = _COST_SCALE_MAX) -> tuple[np.ndarray, float]:
    """(costs: int64 weights, as `weight` itself when it holds integers within +-limit; scale: the factor
    applied)."""
    top = float(np.abs(weight).max(initial=0.0))
    if np.all(weight == np.round(weight)) and top <= limit:
        return weight.astype(np.int64), 1.0
    scale = limit / top if top > 0 else 1.0
    return np.round(weight * scale).astype(np.int64), scale


def solve_flow(weight: np.ndarray, slots: np.ndarray, min_replicas: int,
               tiebreak: np.ndarray | None = None, fill: bool = True) -> tuple[np.ndarray, float]:
    """Maximise sum(weight * x) over x: [servers, items] in {0, 1}, with x.sum(1) == slots (`fill`) or
    <= slots, and x.sum(0) >= min_replicas.

    weight: [servers, items], may be negative; slots: [servers] int, each at most `items`.
    tiebreak: [servers, items] 0/1, among optimal x the one with the fewest chosen 1s (a lexicographic second
    objective: weights are scaled past the largest possible tie-break total).
    Returns (x as bool, rounding slack): the true optimum is at most value(x) + slack.
    """
    from ortools.graph.python import min_cost_flow

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
    flow.add_arcs_with_capacity_and_unit_cost(np.arange(s, s + n, dtype=np.int32), np.full(n, sink, np.int32),
                                              np.full(n, s - min_replicas, np.int64), np.zeros(n, np.int64))
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
