import json

import pytest

from prism_plan.errors import PrismError
from prism_plan.placement.model import PRESETS, ModelSpec, from_hf_config, resolve_model

# Figures from the models' published Hugging Face configs.
EXPECTED = {
    # name: (first MoE layer, last, count, experts, top_k, expert bytes, shared experts)
    "deepseek-v2-lite": (1, 26, 26, 64, 6, 3 * 2048 * 1408 * 2, 2),
    "mixtral-8x7b": (0, 31, 32, 8, 2, 3 * 4096 * 14336 * 2, 0),
    "qwen3-30b-a3b": (0, 47, 48, 128, 8, 3 * 2048 * 768 * 2, 0),
    # FP8 weights plus one float32 scale per 128 x 128 block of each of the 3 matrices (7168 x 2048).
    "deepseek-v3": (3, 60, 58, 256, 8, 3 * 7168 * 2048 + 4 * 3 * 56 * 16, 1),
    "olmoe-1b-7b": (0, 15, 16, 64, 8, 3 * 2048 * 1024 * 2, 0),
    # MXFP4: half a byte per weight and a byte per 32 weights, plus bf16 biases.
    "gpt-oss-120b": (0, 35, 36, 128, 4, 3 * 2880 * 2880 // 2 + 3 * 2880 * 2880 // 32 + 2 * (3 * 2880), 0),
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_match_published_configs(name):
    m = resolve_model(name)
    first, last, count, experts, top_k, nbytes, shared = EXPECTED[name]
    assert (m.layers[0], m.layers[-1], m.num_layers) == (first, last, count)
    assert (m.num_experts, m.top_k, m.expert_bytes, m.shared_experts) == (experts, top_k, nbytes, shared)


def test_deepseek_v2_lite_expert_is_design_figure():
    assert resolve_model("deepseek-v2-lite").expert_bytes == 17301504


def test_config_json_and_model_folder(tmp_path):
    cfg = {"model_type": "qwen2_moe", "num_hidden_layers": 6, "num_experts": 16, "num_experts_per_tok": 4,
           "decoder_sparse_step": 2, "mlp_only_layers": [3], "hidden_size": 64, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 128, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for spec in (tmp_path, tmp_path / "config.json"):
        m = resolve_model(str(spec))
        assert m.layers == (1, 5)  # (i + 1) % 2 == 0 and layer 3 dense
        assert m.expert_bytes == 3 * 64 * 32 * 4
        assert m.shared_experts == 1 and m.shared_expert_bytes == 3 * 64 * 128 * 4
        assert m.num_hidden_layers == 6


def test_transformers_style_config_object():
    class Cfg:
        def to_dict(self):
            return {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4,
                    "num_experts_per_tok": 2, "hidden_size": 8, "intermediate_size": 16, "dtype": "bfloat16"}

    m = from_hf_config(Cfg())
    assert m.layers == (0, 1) and m.expert_bytes == 3 * 8 * 16 * 2


def test_bad_model_inputs(tmp_path):
    with pytest.raises(PrismError, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(PrismError, match="not a MoE config"):
        from_hf_config({"num_hidden_layers": 2, "hidden_size": 8})
    with pytest.raises(PrismError, match="top_k"):
        ModelSpec("m", (0,), 4, 5, 10, 8)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(PrismError, match="not valid JSON"):
        resolve_model(str(tmp_path))


def test_to_dict_round_trip():
    m = resolve_model("deepseek-v3")
    assert ModelSpec.from_dict(m.to_dict()) == m
    with pytest.raises(PrismError, match="unknown keys"):
        ModelSpec.from_dict({**m.to_dict(), "typo": 1})


def test_per_layer_expert_bytes():
    m = ModelSpec("m", (0, 1, 2), 4, 2, (10, 20, 30), 8)
    assert list(m.layer_bytes) == [10, 20, 30] 
    assert m.routed_bytes == 4 * 60
    with pytest.raises(PrismError, match="one value per layer"):
        ModelSpec("m", (0, 1), 4, 2, (10,), 8)
