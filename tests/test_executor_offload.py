"""The executor's offload tier on CPU: OffloadCache copies an expert from the slow tier (host memory, or the
checkpoint on demand) on a miss, not on a hit, frees what it evicts and counts the bytes it copied; over gloo,
two ranks that pin some experts and load the others give the model's own outputs, and each rank's loads (bytes,
hits, misses) equal the simulator's offload replay (replay_offload) of the same batch steps: both follow the
contract's lookup order (per server, batch step and layer: the experts its cache holds, then the others, each in ascending id)."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")

from prism_plan.errors import PrismError  # noqa: E402
from prism_plan.executor.group import init_distributed  # noqa: E402
from prism_plan.executor.moe import DistributedMoE  # noqa: E402
from prism_plan.executor.store import ExpertStore, OffloadCache, expert_list, index_checkpoint  # noqa: E402
from prism_plan.fileio import DATA_DIR  # noqa: E402
from prism_plan.placement.model import ModelSpec, from_hf_config  # noqa: E402
from prism_plan.placement.offload import Offload  # noqa: E402
from prism_plan.placement.offload_replay import replay_offload  # noqa: E402
from prism_plan.placement.workload import CostModel, prepare_workload  # noqa: E402
from prism_plan.traces.trace import load_trace  # noqa: E402

TINY = DATA_DIR / "tiny"  # a random Qwen3-MoE checkpoint (3 MoE layers x 6 experts, float32) and its trace
ORIGINS = ("a", "b")  # origin i arrives at server i


@pytest.fixture(scope="module")
def spec():
    return replace(from_hf_config(TINY / "model"), act_bytes=4)  # the executor runs in float32


def nbytes(tensors: dict) -> int:
    return sum(t.nbytes for t in tensors.values())


# The cache-copy path, in one process ---------------------------------------------------------------------------

@pytest.fixture
def renumbered(spec):
    """The tiny model with MoE layers numbered 3, 5, 7: cache keys are layer indices, stores' layer numbers."""
    return replace(spec, layers=(3, 5, 7), num_hidden_layers=8)


def host_cache(model: ModelSpec, experts: int) -> tuple[ExpertStore, OffloadCache]:
    """A host store holding every expert (synthetic weights) and a cache with room for `experts` of them."""
    host = ExpertStore().fill_synthetic(model, [(x, e) for x in model.layers for e in range(model.num_experts)])
    return host, OffloadCache(model, experts * int(model.layer_bytes[0]), host)


def test_a_miss_copies_the_expert_and_counts_its_bytes(renumbered):
    host, cache = host_cache(renumbered, 2)
    assert cache.get(1, 4) is True
    held, source = cache.resident.tensors[(5, 4)], host.tensors[(5, 4)]
    assert sorted(held) == sorted(source)
    for k in held:  # equal values in memory of its own: a real copy
        assert torch.equal(held[k], source[k]) and held[k].data_ptr() != source[k].data_ptr()
    assert cache.bytes_copied == nbytes(source) == 1536
    assert (cache.bytes_loaded, cache.misses, cache.hits) == (int(renumbered.layer_bytes[1]), 1, 0)


def test_a_hit_copies_nothing(renumbered):
    _, cache = host_cache(renumbered, 2)
    cache.get(0, 1)
    ptr = cache.resident.tensors[(3, 1)]["down_proj.weight"].data_ptr()
    assert cache.get(0, 1) is False
    assert cache.resident.tensors[(3, 1)]["down_proj.weight"].data_ptr() == ptr
    assert (cache.hits, cache.misses, cache.bytes_copied) == (1, 1, 1536)


def test_eviction_frees_the_least_recently_used_expert(renumbered):
    _, cache = host_cache(renumbered, 2)
    cache.get(0, 1)
    cache.get(0, 2)
    cache.get(0, 1)  # a hit: expert 2 is now the least recently used
    cache.get(2, 3)
    assert sorted(cache.resident.tensors) == [(3, 1), (7, 3)]
    assert cache.cache.keys() == [(0, 1), (2, 3)]
    assert (cache.misses, cache.bytes_copied, cache.bytes_loaded) == (3, 3 * 1536, 3 * 1536)


def test_an_expert_the_slow_tier_lacks_is_refused_and_counts_nothing(renumbered):
    host = ExpertStore().fill_synthetic(renumbered, [(3, 0)])
    cache = OffloadCache(renumbered, 4096, host)
    with pytest.raises(PrismError, match="slow tier does not hold expert 1 of layer 3"):
        cache.get(0, 1)
    assert (cache.misses, cache.bytes_loaded, cache.resident.tensors) == (0, 0, {})


def test_for_rank_holds_exactly_the_slow_tier_and_reads_the_checkpoint_on_demand(spec):
    stored = np.zeros((2, spec.num_layers, spec.num_experts), bool)
    stored[0, 1, [2, 4]] = stored[1, 0, 5] = True
    offload = Offload(np.array([1536, 3072]), stored)
    index = index_checkpoint(TINY / "model", spec)
    host = OffloadCache.for_rank(offload, 0, spec, index=index)
    assert host.slow_tier.experts() == [(1, 2), (1, 4)] and host.cache.capacity == 1536
    lazy = OffloadCache.for_rank(offload, 1, spec, index=index, on_demand=True)
    assert lazy.stored == {(0, 5)} and lazy.resident.reads == []
    assert lazy.get(0, 5) and lazy.bytes_copied == 1536
    assert sorted(name for name, _ in lazy.resident.reads) == sorted(
        f"model.layers.0.mlp.experts.5.{p}_proj.weight" for p in ("gate", "up", "down"))
    want = ExpertStore().load(index, [(0, 5)]).tensors[(0, 5)]
    assert all(torch.equal(lazy.resident.tensors[(0, 5)][k], want[k]) for k in want)
    with pytest.raises(PrismError, match="needs the checkpoint"):
        OffloadCache.for_rank(offload, 1, spec, on_demand=True)


def test_a_cache_needs_the_pinned_placement_the_store_holds(spec):
    group = SimpleNamespace(rank=0, world=2)  # the constructor reads only these
    hosted = np.zeros((2, spec.num_layers, spec.num_experts), bool)
    hosted[0, 0, 1] = True
    _, cache = host_cache(spec, 2)
    routing = np.zeros((2, spec.num_layers, spec.num_experts), np.int64)
    with pytest.raises(PrismError, match="pass `hosted`"):
        DistributedMoE(ExpertStore(), routing, spec.layers, group, cache=cache)
    with pytest.raises(PrismError, match="holds other experts than `hosted` pins"):
        DistributedMoE(ExpertStore(), routing, spec.layers, group, hosted=hosted, cache=cache)


# Two ranks over gloo -------------------------------------------------------------------------------------------

def offload_case(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray, Offload]:
    """(hosted, routing, offload) for servers s0 (origin a) and s1 (origin b): s0 pins experts 0, 1 and s1
    experts 2, 3 of every layer, which serve them for both origins; experts 4 and 5 are pinned nowhere and
    loaded where the origin arrives, except origin a's expert 5 of layer 1, which s1 loads for it. The caches
    have room for 4 (s0) and 3 (s1) of the 5 and 6 experts their batch steps need, so that both evict and s0,
    whose steps need fewer now and then, also hits."""
    shape = (2, spec.num_layers, spec.num_experts)
    hosted = np.zeros(shape, bool)
    hosted[0, :, [0, 1]] = hosted[1, :, [2, 3]] = True
    routing = np.zeros(shape, np.int64)
    routing[:, :, [2, 3]] = 1
    routing[1, :, [4, 5]] = 1
    routing[0, 1, 5] = 1
    offload = Offload(np.array([4, 3]) * int(spec.layer_bytes[0]), np.ones(shape, bool))
    return hosted, routing, offload


def workload(trace):
    """The trace cut into batch steps as the simulator cuts it (origin i arrives at server i)."""
    return prepare_workload(trace, ORIGINS, np.arange(len(ORIGINS)))


def hidden_states(trace, spec):
    """[tokens, layers, hidden] random MoE inputs, the same in every process."""
    return torch.randn((trace.num_tokens, spec.num_layers, spec.hidden_size),
                       generator=torch.Generator().manual_seed(1))


def _offload_worker(rank, world, init, out_dir, spec_dict):
    spec = ModelSpec.from_dict(spec_dict)
    group = init_distributed(20.0, init, rank, world)
    hosted, routing, offload = offload_case(spec)
    index = index_checkpoint(TINY / "model", spec)
    store = ExpertStore().load(index, expert_list(hosted, rank, spec.layers))
    # rank 0 keeps its slow tier in host memory, rank 1 reads the checkpoint on each miss
    cache = OffloadCache.for_rank(offload, rank, spec, index=index, on_demand=rank == 1)
    moe = DistributedMoE(store, routing, spec.layers, group, hosted=hosted, cache=cache)
    trace = load_trace(TINY / "trace.parquet")
    w = workload(trace)
    origin, step = w.origin, w.step
    hidden = hidden_states(trace, spec)
    rows, outs = [], []
    for st in range(w.num_steps):  # every rank takes part in every step, with its tokens or none
        mine = np.nonzero((origin == rank) & (step == st))[0]
        outs.append(torch.stack([moe.forward(l, hidden[mine, l], origin[mine], trace.experts[mine, l].astype(np.int64),
                                             torch.as_tensor(trace.weights[mine, l])) for l in range(spec.num_layers)],
                                dim=1))
        rows.append(mine)
    np.savez(out_dir / f"offload{rank}.npz", rows=np.concatenate(rows), out=torch.cat(outs).numpy())
    (out_dir / f"counters{rank}.json").write_text(json.dumps(moe.offload_counters))
    group.close()


def simulated_loads(spec, trace, hosted, routing, offload):
    """The simulator's offload replay of the trace's batch steps (no prefetch): per server bytes_loaded, hits,
    misses. Costs do not change what is loaded; any will do."""
    costs = CostModel(np.zeros((2, 2)), np.full((2, 2), np.inf), np.full(2, 1e12), spec.token_bytes,
                      spec.expert_flops)
    return replay_offload(workload(trace), hosted, routing, offload, costs, spec.layer_bytes, np.full(2, 1e9),
                          np.zeros(2))


def model_outputs(trace, spec) -> np.ndarray:
    """[tokens, layers, hidden] the model's own experts give on the trace's routing of `hidden_states`."""
    transformers = pytest.importorskip("transformers")  # only here: the spawned ranks start faster without it
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY / "model").eval()
    hidden = hidden_states(trace, spec)
    with torch.inference_mode():
        return torch.stack([model.model.layers[l].mlp.experts(hidden[:, l], torch.as_tensor(trace.experts[:, l]).long(),
                                                              torch.as_tensor(trace.weights[:, l]))
                            for l in range(spec.num_layers)], dim=1).numpy()


def test_two_ranks_load_what_the_simulator_loads_and_give_the_models_outputs(spec, tmp_path):
    ranks = mp.spawn(_offload_worker, args=(2, f"file://{tmp_path / 'init'}", tmp_path, spec.to_dict()), nprocs=2,
                     join=False)
    trace = load_trace(TINY / "trace.parquet")
    ref = model_outputs(trace, spec)  # while the ranks run
    while not ranks.join():
        pass
    hosted, routing, offload = offload_case(spec)
    sim = simulated_loads(spec, trace, hosted, routing, offload)
    for r in range(2):
        got = json.loads((tmp_path / f"counters{r}.json").read_text())
        assert (got["bytes_loaded"], got["hits"], got["misses"]) == (sim.bytes_loaded[r], sim.hits[r], sim.misses[r])
        assert got["bytes_copied"] == got["bytes_loaded"]  # the checkpoint's experts are the model's size
        assert got["bytes_loaded"] > offload.cache_bytes[r]  # more loaded than fits: experts were evicted
        out = np.load(tmp_path / f"offload{r}.npz")
        np.testing.assert_allclose(out["out"], ref[out["rows"]], rtol=1e-5, atol=1e-6)
    assert sim.hits[0] > 0
