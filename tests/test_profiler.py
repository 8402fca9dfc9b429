"""`profile run` on tiny random-weight models of every supported family, checked token by token against the
indices each model's experts really receive, unbatched, for prefill and decode."""

import importlib.util
import inspect
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prism_plan.cli import main  # noqa: E402
from prism_plan.errors import PrismError  # noqa: E402
from prism_plan.traces.profiler import load_model, moe_routers, profile_model, router_choice  # noqa: E402
from prism_plan.traces.trace import load_trace  # noqa: E402

BASE = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128)
MLA = dict(num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
           intermediate_size=24, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=6,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=6,
        num_experts_per_tok=2, mlp_only_layers=[1])),  # layer 1 dense: must be skipped
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=24, moe_intermediate_size=8,
                                                                num_experts=6, num_experts_per_tok=2, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=8, num_experts=6, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(MLA, q_lora_rank=8, n_group=4,
                                                                      topk_group=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(MLA, q_lora_rank=None)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=8, num_local_experts=6, num_experts_per_tok=2, head_dim=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=8, num_local_experts=6,
                                                         num_experts_per_tok=2)),
}
PROMPTS = [("a", [5, 9, 33, 2]), ("b", [17, 3, 3, 60, 41, 8, 22, 9, 1]), ("a", [7]), ("b", [12, 30, 45, 2, 61, 0]),
           ("c", [8, 8, 19])]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, (config_cls, model_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**{**BASE, **extra})
        model = getattr(transformers, model_cls)(config)
        if family == "deepseek_v3":  # a non-zero score bias, so that routing differs from plain top-k
            for _, router in moe_routers(model):
                router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts))
        model.save_pretrained(root / family)
        dirs[family] = root / family
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"origin": o, "input_ids": ids}) + "\n" for o, ids in PROMPTS))
    return dirs, prompts


def experts_calls(model, run):
    """Run `run()` and return, per forward pass, {layer: indices the MoE block used}: what its experts module
    receives (transformers 5.x, GPT-OSS 4.x), else, where the block loops over expert modules itself (4.x), its
    router's output read as the block reads it."""
    calls, handles = [], []
    received, routed = {}, {}
    family = model.config.model_type
    for layer, router in moe_routers(model):
        block = next(m for m in model.modules() if getattr(m, "gate", getattr(m, "router", None)) is router)

        def pre(module, args, kwargs, layer=layer):
            k = model.config.num_experts_per_tok
            given = [a for a in list(args) + list(kwargs.values())
                     if torch.is_tensor(a) and not a.is_floating_point() and a.shape[-1] == k]
            if given:
                received[layer] = given[0].reshape(-1, given[0].shape[-1]).numpy().copy()

        def post(module, args, output, layer=layer):
            routed[layer] = router_choice(output, model.config.num_experts_per_tok, family, model.config)[0].numpy()
        handles.append(block.experts.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(router.register_forward_hook(post))
    try:
        for _ in run():
            calls.append({**routed, **received})
            received.clear()
            routed.clear()
    finally:
        for h in handles:
            h.remove()
    return calls


def reference(model, ids, new_tokens):
    """Indices per layer for one prompt run alone (no padding), prefill then greedy decode: [tokens, L, k]."""
    rows = []
    # transformers 5.x takes the KV cache as `cache`, 4.x as `past_key_values`
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        yield
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, use_cache=True, **{cache: getattr(out, cache)})
            yield

    with torch.inference_mode():
        for call in experts_calls(model, run):
            rows.append(np.stack([call[x] for x in sorted(call)], axis=1))
    return np.concatenate(rows)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_routing_is_the_models_own(family, model_dirs, tmp_path):
    dirs, prompts = model_dirs
    summary = profile_model(dirs[family], prompts, tmp_path / "t.parquet", max_new_tokens=3, batch_size=3,
                            device="cpu", quiet=True)
    trace = load_trace(tmp_path / "t.parquet")
    model, _ = load_model(dirs[family], device="cpu")
    assert (summary["device"], summary["dtype"], summary["device_map"]) == ("cpu", "float32", None)
    assert trace.num_tokens == summary["tokens"] == sum(len(ids) for _, ids in PROMPTS) + 3 * len(PROMPTS)
    assert list(trace.meta.layers) == [layer for layer, _ in moe_routers(model)]
    if family == "qwen2_moe":
        assert list(trace.meta.layers) == [0, 2]
    if family.startswith("deepseek"):
        assert list(trace.meta.layers) == [1, 2]  # layer 0 is dense
    for request, (origin, ids) in enumerate(PROMPTS):
        mine = (trace.request == request)
        assert {trace.origins[o] for o in trace.origin[mine]} == {origin}
        order = np.argsort(trace.position[mine])
        assert trace.position[mine][order].tolist() == list(range(len(ids) + 3))
        assert trace.decode[mine][order].tolist() == [False] * len(ids) + [True] * 3
        expected = reference(model, ids, 3)
        assert np.array_equal(trace.experts[mine][order], expected), f"{family} request {request}"
    assert trace.weights is not None and np.isfinite(trace.weights).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_ids_match_output_router_logits(family, model_dirs, tmp_path):
    dirs, prompts = model_dirs
    profile_model(dirs[family], prompts, tmp_path / "t.parquet", batch_size=5, device="cpu", quiet=True)
    trace = load_trace(tmp_path / "t.parquet")
    model, _ = load_model(dirs[family], device="cpu")
    k = model.config.num_experts_per_tok
    for request, (_, ids) in enumerate(PROMPTS):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids]), output_router_logits=True).router_logits
        top = np.stack([torch.topk(x.softmax(-1), k).indices.numpy() for x in logits], axis=1)
        mine = trace.request == request
        assert np.array_equal(trace.experts[mine][np.argsort(trace.position[mine])], top)


def test_cli_profile_run_and_tables(model_dirs, tmp_path, capsys):
    dirs, prompts = model_dirs
    code = main(["profile", "run", str(dirs["mixtral"]), "--prompts", str(prompts), "-o", str(tmp_path / "t.parquet"),
                 "--max-new-tokens", "2", "--device", "cpu", "--json", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["tokens"] == sum(len(i) for _, i in PROMPTS) + 2 * len(PROMPTS)
    assert out["origins"] == ["a", "b", "c"]
    assert main(["profile", "tables", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "t.npz")]) == 0


def test_text_prompts_need_a_tokenizer_and_bad_prompts_are_one_line(model_dirs, tmp_path, capsys):
    dirs, _ = model_dirs
    bad = tmp_path / "p.jsonl"
    for text, message in [('{"origin": "a", "text": "hello"}', "needs the model's tokenizer"),
                          ('{"text": "hello"}', "needs a `origin`"),
                          ('{"origin": "a", "input_ids": [1, 999]}', "vocabulary of 64"),
                          ('{"origin": "a", "input_ids": []}', "non-empty list")]:
        bad.write_text(text + "\n")
        code = main(["profile", "run", str(dirs["olmoe"]), "--prompts", str(bad), "-o", str(tmp_path / "x.parquet")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.parquet").exists()


def test_text_prompts_with_a_tokenizer(model_dirs, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    dirs, _ = model_dirs
    vocab = {f"w{i}": i for i in range(64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    folder = tmp_path / "m"
    load_model(dirs["qwen3_moe"], device="cpu")[0].save_pretrained(folder)
    fast.save_pretrained(folder)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"domain": "x", "text": "w1 w2 w3"}\n{"domain": "y", "text": "w4 w5"}\n')
    summary = profile_model(folder, prompts, tmp_path / "t.parquet", origin_field="domain", device="cpu", quiet=True)
    assert summary["tokens"] == 5 and summary["origins"] == ["x", "y"]


def test_missing_model_is_a_clear_error(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"origin": "a", "input_ids": [1]}\n')
    with pytest.raises(PrismError, match="no model folder at"):
        profile_model(tmp_path / "nothing-here", tmp_path / "p.jsonl", tmp_path / "t.parquet", quiet=True)


def test_planner_and_cli_work_without_torch(tmp_path):
    import subprocess
    import sys

    # torch and transformers made unimportable: planning works, profiling says how to install them.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from prism_plan.cli import main\n"
            "assert main(['solve', '--tables', sys.argv[1], '--cluster', sys.argv[2], '-o', sys.argv[3]]) == 0\n"
            "assert main(['apply', '--plan', sys.argv[3], '--cluster', sys.argv[2], '--nproc', '4']) == 2\n"
            "sys.exit(main(['profile', 'run', 'x', '--prompts', sys.argv[4], '-o', sys.argv[3] + '.parquet']))\n")
    from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE

    assert main(["profile", "tables", str(BUNDLED_TRACE), "-o", str(tmp_path / "t.npz"), "--no-pairs"]) == 0
    (tmp_path / "p.jsonl").write_text('{"origin": "a", "input_ids": [1]}\n')
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.npz"), str(BUNDLED_CLUSTER),
                          str(tmp_path / "plan.json"), str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert run.returncode == 2 and (tmp_path / "plan.json").exists()
    assert "pip install 'prism-plan[profile]'" in run.stderr and "Traceback" not in run.stderr
    assert "the executor needs torch, which is not installed: pip install 'prism-plan[torch]'" in run.stderr


def test_trace_carries_the_model_shape_so_solve_needs_no_model(model_dirs, tmp_path, capsys):
    dirs, prompts = model_dirs
    profile_model(dirs["deepseek_v3"], prompts, tmp_path / "t.parquet", device="cpu", quiet=True)
    assert load_trace(tmp_path / "t.parquet").meta.spec["layers"] == [1, 2]
    assert main(["profile", "tables", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "t.npz")]) == 0
    (tmp_path / "c.toml").write_text('[defaults]\n[[server]]\nname="a"\nmemory_gib=1\norigins=["a", "c"]\n'
                                     '[[server]]\nname="b"\nmemory_gib=1\norigins=["b"]\n')
    capsys.readouterr()
    assert main(["solve", "--tables", str(tmp_path / "t.npz"), "--cluster", str(tmp_path / "c.toml"), "-o",
                 str(tmp_path / "p.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["local_coverage"] == 1.0


def same_sets(a, b):
    """Share of (token, layer) routing choices whose top-k expert sets agree, of two traces of the same rows."""
    assert a.experts.shape == b.experts.shape
    for column in ("origin", "request", "position", "decode"):
        assert np.array_equal(getattr(a, column), getattr(b, column)), column
    return float((np.sort(a.experts, axis=-1) == np.sort(b.experts, axis=-1)).all(axis=-1).mean())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_bfloat16_on_cpu_records_the_routers_own_choice(family, model_dirs, tmp_path):
    dirs, prompts = model_dirs
    runs = {}
    for dtype in ("float32", "bfloat16"):
        summary = profile_model(dirs[family], prompts, tmp_path / f"{dtype}.parquet", max_new_tokens=2, batch_size=3,
                                device="cpu", dtype=dtype, quiet=True)
        assert summary["dtype"] == dtype
        runs[dtype] = load_trace(tmp_path / f"{dtype}.parquet")
    # the same rows; rounding to bfloat16 may flip a near tie, and then the greedy decode that follows
    assert same_sets(runs["float32"], runs["bfloat16"]) >= 0.85
    # what the bfloat16 model's experts receive, prompt by prompt, is what was recorded
    model, _ = load_model(dirs[family], device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    trace = runs["bfloat16"]
    for request, (_, ids) in enumerate(PROMPTS):
        mine = trace.request == request
        assert np.array_equal(trace.experts[mine][np.argsort(trace.position[mine])], reference(model, ids, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_on_a_gpu_agrees_with_the_cpu(model_dirs, tmp_path):
    dirs, prompts = model_dirs
    traces = []
    for device in ("cpu", "cuda"):
        summary = profile_model(dirs["qwen3_moe"], prompts, tmp_path / f"{device}.parquet", max_new_tokens=2,
                                device=device, dtype="bfloat16", quiet=True)
        assert (summary["device"], summary["dtype"]) == (device, "bfloat16")
        traces.append(load_trace(tmp_path / f"{device}.parquet"))
    assert same_sets(*traces) >= 0.85


def oom_once(monkeypatch, fail_when):
    """Make BatchRunner passes for which fail_when(prompt indices) holds run out of memory, each once, after
    their prefill ran (so the recorder holds a pass's routing that must not be written)."""
    from prism_plan.traces.profiler import BatchRunner

    forward, failed = BatchRunner._forward, []

    def flaky(self, idx):
        steps = forward(self, idx)
        yield next(steps)
        if fail_when(idx) and idx not in failed:
            failed.append(list(idx))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield from steps
    monkeypatch.setattr(BatchRunner, "_forward", flaky)
    return failed


def test_out_of_memory_halves_the_pass_and_writes_each_row_once(model_dirs, tmp_path, monkeypatch):
    dirs, prompts = model_dirs
    options = dict(max_new_tokens=2, batch_size=4, device="cpu", quiet=True)
    plain = profile_model(dirs["olmoe"], prompts, tmp_path / "plain.parquet", **options)
    failed = oom_once(monkeypatch, lambda idx: len(idx) > 1)
    s = profile_model(dirs["olmoe"], prompts, tmp_path / "oom.parquet", **options)
    # batch [0..3] fails, then its halves [0, 1] and [2, 3]; later passes hold no more than the half that fit
    assert failed == [[0, 1, 2, 3], [0, 1], [2, 3]]
    assert s["out_of_memory_retries"] == 3 and s["tokens"] == plain["tokens"] and "ran out of memory" in s["notes"][0]
    a, b = load_trace(tmp_path / "plain.parquet"), load_trace(tmp_path / "oom.parquet")
    assert a.num_tokens == b.num_tokens and same_sets(a, b) == 1.0
    assert np.array_equal(a.experts, b.experts) and np.allclose(a.weights, b.weights, atol=1e-6)


def test_a_token_budget_splits_batches_without_changing_the_trace(model_dirs, tmp_path, monkeypatch):
    from prism_plan.traces.profiler import BatchRunner

    dirs, prompts = model_dirs
    options = dict(max_new_tokens=1, batch_size=5, device="cpu", quiet=True)
    profile_model(dirs["qwen3_moe"], prompts, tmp_path / "a.parquet", **options)
    forward, passes = BatchRunner._forward, []
    monkeypatch.setattr(BatchRunner, "_forward", lambda self, idx: passes.append(idx) or forward(self, idx))
    profile_model(dirs["qwen3_moe"], prompts, tmp_path / "b.parquet", max_batch_tokens=20, **options)
    # prompts of 4, 9, 1, 6 and 3 tokens, each + 1 decode step: [0, 1] holds 2 x 10, [2, 3] 2 x 7
    assert passes == [[0, 1], [2, 3], [4]]
    a, b = load_trace(tmp_path / "a.parquet"), load_trace(tmp_path / "b.parquet")
    assert same_sets(a, b) == 1.0 and np.array_equal(a.experts, b.experts)


def test_one_prompt_that_does_not_fit_is_one_line(model_dirs, tmp_path, monkeypatch, capsys):
    dirs, prompts = model_dirs
    oom_once(monkeypatch, lambda idx: idx == [0])
    code = main(["profile", "run", str(dirs["olmoe"]), "--prompts", str(prompts), "-o", str(tmp_path / "t.parquet"),
                 "--device", "cpu", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "prompt 1 (4 tokens + 0 decode steps) does not fit in memory on its own" in err and "--dtype" in err
    assert not (tmp_path / "t.parquet").exists()


def test_bad_device_dtype_and_device_map_are_one_line(model_dirs, tmp_path, capsys, monkeypatch):
    from prism_plan.traces.profiler import choose_runtime

    dirs, prompts = model_dirs
    cases = [(["--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
             (["--dtype", "int8"], "'int8' is not one of 'bfloat16', 'float16', 'float32'"),
             (["--device", "cpu", "--device-map", "auto"], "--device-map auto spreads a model over GPUs"),
             (["--batch-size", "2", "--max-batch-tokens", "0"], "--max-batch-tokens")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device is cuda, but"))
    for flags, message in cases:
        code = main(["profile", "run", str(dirs["olmoe"]), "--prompts", str(prompts), "-o", str(tmp_path / "t.parquet"),
                     *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    for options, message in [(dict(device="tpu"), "unknown `device` 'tpu'"), (dict(dtype="half"), "unknown `dtype`"),
                             (dict(device_map="balanced"), "unknown `device_map`")]:
        with pytest.raises(PrismError, match=message):
            choose_runtime(**options)
    if importlib.util.find_spec("accelerate") is None:
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            with pytest.raises(PrismError, match="`device_map` auto needs accelerate, which is not installed"):
                choose_runtime(device="cuda", device_map="auto")
    with pytest.raises(PrismError, match="`trust_remote_code` must be True or False"):
        profile_model(dirs["olmoe"], prompts, tmp_path / "t.parquet", trust_remote_code="yes")
    matmul = torch.matmul

    def no_bf16(a, b):  # a torch build without bfloat16 kernels for this CPU
        if a.dtype == torch.bfloat16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')
        return matmul(a, b)
    monkeypatch.setattr(torch, "matmul", no_bf16)
    with pytest.raises(PrismError, match="cannot compute in bfloat16 on this CPU .*; use `dtype` float32"):
        choose_runtime(device="cpu", dtype="bfloat16")
    assert choose_runtime(device="cpu").dtype == "float32"


def test_a_model_too_large_for_memory_is_refused_before_loading(model_dirs, tmp_path, capsys, monkeypatch):
    from prism_plan.traces import profiler

    dirs, prompts = model_dirs
    monkeypatch.setattr(profiler, "free_memory", lambda device: 1000)  # bytes: the tiny model needs ~100 KiB
    code = main(["profile", "run", str(dirs["mixtral"]), "--prompts", str(prompts), "-o", str(tmp_path / "t.parquet"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "parameters" in err and "in float32, more than the 1000 B of memory free here" in err
    assert "run it on a GPU (--device cuda) or a machine with more memory" in err
    cpu, cuda, gib = profiler.Runtime("cpu", "float32"), profiler.Runtime("cuda", "bfloat16"), 2**30
    assert profiler.fit_runtime(cpu, "m", 10**9, 5 * gib, False) == cpu  # 3.73 GiB
    with pytest.raises(PrismError, match=r"15,700,000,000 parameters, 58.49 GiB in float32, more than the 40.00 GiB "
                                         r"of memory free here; in bfloat16 \(`dtype`\) it needs 29.24 GiB"):
        profiler.fit_runtime(cpu, "m", 15_700_000_000, 40 * gib, False)
    assert profiler.fit_runtime(cuda, "m", 10**9, 4 * gib, True) == cuda
    assert profiler.fit_runtime(cuda, "m", 10**10, 4 * gib, True) == profiler.Runtime("cuda", "bfloat16", "auto")
    with pytest.raises(PrismError, match=r"free holds with room to run; install accelerate \(pip install accelerate"):
        profiler.fit_runtime(cuda, "m", 10**10, 4 * gib, False)


REMOTE_CODE = '''
from transformers import MixtralConfig, MixtralForCausalLM


class TinyConfig(MixtralConfig):
    model_type = "prism_tiny_moe"


class TinyForCausalLM(MixtralForCausalLM):
    config_class = TinyConfig
'''


def test_trust_remote_code_runs_the_models_own_code(model_dirs, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file
    from transformers import dynamic_module_utils

    dirs, prompts = model_dirs
    # transformers copies remote code into its modules cache: keep it in tmp_path
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "modeling_tiny.py").write_text(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny", folder / "modeling_tiny.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    mixtral, _ = load_model(dirs["mixtral"], device="cpu")
    model = code.TinyForCausalLM(code.TinyConfig(**mixtral.config.to_dict()))
    model.load_state_dict(mixtral.state_dict())
    model.config.auto_map = {"AutoConfig": "modeling_tiny.TinyConfig",
                             "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    # save_pretrained would write Mixtral's per-expert layout, which transformers reads back only as a mixtral
    save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    run = ["profile", "run", str(folder), "--prompts", str(prompts), "--device", "cpu", "--max-new-tokens", "1"]
    assert main(run + ["-o", str(tmp_path / "refused.parquet")]) == 2
    err = capsys.readouterr().err
    assert "runs Python code of its own" in err and "--trust-remote-code" in err and len(err.splitlines()) == 1
    assert main(run + ["-o", str(tmp_path / "remote.parquet"), "--trust-remote-code"]) == 0
    assert any((tmp_path / "modules").rglob("modeling_tiny.py"))  # the code that ran is the folder's
    profile_model(dirs["mixtral"], prompts, tmp_path / "mixtral.parquet", device="cpu", max_new_tokens=1, quiet=True)
    mine, theirs = load_trace(tmp_path / "remote.parquet"), load_trace(tmp_path / "mixtral.parquet")
    assert np.array_equal(mine.experts, theirs.experts)


def test_transformers_warnings_stay_out_of_the_output(model_dirs, tmp_path):
    import subprocess
    import sys

    dirs, prompts = model_dirs
    # a fresh process: transformers says each deprecation once per process, so an earlier test cannot hide one
    run = subprocess.run([sys.executable, "-m", "prism_plan.cli", "profile", "run", str(dirs["deepseek_v2"]),
                          "--prompts", str(prompts), "-o", str(tmp_path / "t.parquet"), "--device", "cpu",
                          "--max-new-tokens", "2"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "always"})
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout.startswith(f"wrote {tmp_path / 't.parquet'}: ") and len(run.stdout.splitlines()) == 1
