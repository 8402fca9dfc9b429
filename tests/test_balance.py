"""The `balance` layout solver: bounds no layout beats, layouts a serving system can load, better than EPLB."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.solvers import balance
from prism_plan.solvers.balance import layer_bounds, solve_balance
from prism_plan.solvers.deadline import Deadline
from prism_plan.solvers.eplb import rebalance


def brute_force(demand: np.ndarray, speed: np.ndarray, slots: int, min_replicas: int) -> float:
    """The optimal time of one layer (demand [experts]) over every layout, enumerated."""
    gpus, experts = len(speed), len(demand)
    subsets = np.array([np.isin(np.arange(experts), c) for c in itertools.combinations(range(experts), slots)])
    layouts = subsets[np.array(list(itertools.product(range(len(subsets)), repeat=gpus)))]  # [n, gpus, experts]
    count = layouts.sum(axis=1)
    keep = (count >= min_replicas).all(axis=1)
    layouts, count = layouts[keep], count[keep]
    load = (layouts * (demand / count)[:, None, :]).sum(axis=2)
    return float((load / speed).max(axis=1).min())


def tiny_cases(n: int, seed: int = 0):
    """(demand [2, experts], speed, slots, min_replicas) of small random layers, 2-4 GPUs, 3-6 experts."""
    rng = np.random.default_rng(seed)
    while n:
        gpus, experts = int(rng.integers(2, 5)), int(rng.integers(3, 7))
        slots, m = int(rng.integers(1, experts + 1)), int(rng.integers(1, 3))
        if gpus * slots < m * experts or m > gpus or len(list(itertools.combinations(range(experts), slots))) ** gpus > 2e5:
            continue
        speed = np.ones(gpus) if rng.random() < 0.5 else rng.choice([1.0, 2.0], gpus)
        n -= 1
        yield rng.lognormal(0, 1.5, (2, experts)), speed, slots, m


def check_layout(hosted: np.ndarray, slots: int, min_replicas: int) -> None:
    assert hosted.dtype == bool
    assert (hosted.sum(axis=2) == slots).all()  # exactly `slots` distinct experts per GPU and layer
    assert (hosted.sum(axis=0) >= min_replicas).all()


def layer_times(demand: np.ndarray, speed: np.ndarray, hosted: np.ndarray) -> np.ndarray:
    load = np.einsum("gle,le->lg", hosted, demand / np.maximum(hosted.sum(axis=0), 1))
    return (load / speed).max(axis=1)


def eplb_overload(demand: np.ndarray, gpus: int, slots: int) -> float:
    phy2log, _, logcnt = rebalance(demand, gpus * slots, num_gpus=gpus)
    load = np.take_along_axis(demand / logcnt, phy2log, axis=1).reshape(len(demand), gpus, slots).sum(axis=2)
    return overload(load)


def overload(load: np.ndarray) -> float:
    """Mean over layers of (max - mean) / mean GPU load; load [layers, gpus]."""
    return float(((load.max(axis=1) - load.mean(axis=1)) / load.mean(axis=1)).mean())


def skewed(layers: int, experts: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0, 1.5, (layers, experts)) * 100


def test_bounds_and_layouts_against_brute_force():
    at_optimum = cases = 0
    for demand, speed, slots, m in tiny_cases(16):
        result = solve_balance(demand, speed, slots, m)
        check_layout(result.hosted, slots, m)
        assert np.allclose(result.layer_time, layer_times(demand, speed, result.hosted))
        for layer in range(2):
            optimum = brute_force(demand[layer], speed, slots, m)
            assert result.layer_bound[layer] <= optimum * (1 + 1e-9)
            assert result.layer_time[layer] >= optimum * (1 - 1e-9)
            at_optimum += result.layer_time[layer] <= optimum * (1 + 1e-6)
            cases += 1
        assert (result.status == "optimal") == bool((result.layer_time <= result.layer_bound * (1 + 1e-6)).all())
    assert at_optimum >= 0.9 * cases


def test_the_search_alone_and_its_bounds_against_brute_force(monkeypatch):
    monkeypatch.setattr(balance, "MILP_VARS", 0)  # no exact MILP: the local search and the cheap bounds
    at_optimum = cases = 0
    for demand, speed, slots, m in tiny_cases(24, seed=1):
        result = solve_balance(demand, speed, slots, m)
        check_layout(result.hosted, slots, m)
        bound, _ = layer_bounds(demand, speed, slots, m, result.layer_time)
        for layer in range(2):
            optimum = brute_force(demand[layer], speed, slots, m)
            assert bound[layer] <= optimum * (1 + 1e-9) and result.layer_bound[layer] <= optimum * (1 + 1e-9)
            at_optimum += result.layer_time[layer] <= optimum * (1 + 1e-6)
            cases += 1
    assert at_optimum >= 0.5 * cases


def test_bounds_hold_for_eplb_and_random_layouts():
    demand, speed = skewed(6, 24, seed=3), np.ones(8)
    bound, _ = layer_bounds(demand, speed, 4, 1, np.full(6, 1e9))
    phy2log, _, _ = rebalance(demand, 32, num_gpus=8)
    hosted = np.zeros((8, 6, 24), bool)
    for layer in range(6):
        hosted[np.arange(32) // 4, layer, phy2log[layer]] = True
    if (hosted.sum(axis=2) == 4).all():  # EPLB may put two copies of an expert on one GPU
        assert (bound <= layer_times(demand, speed, hosted) * (1 + 1e-9)).all()
    result = solve_balance(demand, speed, 4)
    assert (result.layer_bound <= result.layer_time * (1 + 1e-9)).all()


def test_beats_eplb_overload_on_a_mid_size_case():
    demand = skewed(8, 64, seed=7)
    for gpus, slots in ((16, 5), (32, 2), (8, 9)):
        result = solve_balance(demand, np.ones(gpus), slots)
        check_layout(result.hosted, slots, 1)
        load = np.einsum("gle,le->lg", result.hosted, demand / result.hosted.sum(axis=0))
        assert overload(load) <= eplb_overload(demand, gpus, slots)
        assert result.layer_time.sum() <= result.layer_bound.sum() * 1.1


def test_min_replicas_is_kept():
    result = solve_balance(skewed(3, 12, seed=2), np.ones(6), 5, min_replicas=2)
    check_layout(result.hosted, 5, 2)


def test_faster_gpus_carry_more_load():
    speed = np.where(np.arange(16) < 8, 2.0, 1.0)
    demand = skewed(4, 48, seed=5)
    result = solve_balance(demand, speed, 4)
    check_layout(result.hosted, 4, 1)
    load = np.einsum("gle,le->lg", result.hosted, demand / result.hosted.sum(axis=0))
    assert (load[:, :8].mean(axis=1) > 1.5 * load[:, 8:].mean(axis=1)).all()
    assert result.layer_time.sum() <= result.layer_bound.sum() * 1.05


def test_a_tiny_time_limit_still_gives_a_layout():
    demand = skewed(10, 64, seed=11)
    result = solve_balance(demand, np.ones(16), 5, deadline=Deadline(1e-4))
    check_layout(result.hosted, 5, 1)
    assert (result.layer_bound <= result.layer_time * (1 + 1e-9)).all()
    assert result.extra["stopped"] in ("deadline", "bound", "local optimum")


def drifted(old: np.ndarray, seed: int) -> np.ndarray:
    new = skewed(*old.shape, seed=seed)
    return 0.7 * old + 0.3 * new * old.sum(axis=1, keepdims=True) / new.sum(axis=1, keepdims=True)


def test_rebalance_pays_for_its_moves_and_keeps_the_budget():
    gpus, slots = 16, 5
    old = skewed(6, 64, seed=13)
    demand = drifted(old, seed=14)
    current = solve_balance(old, np.ones(gpus), slots).hosted
    before = layer_times(demand, np.ones(gpus), current).sum()
    cost = np.full(current.shape, 1e-3 * before / 6)
    free = solve_balance(demand, np.ones(gpus), slots, current=current, add_cost=cost)
    check_layout(free.hosted, slots, 1)
    assert free.added == int((free.hosted & ~current).sum())
    assert free.layer_time.sum() + free.extra["copy_cost"] <= before
    assert free.extra["copy_cost"] == pytest.approx(free.added * cost[0, 0, 0])
    scratch = solve_balance(demand, np.ones(gpus), slots)
    assert free.added < int((scratch.hosted & ~current).sum())
    size = np.full(6, 1000)
    budget = 1000 * (free.added // 3)
    tight = solve_balance(demand, np.ones(gpus), slots, current=current, add_cost=cost, add_bytes=size,
                          budget_bytes=budget)
    check_layout(tight.hosted, slots, 1)
    assert tight.extra["copied_bytes"] == 1000 * tight.added <= budget
    assert tight.layer_time.sum() < before
    none = solve_balance(demand, np.ones(gpus), slots, current=current, add_bytes=size, budget_bytes=0)
    assert none.added == 0 and (none.hosted == current).all()


def test_an_expensive_move_is_not_made():
    old = skewed(2, 16, seed=21)
    current = solve_balance(old, np.ones(4), 5).hosted
    demand = drifted(old, seed=22)
    result = solve_balance(demand, np.ones(4), 5, current=current, add_cost=np.full(current.shape, 1e9))
    assert result.added == 0


HALVES = np.zeros((2, 2, 4), bool)  # a valid layout of 2 GPUs x 2 slots: experts 0-1 on GPU 0, 2-3 on GPU 1
HALVES[0, :, :2] = HALVES[1, :, 2:] = True


@pytest.mark.parametrize("call, parameter", [
    (lambda: solve_balance(np.ones(5), np.ones(2), 2), "demand"),
    (lambda: solve_balance(-np.ones((2, 4)), np.ones(2), 2), "demand"),
    (lambda: solve_balance(np.ones((2, 4)), np.array([1.0, 0.0]), 2), "speed"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 5), "slots_per_layer"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 1), "slots_per_layer"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 2, min_replicas=3), "min_replicas"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 2, current=np.ones((2, 2, 3), bool)), "current"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 2, current=np.ones((2, 2, 4), bool)), "current"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 2, add_cost=np.zeros((2, 2, 4))), "add_cost"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 2, current=HALVES, budget_bytes=10), "budget_bytes"),
    (lambda: solve_balance(np.ones((2, 4)), np.ones(2), 2, current=HALVES, add_bytes=np.ones(3, int)), "add_bytes"),
])
def test_errors_name_the_parameter(call, parameter):
    with pytest.raises(PrismError) as err:
        call()
    assert parameter in err.value.parameters
    assert f"`{parameter}`" in str(err.value)
