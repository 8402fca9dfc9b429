"""Baselines the serving systems use today, for comparison: linear and round-robin (vLLM's static layouts),
popularity (the global hottest experts everywhere, blind to origins), eplb (DeepSeek's load balancer, with its
equal slots per GPU), eplb-memory (its ideas in each server's own memory) and random. Each generalises its
original to servers of unequal memory as the docstrings say.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import numpy as np

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.solvers.base import Solver
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.eplb import rebalance, replicate_experts
from prism_plan.solvers.objectives import Objective
from prism_plan.solvers.problem import PlacementProblem, Solution
from prism_plan.solvers.repair import repair_coverage
from prism_plan.solvers.topology import check_topology_problem, pack_nodes, whole_experts_fit
from prism_plan.units import human_bytes


class LayoutSolver(Solver):
    """A fixed layout rule as a solver: `place` makes the placement, reported as a heuristic."""

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        return Solution(self.place(problem, deadline), "heuristic")

    @abstractmethod
    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        """[servers, layers, experts] bool."""


def layer_slots(problem: PlacementProblem) -> np.ndarray:
    """[servers, layers] int: experts of each layer a server can hold when it spreads its memory evenly over
    the layers. Leftover memory adds one slot to further layers, each server starting where the previous
    one stopped, so every layer ends up with about the same number of slots in total."""
    s_count, l_count, _ = problem.shape
    per_round = int(problem.layer_bytes.sum())
    slots = np.repeat((problem.budget // per_round)[:, None], l_count, axis=1)
    offset = 0
    for s in range(s_count):
        left = int(problem.budget[s]) - int(slots[s, 0]) * per_round
        for j in range(l_count):
            layer = (offset + j) % l_count
            if problem.layer_bytes[layer] > left:
                break
            slots[s, layer] += 1
            left -= int(problem.layer_bytes[layer])
            offset = layer + 1
    return np.minimum(slots, problem.shape[2])


def proportional_counts(total: int, share: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Split `total` items into integers proportional to `share`, none above `cap` (largest remainder)."""
    ideal = total * share / share.sum()
    counts = np.minimum(np.floor(ideal).astype(np.int64), cap)
    while counts.sum() < total:
        room = counts < cap
        if not room.any():
            raise InfeasibleError(f"{total} experts do not fit in the {int(cap.sum())} slots this layout gives "
                                  f"a layer; the memory budgets are too tight for an even layout")
        i = np.flatnonzero(room)[np.argmax((ideal - counts)[room])]
        counts[i] += 1
    return counts


def _block_counts(problem: PlacementProblem) -> np.ndarray:
    """[servers, layers]: one copy of each expert, split in proportion to server memory."""
    slots = layer_slots(problem)
    e = problem.shape[2]
    return np.stack([proportional_counts(e, problem.budget.astype(float), slots[:, l])
                     for l in range(problem.shape[1])], axis=1)


def linear_placement(problem: PlacementProblem) -> np.ndarray:
    """[servers, layers, experts] bool: each layer's experts in id order, cut into contiguous blocks sized in
    proportion to server memory; one copy each, leftover memory unused (vLLM's default `linear` layout)."""
    counts = _block_counts(problem)
    hosted = np.zeros(problem.shape, bool)
    ids = np.arange(problem.shape[2])
    for l in range(problem.shape[1]):
        ends = np.cumsum(counts[:, l])
        owner = np.searchsorted(ends, ids, side="right")
        hosted[owner, l, ids] = True
    return hosted


class LinearSolver(LayoutSolver):
    """vLLM's `linear` layout: `linear_placement`."""

    name = "linear"
    summary = "contiguous id blocks sized by memory, one copy each (vLLM default)"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return linear_placement(problem)


def round_robin_placement(problem: PlacementProblem) -> np.ndarray:
    """[servers, layers, experts] bool: expert e of each layer on the next server in turn that still has a
    slot for that layer (vLLM's `round_robin` layout, e on rank e % servers, when memory is equal); one copy
    each."""
    counts = _block_counts(problem)
    s_count, l_count, e_count = problem.shape
    hosted = np.zeros(problem.shape, bool)
    for l in range(l_count):
        left = counts[:, l].copy()
        s = 0
        for e in range(e_count):
            while left[s] == 0:
                s = (s + 1) % s_count
            hosted[s, l, e] = True
            left[s] -= 1
            s = (s + 1) % s_count
    return hosted


class RoundRobinSolver(LayoutSolver):
    """vLLM's `round_robin` layout: `round_robin_placement`."""

    name = "round-robin"
    summary = "experts dealt to servers in turn, one copy each (vLLM round_robin)"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return round_robin_placement(problem)


def popularity_placement(problem: PlacementProblem, deadline: Deadline = UNLIMITED) -> np.ndarray:
    """[servers, layers, experts] bool: every server fills its memory with the globally hottest experts
    (summed over all origins), then the remaining experts get their copies where that costs the least global
    traffic. Blind to origins."""
    demand = problem.demand
    blind = replace(problem, weight=np.broadcast_to(demand, problem.shape).copy())
    hosted = np.zeros(problem.shape, bool)
    for s in range(problem.shape[0]):
        hosted[s] = _hottest_within(demand, problem.layer_bytes, int(problem.budget[s]))
    return repair_coverage(blind, hosted, deadline)


class PopularitySolver(LayoutSolver):
    """The global hottest experts everywhere: `popularity_placement`."""

    name = "popularity"
    summary = "global hottest experts on every server, blind to origins"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return popularity_placement(problem, deadline)


def _hottest_within(weight: np.ndarray, layer_bytes: np.ndarray, budget: int) -> np.ndarray:
    """[layers, experts] bool: the experts of highest activations per byte that fit in `budget` bytes."""
    size = np.broadcast_to(layer_bytes[:, None], weight.shape).ravel()
    order = np.argsort(-(weight.ravel() / size), kind="stable")
    fits = np.cumsum(size[order]) <= budget
    chosen = np.zeros(weight.size, bool)
    chosen[order[fits]] = True
    return chosen.reshape(weight.shape)


def eplb_ranks(problem: PlacementProblem) -> tuple[np.ndarray, int, str]:
    """How the servers appear to EPLB: (server [servers] int64, the server of each EPLB rank, node by node;
    the number of nodes EPLB is told; a note, "" unless the nodes had to be merged). Nodes are the cluster's
    (a server without `node` is a node of its own, as SGLang and vLLM count machines); EPLB assumes equal GPUs
    per node, so nodes of unequal size are given to it as one node (its global policy)."""
    s_count = problem.shape[0]
    node = np.arange(s_count) if problem.cluster is None else problem.cluster.node_index
    server = np.argsort(node, kind="stable")
    sizes = np.bincount(node)
    if (sizes == sizes[0]).all():
        return server, len(sizes), ""
    return server, 1, f"its nodes hold unequal numbers of servers ({', '.join(map(str, sizes))}): one node"


def eplb_slots_per_gpu(problem: PlacementProblem) -> tuple[int, int]:
    """(slots every server gets in every layer, what the smallest server's memory holds): EPLB gives every GPU
    the same slots, so the smallest server decides, but never fewer than ceil(experts / servers), which every
    expert needs a slot, nor more than the experts (a server that holds each expert has no use for more); with a
    slot layout, its slots."""
    s_count, _, e_count = problem.shape
    held = int(problem.budget.min()) // int(problem.layer_bytes.sum())
    if problem.layout is not None:
        return problem.layout.slots_per_layer, held
    return min(max(held, -(-e_count // s_count)), e_count), held


def eplb_hosted(phy2log: np.ndarray, server: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """[servers, layers, experts] bool from EPLB's phy2log ([layers, slots]): slot j on rank j // (slots / ranks),
    rank r on server[r]; two copies of one expert on one server count once."""
    layers, slots = phy2log.shape
    owner = server[np.arange(slots) // (slots // len(server))]
    hosted = np.zeros(shape, bool)
    hosted[owner[None, :], np.arange(layers)[:, None], phy2log] = True
    return hosted


def shed_to_memory(hosted: np.ndarray, cap: np.ndarray, load: np.ndarray) -> tuple[np.ndarray, int, int]:
    """`hosted` ([servers, layers, experts] bool) cut to at most cap ([servers, layers]) experts per server and
    layer: a server over its cap drops its copies of least load per copy; an expert left with no copy goes, hottest
    first, to the server with room that carries the least load (EPLB's packing rule); one that finds no room is
    left to the solver's repair. load: [layers, experts]. Returns (hosted, experts moved, spare copies dropped)."""
    hosted = hosted.copy()
    moved = shed = orphaned = 0
    for l in range(hosted.shape[1]):
        h = hosted[:, l]  # a view: [servers, experts]
        per_copy = load[l] / np.maximum(h.sum(axis=0), 1)
        for s in np.flatnonzero(h.sum(axis=1) > cap[:, l]):
            mine = np.flatnonzero(h[s])
            h[s, mine[np.argsort(per_copy[mine], kind="stable")[:len(mine) - cap[s, l]]]] = False
            shed += len(mine) - int(cap[s, l])
        per_copy = load[l] / np.maximum(h.sum(axis=0), 1)
        carried = (h * per_copy).sum(axis=1)
        orphans = np.flatnonzero(~h.any(axis=0))
        orphaned += len(orphans)
        for e in orphans[np.argsort(-load[l, orphans], kind="stable")]:
            room = np.flatnonzero(h.sum(axis=1) < cap[:, l])
            if not len(room):
                break
            s = room[np.argmin(carried[room])]
            h[s, e] = True
            carried[s] += load[l, e]
            moved += 1
    return hosted, moved, shed - orphaned


def _names(problem: PlacementProblem, servers) -> list[str]:
    return [problem.server_names[s] if problem.server_names else f"server {s}" for s in servers]


def unused_memory_note(problem: PlacementProblem, hosted: np.ndarray) -> str:
    """"memory left unused: X in all (the servers with the most unused first)"; hosted: [servers, layers, experts]."""
    unused = problem.budget - problem.memory(hosted)
    top = [s for s in np.argsort(-unused, kind="stable") if unused[s] > 0]
    shown = ", ".join(f"{n} {human_bytes(unused[s])}" for n, s in zip(_names(problem, top[:4]), top))
    return f"memory left unused: {human_bytes(unused.sum())} in all ({shown}{', ...' if len(top) > 4 else ''})"


def eplb_placement(problem: PlacementProblem) -> tuple[np.ndarray, str]:
    """DeepSeek's EPLB (`prism_plan.solvers.eplb.rebalance`) on the cluster's servers as its GPUs, with the
    model's expert groups and the cluster's nodes: every server the same slots in every layer, as EPLB
    requires. Returns ([servers, layers, experts] bool, a note saying how the layout was adapted to this
    cluster, "" when it was not).

    Adaptations, each said in the note: servers of unequal memory all get what the smallest holds, the rest is
    left unused; when the smallest holds fewer slots than ceil(experts / servers), EPLB runs with that many and
    each server then keeps what its memory holds (`shed_to_memory`); copies EPLB puts twice on one GPU count once.
    """
    s_count, l_count, e_count = problem.shape
    server, nodes, node_note = eplb_ranks(problem)
    per_gpu, held = eplb_slots_per_gpu(problem)
    groups = 1 if problem.model is None else problem.model.expert_groups
    demand = problem.demand
    phy2log, _, _ = rebalance(demand, per_gpu * s_count, groups, nodes, s_count)
    hosted = eplb_hosted(phy2log, server, problem.shape)
    notes = [node_note] if node_note else []
    twice = per_gpu * s_count * l_count - int(hosted.sum())
    if twice:
        notes.append(f"{twice} copies EPLB put on a GPU that held the expert already count once")
    smallest = int(np.argmin(problem.budget))
    name, size = _names(problem, [smallest])[0], human_bytes(problem.budget[smallest])
    if per_gpu > held:
        fitted, moved, dropped = shed_to_memory(hosted, layer_slots(problem), demand)
        over = ", ".join(_names(problem, np.flatnonzero((hosted & ~fitted).any(axis=(1, 2)))))
        hosted = fitted
        notes.insert(0, f"EPLB needs {per_gpu} slots per GPU and layer ({e_count} experts on {s_count} GPUs) but "
                        f"{name}'s {size} holds {held}; EPLB's layout with {per_gpu} per GPU, then {over} kept "
                        f"the copies of most load its memory holds: {moved} experts moved to the least loaded "
                        f"servers with room, {dropped} spare copies dropped")
    elif (problem.budget != problem.budget[0]).any():
        holds = f"what {name}'s {size} holds" if per_gpu == held else f"every expert ({name}'s {size} holds {held})"
        notes.insert(0, f"equal slots per GPU as EPLB requires: {per_gpu} per layer, {holds}")
    if notes and (problem.budget != problem.budget[0]).any():
        notes.append(unused_memory_note(problem, hosted))
    return hosted, ("eplb: " + "; ".join(notes)) if notes else ""


class EplbSolver(Solver):
    """DeepSeek's EPLB: `eplb_placement`; the note on how it was adapted to the cluster goes into the plan's
    solver evidence as `note`."""

    name = "eplb"
    summary = "DeepSeek EPLB: equal slots per GPU, hot experts replicated, copies packed to balance load"

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        hosted, note = eplb_placement(problem)
        return Solution(hosted, "heuristic", extra={"note": note} if note else {})


def eplb_pack(load: np.ndarray, count: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """[servers, experts] bool: EPLB's balanced packing of the copies (each carrying load / count), heaviest
    first, onto the least loaded server that has a free slot and no copy of that expert yet. A first copy
    always finds room (copies never outnumber slots); an extra copy that finds none is dropped."""
    s_count = len(capacity)
    expert = np.repeat(np.arange(len(load)), count)
    share = (load / count)[expert]
    placed = np.zeros((s_count, len(load)), bool)
    total = np.zeros(s_count)
    used = np.zeros(s_count, np.int64)
    for i in np.argsort(-share, kind="stable"):
        ok = (used < capacity) & ~placed[:, expert[i]]
        if not ok.any():
            continue  # an extra copy with nowhere left to go: only servers that already hold it have room
        s = np.flatnonzero(ok)[np.argmin(total[ok])]
        placed[s, expert[i]] = True
        total[s] += share[i]
        used[s] += 1
    return placed


def eplb_memory_placement(problem: PlacementProblem) -> np.ndarray:
    """[servers, layers, experts] bool: EPLB's two ideas fitted to each server's own memory instead of equal
    slots: per layer, replicate the hottest experts (`replicate_experts`, by global load) into every slot the
    servers have (`layer_slots`), at most one copy per server, then pack the copies to balance the load."""
    slots = layer_slots(problem)
    demand = problem.demand + 1e-12  # no load at all still makes a copy's share defined
    hosted = np.zeros(problem.shape, bool)
    for l in range(problem.shape[1]):
        cap = slots[:, l]
        total = min(max(int(cap.sum()), problem.shape[2]), problem.shape[0] * problem.shape[2])
        count = np.minimum(replicate_experts(demand[l:l + 1], total)[2][0], problem.shape[0])
        hosted[:, l] = eplb_pack(demand[l], count, cap)
    return hosted


class EplbMemorySolver(LayoutSolver):
    """EPLB's replication and packing into each server's own memory: `eplb_memory_placement`."""

    name = "eplb-memory"
    summary = "EPLB's replicate and pack into each server's own memory (unequal slots, one copy per server)"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return eplb_memory_placement(problem)


def random_placement(problem: PlacementProblem, seed: int = 0) -> np.ndarray:
    """[servers, layers, experts] bool: every expert once on a random server with room, then random extra
    copies in all remaining memory (seeded)."""
    rng = np.random.default_rng(seed)
    slots = layer_slots(problem)
    s_count, l_count, e_count = problem.shape
    hosted = np.zeros(problem.shape, bool)
    for l in range(l_count):
        owners = np.repeat(np.arange(s_count), slots[:, l])
        rng.shuffle(owners)
        hosted[owners[:e_count], l, rng.permutation(e_count)] = True
        for s in range(s_count):
            extra = slots[s, l] - int(hosted[s, l].sum())
            free = np.flatnonzero(~hosted[s, l])
            if extra > 0 and len(free):
                hosted[s, l, rng.choice(free, size=min(extra, len(free)), replace=False)] = True
    return hosted


class RandomSolver(LayoutSolver):
    """Seeded random copies: `random_placement`."""

    name = "random"
    summary = "random copies filling memory (seeded)"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return random_placement(problem, self.seed)


# Share of a node's slots and fair load the co-activation seeding may fill (TensorRT-LLM's `alpha`); the rest
# goes by load alone.
COACTIVATION_ALPHA = 0.8


def capped_copies(load: np.ndarray, total: int, cap: int, min_replicas: int) -> np.ndarray:
    """[experts] int64: EPLB's replication (each extra copy to the expert of highest load per copy) with at
    most `cap` copies each, until `total` copies or every expert at the cap. load: [experts]."""
    count = np.full(len(load), min_replicas, np.int64)
    for _ in range(total - int(count.sum())):
        per_copy = np.where(count < cap, load / count, -np.inf)
        if not np.isfinite(per_copy).any():
            break
        count[np.argmax(per_copy)] += 1
    return count


def coactivation_nodes(demand: np.ndarray, coact: np.ndarray, node: np.ndarray, speed: np.ndarray, slots: int,
                       min_replicas: int, alpha: float = COACTIVATION_ALPHA) -> np.ndarray:
    """[experts] int64, the node of each expert (with all its copies) in one layer, by co-activation grouping
    (TensorRT-LLM's do_placement_with_cooccurrence at the level of nodes): copies as EPLB replicates them; each
    node in turn is seeded with the free expert of largest load per copy and takes the free expert most
    co-activated with what it holds until alpha x its slots or alpha x its fair load would be passed; the rest,
    by load per copy, go to the node least loaded relative to its fair share with room for their copies.

    demand: [experts]; coact: [experts, experts] tokens in which both fired; node, speed: [servers]."""
    n_nodes = int(node.max()) + 1
    gpus = np.bincount(node, minlength=n_nodes)
    room = gpus * slots
    fair = demand.sum() * np.bincount(node, speed, minlength=n_nodes) / speed.sum()
    count = capped_copies(demand, int(room.sum()), int(gpus.min()), min_replicas)
    per_copy = demand / count
    co = coact - np.diag(np.diag(coact))
    assign = np.full(len(demand), -1, np.int64)
    used, load, held = np.zeros(n_nodes, np.int64), np.zeros(n_nodes), np.zeros(n_nodes, np.int64)

    def put(e: int, n: int) -> None:
        assign[e] = n
        used[n] += count[e]
        load[n] += demand[e]
        held[n] += 1

    for n in range(n_nodes):
        free = assign < 0
        if not free.any():
            break
        put(int(np.argmax(np.where(free, per_copy, -np.inf))), n)
        while True:
            ok = (assign < 0) & (used[n] + count <= alpha * room[n]) & (load[n] + demand <= alpha * fair[n])
            if not ok.any():
                break
            score = np.where(ok, co[:, assign == n].sum(axis=1), -np.inf)
            best = np.flatnonzero(score == score.max())
            put(int(best[np.argmax(per_copy[best])]), n)
    left = np.flatnonzero(assign < 0)
    for i, e in enumerate(left[np.argsort(-per_copy[left], kind="stable")]):
        # Every node needs at least `slots` experts (at most one copy per GPU): keep enough back for them.
        short = np.maximum(slots - held, 0)
        must = short > 0 if short.sum() >= len(left) - i else np.ones(n_nodes, bool)
        fits = must & (held < room // min_replicas) & (used + count[e] <= room)
        fits = fits if fits.any() else must & (held < room // min_replicas)
        put(e, int(np.flatnonzero(fits)[np.argmin((load / fair)[fits])]))
    return assign


def coactivation_placement(problem: PlacementProblem, deadline: Deadline = UNLIMITED) -> np.ndarray:
    """[servers, layers, experts] bool: per layer, experts grouped onto nodes by co-activation
    (`coactivation_nodes`, with the tables' `coact`), then each node's copies packed onto its GPUs for balance
    (`topology.pack_nodes`). The co-activation idea of SGLang PR #19811 and TensorRT-LLM's offline balancer, at the
    level of nodes, for a cluster with a [layout]."""
    check_topology_problem(problem)
    if problem.tables is None or problem.tables.coact is None:
        raise PrismError("the coactivation layout needs tables with co-activation counts; build the tables with "
                         "pairs", parameters=("tables",))
    if not whole_experts_fit(problem):
        raise InfeasibleError(f"the coactivation layout keeps each expert on one node, but its nodes need more "
                              f"than the {problem.shape[2]} experts of a layer (every node holds at least "
                              f"slots_per_layer of them); group the servers into fewer nodes")
    slots, r = problem.layout.slots_per_layer, problem.min_replicas
    node, speed = problem.nodes, problem.speed
    hosted = np.zeros(problem.shape, bool)
    for layer in range(problem.shape[1]):
        demand = problem.demand[layer]
        assign = coactivation_nodes(demand, problem.tables.coact[layer], node, speed, slots, r)
        hosted[:, layer] = pack_nodes(demand, assign, node, speed, slots, r,
                                      deadline.split(1.0 / (problem.shape[1] - layer)))
    return hosted


class CoactivationSolver(LayoutSolver):
    """Co-activated experts grouped onto nodes, then packed for balance: `coactivation_placement`."""

    name = "coactivation"
    needs_layout = True
    summary = "co-activated experts grouped onto nodes, copies packed for balance (TensorRT-LLM/SGLang idea)"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return coactivation_placement(problem, deadline)
