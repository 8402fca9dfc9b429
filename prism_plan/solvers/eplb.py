"""DeepSeek's expert-parallelism load balancer (EPLB), written from its published description
(github.com/deepseek-ai/EPLB; vLLM's DefaultEplbPolicy runs the same algorithm).

Per MoE layer, EPLB gives hot experts extra copies and spreads the copies over GPUs that all have the same
number of slots, so that every GPU carries about the same load. Hierarchical policy, when the expert groups
divide evenly over the nodes: whole groups are packed onto nodes (balancing their load, so a token's group stays
inside one node), each node replicates its own experts into its share of the slots, and each node's copies are
packed onto its GPUs. Otherwise the global policy: the same steps with one group and one node. Slot j of a
layer is on GPU j // (slots / GPUs), and GPUs are numbered node by node.

numpy only; every step works on all layers (and nodes) at once, looping only where the greedy rule is sequential.
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import finite_array, integer


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Split each row's items into `num_packs` packs of equal count, balancing the packs' total weight: heaviest
    item first, each into the lightest pack that is not full (the lowest-numbered on a tie). With one item per
    pack, EPLB keeps item i in pack i.

    weight: [rows, items], items a multiple of num_packs. Returns (pack [rows, items] int64, the pack of each
    item; rank [rows, items] int64, its place in its pack, in the order items went in)."""
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        pack = np.broadcast_to(np.arange(items, dtype=np.int64), weight.shape).copy()
        return pack, np.zeros_like(pack)
    order = np.argsort(-weight, axis=1, kind="stable")
    pack = np.empty((rows, items), np.int64)
    rank = np.empty((rows, items), np.int64)
    load = np.zeros((rows, num_packs))
    filled = np.zeros((rows, num_packs), np.int64)
    r = np.arange(rows)
    for item in order.T:  # the greedy rule is sequential in the items, independent across rows
        choice = np.argmin(np.where(filled < per_pack, load, np.inf), axis=1)
        pack[r, item] = choice
        rank[r, item] = filled[r, choice]
        load[r, choice] += weight[r, item]
        filled[r, choice] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_copies: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each row's experts `num_copies` copies in all, one each and then, one at a time, another copy of
    the expert with the highest load per copy (the lowest id on a tie): this minimises the largest load per copy.

    weight: [rows, experts], num_copies >= experts. Returns (copy_of [rows, copies] int64, the expert of each
    copy, first the experts in id order and then the extra copies in the order they were made; replica
    [rows, copies] int64, 0 for an expert's first copy, k for its k-th extra one; count [rows, experts] int64)."""
    rows, experts = weight.shape
    copy_of = np.empty((rows, num_copies), np.int64)
    copy_of[:, :experts] = np.arange(experts)
    replica = np.zeros((rows, num_copies), np.int64)
    count = np.ones((rows, experts), np.int64)
    per_copy = weight.astype(float, copy=True)
    r = np.arange(rows)
    for j in range(experts, num_copies):
        hot = np.argmax(per_copy, axis=1)
        copy_of[:, j] = hot
        replica[:, j] = count[r, hot]
        count[r, hot] += 1
        per_copy[r, hot] = weight[r, hot] / count[r, hot]
    return copy_of, replica, count


def invert(perm: np.ndarray) -> np.ndarray:
    """[rows, n] int64: the inverse of each row's permutation `perm` ([rows, n])."""
    inverse = np.empty_like(perm)
    np.put_along_axis(inverse, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inverse


def node_major_position(weight: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """[layers, experts] int64: where each expert goes when whole groups of consecutive experts are packed onto
    nodes by their total load (`balanced_packing`) and the experts laid out node by node, each group's in id
    order. weight: [layers, experts]."""
    layers, experts = weight.shape
    size = experts // num_groups
    node, rank = balanced_packing(weight.reshape(layers, num_groups, size).sum(axis=2), num_nodes)
    group_start = (node * (num_groups // num_nodes) + rank) * size  # [layers, groups]
    return (group_start[:, :, None] + np.arange(size)).reshape(layers, experts)


def rebalance_hierarchical(weight: np.ndarray, num_copies: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy: groups onto nodes, copies within each node, copies onto the node's GPUs.

    weight: [layers, experts]. Returns (phy2log [layers, num_copies], the expert in each slot; replica
    [layers, num_copies], which copy of its expert a slot holds (as `replicate_experts` numbers them); logcnt
    [layers, experts], copies of each expert)."""
    layers, experts = weight.shape
    node_experts, node_copies = experts // num_nodes, num_copies // num_nodes
    position = node_major_position(weight, num_groups, num_nodes)
    expert_at = invert(position)  # [layers, experts]: the expert at each node-major position
    local = np.take_along_axis(weight, expert_at, axis=1).reshape(layers * num_nodes, node_experts)
    copy_of, replica, count = replicate_experts(local, node_copies)  # [layers * nodes, node_copies]
    share = np.take_along_axis(local / count, copy_of, axis=1)  # the load each copy carries
    gpu, rank = balanced_packing(share, num_gpus // num_nodes)
    copy_at = invert(gpu * (num_copies // num_gpus) + rank)  # [layers * nodes, node_copies]: copy in each slot
    node_start = (np.arange(num_nodes) * node_experts)[None, :, None]
    slot_position = (np.take_along_axis(copy_of, copy_at, axis=1).reshape(layers, num_nodes, -1)
                     + node_start).reshape(layers, num_copies)
    phy2log = np.take_along_axis(expert_at, slot_position, axis=1)
    slot_replica = np.take_along_axis(replica, copy_at, axis=1).reshape(layers, num_copies)
    logcnt = np.take_along_axis(count.reshape(layers, experts), position, axis=1)
    return phy2log, slot_replica, logcnt


def logical_to_physical(phy2log: np.ndarray, replica: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """log2phy [layers, experts, most copies] int64: the slots of each expert's copies, by their replica
    number, -1 padded. phy2log, replica: [layers, slots]; logcnt: [layers, experts]."""
    layers, slots = phy2log.shape
    log2phy = np.full(logcnt.shape + (int(logcnt.max()),), -1, np.int64)
    log2phy[np.arange(layers)[:, None], phy2log, replica] = np.arange(slots)
    return log2phy


def check_weight(weight: np.ndarray) -> np.ndarray:
    """`weight` ([layers, experts] loads) as float64, or a PrismError naming it when it is not a 2-D array of
    finite loads >= 0."""
    return finite_array(weight, "weight", ndim=2, shape="a [layers, experts] array of loads",
                        holds="finite loads >= 0 (token counts per expert); drop NaNs and negative values")


def rebalance(weight: np.ndarray, num_replicas: int, num_groups: int = 1, num_nodes: int = 1,
              num_gpus: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB's `rebalance_experts`: the hierarchical policy when `num_groups` % `num_nodes` == 0, else
    the global one.

    weight: [layers, experts] load of each expert (e.g. tokens routed to it). num_replicas: slots per layer,
    a multiple of num_gpus and at least the experts; num_groups: expert groups (a divisor of the experts);
    num_nodes: nodes, each holding num_gpus / num_nodes GPUs. Returns (phy2log [layers, num_replicas] int64,
    the expert in each slot, slot j on GPU j // (num_replicas / num_gpus); log2phy [layers, experts, most
    copies] int64, the slots of each expert, -1 padded; logcnt [layers, experts] int64, copies of each)."""
    w = check_weight(weight)
    experts = w.shape[1]
    num_gpus = integer(num_gpus, "`num_gpus`", low=1, parameters=("num_gpus",))
    num_replicas = integer(num_replicas, "`num_replicas`", low=experts,
                           fix="every expert needs a slot: give at least one per expert", parameters=("num_replicas",))
    num_groups = integer(num_groups, "`num_groups`", low=1, high=experts, parameters=("num_groups",))
    num_nodes = integer(num_nodes, "`num_nodes`", low=1, high=num_gpus, parameters=("num_nodes",))
    if num_replicas % num_gpus:
        raise PrismError(f"`num_replicas` {num_replicas} must be a multiple of `num_gpus` {num_gpus}: EPLB gives "
                         f"every GPU the same number of slots", parameters=("num_replicas", "num_gpus"))
    if experts % num_groups:
        raise PrismError(f"`num_groups` {num_groups} must divide the {experts} experts into equal groups",
                         parameters=("num_groups",))
    if num_groups % num_nodes:  # EPLB's global policy: one group, one node
        num_groups = num_nodes = 1
    elif num_gpus % num_nodes:
        raise PrismError(f"`num_gpus` {num_gpus} must be a multiple of `num_nodes` {num_nodes} (equal GPUs per "
                         f"node); pass num_nodes=1 for the global policy", parameters=("num_gpus", "num_nodes"))
    phy2log, replica, logcnt = rebalance_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    return phy2log, logical_to_physical(phy2log, replica, logcnt), logcnt
