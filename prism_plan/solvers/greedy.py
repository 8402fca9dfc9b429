"""`greedy`: the paper's two-stage heuristic, followed by an exchange pass.

Stage 1 splits each server's memory across layers in proportion to how spread out its origins' activations
are in that layer (the entropy's effective number of experts, exp(H)). Stage 2 fills each layer's share with
the server's hottest experts, then gives every expert its `min_replicas` copies by placing missing ones where
they cost the least local traffic. Two improvement passes follow (not in the paper): an exchange that swaps,
per server, a hosted expert with spare copies elsewhere for a hotter one it lacks, and a transfer that moves
required copies to the servers where they displace the least.
"""

from __future__ import annotations

import numpy as np

from prism_plan.solvers.base import Solver
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.objectives import Objective
from prism_plan.solvers.problem import PlacementProblem, Solution
from prism_plan.solvers.repair import repair_coverage


def entropy_shares(weight: np.ndarray, budget: int, layer_bytes: np.ndarray) -> np.ndarray:
    """Experts per layer for one server: [layers] int.

    weight: [layers, experts] activations at this server; budget: bytes; layer_bytes: [layers].
    Layer l gets memory in proportion to exp(H_l), H_l the entropy of its activation distribution
    (a layer with no activations counts as uniform).
    """
    l, e = weight.shape
    total = weight.sum(axis=1, keepdims=True)
    p = np.where(total > 0, weight / np.where(total > 0, total, 1), 1.0 / e)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    need = np.exp(h) * layer_bytes
    ideal = budget * need / need.sum() / layer_bytes
    counts = np.minimum(np.floor(ideal).astype(np.int64), e)
    # Hand out what rounding and the per-layer cap left, largest remainder first, while memory allows.
    room = budget - int((counts * layer_bytes).sum())
    for i in np.argsort(-(ideal - counts), kind="stable"):
        while counts[i] < e and layer_bytes[i] <= room:
            counts[i] += 1
            room -= int(layer_bytes[i])
            if counts[i] >= ideal[i]:
                break
    return counts


def top_per_layer(weight: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[layers, experts] bool: the `counts[l]` hottest experts of each layer (ties by lower id)."""
    order = np.argsort(-weight, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(weight.shape[1])[None, :], axis=1)
    return rank < counts[:, None]


def exchange(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline = UNLIMITED,
             sweeps: int = 8) -> np.ndarray:
    """Per server and expert size, swap spare-copy experts for hotter missing ones, and fill free memory
    with the hottest missing experts, until a sweep changes nothing or the deadline passes."""
    hosted = hosted.copy()
    s_count = problem.shape[0]
    size = problem.cell_bytes[0].ravel()
    for _ in range(sweeps):
        changed = False
        for s in range(s_count):
            if deadline.expired():
                return hosted
            w = problem.weight[s].ravel()
            h = hosted[s].ravel()  # a view: writes go to `hosted`
            for b in np.unique(problem.layer_bytes):
                copies = hosted.sum(axis=0).ravel()
                free = int(problem.budget[s]) - int((h * size).sum())
                ins = np.flatnonzero(~h & (size == b))
                ins = ins[np.argsort(-w[ins], kind="stable")]
                n_fill = min(len(ins), max(free, 0) // int(b))
                if n_fill:
                    h[ins[:n_fill]] = True
                    ins = ins[n_fill:]
                    changed = True
                outs = np.flatnonzero(h & (size == b) & (copies > problem.min_replicas))
                outs = outs[np.argsort(w[outs], kind="stable")]
                k = min(len(ins), len(outs))
                gain = w[ins[:k]] - w[outs[:k]]
                m = int(np.argmin(gain > 0)) if (gain <= 0).any() else k
                if m:
                    h[ins[:m]] = True
                    h[outs[:m]] = False
                    changed = True
        if not changed:
            break
    return hosted


def transfer_duty(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline = UNLIMITED,
                  max_moves: int | None = None) -> np.ndarray:
    """Move required copies to the servers where they cost the least.

    A move takes an expert d that has only `min_replicas` copies from a server A that holds it to a server B
    that lacks it: B drops its least active spare copy v of the same size, A takes its most active missing
    expert u of that size. Gain = (w[B, d] - w[B, v]) + (w[A, u] - w[A, d]). The best move is made until none
    gains or the deadline passes; each step is O(servers x layers x experts) array work.
    """
    hosted = hosted.copy()
    s_count = problem.shape[0]
    w = problem.weight.reshape(s_count, -1)
    h = hosted.reshape(s_count, -1)  # a view
    size = problem.cell_bytes[0].ravel()
    classes = [np.flatnonzero(size == b) for b in np.unique(problem.layer_bytes)]
    max_moves = max_moves if max_moves is not None else 4 * w.shape[1]
    rows = np.arange(s_count)
    for _ in range(max_moves):
        if deadline.expired():
            break
        best_gain, best = 1e-12, None
        copies = h.sum(axis=0)
        for idx in classes:
            hc, wc = h[:, idx], w[:, idx]
            spare = hc & (copies[idx] > problem.min_replicas)[None]
            v = np.argmin(np.where(spare, wc, np.inf), axis=1)  # B's cheapest spare copy
            drop_cost = np.where(spare.any(axis=1), wc[rows, v], np.inf)
            u = np.argmax(np.where(hc, -np.inf, wc), axis=1)  # A's best missing expert
            add_gain = np.where((~hc).any(axis=1), wc[rows, u], -np.inf)
            required = hc & (copies[idx] == problem.min_replicas)[None]
            give = np.where(required, add_gain[:, None] - wc, -np.inf)  # [A, d]
            take = np.where(hc, -np.inf, wc - drop_cost[:, None])  # [B, d]
            a, b = np.argmax(give, axis=0), np.argmax(take, axis=0)
            gain = give[a, np.arange(len(idx))] + take[b, np.arange(len(idx))]
            d = int(np.argmax(gain))
            if gain[d] > best_gain:
                best_gain = gain[d]
                best = (idx[d], int(a[d]), int(b[d]), idx[u[a[d]]], idx[v[b[d]]])
        if best is None:
            break
        d, a, b, u, v = best
        h[a, d], h[a, u], h[b, d], h[b, v] = False, True, True, False
    return hosted


def greedy_placement(problem: PlacementProblem, deadline: Deadline = UNLIMITED) -> np.ndarray:
    """hosted: [servers, layers, experts] bool, the paper's two stages (entropy-guided layer shares filled with
    each server's hottest experts, then every expert given its copies) and the exchange and transfer passes,
    which stop at `deadline` with what they have."""
    hosted = np.zeros(problem.shape, bool)
    for s in range(problem.shape[0]):
        counts = entropy_shares(problem.weight[s], int(problem.budget[s]), problem.layer_bytes)
        hosted[s] = top_per_layer(problem.weight[s], counts)
    hosted = exchange(problem, repair_coverage(problem, hosted, deadline), deadline)
    return exchange(problem, transfer_duty(problem, hosted, deadline), deadline)


class GreedySolver(Solver):
    """Entropy-guided layer shares, hottest experts per share, coverage repair, exchange pass."""

    name = "greedy"
    objectives = ("coverage",)
    summary = "the paper's two-stage heuristic (entropy shares, coverage repair) plus an exchange pass"

    def _solve(self, problem: PlacementProblem, objective: Objective, deadline: Deadline) -> Solution:
        return Solution(greedy_placement(problem, deadline), "heuristic")
