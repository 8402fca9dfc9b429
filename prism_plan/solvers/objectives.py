"""What a placement is judged by: coverage, the latency model, replayed traffic, the simulated time to first
token, and any of them net of a cost for the bytes a re-plan moves.

Every objective gives a value for any placement (so heuristics and baselines can be compared under it) and,
where one is cheap, a bound no placement can beat; `weak_bound` marks bounds that are loose by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.layout import (activation_node_visits, balance_metrics, gpu_load, layer_node_visits,
                                         node_round_trip, node_visits)
from prism_plan.placement.metrics import route
from prism_plan.placement.migration import needed_copy_bytes
from prism_plan.placement.simulator import layer_objective, layer_serve, layer_traffic, replay_layer
from prism_plan.solvers.problem import PlacementProblem

# A value within this relative distance of its bound counts as proven optimal: the flow's only error is the
# rounding of fractional weights; MILP bounds come from floating-point LPs.
OPTIMALITY_TOLERANCE = 1e-6


def relative_gap(objective: float, bound: float | None, maximize: bool = True) -> float | None:
    """How far `objective` may be from the optimum given `bound`: (bound - objective) / |bound| when
    maximising, (objective - bound) / |objective| when minimising; 0 when they differ by under 1e-9 of the larger
    or under 1e-15 (the rounding of scaled weights, near a zero objective: objectives in seconds per token are
    small numbers), None without a bound."""
    if bound is None:
        return None
    scale = abs(bound) if maximize else abs(objective)
    if not np.isfinite(bound):  # no bound proven yet (a decomposition's start)
        return float("inf")
    if scale < 1e-15 or abs(bound - objective) <= max(1e-15, 1e-9 * max(abs(bound), abs(objective))):
        return 0.0
    return max(0.0, ((bound - objective) if maximize else (objective - bound)) / scale)


def proven_status(value: float, bound: float | None, maximize: bool = True) -> str:
    """`optimal` when `bound` proves `value` within OPTIMALITY_TOLERANCE, else `feasible`."""
    gap = relative_gap(value, bound, maximize)
    return "optimal" if gap is not None and gap <= OPTIMALITY_TOLERANCE else "feasible"


def coverage_value(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> float:
    """Activations served at their origin's server: sum of weight where hosted."""
    return float((problem.weight * hosted).sum())


def local_upper_bounds(problem: PlacementProblem) -> np.ndarray:
    """[servers]: the most activations each server can serve at home, a fractional knapsack of its own
    activations in its memory (ignoring the replica constraint). O(servers x layers x experts x log)."""
    s = problem.shape[0]
    size = problem.cell_bytes.reshape(s, -1).astype(float)
    w = problem.weight.reshape(s, -1)
    order = np.argsort(-w / size, axis=1, kind="stable")
    w_sorted = np.take_along_axis(w, order, axis=1)
    b_sorted = np.take_along_axis(size, order, axis=1)
    used_before = np.cumsum(b_sorted, axis=1) - b_sorted
    frac = np.clip((problem.budget[:, None] - used_before) / b_sorted, 0.0, 1.0)
    return (w_sorted * frac).sum(axis=1)


def coverage_upper_bound(problem: PlacementProblem) -> float:
    """A bound no placement can beat: every server serves at most its `local_upper_bounds` at home."""
    return float(local_upper_bounds(problem).sum())


def balanced_compute(problem: PlacementProblem) -> float:
    """Seconds per token no placement's compute makespans beat: every layer's activations spread over all
    servers in proportion to their speed."""
    act = problem.act_seconds
    if not act.any():
        return 0.0
    speed = (1.0 / np.where(act > 0, act, np.inf)).sum()  # activations per second, all servers together
    return float(problem.weight.sum() / speed) * problem.per_token


def latency_lower_bound(problem: PlacementProblem) -> float:
    """Seconds per token no placement beats in the latency model: the activations a server cannot serve at
    home (beyond `local_upper_bounds`) pay at least its cheapest round trip, and compute at least
    `balanced_compute`. Cheap and loose: it ignores the replica rows and every server's load."""
    s = problem.shape[0]
    if s == 1:
        return balanced_compute(problem)
    cheapest = np.where(np.eye(s, dtype=bool), np.inf, problem.round_trip).min(axis=1)
    remote = np.maximum(problem.weight.sum(axis=(1, 2)) - local_upper_bounds(problem), 0.0)
    return float(remote @ cheapest) * problem.per_token + balanced_compute(problem)


def nearest_routing(problem: PlacementProblem, hosted: np.ndarray, homes: np.ndarray | None = None) -> np.ndarray:
    """[homes, layers, experts]: the hosting server each home server's origins reach fastest (their own when
    it hosts the expert). homes: server indices (default: every server)."""
    homes = np.arange(problem.shape[0]) if homes is None else homes
    return route(hosted, homes, problem.hop_seconds)


def even_dispatch(problem: PlacementProblem) -> bool:
    """Whether the problem's serving system splits each expert's activations evenly over its copies (a layout
    with dispatch `even`) rather than sending each home server's to one copy (its routing)."""
    return problem.layout is not None and problem.layout.dispatch == "even"


def default_routing(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None) -> np.ndarray | None:
    """`routing` when given, else how the serving system routes `hosted`: the nearest replica, or None (even
    shares) under even dispatch."""
    if routing is None and not even_dispatch(problem):
        return nearest_routing(problem, hosted)
    return routing


def layer_makespan(problem: PlacementProblem, routing: np.ndarray | None, hosted: np.ndarray | None = None
                   ) -> np.ndarray:
    """seconds: [layers], the busiest server's compute time per layer over the whole profile.
    routing: [servers, layers, experts] serving server for each home server; None with `hosted` to split each
    expert's activations evenly over its copies."""
    load = gpu_load(hosted, problem.weight, routing)
    return (load * problem.act_seconds[:, None]).max(axis=0)


def activation_network(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None,
                       round_trip: np.ndarray) -> np.ndarray:
    """seconds: [layers] per token when every remote activation pays `round_trip` ([servers, servers]) from its
    home to its serving server (routing: [servers, layers, experts] serving server per home; None for even
    shares)."""
    if routing is None:
        share = hosted / np.maximum(hosted.sum(axis=0), 1)[None]  # [servers, layers, experts]
        reach = np.einsum("hs,sle->hle", round_trip, share)  # each home's expected round trip to an expert
        return (problem.weight * reach).sum(axis=(0, 2)) * problem.per_token
    home = np.arange(problem.shape[0])[:, None, None]
    return (problem.weight * round_trip[home, routing]).sum(axis=(0, 2)) * problem.per_token


def layer_latency(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(network, compute makespan), seconds per token, each [layers], of the latency model.

    Network: every remote activation pays the round trip of one hidden state to its serving server; in a slot
    layout with the token-level trace, a token pays one round trip per other node it visits in a layer and one
    per other GPU of its own node it visits (co-activated experts there share it, as DeepEP sends a token once
    to each node and once to each GPU inside its node). Makespan: per layer, the busiest server's compute time
    over the whole profile, spread over its tokens.
    routing: [servers, layers, experts] serving server for each home server (default: nearest replica, or under
    even dispatch every copy an equal share). Layers share nothing: a layout may take each layer from another
    plan, with that plan's routing there.
    """
    routing = default_routing(problem, hosted, routing)
    makespan = layer_makespan(problem, routing, hosted) * problem.per_token
    w = problem.workload
    if problem.layout is None or w is None:
        return activation_network(problem, hosted, routing, problem.round_trip), makespan
    node, home = problem.nodes, w.home[w.origin]
    across = layer_node_visits(w.experts, home, hosted, node, routing, cost=node_round_trip(problem.round_trip, node))
    return home_node_visits(problem, hosted, routing) + across, makespan


def home_node_visits(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None) -> np.ndarray:
    """seconds: [layers] per token of the trips to other GPUs of a token's home node: one round trip per GPU
    there that serves one of its experts in a layer. Node by node, each GPU of the node its own visit target
    and the rest of the cluster one target that costs nothing, so the work grows with the node, not the
    cluster."""
    w = problem.workload
    node, home = problem.nodes, w.home[w.origin]
    total = np.zeros(problem.shape[1])
    for n in range(int(node.max()) + 1):
        members = np.flatnonzero(node == n)
        mine = np.flatnonzero(node[home] == n)
        if len(members) < 2 or not len(mine):
            continue
        target = np.full(len(node), len(members))  # servers of other nodes: the free target
        target[members] = np.arange(len(members))
        cost = np.zeros((len(node), len(members) + 1))
        cost[np.ix_(members, np.arange(len(members)))] = problem.round_trip[np.ix_(members, members)]
        total += layer_node_visits(w.experts[mine], home[mine], hosted, target, routing, cost) * len(mine)
    return total / max(len(home), 1)


def latency_terms(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None):
    """(network seconds, compute makespan seconds), each per token and summed over layers (`layer_latency`)."""
    network, makespan = layer_latency(problem, hosted, routing)
    return float(network.sum()), float(makespan.sum())


def latency_value(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> float:
    """Expected MoE seconds per token under the latency model (routing: default nearest replica)."""
    return float(sum(latency_terms(problem, hosted, routing)))


def balance_value(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> float:
    """Seconds per token of the busiest server's expert compute, summed over layers (what EPLB minimises, in
    time so that faster GPUs may carry more): activations split over copies as the problem's serving system
    splits them (routing: [servers, layers, experts] serving server per home server; default nearest replica, or
    even shares under even dispatch)."""
    routing = default_routing(problem, hosted, routing)
    return float(layer_makespan(problem, routing, hosted).sum()) * problem.per_token


def serving_metrics(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> dict:
    """What a serving layout is judged by (DESIGN.md, "Objectives and metrics"): `balancedness`, `overload`,
    `cross_node_bytes_per_token` (hidden states out and back, once per other node a token visits in a layer;
    counted token by token on the problem's trace, else per activation from the tables, an upper bound, as
    `cross_node_counted` says) and `cross_node_dispatch_share` (the share of activations served on another node
    than their home's, the cross-node ratio SGLang's EPLB work reports; what the bytes are where every
    activation travels alone, as in dispatch without DeepEP's per-node forwarding). routing: [servers, layers,
    experts] serving server per home server (default nearest replica); ignored under even dispatch."""
    routing = None if even_dispatch(problem) else default_routing(problem, hosted, routing)
    metrics = balance_metrics(gpu_load(hosted, problem.weight, routing), problem.speed)
    token_bytes = problem.costs.token_bytes if problem.costs is not None else 0
    away = activation_node_visits(problem.weight, 1.0, hosted, problem.nodes, routing)  # activations off node
    activations = float(problem.weight.sum())
    share = away / activations if activations else 0.0
    w = problem.workload
    if w is not None:
        visits = node_visits(w.experts, w.home[w.origin], hosted, problem.nodes, routing)
        counted = "per token (trace)"
    else:
        visits = away / problem.tokens if problem.tokens else 0.0
        counted = "per activation (tables; co-activated experts sharing a trip not seen: an upper bound)"
    metrics.update(cross_node_bytes_per_token=2.0 * token_bytes * visits, cross_node_counted=counted,
                   cross_node_dispatch_share=share, dispatch="even" if even_dispatch(problem) else "static")
    return metrics


def _workload(problem: PlacementProblem, objective: str):
    if problem.workload is None or problem.costs is None:
        raise PrismError(f"objective {objective!r} replays the token-level trace: pass the `trace` the tables were "
                         f"built from", parameters=("trace",))
    return problem.workload, problem.costs


def replay_layers(problem: PlacementProblem, hosted: np.ndarray, objective: str, layers=None):
    """Replay the problem's workload through `hosted` with nearest-replica routing; yields
    (layer, LayerReplay) for each layer in `layers` (default all)."""
    w, costs = _workload(problem, objective)
    routing = nearest_routing(problem, hosted, w.home)
    for l in range(problem.shape[1]) if layers is None else layers:
        yield l, replay_layer(w, layer_serve(w, routing, l), costs)


def simulated_ttft_value(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> float:
    """Mean MoE seconds per request when the workload is replayed through `hosted` (the simulator's model):
    the time to first token, plus the decode steps when the trace has them."""
    return float(sum(layer_objective(problem.workload, rep)
                     for _, rep in replay_layers(problem, hosted, "simulated_ttft")))


def simulated_ttft_lower_bound(problem: PlacementProblem) -> float:
    """A bound no placement beats in the simulator: per step, origin and layer, either every activation runs
    at home (at least their compute there) or some token goes out (at least one round trip and one expert)."""
    w, _ = _workload(problem, "simulated_ttft")
    s_n = problem.shape[0]
    one_remote = np.where(np.eye(s_n, dtype=bool), np.inf,
                          problem.round_trip + problem.act_seconds[None, :]).min(axis=1)
    acts = np.bincount(w.step * len(w.origins) + w.origin, minlength=w.num_steps * len(w.origins))
    acts = acts.reshape(w.num_steps, len(w.origins)) * w.experts.shape[2]
    local = acts * problem.act_seconds[w.home][None, :]
    per_layer = np.where(acts > 0, np.minimum(local, one_remote[w.home][None, :]), 0.0)
    return float((w.pairs * per_layer).sum()) * problem.shape[1] / max(w.num_requests, 1)


def traffic_value(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> float:
    """Bytes per token crossing the network on replay: one trip out and back per token, layer and remote
    server it needs."""
    _, costs = _workload(problem, "traffic")
    return float(sum(layer_traffic(problem.workload, rep, costs)
                     for _, rep in replay_layers(problem, hosted, "traffic")))


def traffic_lower_bound(problem: PlacementProblem) -> float:
    """Bytes per token no placement beats: a trip carries at most top_k activations of one token, and at least
    (activations - the coverage bound) activations are remote."""
    w, costs = _workload(problem, "traffic")
    s, l, e = problem.shape
    k = w.experts.shape[2]
    cell = (w.home[w.origin][:, None, None] * l + np.arange(l)[None, :, None]) * e + w.experts
    weight = np.bincount(cell.ravel(), minlength=s * l * e).reshape(problem.shape).astype(float)
    remote = weight.sum() - coverage_upper_bound(replace(problem, weight=weight))
    return 2 * costs.token_bytes * max(remote, 0.0) / k / max(w.num_tokens, 1)


@dataclass(frozen=True)
class Objective:
    """How placements are scored: value(problem, hosted, routing=None), its direction, units, a cheap bound
    if any, and whether that bound is weak by construction (far from the optimum on real problems)."""

    name: str
    maximize: bool
    measure: str
    value: Callable[..., float]
    bound: Callable[[PlacementProblem], float] | None = None
    weak_bound: bool = False


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("coverage", True, "activations served at their origin's server", coverage_value,
              coverage_upper_bound),
    Objective("latency", False, "expected MoE seconds per token (latency model)", latency_value,
              latency_lower_bound, weak_bound=True),
    Objective("balance", False, "busiest server's expert compute seconds per token, summed over layers",
              balance_value, balanced_compute),
    Objective("traffic", False, "network bytes per token (replayed trace)", traffic_value, traffic_lower_bound,
              weak_bound=True),
    Objective("simulated_ttft", False, "simulated mean MoE seconds per request (replayed trace)",
              simulated_ttft_value, simulated_ttft_lower_bound, weak_bound=True),
)}


def get_objective(name: str) -> Objective:
    """An objective by name; a PrismError listing the names otherwise."""
    if name not in OBJECTIVES:
        raise PrismError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}",
                         parameters=("objective",))
    return OBJECTIVES[name]


def activation_value(problem: PlacementProblem, objective: str) -> float:
    """What serving one more activation at home instead of remotely is worth in `objective`'s units: one
    activation (coverage), one mean round trip spread over the tokens (latency, seconds per token), or one
    activation's compute at the mean server spread over the tokens (balance)."""
    if objective == "balance":
        return float(problem.act_seconds.mean()) * problem.per_token
    if objective != "latency":
        return 1.0
    s = problem.shape[0]
    rtt = problem.round_trip[~np.eye(s, dtype=bool)]
    return float(rtt.mean()) * problem.per_token if len(rtt) else 0.0


@dataclass(frozen=True)
class MoveTerms:
    """What a re-plan pays for moving: the current placement ([servers, layers, experts] bool), objective
    units per byte copied, and the most bytes that may be copied (None: no limit)."""

    current: np.ndarray
    cost_per_byte: float = 0.0
    budget_bytes: int | None = None
    # priced_bytes of the last problem asked about: a budget's bisection prices every step of one problem.
    _priced: dict = field(default_factory=dict, compare=False, repr=False)

    def copy_bytes(self, problem: PlacementProblem) -> np.ndarray:
        """bytes: [servers, layers, experts] float64, what hosting each cell costs to copy (0 where it is)."""
        return np.where(self.current, 0, problem.cell_bytes).astype(float)

    def priced_bytes(self, problem: PlacementProblem) -> np.ndarray:
        """[servers, layers, experts] float64, `copy_bytes` weighted by how much slower than the cluster's fastest
        link the copy comes from its fastest current holder: with nodes, a copy over RDMA costs more than one over
        NVLink; without, every byte the same."""
        copy = self.copy_bytes(problem)
        if problem.node is None or problem.cluster is None:
            return copy
        seen = self._priced.get(id(problem))
        if seen is not None and seen[0] is problem:
            return seen[1]
        bandwidth = problem.cluster.bandwidth
        best = np.zeros(problem.shape)
        for src in range(problem.shape[0]):
            np.maximum(best, self.current[src][None] * np.where(np.isinf(bandwidth[src]), 0.0, bandwidth[src])
                       [:, None, None], out=best)
        fastest = float(np.where(np.isinf(bandwidth), 0.0, bandwidth).max())
        priced = copy * fastest / np.where(best > 0, best, fastest)
        self._priced.clear()
        self._priced[id(problem)] = (problem, priced)
        return priced

    def copied(self, problem: PlacementProblem, hosted: np.ndarray) -> int:
        """Bytes that must arrive somewhere new to go from the current placement to `hosted`."""
        return needed_copy_bytes(self.current, hosted, problem.layer_bytes)

    def price(self, problem: PlacementProblem, hosted: np.ndarray) -> float:
        """What going from the current placement to `hosted` costs in objective units: cost_per_byte x the
        `priced_bytes` of every new cell."""
        return self.cost_per_byte * float((self.priced_bytes(problem) * hosted).sum()) if self.cost_per_byte else 0.0

    def within_budget(self, problem: PlacementProblem, hosted: np.ndarray) -> bool:
        return self.budget_bytes is None or self.copied(problem, hosted) <= self.budget_bytes

    def in_units_of(self, problem: PlacementProblem, objective: str, target: str) -> "MoveTerms":
        """The same terms with the cost, given in `objective`'s units, converted to `target`'s."""
        value = activation_value(problem, objective)
        per_byte = self.cost_per_byte * activation_value(problem, target) / value if value else 0.0
        return replace(self, cost_per_byte=per_byte)


def with_moves(objective: Objective, moves: MoveTerms) -> Objective:
    """`objective` net of the move cost: value - cost x copied when maximising, value + cost x copied when
    minimising. The plain objective's bound stays valid: a cost only moves the value away from it."""
    sign = -1.0 if objective.maximize else 1.0

    def net(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None) -> float:
        return objective.value(problem, hosted, routing) + sign * moves.price(problem, hosted)

    joined = "minus" if objective.maximize else "plus"
    return Objective(objective.name, objective.maximize, f"{objective.measure}, {joined} move cost x bytes copied",
                     net, objective.bound, objective.weak_bound)


def net_objective(name: str, moves: MoveTerms | None) -> Objective:
    """The objective `name`, net of the move cost when `moves` are given."""
    objective = get_objective(name)
    return objective if moves is None else with_moves(objective, moves)
