"""`profile run` on tiny random-weight models of every supported family, checked token by token against the
indices each model's experts really receive, unbatched, for prefill and decode."""

import json

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

    def run():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        yield
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            yield

    with torch.inference_mode():
        for call in experts_calls(model, run):
            rows.append(np.stack([call[x] for x in sorted(call)], axis=1))
    return np.concatenate(rows)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_routing_is_the_models_own(family, model_dirs, tmp_path):
    dirs, prompts = model_dirs
    summary = profile_model(dirs[family], prompts, tmp_path / "t.parquet", max_new_tokens=3, batch_size=3,
                            quiet=True)
    trace = load_trace(tmp_path / "t.parquet")
    model, _ = load_model(dirs[family])
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
    profile_model(dirs[family], prompts, tmp_path / "t.parquet", batch_size=5, quiet=True)
    trace = load_trace(tmp_path / "t.parquet")
    model, _ = load_model(dirs[family])
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
                 "--max-new-tokens", "2", "--json", "--quiet"])
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
    load_model(dirs["qwen3_moe"])[0].save_pretrained(folder)
    fast.save_pretrained(folder)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"domain": "x", "text": "w1 w2 w3"}\n{"domain": "y", "text": "w4 w5"}\n')
    summary = profile_model(folder, prompts, tmp_path / "t.parquet", origin_field="domain", quiet=True)
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
    profile_model(dirs["deepseek_v3"], prompts, tmp_path / "t.parquet", quiet=True)
    assert load_trace(tmp_path / "t.parquet").meta.spec["layers"] == [1, 2]
    assert main(["profile", "tables", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "t.npz")]) == 0
    (tmp_path / "c.toml").write_text('[defaults]\n[[server]]\nname="a"\nmemory_gib=1\norigins=["a", "c"]\n'
                                     '[[server]]\nname="b"\nmemory_gib=1\norigins=["b"]\n')
    capsys.readouterr()
    assert main(["solve", "--tables", str(tmp_path / "t.npz"), "--cluster", str(tmp_path / "c.toml"), "-o",
                 str(tmp_path / "p.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["local_coverage"] == 1.0
