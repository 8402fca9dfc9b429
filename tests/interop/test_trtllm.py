"""TensorRT-LLM both ways, without its wheel (none imports on a CPU): an export meets the checks TensorRT-LLM applies
to a load-balancer config (MoeLoadBalancerConfig in tensorrt_llm/llmapi/llm_args.py, setInitialWeightAssignments
in its C++ load balancer, as examples/wide_ep/ep_load_balancer/README.md documents them), and statistics dumps
written the way its ExpertStatistic writes them import to their counts."""

from __future__ import annotations

import argparse
import json
import shlex

import numpy as np
import pytest
import torch

from prism_plan.errors import PrismError
from prism_plan.fileio import DATA_DIR
from prism_plan.pipeline import make_plan
from prism_plan.placement.export import export_plan
from prism_plan.solvers import build_problem, get_solver
from prism_plan.traces.importing import import_trace
from prism_plan.traces.tables import ActivationTables

yaml = pytest.importorskip("yaml")
save_file = pytest.importorskip("safetensors.torch").save_file

TINY = DATA_DIR / "tiny" / "model"  # layers 0, 1, 2 of 3 hidden layers, 6 experts, top-2
# MoeLoadBalancerConfig's fields; it is a StrictBaseModel, so any other key is refused
CONFIG_KEYS = {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
MOE_BACKENDS = {"AUTO", "CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "DENSEGEMM", "VANILLA", "TRITON",
                "MARLIN", "MEGAMOE_DEEPGEMM"}  # MoeConfig.backend's Literal


@pytest.fixture(scope="module")
def plan(esft_tables, edge4, dsv2):
    problem = build_problem(esft_tables, edge4, dsv2)
    return make_plan(problem, get_solver("exact").solve(problem))


def test_the_export_passes_tensorrt_llms_checks_and_places_the_plan(plan, esft_tables, tmp_path):
    out = tmp_path / "moe_load_balancer.yaml"
    summary = export_plan(plan, "trtllm", out, tables=esft_tables)
    doc = yaml.safe_load(out.read_text())
    m, ep = plan.model, len(plan.servers)
    assert set(doc) <= CONFIG_KEYS and doc["layer_updates_per_iter"] == 0  # static: no weight updates
    num_slots, table = doc["num_slots"], doc["initial_global_assignments"]
    assert isinstance(num_slots, int) and num_slots % ep == 0  # MoeLoadBalancerConfig.setup
    local = num_slots // ep
    for i, layer in enumerate(m.layers):  # keyed by hidden-layer index; dense layer 0 has none
        ids = table[layer]  # get_layer_initial_global_assignments: a KeyError when missing
        assert len(ids) == num_slots and all(0 <= e < m.num_experts for e in ids)  # setInitialWeightAssignments
        assert (np.bincount(ids, minlength=m.num_experts) > 0).all()  # every expert has a replica to route to
        for rank in range(ep):  # slot j on rank j // (num_slots / ep)
            assert set(ids[rank * local:(rank + 1) * local]) == set(np.flatnonzero(plan.hosted[rank, i]))
    assert 0 not in table
    parser = argparse.ArgumentParser(exit_on_error=False)
    for flag in ("--tp_size", "--ep_size"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--extra_llm_api_options", required=True)
    args = parser.parse_args(shlex.split(summary["flags"]))
    assert args.tp_size == args.ep_size == ep
    options = yaml.safe_load(summary["notes"][0].split("holds: ", 1)[1])
    assert options == {"moe_config": {"backend": "WIDEEP", "load_balancer": str(out)}}
    assert options["moe_config"]["backend"] in MOE_BACKENDS


def write_dump(folder, counts: dict, meta: dict) -> None:
    """A statistics dump as TensorRT-LLM's ExpertStatistic writes it: rank 0's meta_info.json, one safetensors file
    per rank of `<iteration>_<layer>` bincounts; counts[rank][(iteration, layer)] = int64 tensor."""
    folder.mkdir(parents=True)
    (folder / "meta_info.json").write_text(json.dumps(meta))
    for rank, records in counts.items():
        save_file({f"{i}_{x}": c for (i, x), c in records.items()}, str(folder / f"rank{rank}.safetensors"))


def routed(rng, tokens: int, num_experts: int = 6, k: int = 2) -> torch.Tensor:
    """[tokens, k] distinct expert ids per token, as a router picks them."""
    return torch.from_numpy(np.ascontiguousarray(np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :k]))


def dump_of(rng, iters=range(5, 8), layers=(0, 1, 2, 3), ranks=2, tokens=40):
    """counts[rank][(iteration, layer)] of random routing (layer 3 is a multi-token-prediction layer), and the raw
    ids behind them."""
    raw = {r: {(i, x): routed(rng, tokens) for i in iters for x in layers} for r in range(ranks)}
    counts = {r: {key: torch.bincount(ids.flatten(), minlength=6) for key, ids in rec.items()}
              for r, rec in raw.items()}
    return counts, raw


def test_statistics_dumps_import_to_their_counts(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for origin, tokens in (("law", 40), ("intent", 25)):
        counts, raw = dump_of(rng, tokens=tokens)
        write_dump(tmp_path / "dumps" / origin, counts, {"num_experts": 6, "num_experts_per_token": 2})
        # raw ids beside the counts (EXPERT_STATISTIC_DUMP_RAW) are not counts: they must be left alone
        save_file({f"{i}_{x}": ids for (i, x), ids in raw[0].items()},
                  str(tmp_path / "dumps" / origin / "rank0_raw.safetensors"))
        expected[origin] = np.stack([sum(c[(i, x)].numpy() for c in counts.values() for i in range(5, 8))
                                     for x in (0, 1, 2)])
    s = import_trace("trtllm", tmp_path / "dumps", tmp_path / "t.npz", model=TINY)
    t = ActivationTables.load(tmp_path / "t.npz")
    assert s["tables"] and s["origins"] == ["intent", "law"] and t.origins == ("intent", "law")
    assert t.layers == (0, 1, 2) and t.coact is None and t.meta["coactivation"] is False
    assert np.array_equal(t.freq, np.stack([expected["intent"], expected["law"]]))
    assert t.tokens.tolist() == [2 * 3 * 25, 2 * 3 * 40]  # ranks x iterations x tokens
    one = import_trace("trtllm", tmp_path / "dumps" / "law" / "meta_info.json", tmp_path / "one.npz", model=TINY,
                       origin="edge")
    assert one["origins"] == ["edge"] and one["tokens"] == 240


META = {"num_experts": 6, "num_experts_per_token": 2}


@pytest.mark.parametrize("change, meta, message", [
    (None, {"num_experts": 8, "num_experts_per_token": 2}, "8 experts, but model 'model' has 6; .* counts its slots"),
    (None, {"num_experts": 6, "num_experts_per_token": 3}, "top-3 routing"),
    (None, {"num_experts": "6", "num_experts_per_token": 2}, "`num_experts` must be an integer"),
    (lambda c: [r.pop((6, 1)) for r in c.values()], META, "no counts for iteration 6 of layer 1"),
    (lambda c: [[r.pop((i, 2)) for i in range(5, 8)] for r in c.values()], META, "no counts for MoE layer 2"),
    (lambda c: c[1].update({"5-0": torch.zeros(6, dtype=torch.int64)}), META, "not named <iteration>_<layer>"),
    (lambda c: c[1].update({(5, 0): torch.zeros(4, dtype=torch.int64)}), META, r"expected integer counts \[6\]"),
    (lambda c: c[0].update({(5, 0): torch.zeros(6)}), META, "float32"),
])
def test_malformed_dumps_are_one_line(tmp_path, change, meta, message):
    counts, _ = dump_of(np.random.default_rng(1))
    if change is not None:
        change(counts)
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps(meta))
    for rank, records in counts.items():
        save_file({k if isinstance(k, str) else f"{k[0]}_{k[1]}": c for k, c in records.items()},
                  str(folder / f"rank{rank}.safetensors"))
    with pytest.raises(PrismError, match=message) as e:
        import_trace("trtllm", folder, tmp_path / "t.npz", model=TINY)
    assert "\n" not in str(e.value) and not (tmp_path / "t.npz").exists()


def test_dumps_hold_counts_only_and_live_in_their_folder(tmp_path):
    counts, _ = dump_of(np.random.default_rng(2))
    write_dump(tmp_path / "d", counts, META)
    with pytest.raises(PrismError, match="counts only: write `out` as a .npz"):
        import_trace("trtllm", tmp_path / "d", tmp_path / "t.parquet", model=TINY)
    with pytest.raises(PrismError, match="is a file; give the folder TensorRT-LLM wrote"):
        import_trace("trtllm", tmp_path / "d" / "rank0.safetensors", tmp_path / "t.npz", model=TINY)
    (tmp_path / "d" / "meta_info.json").unlink()
    with pytest.raises(PrismError, match="holds no meta_info.json"):
        import_trace("trtllm", tmp_path, tmp_path / "t.npz", model=TINY)
    (tmp_path / "d" / "rank0.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "d" / "meta_info.json").write_text(json.dumps(META))
    with pytest.raises(PrismError, match="rank0.safetensors is not a readable statistics file"):
        import_trace("trtllm", tmp_path / "d", tmp_path / "t.npz", model=TINY)
