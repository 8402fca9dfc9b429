"""`topology`: a serving layout (equal slots per GPU and MoE layer) that keeps tokens inside their home node
while keeping every GPU's load close to a balance-only plan's.

Per MoE layer (layers share nothing), in two levels:

1. Nodes. Every expert goes, with all of its copies, to one node: under even dispatch a token then visits a
   node only if one of its experts lives there, and co-activated experts and the experts hot for a node's
   origins placed on that node save whole trips (DeepEP sends one copy of a token per node). Limits per node:
   its slots (GPUs x slots_per_layer) and the pieces its experts need, and a load cap, (1 + eps) x the node's
   share of the layer's load by GPU speed. The cost is node visits, or for the latency objective visits x a
   cross-node round trip plus the intra-node round trips of the activations served in their home node
   (`prices`). A greedy start (heaviest expert first, each onto the node where it adds the least cost) is
   improved by local search: move an expert to another node, or swap two experts between nodes, judged exactly
   and incrementally on a token sample (token x node counts).
2. GPUs. Each node's experts are replicated and packed onto its GPUs for balance (`pack_nodes`).

A layer whose busiest GPU ends up further than `overload_slack` above the balance-only plan's (the reference,
by default `solve_balance` over all GPUs) is planned again with a tighter load cap, and keeps the reference when
that fails too. For the latency objective, each layer then takes whichever of this layout, the reference and any
other layouts given (`exact` gives EPLB's) is fastest in the full latency model (`keep_faster_layers`), whatever
its overload: the model weighs the busiest GPU against the trips itself.
Without the token-level trace, node visits are estimated from the tables: activations served on another node,
less the co-activated pairs (`coact`) that share a trip there. Under static dispatch the layout is made
differently: `prism_plan.solvers.static_dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.layout import balance_metrics, by_node, gpu_load, node_round_trip
from prism_plan.placement.metrics import route
from prism_plan.solvers.balance import fewest_largest_pieces, pack, solve_balance
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.eplb import node_major_position
from prism_plan.solvers.objectives import default_routing, even_dispatch, layer_latency
from prism_plan.solvers.problem import PlacementProblem
from prism_plan.solvers.static_dispatch import static_balance_routing, static_plan

# Tokens of the trace the node search judges moves on; the plan is scored on the whole trace afterwards.
SAMPLE_TOKENS = 8000
# How far above the reference plan's overload a layer may go, in overload units ((max - mean) / mean).
OVERLOAD_SLACK = 0.03
# The node load caps tried per layer, as shares of the layer's allowed overload: a node exactly at its cap
# leaves no room for the packing inside it, so the first cap is below the allowance.
CAP_SHARES = (0.5, 0.25, 0.0)
# A move must save at least this many node visits per token: float noise is no progress.
MIN_GAIN = 1e-12
# Iterated local search: kicks per layer and node layout, and random swaps per kick.
KICKS = 6
KICK_SWAPS = 4
# What the node search may minimise (`prices`).
OBJECTIVES = ("latency", "cross_node")
# Swap candidates checked exactly per pair of nodes and round, best estimated first.
SWAP_CANDIDATES = 8


@dataclass
class TopologyPlan:
    """A topology layout and its evidence.

    hosted: [servers, layers, experts] bool, exactly slots_per_layer experts per server and layer;
    reference: [layers] bool, the layers that kept the balance-only plan (no node layout met the overload
    limit, or it was faster); cap_share: [layers] the share of the allowed overload the node load cap took, or
    under static dispatch the share of the spare-slot ladder (`spare_ladder`) the layer took (nan where the
    reference or another layout given was kept); moves: node moves and swaps made, over all layers; routing:
    [servers, layers, experts] int, the serving server of each home server's activations (static dispatch; None
    under even dispatch)."""

    hosted: np.ndarray
    reference: np.ndarray
    cap_share: np.ndarray
    moves: dict = field(default_factory=lambda: {"moves": 0, "swaps": 0})
    routing: np.ndarray | None = None


# ------------------------------------------------------------------------------------------ node visit models


class TokenVisits:
    """Node visits per token of a token sample in one layer, with every expert on one node: a token visits
    each node other than its home's that holds one of its experts.

    experts: [tokens, top_k] expert ids; home: [tokens] home node; num_nodes, num_experts. Costs are visits per
    token x `visit_price` plus `linear` [experts, nodes], a cost of each expert on each node (default none)."""

    def __init__(self, experts: np.ndarray, home: np.ndarray, num_nodes: int, num_experts: int,
                 visit_price: float = 1.0, linear: np.ndarray | None = None) -> None:
        tokens, k = experts.shape
        self.linear = np.zeros((num_experts, num_nodes)) if linear is None else linear
        self.away = np.ones((tokens, num_nodes), bool)
        self.away[np.arange(tokens), home] = False
        self.scale = visit_price / max(tokens, 1)
        self.inc_expert = experts.ravel().astype(np.int64)
        self.inc_token = np.repeat(np.arange(tokens), k)
        order = np.argsort(self.inc_expert, kind="stable")
        self.token_of = self.inc_token[order]  # tokens of each expert, contiguous and ascending
        self.start = np.searchsorted(self.inc_expert[order], np.arange(num_experts + 1))
        self.count = np.zeros((tokens, num_nodes), np.int32)  # experts of each token on each node
        self.node = np.full(num_experts, -1, np.int64)

    def _tokens(self, e: int) -> np.ndarray:
        return self.token_of[self.start[e]:self.start[e + 1]]

    def add_costs(self, e: int) -> np.ndarray:
        """[nodes]: the cost that placing the unplaced expert `e` on each node adds."""
        rows = self._tokens(e)
        return ((self.count[rows] == 0) & self.away[rows]).sum(axis=0) * self.scale + self.linear[e]

    def place(self, e: int, n: int) -> None:
        rows = self._tokens(e)
        if self.node[e] >= 0:
            self.count[rows, self.node[e]] -= 1
        self.count[rows, n] += 1
        self.node[e] = n

    def move_gain(self, e: int, b: int) -> float:
        """The cost saved by moving placed expert `e` to node `b` (0 to its own)."""
        rows, a = self._tokens(e), self.node[e]
        if a == b:
            return 0.0
        lost = ((self.count[rows, a] == 1) & self.away[rows, a]).sum()
        made = ((self.count[rows, b] == 0) & self.away[rows, b]).sum()
        return float(lost - made) * self.scale + float(self.linear[e, a] - self.linear[e, b])

    def gains(self) -> np.ndarray:
        """[experts, nodes]: `move_gain` of every expert to every node (0 to its own), all at once."""
        lose = (self.count == 1) & self.away
        made = (self.count == 0) & self.away
        saved = lose[self.inc_token, self.node[self.inc_expert]][:, None].astype(np.int64) - made[self.inc_token]
        n_exp, n_nodes = len(self.node), self.away.shape[1]
        g = np.stack([np.bincount(self.inc_expert, saved[:, n], minlength=n_exp) for n in range(n_nodes)], axis=1)
        own = self.linear[np.arange(n_exp), self.node]
        g = g * self.scale + own[:, None] - self.linear
        g[np.arange(n_exp), self.node] = 0.0
        return g

    def cost(self) -> float:
        """The sample's cost: visits per token x visit_price, plus the linear costs."""
        e = np.arange(len(self.node))
        return float(((self.count > 0) & self.away).sum()) * self.scale + float(self.linear[e, self.node].sum())


class TableVisits:
    """Node visits per token estimated from the tables, with every expert on one node: the activations served
    on another node than their home's, less one for each co-activated pair that shares such a node (a first-order
    count of the trips shared; exact when no three experts of a token share a node).

    node_demand: [nodes, experts] activations per token from each node's origins; coact: [experts, experts]
    tokens per token in which both fired; home_share: [nodes] the share of the tokens each node's origins send.
    Costs are visits x `visit_price` plus `linear` [experts, nodes], as in TokenVisits."""

    def __init__(self, node_demand: np.ndarray, coact: np.ndarray, home_share: np.ndarray, visit_price: float = 1.0,
                 linear: np.ndarray | None = None) -> None:
        away = node_demand.sum(axis=0)[None, :] - node_demand  # [nodes, experts]: activations from elsewhere
        # away_demand: the cost of each expert on each node before shared trips.
        self.away_demand = visit_price * away + (0.0 if linear is None else linear.T)
        self.coact = visit_price * (coact - np.diag(np.diag(coact)))
        self.keep = 1.0 - home_share  # a shared pair saves a trip only for tokens not from that node
        self.on = np.zeros((coact.shape[0], len(home_share)))
        self.node = np.full(coact.shape[0], -1, np.int64)

    def add_costs(self, e: int) -> np.ndarray:
        """[nodes]: estimated visits per token that `e` brings to each node, given the other placed experts."""
        return self.away_demand[:, e] - (self.coact[e] @ self.on) * self.keep  # coact's diagonal is 0

    def place(self, e: int, n: int) -> None:
        if self.node[e] >= 0:
            self.on[e, self.node[e]] = 0.0
        self.on[e, n] = 1.0
        self.node[e] = n

    def move_gain(self, e: int, b: int) -> float:
        c = self.add_costs(e)
        return float(c[self.node[e]] - c[b])

    def gains(self) -> np.ndarray:
        cost = self.away_demand.T - (self.coact @ self.on) * self.keep[None, :]  # [experts, nodes]
        return cost[np.arange(len(self.node)), self.node][:, None] - cost

    def cost(self) -> float:
        e = np.arange(len(self.node))
        shared = float(((self.coact @ self.on) * self.on * self.keep[None, :]).sum()) / 2.0
        return float(self.away_demand[self.node, e].sum()) - shared


def swap_gain(model, e: int, f: int) -> float:
    """Visits per token saved by swapping the nodes of placed experts `e` and `f` (two moves, undone)."""
    a, b = int(model.node[e]), int(model.node[f])
    first = model.move_gain(e, b)
    model.place(e, b)
    second = model.move_gain(f, a)
    model.place(e, a)
    return first + second


# ------------------------------------------------------------------------------------------ node limits


@dataclass
class NodeLimits:
    """One layer's node limits and what the assignment uses of them, per node: slots (GPUs x slots_per_layer),
    gpus, cap (load, activations), lo/hi (fewest and most experts: each expert has at most `gpus` and at least
    min_replicas copies there); load, pieces (sum of each expert's `need`) and experts as assigned."""

    slots: np.ndarray
    gpus: np.ndarray
    cap: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    load: np.ndarray
    pieces: np.ndarray
    experts: np.ndarray

    def fits(self, n: int, d_add: float, need_add: int, count_add: int) -> bool:
        """Whether node `n` stays within its limits after the change (a change that sheds load always passes the
        load cap, so a node past it may still improve)."""
        load_ok = self.load[n] + d_add <= self.cap[n] or d_add <= 0
        count_ok = self.experts[n] + count_add <= self.hi[n] if count_add > 0 else \
            self.experts[n] + count_add >= self.lo[n]
        return bool(load_ok and count_ok and self.pieces[n] + need_add <= self.slots[n])

    def shift(self, n: int, d_add: float, need_add: int, count_add: int) -> None:
        self.load[n] += d_add
        self.pieces[n] += need_add
        self.experts[n] += count_add


def node_limits(node: np.ndarray, speed: np.ndarray, slots: int, min_replicas: int, total: float,
                cap_eps: float) -> NodeLimits:
    """The empty assignment's limits for a layer of `total` activations: node [servers] index, speed [servers]."""
    n_nodes = int(node.max()) + 1
    gpus = np.bincount(node, minlength=n_nodes)
    fair = total * np.bincount(node, speed, minlength=n_nodes) / speed.sum()
    zeros = np.zeros(n_nodes)
    return NodeLimits(gpus * slots, gpus, fair * (1.0 + cap_eps), np.full(n_nodes, slots), gpus * slots // min_replicas,
                      zeros, np.zeros(n_nodes, np.int64), np.zeros(n_nodes, np.int64))


def expert_need(demand: np.ndarray, node: np.ndarray, speed: np.ndarray, min_replicas: int,
                allowed: float) -> np.ndarray:
    """[experts] int: copies each expert needs so that none carries more than a fair GPU's load x (1 + allowed)
    (so a node's packing can reach the target), at least min_replicas and at most the smallest node's GPUs."""
    per_gpu = demand.sum() / speed.sum() * speed.min() * (1.0 + allowed)
    need = np.ceil(demand / max(per_gpu, 1e-300)).astype(np.int64)
    return np.clip(need, min_replicas, np.bincount(node).min())


# ------------------------------------------------------------------------------------------ node search


def greedy_nodes(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits) -> None:
    """Place every expert, heaviest first, on the node within its limits where it adds the least cost (most
    load room on a tie), keeping enough experts back for nodes below their fewest. An expert that fits nowhere
    goes where the load room is largest (the layer's overload check then judges the result)."""
    left = len(demand)
    for e in np.argsort(-demand, kind="stable"):
        left -= 1
        short = np.maximum(lim.lo - lim.experts, 0)
        # When the experts still to come cannot fill every node below its fewest, this one goes to such a node.
        must = short > 0 if short.sum() > left else np.ones(len(short), bool)
        fit = must & np.array([lim.fits(n, demand[e], need[e], 1) for n in range(len(lim.slots))])
        if fit.any():
            cost = np.where(fit, model.add_costs(e), np.inf)
            best = np.flatnonzero(cost <= cost.min() + MIN_GAIN)
        else:
            best = np.flatnonzero(must & (lim.experts < lim.hi))
        n = int(best[np.argmax((lim.cap - lim.load)[best])])
        model.place(e, n)
        lim.shift(n, demand[e], need[e], 1)


def _try_moves(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits, gains: np.ndarray) -> int:
    """Apply the improving single moves, best estimated first, each checked exactly against the state as it
    stands when its turn comes. Returns how many were made."""
    made = 0
    cand = np.argwhere(gains > MIN_GAIN)
    for e, b in cand[np.argsort(-gains[cand[:, 0], cand[:, 1]], kind="stable")]:
        a = int(model.node[e])
        if a == b or not (lim.fits(b, demand[e], need[e], 1) and lim.fits(a, -demand[e], -need[e], -1)):
            continue
        if model.move_gain(e, b) > MIN_GAIN:
            model.place(e, b)
            lim.shift(a, -demand[e], -need[e], -1)
            lim.shift(b, demand[e], need[e], 1)
            made += 1
    return made


def _try_swaps(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits, gains: np.ndarray) -> int:
    """For each pair of nodes, the best estimated swaps within their limits, checked exactly; at most one
    applied per pair. Returns how many were made."""
    made = 0
    n_nodes = len(lim.slots)
    for a in range(n_nodes):
        for b in range(a + 1, n_nodes):
            ea, eb = np.flatnonzero(model.node == a), np.flatnonzero(model.node == b)
            if not len(ea) or not len(eb):
                continue
            score = gains[ea, b][:, None] + gains[eb, a][None, :]  # ignores tokens holding both: checked below
            shift = demand[eb][None, :] - demand[ea][:, None]  # load node a takes on
            pieces = need[eb][None, :] - need[ea][:, None]
            ok = ((lim.load[a] + shift <= lim.cap[a]) | (shift <= 0)) & ((lim.load[b] - shift <= lim.cap[b])
                                                                         | (shift >= 0))
            ok &= (lim.pieces[a] + pieces <= lim.slots[a]) & (lim.pieces[b] - pieces <= lim.slots[b])
            score = np.where(ok & (score > MIN_GAIN), score, -np.inf).ravel()
            for i in np.argsort(-score, kind="stable")[:SWAP_CANDIDATES]:
                if not np.isfinite(score[i]):
                    break
                e, f = ea[i // len(eb)], eb[i % len(eb)]
                if swap_gain(model, e, f) > MIN_GAIN:
                    model.place(e, b)
                    model.place(f, a)
                    lim.shift(a, shift.flat[i], int(pieces.flat[i]), 0)
                    lim.shift(b, -shift.flat[i], -int(pieces.flat[i]), 0)
                    made += 1
                    break
    return made


def improve_nodes(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits, deadline: Deadline,
                  moves: dict) -> None:
    """Local search on the node assignment: improving moves, then swaps when no move helps, until neither does
    or the deadline."""
    while not deadline.expired():
        gains = model.gains()
        made = _try_moves(model, demand, need, lim, gains)
        moves["moves"] += made
        if made:
            continue
        swapped = _try_swaps(model, demand, need, lim, gains)
        moves["swaps"] += swapped
        if not swapped:
            return


def _assign(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits, assign: np.ndarray) -> None:
    """Put the model and the limits' usage at the node assignment `assign` ([experts])."""
    for e in np.flatnonzero(model.node != assign):
        model.place(int(e), int(assign[e]))
    n = len(lim.slots)
    lim.load[:] = np.bincount(assign, demand, minlength=n)
    lim.pieces[:] = np.bincount(assign, need, minlength=n)
    lim.experts[:] = np.bincount(assign, minlength=n)


def _kick(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits, rng: np.random.Generator) -> None:
    """Random swaps of experts between nodes, within the limits: a step out of a local optimum."""
    for _ in range(KICK_SWAPS):
        e, f = rng.choice(len(demand), 2, replace=False)
        a, b = int(model.node[e]), int(model.node[f])
        shift, pieces = demand[f] - demand[e], int(need[f] - need[e])
        if a != b and lim.fits(a, shift, pieces, 0) and lim.fits(b, -shift, -pieces, 0):
            model.place(int(e), b)
            model.place(int(f), a)
            lim.shift(a, shift, pieces, 0)
            lim.shift(b, -shift, -pieces, 0)


def shed_load(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits) -> None:
    """Bring nodes past their load cap under it: move, one at a time, the expert of such a node whose move to a
    node with room costs least, until none is past its cap or no move is left."""
    while (lim.load > lim.cap).any():
        gains = model.gains()
        best, pick = -np.inf, None
        for a in np.flatnonzero(lim.load > lim.cap):
            for e in np.flatnonzero(model.node == a):
                if not lim.fits(a, -demand[e], -need[e], -1):
                    continue
                for b in range(len(lim.slots)):
                    if b != a and lim.load[b] + demand[e] <= lim.cap[b] and lim.fits(b, demand[e], need[e], 1) \
                            and gains[e, b] > best:
                        best, pick = gains[e, b], (int(e), int(a), b)
        if pick is None:
            return
        e, a, b = pick
        model.place(e, b)
        lim.shift(a, -demand[e], -need[e], -1)
        lim.shift(b, demand[e], need[e], 1)


def search_nodes(model, demand: np.ndarray, need: np.ndarray, lim: NodeLimits, deadline: Deadline, moves: dict,
                 rng: np.random.Generator) -> None:
    """Iterated local search: `improve_nodes`, then up to KICKS times a `_kick` and `improve_nodes` again,
    keeping the best assignment found."""
    improve_nodes(model, demand, need, lim, deadline, moves)
    best, best_cost = model.node.copy(), model.cost()
    for _ in range(KICKS):
        if deadline.expired():
            break
        _kick(model, demand, need, lim, rng)
        improve_nodes(model, demand, need, lim, deadline, moves)
        if model.cost() < best_cost - MIN_GAIN:
            best, best_cost = model.node.copy(), model.cost()
    _assign(model, demand, need, lim, best)


# ------------------------------------------------------------------------------------------ GPUs in a node


def pack_nodes(demand: np.ndarray, assign: np.ndarray, node: np.ndarray, speed: np.ndarray, slots: int,
               min_replicas: int, deadline: Deadline) -> np.ndarray:
    """[servers, experts] bool: each node's experts replicated and packed onto its GPUs (exactly `slots` per GPU):
    EPLB's start (`fewest_largest_pieces`, then `pack`), improved by `solve_balance`'s local search from it.
    demand: [experts]; assign: [experts] node of each; node, speed: [servers]."""
    hosted = np.zeros((len(node), len(demand)), bool)
    n_nodes = int(node.max()) + 1
    for n in range(n_nodes):
        mine, gpus = np.flatnonzero(assign == n), np.flatnonzero(node == n)
        d = demand[mine][None, :]
        start = pack(d, speed[gpus], fewest_largest_pieces(d, len(gpus), slots, min_replicas), slots)
        result = solve_balance(d, speed[gpus], slots, min_replicas, current=start.transpose(1, 0, 2),
                               deadline=deadline.split(1.0 / (n_nodes - n)))
        hosted[np.ix_(gpus, mine)] = result.hosted[:, 0, :]
    return hosted


def layer_overload(problem: PlacementProblem, hosted_layer: np.ndarray, layer: int) -> float:
    """(max - mean) / mean GPU time of one layer (`balance_metrics`), its load split as the problem's dispatch
    splits it (even shares, or each home server's nearest copy). hosted_layer: [servers, experts]."""
    weight = problem.weight[:, layer:layer + 1]
    hosted = hosted_layer[:, None, :]
    routing = None if even_dispatch(problem) else route(hosted, np.arange(problem.shape[0]), problem.hop_seconds)
    return balance_metrics(gpu_load(hosted, weight, routing), problem.speed)["overload"]


# ------------------------------------------------------------------------------------------ the layout


def prices(problem: PlacementProblem, layer: int, objective: str) -> tuple[float, np.ndarray | None]:
    """(seconds per node visit, [experts, nodes] seconds per token of each expert on each node) of one layer.

    objective "cross_node": a visit costs 1 and nothing else counts. "latency": a visit costs the mean round
    trip from a server to another node, and an expert on node n costs each of its activations from n's origins
    the mean round trip inside n times (1 - 1 / GPUs of n), its chance to be served off the home GPU when its
    copies fall anywhere in the node (an activation alone; the latency model charges one trip per GPU a token
    visits there, which `keep_faster_layers` judges)."""
    if objective == "cross_node":
        return 1.0, None
    node, rt = problem.nodes, problem.round_trip
    n_nodes = int(node.max()) + 1
    to_node = node_round_trip(rt, node)
    other = np.arange(n_nodes)[None, :] != node[:, None]
    visit = float(to_node[other].mean()) if other.any() else 0.0
    pair = (node[:, None] == node[None, :]) & ~np.eye(len(node), dtype=bool)
    gpus = np.bincount(node, minlength=n_nodes)
    intra = np.array([rt[np.ix_(node == n, node == n)][pair[np.ix_(node == n, node == n)]].mean() if gpus[n] > 1
                      else 0.0 for n in range(n_nodes)])
    node_demand = by_node(problem.weight[:, layer] * problem.per_token, node)
    return visit, (node_demand * (intra * (1.0 - 1.0 / gpus))[:, None]).T


def _visit_model(problem: PlacementProblem, layer: int, sample: tuple[np.ndarray, np.ndarray] | None,
                 objective: str):
    """The cost model of one layer's node search (see `prices`): the token sample's node visits when there is
    one, else the tables' estimate."""
    node = problem.nodes
    n_nodes, e = int(node.max()) + 1, problem.shape[2]
    price, linear = prices(problem, layer, objective)
    if sample is not None:
        experts, home = sample
        return TokenVisits(experts[:, layer], home, n_nodes, e, price, linear)
    tables = problem.tables
    if tables is None or tables.coact is None:
        raise PrismError("the topology layout needs the token-level `trace` or tables with co-activation counts; "
                         "pass `trace` to build_problem or build the tables with pairs", parameters=("trace",))
    per_token = problem.per_token
    node_demand = by_node(problem.weight[:, layer] * per_token, node)
    tokens = np.bincount(node[problem.homes], tables.tokens.astype(float), minlength=n_nodes)
    return TableVisits(node_demand, tables.coact[layer] * per_token, tokens / max(tokens.sum(), 1.0), price, linear)


def token_sample(problem: PlacementProblem, size: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(experts [tokens, layers, top_k], home node [tokens]) of up to `size` tokens of the problem's trace drawn
    without replacement (seeded), None without a trace."""
    w = problem.workload
    if w is None:
        return None
    pick = np.arange(w.num_tokens)
    if w.num_tokens > size:
        pick = np.sort(np.random.default_rng(seed).choice(w.num_tokens, size, replace=False))
    return w.experts[pick].astype(np.int64), problem.nodes[w.home[w.origin[pick]]]


def group_start(problem: PlacementProblem, layer: int) -> np.ndarray | None:
    """[experts] the node of each expert as EPLB's hierarchical policy puts whole expert groups on nodes (a
    good start for group-limited routing, as DeepSeek-V3's), None when its conditions do not hold (groups a
    multiple of the nodes, equal nodes)."""
    groups = 1 if problem.model is None else problem.model.expert_groups
    gpus = np.bincount(problem.nodes)
    if groups == 1 or groups % len(gpus) or (gpus != gpus[0]).any():
        return None
    position = node_major_position(problem.demand[layer][None, :], groups, len(gpus))[0]
    return position // (problem.shape[2] // len(gpus))


def node_layout(problem: PlacementProblem, layer: int, sample, objective: str, allowed: float, cap_eps: float,
                deadline: Deadline, moves: dict, seed: int = 0) -> np.ndarray:
    """[servers, experts] bool: one layer's topology layout with node load caps (1 + cap_eps) x fair share: the
    node search from the greedy start and from EPLB's group start (`group_start`, brought under the caps by
    `shed_load`), the better kept, then packed."""
    slots, r = problem.layout.slots_per_layer, problem.min_replicas
    demand = problem.demand[layer]
    node, speed = problem.nodes, problem.speed
    need = expert_need(demand, node, speed, r, allowed)
    group = group_start(problem, layer)
    starts = [None] if group is None else [None, group]
    best, best_key = None, None
    for i, start in enumerate(starts):
        lim = node_limits(node, speed, slots, r, float(demand.sum()), cap_eps)
        model = _visit_model(problem, layer, sample, objective)
        if start is None:
            greedy_nodes(model, demand, need, lim)
        else:
            _assign(model, demand, need, lim, start)
            shed_load(model, demand, need, lim)
        search_nodes(model, demand, need, lim, deadline.split(0.7 / (len(starts) - i)), moves,
                     np.random.default_rng(seed + layer))
        within = (lim.load <= lim.cap).all() and (lim.experts >= lim.lo).all() and (lim.pieces <= lim.slots).all()
        key = (not within, model.cost())  # within the limits first, then the cheaper
        if best_key is None or key < best_key:
            best, best_key = model.node.copy(), key
    return pack_nodes(demand, best, node, speed, slots, r, deadline)


def check_topology_problem(problem: PlacementProblem) -> None:
    """A PrismError naming `problem` unless it has a slot layout."""
    if problem.layout is None:
        raise PrismError("the topology layout is for clusters with a [layout] (slots_per_layer); add one to the "
                         "cluster file", parameters=("problem",))


def whole_experts_fit(problem: PlacementProblem) -> bool:
    """Whether every expert can live on one node: each node then needs at least slots_per_layer experts (one
    holds at most a copy per GPU) and they must add up to no more than the layer's experts (false e.g. when
    every server is its own node and the slots outnumber the experts)."""
    gpus = np.bincount(problem.nodes)
    return bool(gpus.min() >= problem.min_replicas and len(gpus) * problem.layout.slots_per_layer <= problem.shape[2])


def plan_topology(problem: PlacementProblem, deadline: Deadline = UNLIMITED, *, reference: np.ndarray | None = None,
                  objective: str = "latency", overload_slack: float = OVERLOAD_SLACK,
                  sample_tokens: int = SAMPLE_TOKENS, seed: int = 0,
                  others: Sequence[tuple[np.ndarray, np.ndarray | None]] = ()) -> TopologyPlan:
    """The topology layout of a layout problem (module docstring) with its evidence.

    reference: [servers, layers, experts] bool, the balance-only layout each layer's overload is held close to
    and falls back to (default `solve_balance`'s); objective: what the node search minimises, "latency" or
    "cross_node" (node visits alone; see `prices`); overload_slack: how much each layer's overload ((max - mean) /
    mean GPU time) may exceed the reference's; sample_tokens: tokens of the trace the node search uses; seed:
    which (objective, sample_tokens and seed steer the even-dispatch search; the static plan maximises the
    activations served in their home node). others: more (hosted, routing) layouts whose layers the latency
    objective takes where they are faster (`keep_faster_layers`; routing None: the serving system's). Stops by
    `deadline` (the layers not reached keep the reference)."""
    check_topology_problem(problem)
    if objective not in OBJECTIVES:
        raise PrismError(f"`objective` must be one of {', '.join(OBJECTIVES)}, got {objective!r}",
                         parameters=("objective",))
    s, layers, e = problem.shape
    slots, r = problem.layout.slots_per_layer, problem.min_replicas
    if reference is None:
        reference = solve_balance(problem.demand, problem.speed, slots, r, deadline=deadline.split(0.2)).hosted
    elif np.shape(reference) != problem.shape:
        raise PrismError(f"`reference` must be a [servers, layers, experts] = {list(problem.shape)} layout, got "
                         f"shape {list(np.shape(reference))}", parameters=("reference",))
    plan = TopologyPlan(np.asarray(reference, bool).copy(), np.ones(layers, bool), np.full(layers, np.nan))
    # The search leaves a share for judging whole layers on the whole trace (seconds at 64 GPUs and more).
    search = deadline.split(0.9) if objective == "latency" and not deadline.expired() else deadline
    if not even_dispatch(problem):
        plan.routing = route(plan.hosted, np.arange(s), problem.hop_seconds)
        # The balance-only layout is served with balanced routing, as `exact`'s balance plan is.
        start = (plan.hosted.copy(), static_balance_routing(problem, plan.hosted, deadline.split(0.05))
                 if objective == "latency" else None)
        static_plan(problem, plan, overload_slack, search)
    else:
        start = (plan.hosted.copy(), None)
        if whole_experts_fit(problem):
            even_plan(problem, plan, objective, overload_slack, sample_tokens, seed, search)
    if objective == "latency":
        keep_faster_layers(problem, plan, [start, *others], deadline)
    return plan


def keep_faster_layers(problem: PlacementProblem, plan: TopologyPlan,
                       others: Sequence[tuple[np.ndarray, np.ndarray | None]], deadline: Deadline = UNLIMITED
                       ) -> None:
    """Put into `plan` each layer of another layout that the full latency model (`layer_latency`) finds faster,
    whatever its overload (the model weighs compute against trips itself): the node search prices node visits
    and home-node activations, not every trip between GPUs of one node. others: (hosted, routing) pairs, the
    first the balance-only reference (its layers stay marked as reference); routing None is how the serving
    system routes the layout (`default_routing`). The layouts not judged by `deadline` are left out."""
    if deadline.expired():
        return
    best = sum(layer_latency(problem, plan.hosted, plan.routing))
    for i, (hosted, routing) in enumerate(others):
        if deadline.expired():
            return
        routing = default_routing(problem, hosted, routing)
        theirs = sum(layer_latency(problem, hosted, routing))
        back = theirs < best
        best = np.minimum(best, theirs)
        plan.hosted[:, back] = hosted[:, back]
        if plan.routing is not None:
            plan.routing[:, back] = routing[:, back]
        plan.reference[back], plan.cap_share[back] = i == 0, np.nan


def even_plan(problem: PlacementProblem, plan: TopologyPlan, objective: str, overload_slack: float,
              sample_tokens: int, seed: int, deadline: Deadline) -> None:
    """Fill `plan` (starting as the reference) layer by layer with the even-dispatch node layout of the loosest
    node load cap (`CAP_SHARES`) whose overload is at most the reference layer's plus `overload_slack`."""
    layers = problem.shape[1]
    sample = token_sample(problem, sample_tokens, seed)
    for layer in range(layers):
        if deadline.expired():
            break
        allowed = layer_overload(problem, plan.hosted[:, layer], layer) + overload_slack
        step = deadline.split(1.0 / (layers - layer))
        for share in CAP_SHARES:
            hosted = node_layout(problem, layer, sample, objective, allowed, share * allowed, step.split(0.5),
                                 plan.moves, seed)
            if layer_overload(problem, hosted, layer) <= allowed:
                plan.hosted[:, layer], plan.reference[layer], plan.cap_share[layer] = hosted, False, share
                break
            if step.expired():
                break


def topology_solution(problem: PlacementProblem, deadline: Deadline = UNLIMITED,
                      others: Sequence[tuple[np.ndarray, np.ndarray | None]] = ()
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """(hosted [servers, layers, experts] bool, routing [servers, layers, experts] int serving server per home
    server, None under even dispatch): `plan_topology`'s latency layout with its defaults (others: as there)."""
    plan = plan_topology(problem, deadline, others=others)
    return plan.hosted, plan.routing


def topology_placement(problem: PlacementProblem, deadline: Deadline = UNLIMITED) -> np.ndarray:
    """[servers, layers, experts] bool: `topology_solution`'s layout (its routing is the one static dispatch
    should use)."""
    return topology_solution(problem, deadline)[0]


# ------------------------------------------------------------------------------------------ lower bound


def _top_sum(x: np.ndarray, count: np.ndarray) -> np.ndarray:
    """[rows]: the sum of each row's `count` largest entries. x: [rows, items]; count: [rows] int."""
    ranked = -np.sort(-x, axis=1)
    return np.where(np.arange(x.shape[1])[None, :] < np.minimum(count, x.shape[1])[:, None], ranked, 0.0).sum(axis=1)


def topology_network_bound(problem: PlacementProblem) -> float:
    """Seconds per token no layout's network time (latency_terms' first term) beats.

    Per home server h and layer: J_h, the activations of h that no layout serves on h itself, at least h's
    activations beyond its `slots_per_layer` largest (h holds that many experts; an even share on h counts as
    served there only in part); per node n: J_n, those no layout serves inside n, at least the node's beyond
    its slots (GPUs x slots_per_layer distinct experts at most; an even share is a fraction of one expert, so
    the fractional knapsack of unit items, the top slots, bounds it). An activation served elsewhere in its
    node is part of a visit to a GPU there that carries at most top_k of the token's activations, so costs at
    least intra_h / top_k (intra_h the cheapest round trip inside the node); one served on another node, part
    of a node visit, at least cross_h / top_k. Hence a token's network time is at least
    min(intra, cross) / k x J + max(0, cross - intra) / k x J_out, both coefficients >= 0, and the lower bounds
    on J and J_out may be put in. Loose (weak): it ignores the replica
    rule, the balance and co-activation."""
    s, layers, e = problem.shape
    node = problem.nodes
    k = _top_k(problem)
    same = node[:, None] == node[None, :]
    rt = problem.round_trip
    intra = np.where(same & ~np.eye(s, dtype=bool), rt, np.inf).min(axis=1) / k  # [servers]
    n_nodes = int(node.max()) + 1
    cross = np.full(s, np.inf)
    if n_nodes > 1:
        to_node = node_round_trip(rt, node)
        cross = np.where(np.arange(n_nodes)[None, :] == node[:, None], np.inf, to_node).min(axis=1) / k
    first = np.minimum(intra, cross)  # [servers]
    first = np.where(np.isfinite(first), first, 0.0)  # one server alone serves everything itself
    slots = problem.layout.slots_per_layer
    w = problem.weight  # [servers, layers, experts]
    off_home = w.sum(axis=2) - _top_sum(w.reshape(s * layers, e), np.full(s * layers, slots)).reshape(s, layers)
    total = float((first[:, None] * off_home).sum())
    # Without another server in the node (intra infinite) every activation off home is already priced at cross.
    both = np.isfinite(cross) & np.isfinite(intra)
    extra = np.where(both, np.maximum(np.where(both, cross - intra, 0.0), 0.0), 0.0)
    gpus = np.bincount(node, minlength=n_nodes)
    for n in range(n_nodes):
        members = np.flatnonzero(node == n)
        wn = w[members].sum(axis=0)  # [layers, experts]
        off_node = wn.sum(axis=1) - _top_sum(wn, np.full(layers, gpus[n] * slots))
        total += float(extra[members].min() * off_node.sum())
    return total * problem.per_token


def _top_k(problem: PlacementProblem) -> int:
    if problem.workload is not None:
        return int(problem.workload.experts.shape[2])
    if problem.model is not None:
        return int(problem.model.top_k)
    return problem.shape[2]  # unknown: a visit may carry every expert of the layer, still a valid bound


def topology_latency_bound(problem: PlacementProblem, deadline: Deadline = UNLIMITED) -> float:
    """Seconds per token no layout beats in the latency model (`latency_value`): `topology_network_bound` plus
    the compute makespan's bound, each layer's busiest-GPU time at least `solve_balance`'s proven layer bound
    (in activations per unit speed) times a GPU's seconds per activation at unit speed. Weak (see the
    network bound)."""
    check_topology_problem(problem)
    act = problem.act_seconds
    makespan = 0.0
    if act.all():
        result = solve_balance(problem.demand, problem.speed, problem.layout.slots_per_layer, problem.min_replicas,
                               deadline=deadline)
        # A server's seconds = load x act = (load / speed) x act x speed, and act x speed is one number.
        makespan = float(result.layer_bound.sum()) * float((act * problem.speed).mean()) * problem.per_token
    return topology_network_bound(problem) + makespan
