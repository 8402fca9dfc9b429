"""Tiny placement problems for property tests, and every feasible placement of one (for brute force)."""

import itertools

import numpy as np
from hypothesis import strategies as st

from prism_plan.placement.simulator import CostModel
from prism_plan.solvers.problem import PlacementProblem


def feasible_placements(problem: PlacementProblem):
    """Yield every hosted array ([servers, layers, experts] bool) within memory and min_replicas."""
    s, l, e = problem.shape
    size = np.broadcast_to(problem.layer_bytes[None, :, None], problem.shape)
    for bits in itertools.product((0, 1), repeat=s * l * e):
        x = np.array(bits, bool).reshape(problem.shape)
        if (x.sum(0) >= problem.min_replicas).all() and ((x * size).sum(axis=(1, 2)) <= problem.budget).all():
            yield x


@st.composite
def tiny_problems(draw, uniform: bool):
    s = draw(st.integers(2, 3))
    l = draw(st.integers(1, 2))
    e = draw(st.integers(2, 3))
    r = draw(st.integers(1, 2))
    weight = np.array(draw(st.lists(st.integers(0, 20), min_size=s * l * e, max_size=s * l * e)), float)
    sizes = np.array([3] * l if uniform else draw(st.lists(st.integers(1, 4), min_size=l, max_size=l)))
    need = r * e * sizes.sum()
    budget = np.array(draw(st.lists(st.integers(0, int(need)), min_size=s, max_size=s)))
    if (np.minimum(budget, e * sizes.sum()).sum() < need) or (uniform and np.minimum(budget // 3, l * e).sum() < r * l * e):
        budget = budget + need  # keep it feasible
    return PlacementProblem(weight.reshape(s, l, e), sizes.astype(np.int64), budget.astype(np.int64),
                            np.zeros((s, s)), r, tuple(f"s{i}" for i in range(s)))


def small_latency_problem(seed: int) -> PlacementProblem:
    """3 servers, 2 layers x 2 experts, random demand and links; compute so fast the makespan vanishes, which
    makes nearest-replica routing optimal and brute force over placements exact."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(1e-4, 2e-3, (3, 3))
    lat = np.triu(lat, 1) + np.triu(lat, 1).T
    bw = np.full((3, 3), 1e9)
    np.fill_diagonal(bw, np.inf)
    costs = CostModel(lat, bw, np.full(3, 1e30), 4096, 1)
    return PlacementProblem(rng.integers(0, 50, (3, 2, 2)).astype(float), np.array([10, 10]),
                            np.array([20, 10, 10]), lat + 4096 / bw, 1, ("a", "b", "c"), costs, 100.0)
