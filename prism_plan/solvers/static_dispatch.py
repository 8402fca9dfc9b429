"""Slot layouts under static dispatch: each home server's tokens of an expert go to one copy the plan's routing
names, so a hot expert with a copy in every node that uses it sends no token across nodes. Per layer:

1. Nodes. Each node holds a set of distinct experts, its slots less `spare` ones kept for second copies,
   every expert on at least min_replicas nodes, maximising the activations its own origins find inside it: the
   exact node-level coverage optimum, `solve_flow` over nodes (`node_experts`).
2. GPUs. Each node's spare slots go to its experts with the most load per copy, remote origins' load shared
   among the nodes holding an expert, and the copies are packed for balance (`node_copy_counts`,
   `place_copies`).
3. Routing, SGLang's nearest-copy rule (a copy on the home GPU, else one in the home node, else any), with the
   choice among equally near copies made for balance (`balanced_routing`).

The fewest spare slots (`spare_ladder`) whose layer overload is within `overload_slack` of the reference's is
kept; a layer none meets keeps the reference with nearest routing (`static_plan`, called by
`topology.plan_topology`). `static_balance_routing` balances any layout's GPUs by the routing alone.
"""

from __future__ import annotations

import numpy as np

from prism_plan.placement.layout import balance_metrics, by_node, gpu_load
from prism_plan.solvers.balance import fewest_largest_pieces, pack
from prism_plan.solvers.coverage import solve_flow
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.problem import PlacementProblem

# Static dispatch: the spare-slot levels tried per layer, and the routing moves off the busiest GPU per layout.
SPARE_LEVELS = 12
ROUTING_MOVES = 2000
# A routing move must lower the busiest GPU's time by this share: float noise is no progress.
ROUTING_IMPROVEMENT = 1e-9


def spare_ladder(capacity: np.ndarray, slots: int, experts: int, min_replicas: int) -> list[np.ndarray]:
    """The [nodes] int counts of slots each node gives to second copies, fewest first: a node of `capacity` slots
    holds between `slots` (its GPUs hold distinct experts) and `experts` distinct ones, and the nodes together
    min_replicas x experts; between the fewest spares and the most the cluster allows, SPARE_LEVELS steps of
    an equal share of every node's slots. Empty when no such counts exist."""
    low = np.maximum(capacity - experts, 0)
    high = capacity - slots
    if min_replicas > len(capacity):  # a node holds an expert once in the node-level coverage
        return []
    room = int((capacity - low).sum()) - min_replicas * experts  # distinct copies the cluster may give up
    if room < 0 or (low > high).any():
        return []
    ladder, seen = [], set()
    for share in np.linspace(0.0, 1.0, SPARE_LEVELS):
        spare = np.minimum(low + np.floor(share * (high - low)).astype(np.int64), high)
        while (spare - low).sum() > room:  # trim the largest nodes' extras until the cluster keeps enough
            spare[np.argmax(spare - low)] -= 1
        if tuple(spare) not in seen:
            seen.add(tuple(spare))
            ladder.append(spare)
    return ladder


def node_experts(demand: np.ndarray, distinct: np.ndarray, min_replicas: int) -> np.ndarray:
    """[nodes, experts] bool: which experts each node holds, `distinct` [nodes] of them, every expert on at least
    min_replicas nodes, maximising the activations its own origins find inside their node (demand: [nodes,
    experts]); the exact node-level coverage optimum, `solve_flow` over nodes."""
    held, _ = solve_flow(demand, distinct.astype(np.int64), min_replicas)
    return held


def node_copy_counts(load: np.ndarray, held: np.ndarray, capacity: np.ndarray, gpus: np.ndarray) -> np.ndarray:
    """[nodes, experts] int: copies of each held expert in its node, one each and the node's spare slots one at a
    time to the expert with the largest load per copy there, at most one per GPU (`fewest_largest_pieces`).
    load: [nodes, experts] activations each node's copies are expected to serve."""
    count = np.zeros(held.shape, np.int64)
    for n in range(len(capacity)):
        mine = np.flatnonzero(held[n])
        count[n, mine] = fewest_largest_pieces(load[n, mine][None, :], int(gpus[n]), int(capacity[n]) // int(gpus[n]),
                                               1)[0]
    return count


def expected_load(weight: np.ndarray, node: np.ndarray, held: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """[nodes, experts]: the activations each node's copies of an expert serve: its own origins' where it holds the
    expert, plus the remote origins' shared among the holding nodes by their GPU speed."""
    demand = by_node(weight, node)
    node_speed = np.bincount(node, speed, minlength=held.shape[0])[:, None] * held
    remote = (demand * ~held).sum(axis=0)  # [experts]: activations from nodes without a copy
    return demand * held + remote[None, :] * node_speed / np.maximum(node_speed.sum(axis=0), 1e-300)


def place_copies(load: np.ndarray, count: np.ndarray, node: np.ndarray, speed: np.ndarray, slots: int
                 ) -> np.ndarray:
    """[servers, experts] bool: each node's copies packed onto its GPUs as even pieces of `load` (`pack`), exactly
    `slots` distinct experts per GPU. load, count: [nodes, experts]."""
    hosted = np.zeros((len(node), load.shape[1]), bool)
    for n in range(load.shape[0]):
        mine, gpus = np.flatnonzero(count[n]), np.flatnonzero(node == n)
        host = pack(load[n, mine][None, :], speed[gpus], count[n, mine][None, :], slots)[0]
        hosted[np.ix_(gpus, mine)] = host
    return hosted


def allowed_servers(hosted: np.ndarray, node: np.ndarray) -> np.ndarray:
    """[homes, experts, servers] bool: the copies each home server may use under nearest routing, SGLang's rule:
    its own, else any in its node, else any. hosted: [servers, experts]."""
    same = node[:, None] == node[None, :]  # [homes, servers]
    own = np.eye(len(node), dtype=bool)[:, None, :] & hosted.T[None]
    in_node = same[:, None, :] & hosted.T[None]
    anywhere = np.broadcast_to(hosted.T[None], in_node.shape)
    return np.where(own.any(axis=2, keepdims=True), own,
                    np.where(in_node.any(axis=2, keepdims=True), in_node, anywhere))


def balanced_routing(hosted: np.ndarray, weight: np.ndarray, node: np.ndarray, speed: np.ndarray,
                     deadline: Deadline) -> np.ndarray:
    """[homes, experts] int: the copy each home server's activations of each expert go to, within
    `allowed_servers`, chosen to balance the GPUs' time (load / speed): every home's forced choices, then the
    others largest first onto the least busy allowed copy (LPT), then moves off the busiest GPU while one helps.
    hosted: [servers, experts]; weight: [homes, experts] activations."""
    allowed = allowed_servers(hosted, node)
    choices = allowed.sum(axis=2)
    routing = np.argmax(allowed, axis=2)  # the only copy where there is one choice (experts without demand: any)
    load = np.bincount(routing.ravel(), (weight * (choices == 1)).ravel(), minlength=len(node))
    free = np.argwhere((choices > 1) & (weight > 0))
    for h, e in free[np.argsort(-weight[free[:, 0], free[:, 1]], kind="stable")]:
        options = np.flatnonzero(allowed[h, e])
        g = options[np.argmin((load[options] + weight[h, e]) / speed[options])]
        routing[h, e] = g
        load[g] += weight[h, e]
    improve_routing(routing, load, allowed, weight, speed, free, deadline)
    return routing


def improve_routing(routing: np.ndarray, load: np.ndarray, allowed: np.ndarray, weight: np.ndarray,
                    speed: np.ndarray, free: np.ndarray, deadline: Deadline) -> None:
    """Move one free (home, expert) choice at a time off the busiest GPU to the allowed copy that leaves the pair
    least busy, while that lowers the busiest time (routing and load updated in place). free: [pairs, 2]."""
    for _ in range(ROUTING_MOVES):
        if deadline.expired() or not len(free):
            return
        b = int(np.argmax(load / speed))
        mine = free[routing[free[:, 0], free[:, 1]] == b]
        if not len(mine):
            return
        w = weight[mine[:, 0], mine[:, 1]]
        after = np.where(allowed[mine[:, 0], mine[:, 1]], (load[None, :] + w[:, None]) / speed[None, :], np.inf)
        after[:, b] = np.inf
        g = np.argmin(after, axis=1)
        worst = np.maximum(after[np.arange(len(mine)), g], (load[b] - w) / speed[b])
        i = int(np.argmin(worst))
        if worst[i] >= load[b] / speed[b] * (1.0 - ROUTING_IMPROVEMENT):
            return
        h, e = mine[i]
        routing[h, e] = g[i]
        load[b] -= w[i]
        load[g[i]] += w[i]


def static_layer(problem: PlacementProblem, layer: int, spare: np.ndarray, deadline: Deadline
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(hosted [servers, experts], routing [homes, experts]) of one layer under static dispatch: the node-level
    coverage optimum with `spare` [nodes] slots of each node kept for second copies (`node_experts`), the copies
    counted and packed for balance (`node_copy_counts`, `place_copies`) and the routing balanced
    (`balanced_routing`)."""
    node, speed = problem.nodes, problem.speed
    slots = problem.layout.slots_per_layer
    weight = problem.weight[:, layer]
    gpus = np.bincount(node)
    capacity = gpus * slots
    held = node_experts(by_node(weight, node), capacity - spare, problem.min_replicas)
    load = expected_load(weight, node, held, speed)
    hosted = place_copies(load, node_copy_counts(load, held, capacity, gpus), node, speed, slots)
    return hosted, balanced_routing(hosted, weight, node, speed, deadline)


def routed_overload(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray, layer: int) -> float:
    """(max - mean) / mean GPU time of one layer under `routing` ([homes, experts]); hosted: [servers, experts]."""
    load = gpu_load(hosted[:, None, :], problem.weight[:, layer:layer + 1], routing[:, None, :])
    return balance_metrics(load, problem.speed)["overload"]


def remote_activations(problem: PlacementProblem, routing: np.ndarray, layer: int) -> float:
    """Activations of one layer served on another node than their home's. routing: [homes, experts]."""
    node = problem.nodes
    return float((problem.weight[:, layer] * (node[routing] != node[:, None])).sum())


def static_plan(problem: PlacementProblem, plan, overload_slack: float, deadline: Deadline) -> None:
    """Fill `plan` (a topology.TopologyPlan: hosted and routing, starting as the reference with nearest routing)
    layer by layer with the static-dispatch layout of the fewest spare slots (`spare_ladder`) whose overload is
    at most the reference layer's plus `overload_slack`; a layer none meets, or the deadline leaves unplanned,
    keeps the reference."""
    s, layers, e = problem.shape
    node = problem.nodes
    ladder = spare_ladder(np.bincount(node) * problem.layout.slots_per_layer, problem.layout.slots_per_layer, e,
                          problem.min_replicas)
    for layer in range(layers):
        if deadline.expired() or not ladder:
            return
        allowed = routed_overload(problem, plan.hosted[:, layer], plan.routing[:, layer], layer) + overload_slack
        step = deadline.split(1.0 / (layers - layer))
        for i, spare in enumerate(ladder):
            hosted, routing = static_layer(problem, layer, spare, step.split(1.0 / (len(ladder) - i)))
            if routed_overload(problem, hosted, routing, layer) <= allowed:
                plan.hosted[:, layer], plan.routing[:, layer] = hosted, routing
                plan.reference[layer], plan.cap_share[layer] = False, float(i) / max(len(ladder) - 1, 1)
                break
            if step.expired():
                break


def static_balance_routing(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline = UNLIMITED
                           ) -> np.ndarray:
    """[servers, layers, experts] int: under static dispatch, the copy each home server's activations of each
    expert go to so that every layer's GPUs are balanced (`balanced_routing` with the whole cluster as one
    node: a home that holds the expert serves it itself, the others may use any copy)."""
    s, layers, _ = problem.shape
    one_node = np.zeros(s, np.int64)
    routing = np.empty(problem.shape, np.int64)
    for layer in range(layers):
        routing[:, layer] = balanced_routing(hosted[:, layer], problem.weight[:, layer], one_node, problem.speed,
                                             deadline.split(1.0 / (layers - layer)))
    return routing
