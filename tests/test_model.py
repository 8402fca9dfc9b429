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


GOOD = {"name": "m", "layers": [0, 1], "num_experts": 4, "top_k": 2, "expert_bytes": 10, "hidden_size": 8}


@pytest.mark.parametrize("change, message", [
    ({"layers": 5}, "`layers` must be a non-empty list"),
    ({"layers": []}, "`layers` must be a non-empty list"),
    ({"layers": [0, "1"]}, "every MoE layer number must be an integer from 0 to 10000, got '1'"),
    ({"layers": [0, 1.0]}, "got 1.0"),
    ({"layers": [-1, 0]}, "got -1"),
    ({"layers": [1, 1]}, "MoE layer numbers repeat"),
    ({"num_experts": 0}, "`num_experts` must be an integer from 1 to 32768, got 0"),
    ({"num_experts": 4.0}, "got 4.0"),
    ({"top_k": True}, "`top_k` .* got True"),
    ({"top_k": 5}, "`top_k` .* from 1 to 4, got 5"),
    ({"expert_bytes": 0}, "`expert_bytes` must be an integer from 1"),
    ({"expert_bytes": 2**50}, "`expert_bytes` must be an integer from 1"),
    ({"expert_bytes": [10, "20"]}, "every `expert_bytes` value"),
    ({"hidden_size": -8}, "`hidden_size` must be an integer from 1"),
    ({"act_bytes": 0}, "`act_bytes` must be an integer from 1 to 8"),
    ({"shared_experts": -1}, "`shared_experts`"),
    ({"num_hidden_layers": 1}, r"`num_hidden_layers` \(0: the last MoE layer \+ 1\) must be an integer from 2"),
    ({"expert_flops": -1}, "`expert_flops`"),
    ({"family": None}, "`family` must be a string"),
    ({"name": 3}, "`name` must be a non-empty string"),
])
def test_model_descriptions_need_exact_types_and_sane_sizes(change, message):
    with pytest.raises(PrismError, match=message) as e:
        ModelSpec.from_dict({**GOOD, **change}, "f.json", "fix it")
    assert str(e.value).startswith("f.json: ") and str(e.value).endswith("; fix it")
    assert ModelSpec.from_dict(GOOD).num_hidden_layers == 2
    with pytest.raises(PrismError, match="f.json: model description lacks hidden_size"):
        ModelSpec.from_dict({k: v for k, v in GOOD.items() if k != "hidden_size"}, "f.json")


MIXTRAL = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "hidden_size": 8, "intermediate_size": 16, "dtype": "bfloat16"}


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": "2"}, "`num_hidden_layers` must be an integer from 1 to 10000, got '2'"),
    ({"num_local_experts": 4.5}, "`num_local_experts` must be an integer from 1 to 32768, got 4.5"),
    ({"num_experts_per_tok": 5}, "`num_experts_per_tok` must be an integer from 1 to 4, got 5"),
    ({"hidden_size": 0}, "`hidden_size` must be an integer from 1"),
    ({"intermediate_size": False}, "`intermediate_size` must be an integer"),
    ({"dtype": "float13"}, "unknown weight dtype 'float13'"),
    ({"dtype": {"a": 1}}, "unknown weight dtype"),
    ({"quantization_config": "fp8"}, "`quantization_config` must be an object"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "`weight_block_size` must be"),
    ({"moe_layers": [0, 9]}, "every `moe_layers` value must be an integer from 0 to 1"),
    ({"first_k_dense_replace": 2}, "none of its 2 layers is a MoE layer"),
    ({"first_k_dense_replace": "1"}, "`first_k_dense_replace` must be an integer"),
    ({"decoder_sparse_step": 0}, "`decoder_sparse_step` must be an integer from 1 to"),
    ({"text_config": [1]}, "`text_config` must be an object"),
    ({"model_type": 7}, "`model_type` must be a string"),
])
def test_configs_with_wrong_types_name_the_file(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**MIXTRAL, **change}))
    with pytest.raises(PrismError, match=message) as e:
        resolve_model(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(PrismError, match="must be a JSON object"):
        resolve_model(str(tmp_path))


def test_expert_groups_come_from_n_group():
    assert resolve_model("deepseek-v3").expert_groups == 8
    assert resolve_model("deepseek-v2-lite").expert_groups == 1 and resolve_model("mixtral-8x7b").expert_groups == 1
    v3 = resolve_model("deepseek-v3").to_dict()
    assert v3["expert_groups"] == 8 and ModelSpec.from_dict(v3).expert_groups == 8
    lite = resolve_model("deepseek-v2-lite").to_dict()
    assert "expert_groups" not in lite  # optional: files written before it read and hash the same
    assert ModelSpec.from_dict(lite).expert_groups == 1
    assert from_hf_config({**MIXTRAL, "n_group": None}).expert_groups == 1
    with pytest.raises(PrismError, match="4 experts do not split into 3 equal `expert_groups`"):
        from_hf_config({**MIXTRAL, "n_group": 3})
    with pytest.raises(PrismError, match="`n_group` must be an integer from 1 to 4"):
        from_hf_config({**MIXTRAL, "n_group": 8})
