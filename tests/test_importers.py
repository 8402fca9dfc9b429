"""Importers for SGLang, vLLM and Megatron-Core routing dumps: shapes as those systems write them."""

import base64
import io
import json
import re

import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.errors import PrismError
from prism_plan.placement.model import resolve_model
from prism_plan.traces.importing import import_trace
from prism_plan.traces.tables import ActivationTables, tables_from_trace
from prism_plan.traces.trace import load_trace

# A DeepSeek-style model: 4 hidden layers, layer 0 dense, MoE layers 1..3, 8 experts, top-2.
CONFIG = {"model_type": "deepseek_v3", "num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 8,
          "num_experts_per_tok": 2, "hidden_size": 16, "moe_intermediate_size": 8}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def per_token_dump(rng, tokens: int):
    """(dump, logical ids [tokens, 3, 2]): physical slots 0..9, slot s holds logical expert p2l[layer, s]."""
    p2l = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 3]), (4, 1))
    p2l[2] = np.roll(p2l[2], 1)
    phys = np.full((4, tokens, 8), -1)
    for layer in range(1, 4):  # two distinct experts per token, each on one of its slots
        for t in range(tokens):
            phys[layer, t, :2] = [rng.choice(np.flatnonzero(p2l[layer] == e)) for e in rng.choice(8, 2, replace=False)]
    logical = p2l[np.arange(1, 4)[:, None, None], phys[1:, :, :2]].transpose(1, 0, 2)
    return phys, p2l, logical


def sglang_record(phys, forward_pass_id, mode, positions, extend_seq_lens=None, rank=0):
    """A per_token record as SGLang's recorder writes it (ForwardMode EXTEND=1, DECODE=2, MIXED=3)."""
    import torch

    return {"forward_pass_id": forward_pass_id, "rank": rank, "gatherer_key": "primary", "forward_mode": mode,
            "input_ids": [7] * len(positions), "positions": positions, "extend_seq_lens": extend_seq_lens,
            "topk_ids_of_layer": torch.tensor(phys, dtype=torch.int32), "misc_objects": []}


def test_sglang_per_token_maps_physical_to_logical_phases_positions_and_requests(tmp_path, capsys, config):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    phys0, p2l, logical0 = per_token_dump(rng, 5)
    phys1, _, logical1 = per_token_dump(rng, 2)
    records = [sglang_record(phys0, 3, 1, [0, 1, 2, 6, 7], [3, 2]),  # two prompts, the second after 6 cached
               sglang_record(np.full((4, 4, 8), -1), 4, 2, [3, 8, 9, 9]),  # a draft model's pass: not recorded
               sglang_record(phys1, 4, 2, [3, 8])]  # their first decode tokens
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(p2l)}, tmp_path / "dump.pt")
    code, out, _ = run(capsys, "profile", "import", "--format", "sglang", tmp_path / "dump.pt", "--model", config,
                       "--origin", "chat", "-o", tmp_path / "t.parquet", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 7 and json.loads(out)["requests"] == 4
    trace = load_trace(tmp_path / "t.parquet")
    assert trace.meta.layers == (1, 2, 3) and trace.origins == ("chat",)
    assert np.array_equal(trace.experts, np.concatenate([logical0, logical1]))
    assert trace.request.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert trace.position.tolist() == [0, 1, 2, 6, 7, 3, 8]
    assert trace.decode.tolist() == [False] * 5 + [True] * 2


def test_sglang_mixed_pass_tells_the_decode_tail_from_prefill(tmp_path, config):
    torch = pytest.importorskip("torch")
    phys, p2l, _ = per_token_dump(np.random.default_rng(3), 6)
    # prefill of 2 tokens, a one-token prompt (position 0: prefill), then two running requests' decode tokens
    records = [sglang_record(phys, 0, 3, [0, 1, 0, 9, 4, 5], [2, 1, 1, 1, 1])]
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(p2l)}, tmp_path / "dump.pt")
    import_trace("sglang", tmp_path / "dump.pt", tmp_path / "t.parquet", model=resolve_model(config))
    trace = load_trace(tmp_path / "t.parquet")
    assert trace.decode.tolist() == [False, False, False, True, True, True]
    assert trace.request.tolist() == [0, 0, 1, 2, 3, 4]


def test_sglang_stat_becomes_tables_without_coactivation(tmp_path, capsys, config):
    torch = pytest.importorskip("torch")
    count = np.zeros((3, 4, 8))
    count[0, 1:] = np.arange(24).reshape(3, 8)
    count[1, 1:] = 2.0  # buffer entry 2 stays zero, layer 0 (dense) stays zero
    torch.save({"rank": 0, "logical_count": torch.tensor(count), "average_utilization_rate_over_window": 0.5},
               tmp_path / "stat.pt")
    code, out, _ = run(capsys, "profile", "import", "--format", "sglang", tmp_path / "stat.pt", "--model", config,
                       "-o", tmp_path / "t.npz", "--json")
    assert code == 0 and json.loads(out)["coactivation"] is False
    t = ActivationTables.load(tmp_path / "t.npz")
    assert t.origins == ("stat",) and t.coact is None and t.meta["coactivation"] is False
    assert t.meta["note"].startswith("SGLang's stat counts are summed over all ranks")
    assert np.array_equal(t.freq[0], count.sum(axis=0)[1:])
    (tmp_path / "c.toml").write_text('[defaults]\n[[server]]\nname="a"\nmemory_gib=1\norigins=["stat"]\n'
                                     '[[server]]\nname="b"\nmemory_gib=1\n')
    code, out, _ = run(capsys, "solve", "--tables", tmp_path / "t.npz", "--cluster", tmp_path / "c.toml", "--model",
                       config, "-o", tmp_path / "p.json", "--json")
    assert code == 0 and json.loads(out)["local_coverage"] == 1.0  # room for everything on the origin's server
    count[0, 0, 3] = 1  # a count in dense layer 0: not this model's dump
    torch.save({"rank": 0, "logical_count": torch.tensor(count)}, tmp_path / "stat.pt")
    code, _, err = run(capsys, "profile", "import", "--format", "sglang", tmp_path / "stat.pt", "--model", config,
                       "-o", tmp_path / "u.npz")
    assert code == 2 and "hidden layer 0 holds counts" in err


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d.pop("records"), "not an SGLang per_token dump"),
    (lambda d: d["records"][0].update(topk_ids_of_layer=d["records"][0]["topk_ids_of_layer"][:3]),
     "3 layers, but model"),
    (lambda d: d.update(last_physical_to_logical_map=d["last_physical_to_logical_map"][:, :4]),
     "physical id >= 4"),
    (lambda d: d["records"][0]["topk_ids_of_layer"][2, 0].fill_(-1), "has -1 among its top-2 ids"),
    (lambda d: d["records"][0]["topk_ids_of_layer"][:, 3].fill_(-1), "1 of its 4 tokens (the first: 3) have no"),
    (lambda d: d["records"][0]["topk_ids_of_layer"][0, 1, 0].fill_(2), "hidden layer 0 holds expert ids"),
    (lambda d: d["records"][0].update(extend_seq_lens=[2, 1]), "summing to its 4 tokens"),
    (lambda d: d["records"][0].update(extend_seq_lens=None), "extend_seq_lens"),
    (lambda d: d["records"][0].update(forward_mode=6), "forward_mode 6 (DRAFT_EXTEND_V2) holds expert ids"),
    (lambda d: d["records"][0].pop("forward_mode"), "no `forward_mode`"),
    (lambda d: d["records"][0].update(positions=[0, 1, 2]), "3 positions for 4 input_ids"),
    (lambda d: d["records"].append({**d["records"][0], "rank": 1}),
     "ranks 0 and 1 recorded the same tokens and expert ids in forward pass 0"),
])
def test_malformed_sglang_dumps_are_one_line(tmp_path, capsys, config, break_it, message):
    torch = pytest.importorskip("torch")
    phys, p2l, _ = per_token_dump(np.random.default_rng(1), 4)
    dump = {"records": [sglang_record(phys, 0, 1, [0, 1, 2, 3], [4])],
            "last_physical_to_logical_map": torch.tensor(p2l)}
    break_it(dump)
    torch.save(dump, tmp_path / "bad.pt")
    code, _, err = run(capsys, "profile", "import", "--format", "sglang", tmp_path / "bad.pt", "--model", config,
                       "-o", tmp_path / "t.parquet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.parquet").exists()


def test_vllm_routed_experts_from_npy_npz_and_a_folder(tmp_path, capsys, config):
    rng = np.random.default_rng(2)
    folder = tmp_path / "vllm"
    folder.mkdir()
    a, b, c = (np.argsort(rng.random((n, 3, 8)), axis=2)[:, :, :2] for n in (4, 6, 2))  # distinct top-2
    np.save(folder / "chat.npy", a)
    np.savez(folder / "code.npz", r0=b, r1=c)
    code, out, _ = run(capsys, "profile", "import", "--format", "vllm", folder, "--model", config, "-o",
                       tmp_path / "t.parquet", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["tokens"] == 12 and summary["requests"] == 3
    trace = load_trace(tmp_path / "t.parquet")
    assert trace.origins == ("chat", "code")
    assert np.array_equal(trace.experts, np.concatenate([a, b, c]))
    hidden = np.zeros((4, 4, 2), np.uint8)  # all hidden layers, as vLLM returns them: dense layer 0 stays zero
    hidden[:, 1:] = a
    np.save(folder / "chat.npy", hidden)
    code, out, _ = run(capsys, "profile", "import", "--format", "vllm", folder, "--model", config, "-o",
                       tmp_path / "u.parquet", "--json")
    assert code == 0 and np.array_equal(load_trace(tmp_path / "u.parquet").experts, np.concatenate([a, b, c]))
    hidden[2, 0] = [1, 0]
    np.save(folder / "chat.npy", hidden)
    code, _, err = run(capsys, "profile", "import", "--format", "vllm", folder, "--model", config, "-o",
                       tmp_path / "v.parquet")
    assert code == 2 and "layer 0 has expert ids" in err and "dense layers zero" in err
    np.save(folder / "chat.npy", np.zeros((4, 5, 2), np.uint8))
    code, _, err = run(capsys, "profile", "import", "--format", "vllm", folder, "--model", config, "-o",
                       tmp_path / "v.parquet")
    assert code == 2 and "[tokens, 4, 2] (all hidden layers, as vLLM returns them) or [tokens, 3, 2]" in err


def vllm_b64(arr: np.ndarray) -> str:
    """`arr` as vLLM's OpenAI server writes routed_experts: base64 of its .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def test_vllm_prompt_and_generated_tokens_become_prefill_and_decode(tmp_path, dsv2):
    rng = np.random.default_rng(5)
    routed = np.zeros((7, 27, 6), np.uint8)  # DeepSeek-V2-Lite: 27 hidden layers, layer 0 dense
    routed[:, 1:] = np.argsort(rng.random((7, 26, 64)), axis=2)[:, :, :6]
    np.save(tmp_path / "r.npy", routed)
    import_trace("vllm", tmp_path / "r.npy", tmp_path / "a.parquet", model=dsv2, prompt_tokens=5)
    trace = load_trace(tmp_path / "a.parquet")
    assert trace.meta.layers == tuple(range(1, 27)) and np.array_equal(trace.experts, routed[:, 1:])
    assert trace.position.tolist() == list(range(7)) and trace.decode.tolist() == [False] * 5 + [True] * 2
    # a completion with prompt_token_ids and token_ids: 5 prompt + 3 generated tokens, the last one not run;
    # the second choice's request skipped its first 2 prompt tokens (routed_experts_prompt_start=2)
    response = {"object": "text_completion", "choices": [
        {"index": 0, "prompt_token_ids": [1] * 5, "token_ids": [2] * 3, "routed_experts": vllm_b64(routed)},
        {"index": 1, "prompt_token_ids": [1] * 5, "token_ids": [2] * 3, "routed_experts": vllm_b64(routed[2:])},
        {"index": 2, "routed_experts": None}]}
    (tmp_path / "resp.json").write_text(json.dumps(response))
    summary = import_trace("vllm", tmp_path / "resp.json", tmp_path / "b.parquet", model=dsv2)
    trace = load_trace(tmp_path / "b.parquet")
    assert summary["requests"] == 2 and trace.request.tolist() == [0] * 7 + [1] * 5
    assert trace.position.tolist() == list(range(7)) + list(range(2, 7))
    assert trace.decode.tolist() == [False] * 5 + [True] * 2 + [False] * 3 + [True] * 2
    with pytest.raises(PrismError, match="lists 5 prompt tokens, but prompt_tokens=4"):
        import_trace("vllm", tmp_path / "resp.json", tmp_path / "c.parquet", model=dsv2, prompt_tokens=4)
    response["choices"][0]["token_ids"] = [2]
    (tmp_path / "resp.json").write_text(json.dumps(response))
    with pytest.raises(PrismError, match="7 rows of routed experts for 5 prompt and 1 generated tokens"):
        import_trace("vllm", tmp_path / "resp.json", tmp_path / "c.parquet", model=dsv2)


def megatron_records(rng, steps=2, tokens=3, layers=(2, 3, 4)):
    out = []
    for step in range(steps):
        for layer in layers:
            ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)])
            out.append({"rank": 0, "step": step, "layer": layer, "num_tokens": tokens, "topk": 2,
                        "top_indices": ids.tolist()})
    out.append({"rank": 0, "step": 0, "block": "mtp", "mtp_idx": 0, "layer": 2, "num_tokens": 1, "topk": 2,
                "top_indices": [[0, 1]]})
    return out


def test_megatron_router_trace(tmp_path, capsys, config):
    records = megatron_records(np.random.default_rng(3))
    (tmp_path / "router_trace_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run(capsys, "profile", "import", "--format", "megatron", tmp_path, "--model", config, "-o",
                       tmp_path / "t.parquet", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 6
    trace = load_trace(tmp_path / "t.parquet")
    assert trace.origins == ("rank0",) and trace.request.tolist() == [0, 0, 0, 1, 1, 1]
    first_step_layer_2 = np.array(records[0]["top_indices"])  # Megatron layer 2 = model layer 1
    assert np.array_equal(trace.experts[:3, 0], first_step_layer_2)
    assert tables_from_trace(tmp_path / "t.parquet").freq.sum() == 6 * 3 * 2


def test_megatron_micro_batches_and_pipeline_stages(tmp_path, config):
    """Hook-path records of two stages (hidden layers 0-1 on rank 0, 2-3 on rank 1, numbered stage-locally), two
    micro-batches per step: each micro-batch is a request whose tokens take their layers from both ranks."""
    rng = np.random.default_rng(4)
    ids = np.argsort(rng.random((2, 2, 3, 3, 8)), axis=-1)[..., :2]  # [step, micro-batch, tokens, MoE layer, k]
    files = {0: [], 1: []}
    for step in range(2):
        for micro in range(2):
            for moe, (rank, local) in enumerate([(0, 1), (1, 0), (1, 1)]):  # model layers 1, 2, 3
                files[rank].append({"step": step + 5, "stage": "pre_dispatch", "block": "decoder", "layer": local,
                                    "rank": rank, "num_tokens": 3, "topk": 2,
                                    "top_indices": ids[step, micro, :, moe].tolist()})
    for rank, records in files.items():
        (tmp_path / f"router_trace_rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = import_trace("megatron", tmp_path, tmp_path / "t.parquet", model=config)
    trace = load_trace(tmp_path / "t.parquet")
    assert summary["requests"] == 4 and trace.origins == ("rank0",)
    assert trace.request.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert np.array_equal(trace.experts, ids.reshape(12, 3, 2))
    for options, message in [({"stage_layers": (2, 1)}, "hold 3 layers, but model"),
                             ({"pipeline_stages": 3}, "do not split evenly into 3"),
                             ({"pipeline_stages": 4, "stage_layers": (2, 2)}, "names 2 stages"),
                             ({"stage_layers": (3, 1)}, "rank 1 (stage 1, hidden layers 3..3) recorded layers [0, 1]")]:
        with pytest.raises(PrismError, match=re.escape(message)):
            import_trace("megatron", tmp_path, tmp_path / "u.parquet", model=config, **options)


@pytest.mark.parametrize("records, message", [
    ([{"rank": 0, "step": 0, "layer": 2, "num_tokens": 1, "top_indices": [[0, 1]]}], "do not match model"),
    ([{"rank": 0, "step": 0, "layer": x, "num_tokens": 2, "top_indices": [[0, 1]]} for x in (2, 3, 4)],
     "num_tokens=2"),
    ([{"rank": 0, "step": 0, "layer": 2}], "not a router trace record"),
])
def test_malformed_megatron_traces(tmp_path, capsys, config, records, message):
    (tmp_path / "router_trace_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, _, err = run(capsys, "profile", "import", "--format", "megatron", tmp_path, "--model", config, "-o",
                       tmp_path / "t.parquet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_importers_need_the_model(tmp_path, capsys):
    code, _, err = run(capsys, "profile", "import", "--format", "vllm", tmp_path, "-o", tmp_path / "t.parquet")
    assert code == 2 and "pass --model" in err
    assert resolve_model("deepseek-v3").num_hidden_layers == 61
