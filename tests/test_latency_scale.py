"""The latency model past the enumeration of server sets: the decomposition's bounds hold against brute force
and the MILP, its placements fit, and solve_latency reports what it proves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prism_plan.placement.simulator import CostModel
from prism_plan.solvers import latency, latency_decomposition as ld
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.latency import solve_latency
from prism_plan.solvers.objectives import balanced_compute, latency_value, proven_status, relative_gap
from prism_plan.solvers.problem import PlacementProblem, placement_fits
from tiny import feasible_placements


def random_problem(servers: int, layers: int, experts: int, seed: int = 0, min_replicas: int = 1,
                   sizes: list[int] | None = None, spare: float = 1.4) -> PlacementProblem:
    """Skewed random demand per home, random symmetric links and compute, memory `spare` x the copies needed."""
    rng = np.random.default_rng(seed)
    weight = rng.pareto(1.2, (servers, layers, experts)).round(1) * 10
    lat = rng.uniform(3e-4, 2e-3, (servers, servers))
    lat = np.triu(lat, 1) + np.triu(lat, 1).T
    bw = np.full((servers, servers), 1e9)
    np.fill_diagonal(bw, np.inf)
    costs = CostModel(lat, bw, rng.uniform(30, 120, servers) * 1e12, 4096, 5e7)
    layer_bytes = np.array(sizes or [10] * layers, np.int64)
    share = rng.uniform(0.5, 1.5, servers)
    budget = share / share.sum() * spare * min_replicas * experts * layer_bytes.sum()
    budget = np.maximum(budget, layer_bytes.max()).astype(np.int64)
    return PlacementProblem(weight, layer_bytes, budget, lat + 4096 / bw, min_replicas,
                            tuple(f"s{i}" for i in range(servers)), costs, 1000.0)


def start(problem: PlacementProblem) -> np.ndarray:
    """A feasible placement: experts dealt round the servers by slot, most room first."""
    s_n, l_n, e_n = problem.shape
    hosted = np.zeros(problem.shape, bool)
    room = problem.budget.astype(float).copy()
    for l, e in itertools.product(range(l_n), range(e_n)):
        for s in np.argsort(-room, kind="stable")[:problem.min_replicas]:
            hosted[s, l, e], room[s] = True, room[s] - problem.layer_bytes[l]
    assert placement_fits(problem, hosted)
    return hosted


def cell_cost(problem: PlacementProblem, cell: int, chosen: tuple[int, ...], mu: np.ndarray) -> float:
    """The relaxed cost of hosting one (layer, expert) cell on the servers `chosen`, seconds per token."""
    l, e = divmod(cell, problem.shape[2])
    reach = problem.round_trip[:, list(chosen)].min(axis=1)
    return float(problem.weight[:, l, e] @ reach) * problem.per_token + problem.layer_bytes[l] * mu[list(chosen)].sum()


@pytest.mark.parametrize("largest", [1, 2, 5])
def test_cell_bounds_never_exceed_the_best_set(largest):
    problem = random_problem(5, 2, 3, seed=largest)
    beyond, cells = ld.beyond_terms(problem), np.arange(6)
    tables = [ld.set_costs(problem, cells, 1, largest)]
    rng = np.random.default_rng(0)
    for mu in [np.zeros(5), rng.uniform(0, 1e-6, 5), rng.uniform(0, 1e-4, 5)]:
        bound, chosen, _ = ld.cell_minima(tables, beyond, mu)
        exact = [min(cell_cost(problem, c, s, mu) for k in range(1, 6) for s in itertools.combinations(range(5), k))
                 for c in cells]
        assert (bound <= np.array(exact) * (1 + 1e-9) + 1e-15).all()
        assert chosen.sum(axis=1).min() >= 1
        if largest == 5:  # every set enumerated: the bound is the minimum itself
            assert bound == pytest.approx(exact, rel=1e-9)


def test_a_refinement_only_raises_the_cell_bounds():
    problem = random_problem(6, 3, 4, seed=3)
    beyond, cells = ld.beyond_terms(problem), np.arange(12)
    tables = [ld.set_costs(problem, cells, 1, 1)]
    mu = np.full(6, 1e-5)
    extra = ld.refinement(problem, tables, beyond, mu)
    assert extra is not None and extra.smallest == 2
    before = ld.cell_minima(tables, beyond, mu)[0]
    after = ld.cell_minima(tables + [extra], beyond, mu)[0]
    assert (after >= before - 1e-15).all() and after.sum() > before.sum()


@pytest.mark.parametrize("seed", range(3))
def test_decomposition_bounds_the_brute_force_optimum(seed, monkeypatch):
    problem = random_problem(3, 2, 2, seed=seed)
    best = min(latency_value(problem, h) for h in feasible_placements(problem))
    for cells in (10**9, 8):  # every set, then only single servers enumerated (the bound on larger sets)
        monkeypatch.setattr(ld, "MAX_SET_CELLS", cells)
        bound, hosted = ld.decompose(problem, start(problem), UNLIMITED)
        assert balanced_compute(problem) <= bound <= best * (1 + 1e-9)
        assert placement_fits(problem, hosted) and latency_value(problem, hosted) >= best * (1 - 1e-9)


@pytest.mark.parametrize("options", [{"min_replicas": 2}, {"sizes": [10, 20, 10]}])
def test_decomposition_keeps_replicas_and_unequal_sizes(options):
    problem = random_problem(5, 3, 6, seed=1, **options)
    first = start(problem)
    bound, hosted = ld.decompose(problem, first, Deadline(10))
    assert placement_fits(problem, hosted)
    assert bound <= latency_value(problem, hosted) <= latency_value(problem, first)


@pytest.fixture(scope="module")
def past_enumeration():
    """14 servers: past `lagrangian_fits`, small enough for the MILP to prove its optimum."""
    problem = random_problem(14, 2, 8, seed=5)
    assert not latency.lagrangian_fits(problem) and latency.milp_fits(problem)
    return problem


def test_decomposition_agrees_with_the_milp(past_enumeration, monkeypatch):
    problem = past_enumeration
    with_milp = solve_latency(problem, [start(problem)], deadline=Deadline(60))
    monkeypatch.setattr(latency, "milp_fits", lambda problem: False)
    alone = solve_latency(problem, [start(problem)], deadline=Deadline(10))
    value = latency_value(problem, alone.hosted, alone.routing)
    assert alone.bound <= latency_value(problem, with_milp.hosted, with_milp.routing) * (1 + 1e-9)
    assert value >= with_milp.bound * (1 - 1e-9)
    assert not alone.weak_bound and relative_gap(value, alone.bound, maximize=False) < 0.05
    assert alone.status == proven_status(value, alone.bound, maximize=False)
