"""prism-plan's slot layouts against vLLM's own DefaultEplbPolicy on held-out clusters and workloads (not those of
bench/ep_placement.py), judged by load arithmetic written here from the slots alone: the balance plan's overload is
at most EPLB's, and a rebalance keeps most of the from-scratch gain while moving far fewer experts than vLLM's
re-balance with its slot preservation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interop.wheels import real_modules, require_or_skip
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.model import ModelSpec
from prism_plan.solvers import IncrementalSolver, build_problem, get_solver
from prism_plan.solvers.incremental import traffic_move_cost
from prism_plan.traces.synthetic import synthetic_windows
from prism_plan.traces.tables import build_tables

MODEL = ModelSpec("held-out-moe", layers=tuple(range(1, 13)), num_experts=64, top_k=6, expert_bytes=2**20,
                  hidden_size=1024)


@pytest.fixture(scope="module")
def vllm_policy():
    require_or_skip("vllm")
    with real_modules("vllm", "vllm.distributed.eplb.policy.default") as mods:
        yield mods["vllm.distributed.eplb.policy.default"].DefaultEplbPolicy


def cluster(gpus: int, per_node: int, slots: int, origins):
    servers = [{"name": f"g{i}", "node": f"n{i // per_node}", "memory_gib": 1.0, "compute_tflops": 100.0,
                "origins": [origins[i]]} for i in range(gpus)]
    nodes = [{"name": f"n{j}", "bandwidth_gbps": 1200.0} for j in range(gpus // per_node)]
    return parse_cluster({"server": servers, "node": nodes, "defaults": {"bandwidth_gbps": 200.0},
                          "layout": {"slots_per_layer": slots}})


def overload_of_slots(gpu_of_slot: np.ndarray, expert_of_slot: np.ndarray, demand: np.ndarray) -> float:
    """Mean over layers of (max - mean) / mean GPU load, each expert's demand split evenly over its slots.
    gpu_of_slot: [slots]; expert_of_slot: [layers, slots]; demand: [layers, experts]."""
    out = []
    for layer, experts in enumerate(expert_of_slot):
        copies = np.bincount(experts, minlength=demand.shape[1])
        gpu_load = np.bincount(gpu_of_slot, demand[layer, experts] / copies[experts])
        out.append(gpu_load.max() / gpu_load.mean() - 1)
    return float(np.mean(out))


def slots_of(hosted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gpu_of_slot, expert_of_slot) of a [gpus, layers, experts] layout, each GPU's experts in id order."""
    gpus, layers, _ = hosted.shape
    per = int(hosted[0, 0].sum())
    experts = np.stack([np.concatenate([np.flatnonzero(hosted[g, l]) for g in range(gpus)]) for l in range(layers)])
    return np.repeat(np.arange(gpus), per), experts


def vllm_phy2log(policy, demand, slots, gpus, per_node, old=None):
    args = (torch.from_numpy(demand.astype(np.float32)), slots * gpus, 1, gpus // per_node, gpus)
    return policy.rebalance_experts(*args, *(() if old is None else (torch.from_numpy(old),))).numpy()


@pytest.mark.parametrize("gpus, per_node, slots, skew", [(16, 4, 5, 1.0), (12, 6, 7, 1.4), (8, 8, 9, 0.7)])
def test_balance_overload_is_at_most_vllms_eplb(vllm_policy, gpus, per_node, slots, skew):
    origins = [f"r{i}" for i in range(gpus)]
    trace = synthetic_windows(MODEL, origins, 160, 1, skew=skew, affinity=0.5, seed=100 + gpus)[0]
    problem = build_problem(build_tables([trace]), cluster(gpus, per_node, slots, origins), MODEL)
    ours = get_solver("exact", time_limit=30).solve(problem, "balance").hosted
    phy2log = vllm_phy2log(vllm_policy, problem.demand, slots, gpus, per_node)
    theirs = overload_of_slots(np.arange(slots * gpus) // slots, phy2log, problem.demand)
    assert overload_of_slots(*slots_of(ours), problem.demand) <= theirs


def test_rebalance_keeps_the_gain_moving_a_third_of_vllms_experts(vllm_policy):
    gpus, per_node, slots = 16, 4, 5
    origins = [f"r{i}" for i in range(gpus)]
    windows = synthetic_windows(MODEL, origins, 200, 4, shift=0.6, affinity=0.6, seed=5)
    c = cluster(gpus, per_node, slots, origins)
    problems = [build_problem(build_tables([w]), c, MODEL) for w in windows]
    current = get_solver("exact", time_limit=30).solve(problems[0], "balance").hosted
    old = vllm_phy2log(vllm_policy, problems[0].demand, slots, gpus, per_node)
    gained = scratch_gained = ours_moved = theirs_moved = 0.0
    for problem in problems[1:]:
        new_p2l = vllm_phy2log(vllm_policy, problem.demand, slots, gpus, per_node, old)
        gpu = np.arange(slots * gpus) // slots
        # Experts vLLM must bring to a GPU that did not hold them (its slot preservation keeps the others).
        theirs_moved += sum(len(set(new_p2l[l, gpu == g]) - set(old[l, gpu == g]))
                            for l in range(len(new_p2l)) for g in range(gpus))
        old = new_p2l
        scratch = get_solver("exact", time_limit=30).solve(problem, "balance").hosted
        new = IncrementalSolver(current, move_cost=traffic_move_cost(problem, 0.002, "balance"),
                                time_limit=30).solve(problem, "balance").hosted
        before = overload_of_slots(*slots_of(current), problem.demand)
        scratch_gained += before - overload_of_slots(*slots_of(scratch), problem.demand)
        gained += before - overload_of_slots(*slots_of(new), problem.demand)
        ours_moved += int((new & ~current).sum())
        current = new
    assert gained >= 0.95 * scratch_gained
    assert ours_moved <= theirs_moved / 3
