"""Megatron-Core 0.19's own RouterTracer (`--moe-routing-trace-path`), run on a CPU, read back by
`profile import --format megatron`.

Each rank gets its own real tracer, hooked (its register_hooks) onto a small torch model shaped as a Megatron
pipeline stage: `decoder.layers.<i>.mlp.router` for the stage's layers, routers returning (probs, routing_map) as
TopKRouter does; or fed through record_indices as the inference engine does. The tracer writes
router_trace_rank{r}.jsonl; the importer must put every token's ids in the right model layer, request and origin:
inference steps, two micro-batches per training step, pipeline stages (stage-local hook numbers and global 1-based
layer numbers), data-parallel ranks beside them, an uneven split.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interop.wheels import real_modules, require_or_skip, stand_in
from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.importing import import_trace
from prism_plan.traces.trace import load_trace

TRACE = "megatron.core.transformer.moe.router_trace"
TOKENS = 5

# DeepSeek-V2-Lite in small: hidden layer 0 dense, layers 1..3 MoE; and a Qwen3-MoE-like model, every layer MoE
DENSE_FIRST = ModelSpec("dsv2-lite-tiny", (1, 2, 3), num_experts=8, top_k=2, expert_bytes=64, hidden_size=16,
                        num_hidden_layers=4)
ALL_MOE = ModelSpec("qwen3-moe-tiny", (0, 1, 2), num_experts=6, top_k=2, expert_bytes=64, hidden_size=16)


class Router(torch.nn.Module):
    """TopKRouter's interface to the tracer: `topk`, `layer_number` (1-based, global) and forward -> (probs,
    routing_map [tokens, experts] bool). Its input here is the ids to route to, [tokens, topk]."""

    def __init__(self, layer_number: int, experts: int, topk: int) -> None:
        super().__init__()
        self.layer_number, self.experts, self.topk = layer_number, experts, topk

    def forward(self, ids: torch.Tensor):
        routing_map = torch.zeros(len(ids), self.experts, dtype=torch.bool)
        routing_map.scatter_(1, ids, True)
        return routing_map.float() / self.topk, routing_map


class Layer(torch.nn.Module):
    def __init__(self, router: Router | None) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        if router is not None:
            self.mlp.router = router


class Stage(torch.nn.Module):
    """One pipeline stage holding the model's hidden layers `hidden` (global 0-based); `block` names where its
    layers sit: "decoder" as in Megatron's GPTModel (the hook path parses the index), anything else makes the
    tracer fall back to the routers' layer_number."""

    def __init__(self, model: ModelSpec, hidden: range, block: str = "decoder", mtp: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        routers = [Router(g + 1, model.num_experts, model.top_k) if g in model.layers else None for g in hidden]
        setattr(self, block, torch.nn.Module())
        getattr(self, block).layers = torch.nn.ModuleList(Layer(r) for r in routers)
        self.routers = [(g, r) for g, r in zip(hidden, routers) if r is not None]
        if mtp:  # a multi-token-prediction head: its records are not the decoder's
            self.mtp = torch.nn.Module()
            self.mtp.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.mtp.layers[0].mtp_model_layer = Layer(Router(1, model.num_experts, model.top_k))

    def forward(self, ids: np.ndarray) -> None:
        """Route a micro-batch: ids [tokens, num_hidden_layers, top_k] to use in each of this stage's layers."""
        for g, router in self.routers:
            router(torch.from_numpy(ids[:, g]))
        if hasattr(self, "mtp"):
            self.mtp.layers[0].mtp_model_layer.mlp.router(torch.from_numpy(ids[:, self.routers[-1][0]]))


@pytest.fixture(scope="module")
def tracing():
    require_or_skip("megatron_core")
    stand_ins = (stand_in("megatron.core.transformer.moe.router", TopKRouter=Router),
                 stand_in("megatron.core.utils", unwrap_model=lambda m: m))
    with real_modules("megatron_core", TRACE, stand_ins=stand_ins) as mods, pytest.MonkeyPatch.context() as mp:
        # a CPU build of torch has no CUDA streams to ask: none is capturing a graph
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        yield mods[TRACE]


def batches(model: ModelSpec, steps: int, micro: int, seed: int) -> np.ndarray:
    """ids [steps, micro-batches, tokens, num_hidden_layers, top_k] int64: distinct experts in MoE layers."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((steps, micro, TOKENS, model.num_hidden_layers, model.top_k), np.int64)
    pick = np.argsort(rng.random((steps, micro, TOKENS, model.num_layers, model.num_experts)), axis=-1)
    ids[..., list(model.layers), :] = pick[..., :model.top_k]
    return ids


def train(tracing, folder, stages: list[Stage], data: list[np.ndarray], first_step: int = 1) -> None:
    """Training as Megatron runs it: every rank runs each micro-batch of a step through its stage, then the
    training loop calls advance_step(iteration). ranks[r] = stages[r]; data[r]: what rank r's pipeline routes."""
    tracers = [tracing.RouterTracer(str(folder), max_steps=100, rank=r, training_mode=True) for r in range(len(stages))]
    for tracer, stage in zip(tracers, stages):
        tracer.register_hooks(stage)
    for step in range(data[0].shape[0]):
        for tracer, stage, ids in zip(tracers, stages, data):
            for micro in ids[step]:
                stage(micro)
            tracer.advance_step(first_step + step)
    for tracer in tracers:
        tracer.flush()


def trace_of(folder, model: ModelSpec, **options):
    import_trace("megatron", folder, folder / "t.parquet", model=model, **options)
    return load_trace(folder / "t.parquet")


def routed(model: ModelSpec, ids: np.ndarray, ordered: bool = False) -> np.ndarray:
    """What the trace must hold for micro-batches ids [..., tokens, hidden layers, k]: the MoE layers, each
    token's ids ascending as a routing_map gives them (as routed with `ordered`)."""
    moe = ids.reshape(-1, *ids.shape[-2:])[:, list(model.layers)]
    return moe if ordered else np.sort(moe, axis=-1)


def requests(micro_batches: int) -> list[int]:
    return [i for i in range(micro_batches) for _ in range(TOKENS)]


def test_inference_steps_on_the_hook_path(tracing, tmp_path):
    """Inference: no advance_step, a layer firing again starts a step; one forward pass = one request."""
    data = batches(DENSE_FIRST, 3, 1, seed=1)
    tracer = tracing.RouterTracer(str(tmp_path), max_steps=100, rank=0)
    stage = Stage(DENSE_FIRST, range(4), mtp=True)
    tracer.register_hooks(stage)
    for step in data:
        stage(step[0])
    tracer.flush()
    trace = trace_of(tmp_path, DENSE_FIRST)
    assert trace.meta.layers == (1, 2, 3) and trace.origins == ("rank0",)
    assert np.array_equal(trace.experts, routed(DENSE_FIRST, data)) and trace.request.tolist() == requests(3)
    assert trace.position.tolist() == list(range(TOKENS)) * 3 and not trace.decode.any()


def test_two_micro_batches_per_training_step(tracing, tmp_path):
    data = batches(ALL_MOE, 2, 2, seed=2)
    train(tracing, tmp_path, [Stage(ALL_MOE, range(3))], [data])
    trace = trace_of(tmp_path, ALL_MOE)
    assert trace.origins == ("rank0",) and trace.request.tolist() == requests(4)
    assert np.array_equal(trace.experts, routed(ALL_MOE, data))  # step 1 micro 0, micro 1, step 2 micro 0, ...


def test_pipeline_stages_with_data_parallel_ranks(tracing, tmp_path):
    """PP=2 x DP=2 in Megatron's default order: ranks 0, 1 are stage 0 (hidden 0, 1) of pipelines 0 and 1,
    ranks 2, 3 stage 1 (hidden 2, 3); the hook path numbers stage 1's layers 0, 1."""
    data = [batches(DENSE_FIRST, 2, 2, seed=3), batches(DENSE_FIRST, 2, 2, seed=4)]  # pipelines 0 and 1
    stages = [Stage(DENSE_FIRST, range(0, 2)), Stage(DENSE_FIRST, range(0, 2)),
              Stage(DENSE_FIRST, range(2, 4)), Stage(DENSE_FIRST, range(2, 4))]
    train(tracing, tmp_path, stages, [data[0], data[1], data[0], data[1]])
    for options in ({}, {"pipeline_stages": 2}, {"stage_layers": (2, 2)}):
        trace = trace_of(tmp_path, DENSE_FIRST, **options)
        assert trace.origins == ("rank0", "rank1")
        assert np.array_equal(trace.experts, np.concatenate([routed(DENSE_FIRST, d) for d in data]))
        assert trace.origin.tolist() == [0] * 4 * TOKENS + [1] * 4 * TOKENS
        assert trace.request.tolist() == requests(4) * 2
    with pytest.raises(PrismError, match="stage 0, hidden layers 0..0"):
        trace_of(tmp_path, DENSE_FIRST, stage_layers=(1, 3))


def test_an_uneven_split_needs_stage_layers(tracing, tmp_path):
    data = batches(ALL_MOE, 1, 2, seed=5)
    train(tracing, tmp_path, [Stage(ALL_MOE, range(0, 2)), Stage(ALL_MOE, range(2, 3))], [data, data])
    with pytest.raises(PrismError, match="stage_layers"):
        trace_of(tmp_path, ALL_MOE)
    trace = trace_of(tmp_path, ALL_MOE, stage_layers=[2, 1])
    assert np.array_equal(trace.experts, routed(ALL_MOE, data)) and trace.request.tolist() == requests(2)


def test_global_layer_numbers_of_pipeline_stages(tracing, tmp_path):
    """Routers outside `decoder.layers`: the tracer records their 1-based global layer_number."""
    data = batches(DENSE_FIRST, 2, 2, seed=6)
    train(tracing, tmp_path, [Stage(DENSE_FIRST, range(0, 2), block="blocks"),
                              Stage(DENSE_FIRST, range(2, 4), block="blocks")], [data, data])
    trace = trace_of(tmp_path, DENSE_FIRST)
    assert trace.origins == ("rank0",) and trace.request.tolist() == requests(4)
    assert np.array_equal(trace.experts, routed(DENSE_FIRST, data))


def test_record_indices_as_the_inference_engine_calls_it(tracing, tmp_path):
    """The dynamic engine hands each step's [tokens, layers, k] routing and the routers' 1-based layer numbers."""
    data = batches(DENSE_FIRST, 3, 1, seed=7)
    for rank, hidden in enumerate((range(0, 2), range(2, 4))):
        tracer = tracing.RouterTracer(str(tmp_path), max_steps=100, rank=rank)
        moe = [g for g in hidden if g in DENSE_FIRST.layers]
        for step in data:
            tracer.record_indices(torch.from_numpy(step[0][:, moe]), layer_ids=[g + 1 for g in moe])
            tracer.advance_step()
        tracer.flush()
    trace = trace_of(tmp_path, DENSE_FIRST)
    assert trace.origins == ("rank0",) and trace.request.tolist() == requests(3)
    assert np.array_equal(trace.experts, routed(DENSE_FIRST, data, ordered=True))
