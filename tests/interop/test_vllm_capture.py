"""vLLM 0.33's own routed-experts capture, run on a CPU, read back by `profile import --format vllm`.

The real RoutedExpertsCapturer records each MoE layer's top-k ids into its step buffer; the real worker-side
AuxOutputWorkerConnector (with its RoutedExpertsBuffer and block store) cuts a step's rows per request, and the
real scheduler-side AuxOutputSchedulerConnector says where a request's output starts (routed_experts_prompt_start)
and trims it to the tokens run so far (all but the last). A small scheduler loop of this test drives them as
vLLM's scheduler and model runner do (chunked prefill, batched decode); the chunks are concatenated as the output
processor does, and vLLM's numpy2base64 writes them into responses shaped as its OpenAI server's. The importer
must return exactly the ids, positions, phases and requests the model routed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from interop.wheels import real_modules, require_or_skip, stand_in
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.importing import import_trace
from prism_plan.traces.trace import load_trace

BLOCK = 4  # KV block (and routing block) size in tokens: small, so requests span several blocks
BUDGET = 8  # tokens per step: long prompts are prefilled in chunks
WORKER = "vllm.distributed.aux_output_connector.worker"
SCHEDULER = "vllm.distributed.aux_output_connector.connector"
SERIAL = "vllm.utils.serial_utils"
CAPTURER = "vllm.model_executor.layers.fused_moe.routed_experts_capturer"

# DeepSeek-V2-Lite in small: hidden layer 0 dense, layers 1..3 MoE; and a Qwen3-MoE-like model, every layer MoE
DENSE_FIRST = ModelSpec("dsv2-lite-tiny", (1, 2, 3), num_experts=8, top_k=2, expert_bytes=64, hidden_size=16,
                        num_hidden_layers=4)
ALL_MOE = ModelSpec("qwen3-moe-tiny", (0, 1, 2), num_experts=6, top_k=2, expert_bytes=64, hidden_size=16)

# (prompt tokens, generated tokens, routed_experts_prompt_start) of each request
REQUESTS = {"a": (6, 4, 0), "b": (11, 3, 0), "c": (5, 2, 2)}


@pytest.fixture(scope="module")
def vllm():
    require_or_skip("vllm")
    empty = type("NotInThisModel", (), {})  # kinds of MoE layer bind_routed_experts_capturer also knows
    stand_ins = (
        stand_in("vllm.config", VllmConfig=object),
        stand_in("vllm.distributed.parallel_state", get_tp_group=lambda: SimpleNamespace(is_first_rank=True)),
        stand_in("vllm.forward_context", ForwardContext=object,
                 get_forward_context=lambda: SimpleNamespace(dp_metadata=None, batch_descriptor=None)),
        stand_in("vllm.model_executor.layers.fused_moe.config", FusedMoEConfig=object),
        stand_in("vllm.model_executor.layers.fused_moe.layer", MoERunner=empty),
        stand_in("vllm.model_executor.layers.fused_moe.modular_kernel", FusedMoEExpertsMonolithic=empty),
        stand_in("vllm.model_executor.layers.fused_moe.router.base_router", BaseRouter=empty),
        stand_in("vllm.platforms", current_platform=SimpleNamespace(device_type="cpu")),
        stand_in("vllm.v1.worker.ubatching", dbo_current_ubatch_token_offset=lambda: 0),
        stand_in("vllm.v1.core.kv_cache_utils", resolve_kv_cache_block_sizes=lambda kv, config: (BLOCK, BLOCK),
                 maybe_convert_block_hash=lambda h: h),
        stand_in("vllm.logger", init_logger=logging.getLogger),
    )
    with real_modules("vllm", CAPTURER, WORKER, SCHEDULER, SERIAL, stand_ins=stand_ins) as mods:
        yield mods


class RoutedLayer(torch.nn.Module):
    """A MoE layer as vLLM's capturer binds to it (a RoutedExpertsCaptureSource): it hands its top-k ids over."""

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.capture_fn = None


@dataclass
class Request:
    """What the scheduler connector reads of vLLM's Request."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    prompt_start: int
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def sampling_params(self) -> SimpleNamespace:
        return SimpleNamespace(routed_experts_prompt_start=self.prompt_start)

    @property
    def block_hashes(self) -> list[bytes]:  # one per full block of the request's tokens
        return [hashlib.sha256(f"{self.request_id}/{i}".encode()).digest() for i in range(self.num_tokens // BLOCK)]

    def is_finished(self) -> bool:
        return self.finished


def vllm_config(model: ModelSpec) -> SimpleNamespace:
    models = SimpleNamespace(get_total_num_hidden_layers=lambda: model.num_hidden_layers,
                             get_num_experts=lambda: model.num_experts,
                             get_num_experts_per_tok=lambda: model.top_k,
                             hf_text_config=SimpleNamespace(model_type=model.name))
    return SimpleNamespace(model_config=models, max_concurrent_batches=1,
                           scheduler_config=SimpleNamespace(max_num_batched_tokens=BUDGET, max_num_seqs=4),
                           parallel_config=SimpleNamespace(data_parallel_rank=0, tensor_parallel_size=1),
                           aux_output_config=SimpleNamespace(max_bytes=1 << 16))


def kv_cache_manager() -> SimpleNamespace:
    nothing_cached = SimpleNamespace(block_size=BLOCK, block_pool=SimpleNamespace(get_cached_block=lambda *a: None))
    coordinator = SimpleNamespace(full_attention_group_id=0, single_type_managers=[nothing_cached])
    return SimpleNamespace(coordinator=coordinator, block_pool=SimpleNamespace(hash_block_size=BLOCK),
                           kv_cache_config=SimpleNamespace(num_blocks=64))


def routing(model: ModelSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """request -> the ids its tokens are routed to, [tokens, num_hidden_layers, top_k] uint8, dense rows zero."""
    out = {}
    for rid, (p, g, _) in REQUESTS.items():
        ids = np.zeros((p + g, model.num_hidden_layers, model.top_k), np.uint8)
        picks = np.argsort(rng.random((p + g, model.num_layers, model.num_experts)), axis=2)[:, :, :model.top_k]
        ids[:, list(model.layers)] = picks
        out[rid] = ids
    return out


def serve(vllm, model: ModelSpec, truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """request -> CompletionOutput.routed_experts, as vLLM's engine builds it for the requests of REQUESTS."""
    net = torch.nn.ModuleList(RoutedLayer(i) for i in model.layers)
    worker = vllm[WORKER].AuxOutputWorkerConnector(vllm_config=vllm_config(model), model=net,
                                                   kv_cache_config=SimpleNamespace(num_blocks=64))
    scheduler = vllm[SCHEDULER].AuxOutputSchedulerConnector(kv_cache_manager())
    requests = {rid: Request(rid, p, g, s) for rid, (p, g, s) in REQUESTS.items()}
    chunks: dict[str, list[np.ndarray]] = {rid: [] for rid in requests}
    while not all(r.finished for r in requests.values()):
        scheduled, left = {}, BUDGET
        for rid, r in requests.items():
            n = min(r.num_tokens - r.num_computed_tokens, left)
            if not r.finished and n:
                scheduled[rid], left = n, left - n
        worker.begin_step(scheduler.build_connector_meta(SimpleNamespace(num_scheduled_tokens=scheduled), requests))
        rows = np.concatenate([truth[rid][requests[rid].num_computed_tokens:][:n] for rid, n in scheduled.items()])
        for layer in net:  # the forward pass: each MoE layer routes the step's tokens
            layer.capture_fn(torch.from_numpy(rows[:, layer.layer_id].astype(np.int32)))
        ids = list(scheduled)
        batch = SimpleNamespace(req_ids=ids, query_start_loc_np=np.cumsum([0, *scheduled.values()]),
                                num_computed_tokens_np=np.array([requests[rid].num_computed_tokens for rid in ids]))
        pending = worker.prepare_output(batch)
        # a request samples a token once every token it has is computed (its prompt's last chunk, or a decode)
        sampled = np.array([requests[rid].num_computed_tokens + scheduled[rid] == requests[rid].num_tokens
                            for rid in ids], np.int32)
        pending.enqueue_cpu_copy(sampled, np.zeros(len(ids), np.int32))
        outputs = pending.process_output()
        for rid, s in zip(ids, sampled):
            r = requests[rid]
            r.num_computed_tokens += scheduled[rid]
            if not s:
                continue
            r.output_token_ids.append(200 + r.num_output_tokens)
            r.finished = r.num_output_tokens == r.max_tokens
            got = scheduler.take_output(r, outputs)
            if got is not None:
                chunks[rid].append(got)
            if r.finished:
                scheduler.request_finished(r)
    worker.close()
    return {rid: np.concatenate(c) for rid, c in chunks.items()}


def prompt_ids(rid: str) -> list[int]:
    return list(range(100, 100 + REQUESTS[rid][0]))


def generated_ids(rid: str) -> list[int]:
    return list(range(200, 200 + REQUESTS[rid][1]))


def write_responses(vllm, folder, routed: dict[str, np.ndarray]) -> None:
    """The requests as a user saves them: a /v1/completions response (a and c, return_token_ids), a
    /v1/chat/completions response per line (b), and LLM.generate's RequestOutputs dumped with nested lists."""
    b64 = vllm[SERIAL].numpy2base64
    completion = {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [
        {"index": i, "text": "", "finish_reason": "length", "prompt_token_ids": prompt_ids(rid),
         "token_ids": generated_ids(rid), "routed_experts": b64(routed[rid])} for i, rid in enumerate("ac")],
        "usage": {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}}
    (folder / "completion.json").write_text(json.dumps(completion))
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "prompt_token_ids": prompt_ids("b"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length",
                         "token_ids": generated_ids("b"), "routed_experts": b64(routed["b"])}]}
    (folder / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    offline = [{"request_id": rid, "prompt_token_ids": prompt_ids(rid), "outputs": [
        {"index": 0, "token_ids": generated_ids(rid), "routed_experts": routed[rid].tolist()}]} for rid in "abc"]
    (folder / "offline.json").write_text(json.dumps(offline))


def expected(model: ModelSpec, truth: dict[str, np.ndarray], rid: str):
    """(ids [tokens, moe_layers, k], position, decode) vLLM returns for request `rid`."""
    p, g, s = REQUESTS[rid]
    position = np.arange(s, p + g - 1)
    return truth[rid][position][:, list(model.layers)], position, position >= p


@pytest.mark.parametrize("model", [DENSE_FIRST, ALL_MOE], ids=lambda m: m.name)
def test_vllm_routed_experts_import_exactly(vllm, model, tmp_path):
    truth = routing(model, np.random.default_rng(7))
    routed = serve(vllm, model, truth)
    for rid, (p, g, s) in REQUESTS.items():  # vLLM's own rule: prompt from `s` and generated tokens, less the last
        assert routed[rid].dtype == np.uint8 and np.array_equal(routed[rid], truth[rid][s:p + g - 1])
    write_responses(vllm, tmp_path, routed)

    sources = {"completion.json": "ac", "chat.jsonl": "b", "offline.json": "abc"}
    for name, rids in sources.items():
        summary = import_trace("vllm", tmp_path / name, tmp_path / "t.parquet", model=model)
        trace = load_trace(tmp_path / "t.parquet")
        assert trace.meta.layers == model.layers and trace.origins == (name.split(".")[0],)
        assert summary["requests"] == len(rids)
        parts = [expected(model, truth, rid) for rid in rids]
        assert np.array_equal(trace.experts, np.concatenate([ids for ids, _, _ in parts]))
        assert trace.position.tolist() == np.concatenate([pos for _, pos, _ in parts]).tolist()
        assert trace.decode.tolist() == np.concatenate([dec for _, _, dec in parts]).tolist()
        assert trace.request.tolist() == [i for i, (ids, _, _) in enumerate(parts) for _ in ids]

    # the array itself (CompletionOutput.routed_experts saved with numpy): the prompt length comes from the caller
    np.save(tmp_path / "a.npy", routed["a"])
    import_trace("vllm", tmp_path / "a.npy", tmp_path / "t.parquet", model=model, prompt_tokens=REQUESTS["a"][0])
    trace = load_trace(tmp_path / "t.parquet")
    ids, position, decode = expected(model, truth, "a")
    assert np.array_equal(trace.experts, ids) and trace.position.tolist() == position.tolist()
    assert trace.decode.tolist() == decode.tolist()
