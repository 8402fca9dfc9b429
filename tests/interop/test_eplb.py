"""prism-plan's EPLB (prism_plan/solvers/eplb.py) against the serving systems' own copies of DeepSeek's algorithm:
vLLM's DefaultEplbPolicy (vllm/distributed/eplb/policy/default.py, numpy) and SGLang's verbatim copy of
DeepSeek's eplb.py (sglang/srt/eplb/eplb_algorithms/deepseek.py, torch), on random loads and cluster shapes
of both policies.

vLLM adds `preserve_intragpu_slots` (with `old_global_expert_indices`: reorder slots within a GPU to spare copies
on a re-balance) beyond DeepSeek; it is not called here, only DeepSeek's part. vLLM returns phy2log alone;
DeepSeek's copy also returns log2phy and logcnt. Loads are float32 values, as both cast them to float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interop.wheels import real_modules, require_or_skip
from prism_plan.solvers.eplb import rebalance

# (layers, experts, groups, nodes, GPUs, slots per layer)
SHAPES = [
    (58, 256, 8, 8, 64, 320),  # DeepSeek-V3 on 8 nodes of 8 GPUs: hierarchical, one group per node
    (58, 256, 8, 4, 32, 288),  # hierarchical, two groups per node
    (58, 256, 8, 16, 64, 320),  # 8 groups on 16 nodes: the global policy
    (26, 64, 1, 4, 4, 64),  # DeepSeek-V2-Lite on 4 single-GPU nodes: global, no spare slots
    (26, 64, 1, 1, 4, 84),  # global, 20 spare slots
    (4, 16, 4, 2, 8, 24),  # hierarchical, 4 GPUs per node
    (3, 12, 3, 3, 3, 18),  # hierarchical, one GPU per node
    (5, 12, 6, 4, 8, 16),  # 6 groups on 4 nodes: global
    (2, 8, 2, 2, 8, 8),  # one slot per GPU
    (3, 6, 2, 1, 2, 40),  # many copies per expert
]
LOADS = {"uniform": lambda rng, shape: rng.random(shape),
         "skewed": lambda rng, shape: rng.pareto(1.2, shape),  # a few very hot experts, as in real traces
         "exponential": lambda rng, shape: rng.exponential(1.0, shape)}


def random_shapes(count: int, seed: int):
    """Small random cluster shapes of both policies: (layers, experts, groups, nodes, GPUs, slots)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        groups, nodes, per_node = (int(rng.choice(c)) for c in ([1, 2, 3, 4, 8], [1, 2, 4], [1, 2, 3, 4]))
        experts = groups * int(rng.integers(1, 6)) * (nodes if groups % nodes else 1)
        gpus = nodes * per_node
        yield (int(rng.integers(1, 6)), experts, groups, nodes, gpus,
               gpus * (-(-experts // gpus) + int(rng.integers(0, 4))))


CASES = [(shape, kind, seed) for shape in SHAPES for kind in LOADS for seed in range(2)] + \
        [(shape, "uniform", 0) for shape in random_shapes(60, seed=7)]


def loads(shape: tuple, kind: str, seed: int) -> np.ndarray:
    """[layers, experts] float32 loads, continuous so that ties are rare."""
    rng = np.random.default_rng(seed)
    return (1000 * LOADS[kind](rng, shape[:2])).astype(np.float32)


@pytest.fixture(scope="module")
def vllm_policy():
    require_or_skip("vllm")
    with real_modules("vllm", "vllm.distributed.eplb.policy.default") as mods:
        yield mods["vllm.distributed.eplb.policy.default"].DefaultEplbPolicy


@pytest.fixture(scope="module")
def deepseek():
    require_or_skip("sglang")
    with real_modules("sglang", "sglang.srt.eplb.eplb_algorithms.deepseek") as mods:
        yield mods["sglang.srt.eplb.eplb_algorithms.deepseek"]


@pytest.mark.parametrize("shape, kind, seed", CASES)
def test_phy2log_equals_vllm(vllm_policy, shape, kind, seed):
    layers, experts, groups, nodes, gpus, slots = shape
    w = loads(shape, kind, seed)
    theirs = vllm_policy.rebalance_experts(torch.from_numpy(w), slots, groups, nodes, gpus).numpy()
    mine, _, _ = rebalance(w.astype(np.float64), slots, groups, nodes, gpus)
    np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("shape, kind, seed", CASES[::3])
def test_all_three_arrays_equal_deepseeks(deepseek, shape, kind, seed):
    """phy2log and logcnt equal; log2phy lists the same slots per expert. Copies of one expert carry equal loads,
    so the order DeepSeek numbers them in comes from torch's unstable sort; prism-plan's sort is stable."""
    layers, experts, groups, nodes, gpus, slots = shape
    w = loads(shape, kind, seed)
    theirs = [x.numpy() for x in deepseek.rebalance_experts(torch.from_numpy(w), slots, groups, nodes, gpus,
                                                            enable_hierarchical=groups % nodes == 0)]
    mine = rebalance(w.astype(np.float64), slots, groups, nodes, gpus)
    np.testing.assert_array_equal(mine[0], theirs[0])
    np.testing.assert_array_equal(mine[2], theirs[2])
    np.testing.assert_array_equal(np.sort(mine[1], axis=2), np.sort(theirs[1], axis=2))


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] % s[3] == 0 and s[3] > 1])
def test_hierarchical_policy_keeps_each_group_in_one_node(shape):
    layers, experts, groups, nodes, gpus, slots = shape
    phy2log, log2phy, logcnt = rebalance(loads(shape, "skewed", 3).astype(np.float64), slots, groups, nodes, gpus)
    group_of = phy2log // (experts // groups)  # [layers, slots]
    node_of = np.arange(slots) // (slots // nodes)
    for l in range(layers):
        owners = [set(node_of[group_of[l] == g]) for g in range(groups)]
        assert all(len(o) == 1 for o in owners), f"layer {l}: a group spans nodes {owners}"
    assert (logcnt == np.stack([np.bincount(row, minlength=experts) for row in phy2log])).all()
    held = np.take_along_axis(phy2log, np.maximum(log2phy, 0).reshape(layers, -1), axis=1).reshape(log2phy.shape)
    assert ((held == np.arange(experts)[None, :, None]) | (log2phy < 0)).all()
