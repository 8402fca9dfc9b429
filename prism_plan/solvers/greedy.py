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

from prism_plan.solvers.base import PlacementProblem, Solver

_MAX_ROUNDS = 64


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


def _evict(problem: PlacementProblem, hosted: np.ndarray, s: int, need: int, keep: np.ndarray) -> bool:
    """Free `need` bytes on server s by evicting its least valuable experts that have spare copies
    (not those in `keep`). Returns False, changing nothing, when that cannot free enough."""
    if need <= 0:
        return True
    copies = hosted.sum(axis=0)
    size = np.broadcast_to(problem.layer_bytes[:, None], copies.shape)
    removable = hosted[s] & (copies > problem.min_replicas) & ~keep
    idx = np.flatnonzero(removable)
    if not len(idx):
        return False
    density = problem.weight[s].ravel()[idx] / size.ravel()[idx]
    idx = idx[np.argsort(density, kind="stable")]
    freed = np.cumsum(size.ravel()[idx])
    cut = int(np.searchsorted(freed, need))
    if cut >= len(idx):
        return False
    hosted[s].ravel()[idx[:cut + 1]] = False
    return True


def repair_coverage(problem: PlacementProblem, hosted: np.ndarray) -> np.ndarray:
    """Give every expert at least `min_replicas` copies, placing each missing copy on the server where it
    loses the least: its own activations there minus what it must evict (priced at the server's cheapest
    spare copy)."""
    hosted = hosted.copy()
    s_count = problem.shape[0]
    size = problem.layer_bytes
    blocked = np.zeros(problem.shape, bool)  # (server, expert) pairs that could not make room
    for _ in range(_MAX_ROUNDS):
        copies = hosted.sum(axis=0)
        deficit = copies < problem.min_replicas
        if not deficit.any():
            return hosted
        used = (hosted * size[None, :, None]).sum(axis=(1, 2))
        free = problem.budget - used
        spare = hosted & (copies > problem.min_replicas)[None]
        density = problem.weight / size[None, :, None]
        price = np.where(spare, density, np.inf).reshape(s_count, -1).min(axis=1)
        price = np.where(np.isfinite(price), price, 0.0)
        cost = np.where(free[:, None, None] >= size[None, :, None], 0.0, price[:, None, None] * size[None, :, None])
        score = np.where(hosted | blocked, -np.inf, problem.weight - cost)
        choice = np.argmax(score, axis=0)  # [layers, experts]
        if not np.isfinite(np.max(score, axis=0)[deficit]).any():
            break  # no server can take any missing copy by evicting spare ones
        for s in range(s_count):
            new = deficit & (choice == s) & np.isfinite(score[s])
            if not new.any():
                continue
            # Hottest missing experts first, so a server that runs out of room drops only the cold ones.
            idx = np.flatnonzero(new)
            idx = idx[np.argsort(-problem.weight[s].ravel()[idx], kind="stable")]
            for flat in idx.tolist():
                l = flat // problem.shape[2]
                used_s = int((hosted[s] * size[:, None]).sum())
                keep = np.zeros(problem.shape[1:], bool)
                keep.ravel()[flat] = True
                if _evict(problem, hosted, s, used_s + int(size[l]) - int(problem.budget[s]), keep):
                    hosted[s].ravel()[flat] = True
                else:
                    blocked[s].ravel()[flat] = True
    return nearest_feasible(problem, hosted)


def nearest_feasible(problem: PlacementProblem, hosted: np.ndarray) -> np.ndarray:
    """The feasible placement that keeps the most of `hosted`, then the most activations: the exact solver
    on weights that value every kept expert above all activations together. Used when budgets are so tight
    that every slot is spoken for and evicting spare copies cannot make room."""
    from dataclasses import replace

    from prism_plan.solvers.exact import ExactSolver

    keep = float(problem.weight.sum()) + 1.0
    anchored = replace(problem, weight=problem.weight + keep * hosted)
    return ExactSolver(time_limit=60, warm_start=False)._solve(anchored)[0]


def exchange(problem: PlacementProblem, hosted: np.ndarray, sweeps: int = 8) -> np.ndarray:
    """Per server and expert size, swap spare-copy experts for hotter missing ones, and fill free memory
    with the hottest missing experts, until a sweep changes nothing."""
    hosted = hosted.copy()
    s_count = problem.shape[0]
    size = np.broadcast_to(problem.layer_bytes[:, None], problem.shape[1:]).ravel()
    for _ in range(sweeps):
        changed = False
        for s in range(s_count):
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


def transfer_duty(problem: PlacementProblem, hosted: np.ndarray, max_moves: int | None = None) -> np.ndarray:
    """Move required copies to the servers where they cost the least.

    A move takes an expert d that has only `min_replicas` copies from a server A that holds it to a server B
    that lacks it: B drops its least active spare copy v of the same size, A takes its most active missing
    expert u of that size. Gain = (w[B, d] - w[B, v]) + (w[A, u] - w[A, d]). The best move is made until none
    gains; each step is O(servers x layers x experts) array work.
    """
    hosted = hosted.copy()
    s_count = problem.shape[0]
    w = problem.weight.reshape(s_count, -1)
    h = hosted.reshape(s_count, -1)  # a view
    size = np.broadcast_to(problem.layer_bytes[:, None], problem.shape[1:]).ravel()
    classes = [np.flatnonzero(size == b) for b in np.unique(problem.layer_bytes)]
    max_moves = max_moves if max_moves is not None else 4 * w.shape[1]
    rows = np.arange(s_count)
    for _ in range(max_moves):
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


class GreedySolver(Solver):
    """Entropy-guided layer shares, hottest experts per share, coverage repair, exchange pass."""

    name = "greedy"
    summary = "the paper's two-stage heuristic (entropy shares, coverage repair) plus an exchange pass"

    def _solve(self, problem: PlacementProblem):
        s_count = problem.shape[0]
        hosted = np.zeros(problem.shape, bool)
        for s in range(s_count):
            counts = entropy_shares(problem.weight[s], int(problem.budget[s]), problem.layer_bytes)
            hosted[s] = top_per_layer(problem.weight[s], counts)
        hosted = exchange(problem, repair_coverage(problem, hosted))
        return exchange(problem, transfer_duty(problem, hosted)), "heuristic", None
