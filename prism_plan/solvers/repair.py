"""Making any placement feasible: giving every expert its `min_replicas` copies where they cost least, or,
when budgets are too tight for that, the feasible placement nearest to it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from prism_plan.solvers.coverage import solve_coverage
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.problem import PlacementProblem

_MAX_ROUNDS = 64


def evict_for(problem: PlacementProblem, hosted: np.ndarray, s: int, need: int, keep: np.ndarray) -> bool:
    """Free `need` bytes on server s by evicting its least valuable experts that have spare copies
    (not those in `keep`: [layers, experts] bool). Returns False, changing nothing, when that cannot free
    enough."""
    if need <= 0:
        return True
    copies = hosted.sum(axis=0)
    size = problem.cell_bytes[s].ravel()
    removable = hosted[s] & (copies > problem.min_replicas) & ~keep
    idx = np.flatnonzero(removable)
    if not len(idx):
        return False
    density = problem.weight[s].ravel()[idx] / size[idx]
    idx = idx[np.argsort(density, kind="stable")]
    freed = np.cumsum(size[idx])
    cut = int(np.searchsorted(freed, need))
    if cut >= len(idx):
        return False
    hosted[s].ravel()[idx[:cut + 1]] = False
    return True


def repair_coverage(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline = UNLIMITED) -> np.ndarray:
    """Give every expert at least `min_replicas` copies, placing each missing copy on the server where it
    loses the least: its own activations there minus what it must evict (priced at the server's cheapest
    spare copy). Falls back to `nearest_feasible` when that cannot finish, or at the deadline."""
    hosted = hosted.copy()
    s_count = problem.shape[0]
    size = problem.cell_bytes
    blocked = np.zeros(problem.shape, bool)  # (server, expert) pairs that could not make room
    for _ in range(_MAX_ROUNDS):
        copies = hosted.sum(axis=0)
        deficit = copies < problem.min_replicas
        if not deficit.any():
            return hosted
        if deadline.expired():
            break
        free = problem.budget - problem.memory(hosted)
        spare = hosted & (copies > problem.min_replicas)[None]
        density = problem.weight / size
        price = np.where(spare, density, np.inf).reshape(s_count, -1).min(axis=1)
        price = np.where(np.isfinite(price), price, 0.0)
        cost = np.where(free[:, None, None] >= size, 0.0, price[:, None, None] * size)
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
                keep = np.zeros(problem.shape[1:], bool)
                keep.ravel()[flat] = True
                used = int(problem.memory(hosted[s:s + 1])[0])
                if evict_for(problem, hosted, s, used + int(problem.layer_bytes[l]) - int(problem.budget[s]), keep):
                    hosted[s].ravel()[flat] = True
                else:
                    blocked[s].ravel()[flat] = True
    return nearest_feasible(problem, hosted, deadline)


def nearest_feasible(problem: PlacementProblem, hosted: np.ndarray, deadline: Deadline = UNLIMITED) -> np.ndarray:
    """The feasible placement that keeps the most of `hosted`, then the most activations: the coverage optimum
    on weights that value every kept expert above all activations together. Used when budgets are so tight
    that every slot is spoken for and evicting spare copies cannot make room."""
    keep = float(problem.weight.sum()) + 1.0
    anchored = replace(problem, weight=problem.weight + keep * hosted)
    return solve_coverage(anchored, deadline=deadline).hosted
