"""Baselines the serving systems use today, for comparison: linear and round-robin (vLLM's static layouts),
popularity (the global hottest experts everywhere, blind to origins), eplb (DeepSeek's load balancer) and
random. Each generalises its original to servers of unequal memory as the docstrings say.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import numpy as np

from prism_plan.errors import InfeasibleError
from prism_plan.solvers.base import Solver
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.objectives import Objective
from prism_plan.solvers.problem import PlacementProblem, Solution
from prism_plan.solvers.repair import repair_coverage


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


def eplb_replicate(load: np.ndarray, slots: int) -> np.ndarray:
    """[experts] int copies: DeepSeek EPLB's replication, adding a copy to the expert with the highest load
    per copy until `slots` copies exist. load: [experts]."""
    count = np.ones(len(load), np.int64)
    for _ in range(slots - len(load)):
        count[np.argmax(load / count)] += 1
    return count


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


def eplb_placement(problem: PlacementProblem) -> np.ndarray:
    """[servers, layers, experts] bool: DeepSeek's EPLB, re-implemented: per layer, replicate the hottest
    experts (by global load) into every slot the servers have, then pack the copies to balance the load across
    servers."""
    slots = layer_slots(problem)
    demand = problem.demand
    hosted = np.zeros(problem.shape, bool)
    for l in range(problem.shape[1]):
        cap = slots[:, l]
        # A server holds at most one copy of an expert, so no expert needs more copies than servers.
        total = min(int(cap.sum()), problem.shape[0] * problem.shape[2])
        count = np.minimum(eplb_replicate(demand[l] + 1e-12, total), problem.shape[0])
        hosted[:, l] = eplb_pack(demand[l] + 1e-12, count, cap)
    return hosted


class EplbSolver(LayoutSolver):
    """DeepSeek's EPLB: `eplb_placement`."""

    name = "eplb"
    summary = "DeepSeek EPLB: replicate hot experts, pack copies to balance load"

    def place(self, problem: PlacementProblem, deadline: Deadline) -> np.ndarray:
        return eplb_placement(problem)


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
