"""Plans for clusters whose GPUs cannot hold the model: pins, cache sizes, slow-tier contents and routing.

The model, per origin server h and expert cell (layer l, expert e), with `touches[h, l, e]` batches at h that
use the cell and `weight[h, l, e]` activations:
- pinned at h: free;
- pinned at another server s: the hidden states travel to s and back; a token's trip to s is shared by its
  experts there, so each activation is charged 2 * token_bytes / bandwidth[h, s] times `trip_share` (one
  activation's share of a trip, top_k activations over the servers a token can visit);
- loaded: `touches * load_seconds[s, l]` at the server s that loads it (h itself, or s with the trip added):
  a batch loads an expert once per layer.
Each cell's cost is the cheapest option the placement leaves. With at most one pinned copy of each cell the
model separates: pinning cell c at s saves sum_h max(0, load_h - remote_hs) against loading, so the best pins
are a transportation problem, a min-cost flow whose LP is integral, with "offloaded" (not pinned anywhere) the
free option of every cell. Under coverage (a pin serves every origin for free) that flow is the optimum.
Under latency more copies of a cell can pay: the facility-location MILP (pins x[s, c], each origin's cell
served from one pin y[h, s, c] <= x[s, c] or loaded at its best server z[h, c]), started from the flow's plan,
improves it and proves a bound for the plan's cache sizes. Too large for the MILP, the bound is the relaxation
in which every other server pins every cell for free (weak: marked so).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from prism_plan.errors import PrismError
from prism_plan.placement.offload import Offload
from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.base import Solver
from prism_plan.solvers.coverage import solve_flow
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.objectives import Objective, proven_status
from prism_plan.solvers.problem import PlacementProblem, Solution, with_offload

OBJECTIVES = ("latency", "coverage")
# The multi-copy MILP is built up to this many variables (servers^2 x cells dominate) and given at most this many
# seconds when the solve has no time limit; past either, the flow's plan stands with the relaxation's bound.
MAX_MILP_VARIABLES = 2_000_000
MILP_SECONDS = 60.0
MEASURES = {"latency": "seconds per request of loads and round trips (offload model)",
            "coverage": "activations served from pinned experts"}


def check_objective(objective: str) -> str:
    """`objective` when an offload plan can be made for it."""
    if objective not in OBJECTIVES:
        raise PrismError(f"the cluster's GPUs cannot hold the model, so experts load from the slow tiers, and plans "
                         f"for that optimise {' or '.join(OBJECTIVES)}, not {objective!r}: pass `objective` latency",
                         parameters=("objective",))
    return objective


def cache_slots(problem: PlacementProblem) -> int:
    """Experts of the largest size each server's cache holds by default: two tokens' worth of one layer (top_k
    experts each), so that the next layer's likeliest experts can load while this layer computes."""
    return 2 * (problem.model.top_k if problem.model is not None else 1)


# The default cache takes at most this share of a server's memory: the rest pins experts.
CACHE_SHARE = 0.25


def cache_bytes(problem: PlacementProblem, slots: int | np.ndarray) -> np.ndarray:
    """bytes: [servers] int64, a cache of `slots` (one number or [servers]) of the largest experts on every
    server that can load, within CACHE_SHARE of its memory but room for one expert at least (0 on servers
    without a slow tier or memory for one expert)."""
    biggest = int(problem.layer_bytes.max())
    loads = np.isfinite(problem.offload.load_seconds).all(axis=1)
    fits = problem.budget // biggest
    room = np.minimum(np.maximum(1, (fits * CACHE_SHARE).astype(np.int64)), slots) * biggest
    return np.where(loads & (fits >= 1), room, 0).astype(np.int64)


def trip_share(problem: PlacementProblem) -> float:
    """One activation's share of a token's trip to a server: its top_k activations over the other servers."""
    k = problem.model.top_k if problem.model is not None else 1
    return min(1.0, max(problem.shape[0] - 1, 1) / k)


def remote_seconds(problem: PlacementProblem) -> np.ndarray:
    """seconds: [servers (origin), servers (serving)], one activation's share of the round trip: the hidden
    state's bytes each way (0 at home). Link latency is left out on purpose: a batch sends one message per layer
    to each server it uses, so latency is paid per (batch, layer, server pair), not per activation; priced per
    activation it made every remote pin look dearer than a load (measured on ESFT at 50% of a copy: mean TTFT
    0.95 -> 1.49 s in the replay, which charges latency per message)."""
    tb = problem.model.token_bytes if problem.model is not None else 0
    bw = problem.cluster.bandwidth if problem.cluster is not None else np.full(problem.hop_seconds.shape, np.inf)
    per = tb / bw + tb / bw.T
    np.fill_diagonal(per, 0.0)
    return per * trip_share(problem)


def option_costs(problem: PlacementProblem, objective: str) -> tuple[np.ndarray, np.ndarray]:
    """(load: [servers, layers, experts] seconds (latency) or activations (coverage) an origin server pays to
    load a cell at home; remote: [servers, servers] per-activation cost of sending to a pinned copy)."""
    w, off = problem.weight, problem.offload
    if objective == "coverage":  # served from any pinned copy counts; loading counts nothing
        return w.copy(), np.zeros((w.shape[0], w.shape[0]))
    with np.errstate(invalid="ignore"):
        load = np.where(off.touches > 0, off.touches * off.load_seconds[:, :, None], 0.0)
    return load, remote_seconds(problem)


def pin_savings(problem: PlacementProblem, load: np.ndarray, remote: np.ndarray) -> np.ndarray:
    """[servers, layers, experts]: what pinning each cell at each server saves, summed over origin servers, as
    the one pinned copy of the cell: sum_h max(0, load_h - remote[h, s] * weight_h)."""
    s_n = problem.shape[0]
    out = np.zeros(problem.shape)
    for s in range(s_n):  # [servers, layers, experts] per serving server: servers^2 cells in all
        out[s] = np.maximum(0.0, load - remote[:, s, None, None] * problem.weight).sum(axis=0)
    return out


def pin_slots(problem: PlacementProblem, cache: np.ndarray) -> np.ndarray:
    """[servers] experts of the largest size each server pins beside its cache."""
    return np.minimum((problem.budget - cache) // int(problem.layer_bytes.max()), int(np.prod(problem.shape[1:])))


def best_pins(problem: PlacementProblem, savings: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """[servers, layers, experts] bool, at most one pinned copy per cell, maximising the savings: the flow."""
    s_n = problem.shape[0]
    x, _ = solve_flow(savings.reshape(s_n, -1), slots.astype(np.int64), 0, fill=False, max_copies=1)
    return x.reshape(problem.shape) & (savings > 0)


def slow_tier_contents(problem: PlacementProblem, hosted: np.ndarray, load: np.ndarray) -> np.ndarray:
    """[servers, layers, experts] bool, what each slow tier holds: the whole model where it has room; else first
    every cell no GPU pins and no whole-model tier holds, each at the server whose origins would load it most,
    then more of the cells its own origins would load, costliest first."""
    budget = problem.offload.host_budget
    size = problem.cell_bytes
    stored = np.zeros(problem.shape, bool)
    whole = budget >= float(size[0].sum())
    stored[whole] = True
    room = np.where(whole, 0.0, budget)
    missing = ~(hosted | stored).any(axis=0)
    cells = np.argwhere(missing)
    for l, e in cells[np.argsort(-load[:, missing].sum(axis=0), kind="stable")]:
        fits = np.flatnonzero(room >= problem.layer_bytes[l])
        if not len(fits):
            raise PrismError(f"the slow tiers have no room left for expert {e} of layer index {l}: raise "
                             f"host_memory_gib", parameters=("cluster",))
        s = fits[np.lexsort((-room[fits], -load[fits, l, e]))[0]]
        stored[s, l, e] = True
        room[s] -= problem.layer_bytes[l]
    for s in np.flatnonzero(room > 0):
        wanted = (load[s] * ~hosted[s] * ~stored[s]).ravel()
        order = np.argsort(-wanted, kind="stable")
        order = order[wanted[order] > 0]
        fits = np.cumsum(size[s].ravel()[order]) <= room[s]
        stored[s].reshape(-1)[order[fits]] = True
    return stored


def cheapest_routing(problem: PlacementProblem, objective: str, hosted: np.ndarray, stored: np.ndarray,
                     cache: np.ndarray, load: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(routing: [servers, layers, experts] the server each origin server's activations of each cell go to,
    cost: [servers, layers, experts] what that choice costs): its own pin, else the cheapest of a pinned copy
    elsewhere, loading at home, or loading at another server that holds the cell (with the trip)."""
    s_n = problem.shape[0]
    biggest = int(problem.layer_bytes.max())
    can_load = stored & (cache >= biggest)[:, None, None]
    w = problem.weight
    best = np.full(problem.shape, np.inf)
    route = np.zeros(problem.shape, np.int64)
    for s in range(s_n):
        trip = remote[:, s, None, None] * w  # [origin servers, layers, experts]
        pinned = np.where(hosted[s][None], trip, np.inf)
        loaded = np.where(can_load[s][None], trip + _load_at(problem, objective, load, s), np.inf)
        cost = np.minimum(pinned, loaded)
        better = cost < best
        best = np.where(better, cost, best)
        route = np.where(better, s, route)
    return route, best


def _load_at(problem: PlacementProblem, objective: str, load: np.ndarray, s: int) -> np.ndarray:
    """[servers, layers, experts]: what each origin server's batches pay to have server s load each cell
    (under latency its batches' loads, timed at s's slow tier)."""
    off = problem.offload
    if not np.isfinite(off.load_seconds[s]).all():
        return np.full(problem.shape, np.inf)
    if objective == "coverage":  # a loaded activation is not served from a pin, wherever it loads
        return load
    return off.touches * off.load_seconds[s][None, :, None]


def offload_value(problem: PlacementProblem, objective: str, cost: np.ndarray, routing: np.ndarray,
                  hosted: np.ndarray) -> float:
    """The objective of a plan: seconds per request of loads and trips (latency), or activations served from
    pinned copies (coverage)."""
    if objective == "coverage":
        return float((problem.weight * _pinned_served(hosted, routing)).sum())
    return float(cost.sum()) / max(problem.offload.requests, 1.0)


def _pinned_served(hosted: np.ndarray, routing: np.ndarray) -> np.ndarray:
    l_n, e_n = hosted.shape[1:]
    return hosted[routing, np.arange(l_n)[None, :, None], np.arange(e_n)[None, None, :]]


def offload_bound(problem: PlacementProblem, objective: str, load: np.ndarray, remote: np.ndarray) -> float:
    """A bound on the best plan under the offload model: every other server pins every cell for free, and each
    origin server's own pins take its largest savings (a knapsack in whole experts of the largest size)."""
    s_n = problem.shape[0]
    slots = pin_slots(problem, np.zeros(s_n, np.int64))
    if objective == "coverage":  # every activation is served from a pin elsewhere when anything is pinned
        return float(problem.weight.sum())
    others = np.where(np.eye(s_n, dtype=bool), np.inf, remote).min(axis=1)  # cheapest trip away from home
    floor = np.minimum(load, others[:, None, None] * problem.weight)  # [servers, layers, experts]
    flat = np.sort(floor.reshape(s_n, -1), axis=1)[:, ::-1]
    kept = np.arange(flat.shape[1])[None, :] < slots[:, None]
    return float(floor.sum() - (flat * kept).sum()) / max(problem.offload.requests, 1.0)


def expected_loads(problem: PlacementProblem, hosted: np.ndarray, route: np.ndarray) -> np.ndarray:
    """[servers] experts each server loads per batch step and layer, on average, under routing `route`
    ([servers, layers, experts] the serving server of each origin server's activations)."""
    s_n, l_n, _ = problem.shape
    loads = ~_pinned_served(hosted, route) & (problem.offload.touches > 0)
    per_server = np.bincount(route[loads], weights=problem.offload.touches[loads], minlength=s_n)
    return per_server / max(problem.offload.steps * l_n, 1.0)


def _pins(problem: PlacementProblem, alone: bool, cache: np.ndarray, load: np.ndarray,
          remote: np.ndarray) -> np.ndarray:
    """[servers, layers, experts] bool, the pins beside caches of `cache` bytes: each server's own hottest
    (`alone`), else the flow."""
    n_slots = pin_slots(problem, cache)
    if alone:
        return _own_hottest(load, n_slots, problem)
    return best_pins(problem, pin_savings(problem, load, remote), n_slots)


def _routes(problem: PlacementProblem, objective: str, alone: bool, hosted: np.ndarray, stored: np.ndarray,
            cache: np.ndarray, load: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(routing, cost) as `cheapest_routing`; alone, every server serves its own origins."""
    if not alone:
        return cheapest_routing(problem, objective, hosted, stored, cache, load, remote)
    missing = ~(hosted | stored)
    if missing.any():
        s, l, e = np.argwhere(missing)[0]
        raise PrismError(f"server {problem.server_names[s]} alone cannot serve expert {e} of layer index {l}: its "
                         f"slow tier does not hold it; give it host memory for the whole model",
                         parameters=("cluster",))
    route = np.broadcast_to(np.arange(problem.shape[0])[:, None, None], problem.shape).copy()
    return route, np.where(hosted, 0.0, load)


def plan_offload(problem: PlacementProblem, objective: str, deadline: Deadline, *, alone: bool = False,
                 slots: int | np.ndarray | None = None) -> Solution:
    """Pins, cache sizes, slow-tier contents and routing for a problem with `offload` terms.

    alone: every server serves its own origins only, pinning what they use most and loading the rest (the
    in-situ swapping baseline). slots: experts of the largest size each cache holds, one number or [servers]
    (default: room for the experts a server loads in one batch step and layer, on average, plus the next
    layer's prefetch of `cache_slots`; one expert where slow tiers hold part of the model, since pins must
    then cover the rest).
    """
    check_objective(objective)
    load, remote = option_costs(problem, objective)
    if alone:
        remote = np.where(np.eye(problem.shape[0], dtype=bool), 0.0, np.inf)
    limited = bool(np.isfinite(problem.offload.host_budget).any())
    cache = cache_bytes(problem, slots if slots is not None else 1 if limited else cache_slots(problem))
    hosted = _pins(problem, alone, cache, load, remote)
    stored = slow_tier_contents(problem, hosted, load)
    if slots is None and not limited:  # size each cache by what the first plan loads there, and plan again
        route, _ = _routes(problem, objective, alone, hosted, stored, cache, load, remote)
        wanted = cache_slots(problem) + np.ceil(expected_loads(problem, hosted, route)).astype(np.int64)
        cache = cache_bytes(problem, wanted)
        hosted = _pins(problem, alone, cache, load, remote)
        stored = slow_tier_contents(problem, hosted, load)
    bound, weak = offload_bound(problem, objective, load, remote), True
    if objective == "coverage" and not alone:
        bound, weak = None, False  # the flow is the optimum; its value is the bound, set below
    elif not alone and _milp_size(problem) <= MAX_MILP_VARIABLES and not deadline.expired():
        route, _ = _routes(problem, objective, alone, hosted, stored, cache, load, remote)
        better, milp_bound = pin_milp(problem, hosted, route, stored, cache, load, remote,
                                      pin_slots(problem, cache), deadline)
        if better is not None:
            hosted = better
            stored = slow_tier_contents(problem, hosted, load)
        if milp_bound is not None:
            bound, weak = max(bound, milp_bound), False
    route, cost = _routes(problem, objective, alone, hosted, stored, cache, load, remote)
    value = offload_value(problem, objective, cost, route, hosted)
    bound = value if bound is None else bound
    status = "heuristic" if alone else proven_status(value, bound, maximize=objective == "coverage")
    biggest = int(problem.layer_bytes.max())
    extra = {"cache_slots": (cache // biggest).tolist(), "pinned_cells": int(hosted.sum()), "value": value,
             "measure": MEASURES[objective]}
    return Solution(hosted, status, bound, route, extra, weak_bound=weak, offload=Offload(cache, stored))


def _milp_size(problem: PlacementProblem) -> int:
    s_n, l_n, e_n = problem.shape
    return (s_n * s_n + 2 * s_n) * l_n * e_n


def pin_milp(problem: PlacementProblem, hosted: np.ndarray, route: np.ndarray, stored: np.ndarray,
             cache: np.ndarray, load: np.ndarray, remote: np.ndarray, slots: np.ndarray,
             deadline: Deadline) -> tuple[np.ndarray | None, float | None]:
    """The latency model with any number of copies per cell, as a MILP started from `hosted` (routed by
    `route`): (better pins or None, the proven lower bound in seconds per request or None)."""
    s_n = problem.shape[0]
    c_n = int(np.prod(problem.shape[1:]))
    w = problem.weight.reshape(s_n, c_n)
    biggest = int(problem.layer_bytes.max())
    # z: each origin's cheapest load, at home or at a server that holds the cell (with the trip)
    z_cost = np.full((s_n, c_n), np.inf)
    for s in range(s_n):
        if cache[s] >= biggest:
            at_s = remote[:, s, None] * w + _load_at(problem, "latency", load, s).reshape(s_n, c_n)
            z_cost = np.minimum(z_cost, np.where(stored[s].reshape(1, c_n), at_s, np.inf))
    z_cost = np.where(np.isfinite(z_cost), z_cost, 1e30)  # no load possible: only a pin serves it
    n_x, n_y = s_n * c_n, s_n * s_n * c_n
    x_idx = np.arange(n_x).reshape(s_n, c_n)
    y_idx = n_x + np.arange(n_y).reshape(s_n, s_n, c_n)  # [origin, serving server, cell]
    z_idx = n_x + n_y + np.arange(s_n * c_n).reshape(s_n, c_n)
    y_cost = remote[:, :, None] * w[:, None, :]
    c = np.concatenate([np.zeros(n_x), y_cost.ravel(), z_cost.ravel()]) / max(problem.offload.requests, 1.0)
    assign_rows = np.arange(s_n * c_n).reshape(s_n, c_n)
    rows_a = np.concatenate([np.broadcast_to(assign_rows[:, None, :], y_idx.shape).ravel(), assign_rows.ravel()])
    cols_a = np.concatenate([y_idx.ravel(), z_idx.ravel()])
    link_rows = s_n * c_n + np.arange(n_y)
    rows_l = np.concatenate([link_rows, link_rows])
    cols_l = np.concatenate([y_idx.ravel(), np.broadcast_to(x_idx[None, :, :], y_idx.shape).ravel()])
    vals_l = np.concatenate([np.ones(n_y), -np.ones(n_y)])
    mem_rows = s_n * c_n + n_y + np.repeat(np.arange(s_n), c_n)
    n_rows = s_n * c_n + n_y + s_n
    a = sp.csr_matrix((np.concatenate([np.ones(len(cols_a)), vals_l, np.ones(n_x)]),
                       (np.concatenate([rows_a, rows_l, mem_rows]), np.concatenate([cols_a, cols_l, x_idx.ravel()]))),
                      shape=(n_rows, n_x + n_y + s_n * c_n))
    row_lb = np.concatenate([np.ones(s_n * c_n), np.full(n_y, -np.inf), np.full(s_n, -np.inf)])
    row_ub = np.concatenate([np.ones(s_n * c_n), np.zeros(n_y), slots.astype(float)])
    n = a.shape[1]
    hint = np.zeros(n)
    flat_route, flat_hosted = route.reshape(s_n, c_n), hosted.reshape(s_n, c_n)
    hint[x_idx.ravel()] = flat_hosted.ravel()
    served = \
        flat_hosted[flat_route, np.arange(c_n)[None, :]]
    origin, cell = np.nonzero(served)
    hint[y_idx[origin, flat_route[origin, cell], cell]] = 1.0
    hint[z_idx[~served]] = 1.0
    model = MilpModel(c, a, row_lb, row_ub, np.zeros(n), np.ones(n), np.r_[np.ones(n_x, bool), np.zeros(n - n_x, bool)],
                      maximize=False, hint=hint)
    left = deadline.remaining()
    sol = BACKENDS["highs"]().solve(model, MILP_SECONDS if left is None else min(left, MILP_SECONDS))
    better = None if sol.x is None else (sol.x[:n_x] > 0.5).reshape(problem.shape)
    return better, sol.bound


def _own_hottest(load: np.ndarray, slots: np.ndarray, problem: PlacementProblem) -> np.ndarray:
    """[servers, layers, experts] bool: each server pins the `slots` cells its own origins would load most."""
    s_n = problem.shape[0]
    flat = load.reshape(s_n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    hosted = np.zeros(flat.shape, bool)
    ranks = np.arange(flat.shape[1])[None, :] < slots[:, None]
    np.put_along_axis(hosted, order, ranks, axis=1)
    return hosted.reshape(problem.shape) & (load > 0)


class SwapSolver(Solver):
    """Every server alone: pins what its own origins use most and swaps the rest in from its own slow tier (the
    in-situ swapping that Sirius improves on); for clusters with slow tiers, whether or not the GPUs could
    hold the model."""

    name = "swap"
    objectives = OBJECTIVES
    plans_offload = True
    needs_offload = True
    summary = "baseline for offload clusters: each server alone pins its hottest experts and loads the rest"

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        return plan_offload(problem, objective.name, deadline, alone=True)


def offload_metrics(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray, offload: Offload) -> dict:
    """Plan metrics of the offload tier. routing: [servers, layers, experts] serving server per origin server.

    loaded_share: activations whose serving server loads the expert; pinned_remote_share: served from a pinned
    copy on another server; loads_per_request: loads the plan's routing implies per request (the model: one per
    batch and layer that uses the cell); cache_bytes and pinned_bytes per server."""
    problem = with_offload(problem)
    w = problem.weight
    total = float(w.sum()) or 1.0
    pinned = _pinned_served(hosted, routing)
    home = routing == np.arange(problem.shape[0])[:, None, None]
    names = problem.server_names
    return {
        "loaded_share": float((w * ~pinned).sum()) / total,
        "pinned_remote_share": float((w * (pinned & ~home)).sum()) / total,
        "loads_per_request": float((problem.offload.touches * ~pinned).sum()) / max(problem.offload.requests, 1.0),
        "cache_bytes": dict(zip(names, offload.cache_bytes.tolist())),
        "pinned_bytes": dict(zip(names, problem.memory(hosted).tolist())),
    }
