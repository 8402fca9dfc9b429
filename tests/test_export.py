"""Exports to SGLang, vLLM-Ascend, EPLB and TensorRT-LLM: the readers' checks, the round trip back to the plan, the
flags each server needs, and the memory check against a cluster."""

import json
import shlex
from dataclasses import replace

import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.errors import PrismError
from prism_plan.fileio import DATA_DIR
from prism_plan.pipeline import make_plan
from prism_plan.messages import describe_export
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.export import (ExportError, export_plan, origin_activations, physical_layout, read_eplb,
                                         read_sglang, read_trtllm, read_vllm_ascend, to_sglang, to_trtllm,
                                         to_vllm_ascend, traffic_demand)
from prism_plan.solvers import build_problem, get_solver
from prism_plan.traces.tables import ActivationTables


@pytest.fixture(scope="module")
def plan(esft_tables, edge4, dsv2):
    problem = build_problem(esft_tables, edge4, dsv2)
    return make_plan(problem, get_solver("exact").solve(problem))


def test_sglang_export_passes_sglang_checks_and_maps_back_to_the_plan(plan, tmp_path):
    summary = export_plan(plan, "sglang", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert list(doc) == ["physical_to_logical_map"]
    p2l = np.array(doc["physical_to_logical_map"])
    assert p2l.shape == (27, summary["physical_experts"])  # every hidden layer of DeepSeek-V2-Lite, dense layer 0 too
    assert p2l.shape[1] % 4 == 0 and summary["redundant_experts"] == p2l.shape[1] - 64
    assert p2l.min() >= 0 and p2l.max() < 64
    for l in range(1, 27):
        assert set(p2l[l]) == set(range(64))
    per = p2l.shape[1] // 4
    for s in range(4):  # GPU s holds slots [s*P/4, (s+1)*P/4): exactly the plan's experts of server s
        for i, layer in enumerate(plan.model.layers):
            assert set(p2l[layer, s * per:(s + 1) * per]) == set(np.flatnonzero(plan.hosted[s, i]))
    assert np.array_equal(read_sglang(doc, plan), plan.hosted)


@pytest.mark.parametrize("fmt, reader", [("eplb", read_eplb), ("trtllm", read_trtllm)])
def test_other_exports_round_trip(plan, tmp_path, fmt, reader):
    out = tmp_path / ("x.npz" if fmt == "eplb" else "x.yaml")
    summary = export_plan(plan, fmt, out)
    if fmt == "eplb":
        with np.load(out) as z:
            doc = {k: z[k] for k in z.files}
        assert doc["phy2log"].shape[0] == 26 and (doc["logcnt"] >= 1).all()
    else:
        doc = pytest.importorskip("yaml").safe_load(out.read_text())
        assert list(doc["initial_global_assignments"]) == list(range(1, 27))  # keyed by hidden-layer index
        assert doc["num_slots"] == summary["physical_experts"] and doc["layer_updates_per_iter"] == 0
    assert np.array_equal(reader(doc, plan), plan.hosted)


def test_vllm_ascend_devices_hold_distinct_experts_and_the_plans_own(plan, esft_tables, tmp_path):
    summary = export_plan(plan, "vllm-ascend", tmp_path / "x.json", tables=esft_tables)
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["moe_layer_count"] == 26 and len(doc["layer_list"][0]["device_list"]) == 4
    per = summary["slots_per_gpu"]
    for layer in doc["layer_list"]:
        for d in layer["device_list"]:
            assert len(set(d["device_expert"])) == len(d["device_expert"]) == per
    hosted = read_vllm_ascend(doc, plan)
    assert (hosted >= plan.hosted).all() and (hosted.sum(axis=2) == per).all()
    assert summary["redundant_experts"] == 4 * per - 64


def test_vllm_ascend_spare_slots_take_what_the_devices_traffic_uses_most(plan, esft_tables):
    freq = origin_activations(plan, esft_tables)
    layout = physical_layout(plan, freq, distinct=True)
    demand = traffic_demand(plan, freq)
    s = int(np.argmax(layout.padding))
    l = int(np.argmin(plan.hosted[s].sum(axis=1)))
    mine = np.flatnonzero(plan.hosted[s, l])
    extra = layout.slots[l, s, len(mine):]
    others = np.setdiff1d(np.arange(64), mine)
    assert not set(extra) & set(mine)
    assert demand[s, l, extra].min() >= np.sort(demand[s, l, others])[-len(extra)]
    # demand counts the server's traffic: where its origins go, not only what it hosts
    assert demand[s, l, others].sum() > 0


def test_every_export_names_its_servers_flags(plan, tmp_path):
    s = export_plan(plan, "sglang", tmp_path / "s.json")
    r = s["redundant_experts"]
    assert shlex.split(s["flags"]) == ["--tp-size", "4", "--ep-size", "4", "--ep-num-redundant-experts", str(r),
                                       "--init-expert-location", str(tmp_path / "s.json")]
    assert (64 + r) % 4 == 0
    v = export_plan(plan, "vllm-ascend", tmp_path / "v.json")
    args = shlex.split(v["flags"])
    assert args[:3] == ["--tensor-parallel-size", "4", "--enable-expert-parallel"] and args[3] == "--additional-config"
    assert json.loads(args[4]) == {"eplb_config": {"expert_map_path": str(tmp_path / "v.json"),
                                                   "num_redundant_experts": v["physical_experts"] - 64}}
    t = export_plan(plan, "trtllm", tmp_path / "t.yaml")
    assert "--ep_size 4" in t["flags"] and f'load_balancer: "{tmp_path / "t.yaml"}"' in t["notes"][0]
    e = export_plan(plan, "eplb", tmp_path / "e.npz")
    assert e["flags"] is None and "phy2log" in e["notes"][0]
    lines = describe_export(v)
    assert any(line.startswith("start vLLM-Ascend with --tensor-parallel-size 4") for line in lines)
    assert "replicas of experts hosted elsewhere" in lines[-1]


def cluster_with(memory_gib: list[float]):
    """edge-4's servers and origins with other memory."""
    servers = [{"name": f"edge-{c}", "memory_gib": m, "origins": [o]}
               for c, m, o in zip("abcd", memory_gib, ("intent", "law", "summary", "translation"))]
    return parse_cluster({"defaults": {"bandwidth_gbps": 1.0, "latency_ms": 1.0}, "server": servers})


def test_an_export_that_overflows_a_server_is_refused(plan, edge4, tmp_path):
    with pytest.raises(ExportError, match=r"gives every GPU 37 slots per MoE layer \(15.50 GiB\), but server 'edge-a' "
                                          r"has 6.00 GiB: 9.50 GiB over \(and 3 more servers over\); no equal-slot "
                                          r"layout fits it: 4 GPUs need at least 16 slots each \(6.70 GiB\)") as e:
        export_plan(plan, "sglang", tmp_path / "s.json", cluster=edge4)
    assert e.value.parameters == ("cluster",)
    with pytest.raises(ExportError, match=r"server 'edge-b' has 12.00 GiB: 3.50 GiB over; export a plan with at most "
                                          r"28 experts of any layer on every server \(this one has 37\)"):
        export_plan(plan, "vllm-ascend", tmp_path / "v.json", cluster=cluster_with([16, 12, 16, 16]))
    with pytest.raises(PrismError, match="pass the cluster file the plan was made for"):
        export_plan(plan, "trtllm", tmp_path / "t.yaml", cluster=parse_cluster(
            {"server": [{"name": "x", "memory_gib": 99, "origins": ["intent"]}]}))
    for fmt, name in [("sglang", "init.pt"), ("sglang", "init"), ("vllm-ascend", "MAP.JSON")]:
        with pytest.raises(ExportError, match=r"reads the map as a JSON file only when its name ends in \.json"):
            export_plan(plan, fmt, tmp_path / name)
    assert not any(tmp_path.iterdir())


def test_sglang_export_says_when_sglang_ignores_the_location(plan, tmp_path):
    mixtral = replace(plan, model=replace(plan.model, family="mixtral"))
    notes = export_plan(mixtral, "sglang", tmp_path / "m.json")["notes"]
    assert any("ignores --init-expert-location for this model" in n for n in notes)
    assert not any("ignores" in n for n in export_plan(plan, "sglang", tmp_path / "d.json")["notes"])
    fits = export_plan(plan, "eplb", tmp_path / "e.npz", cluster=cluster_with([15.51] * 4))
    assert fits["bytes_per_gpu"] == 37 * 26 * 17301504


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "holds only num_slots, layer_updates_per_iter, initial_global_assignments"),
    (lambda d: d.update(num_slots=d["num_slots"] + 1), "divisible by ep_size 4"),
    (lambda d: d.update(layer_updates_per_iter=2), "a static placement needs 0"),
    (lambda d: d["initial_global_assignments"].pop(7), "layer 7 needs a list of .* got nothing"),
    (lambda d: d["initial_global_assignments"][3].pop(), "layer 3 needs a list of .* got 147 values"),
    (lambda d: d["initial_global_assignments"][4].__setitem__(0, 64), "must lie in 0..63"),
    (lambda d: d["initial_global_assignments"][5].__setitem__(0, 1.0), "integer expert ids"),
    (lambda d: d["initial_global_assignments"][6].__setitem__(slice(None), [0] * d["num_slots"]),
     "layer 5 has no slot for expert 1"),
])
def test_trtllm_checks_reject_bad_configs(plan, mutate, message):
    doc = to_trtllm(plan, physical_layout(plan))
    mutate(doc)
    with pytest.raises(ExportError, match=message):
        read_trtllm(doc, plan)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["layer_list"][2]["device_list"][1]["device_expert"].__setitem__(0, d["layer_list"][2]["device_list"]
                                                                                  [1]["device_expert"][1]),
     "device 1 of layer 2 holds an expert twice"),
    (lambda d: d["layer_list"][0]["device_list"].reverse(), "rank order"),
])
def test_vllm_ascend_checks_reject_what_its_loader_misreads(plan, mutate, message):
    doc = to_vllm_ascend(plan, physical_layout(plan, distinct=True))
    mutate(doc)
    with pytest.raises(ExportError, match=message):
        read_vllm_ascend(doc, plan)
    with pytest.raises(ExportError, match="holds an expert twice"):  # the layout other formats use
        to_vllm_ascend(plan, physical_layout(plan))


def test_spare_slots_repeat_the_servers_hottest_experts(plan, esft_tables):
    freq = origin_activations(plan, esft_tables)
    layout = physical_layout(plan, freq)
    s = int(np.argmax(layout.padding))
    l = int(np.argmin(plan.hosted[s].sum(axis=1)))
    mine = np.flatnonzero(plan.hosted[s, l])
    extra = layout.slots[l, s, len(mine):]
    load = np.zeros(64)
    for o, origin in enumerate(plan.origins):
        served = plan.routing[o, l] == s
        load[served] += freq[o, l][served]
    assert set(extra) <= set(mine)
    assert load[extra[0]] == load[mine].max()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "only the key"),
    (lambda d: d.update(physical_to_logical_map=d["physical_to_logical_map"][:26]), "27 hidden layers"),
    (lambda d: [row.pop() for row in d["physical_to_logical_map"]], "do not divide"),
    (lambda d: d["physical_to_logical_map"][3].__setitem__(0, 64), "must lie in 0..63"),
    (lambda d: d["physical_to_logical_map"][5].__setitem__(slice(None), [0] * len(d["physical_to_logical_map"][5])),
     "layer 5 has no slot for expert 1"),
])
def test_sglang_checks_reject_bad_maps(plan, mutate, message):
    doc = to_sglang(plan, physical_layout(plan))
    mutate(doc)
    with pytest.raises(ExportError, match=message):
        read_sglang(doc, plan)


def test_cli_export_prints_what_sglang_needs(plan, esft_tables, tmp_path, capsys):
    plan.save(tmp_path / "p.json")
    esft_tables.save(tmp_path / "t.npz")
    assert main(["export", "--plan", str(tmp_path / "p.json"), "--format", "sglang", "-o", str(tmp_path / "s.json"),
                 "--tables", str(tmp_path / "t.npz")]) == 0
    out = capsys.readouterr().out
    assert "--ep-size 4 --ep-num-redundant-experts" in out and "second copies" in out
    assert main(["export", "--plan", str(tmp_path / "p.json"), "--format", "trtllm", "-o",
                 str(tmp_path / "t.yaml")]) == 0
    out = capsys.readouterr().out
    assert "start TensorRT-LLM with --tp_size 4 --ep_size 4" in out and "moe_config: {backend: WIDEEP" in out
    assert main(["export", "--plan", str(tmp_path / "p.json"), "--format", "tensorrt", "-o", "x"]) == 2


def test_export_options_are_checked_before_anything_is_written(plan, tmp_path):
    for fmt in ("SGLang", "tensorrt", None):
        with pytest.raises(ExportError, match="unknown export format .*; choose one of sglang, vllm-ascend, eplb, "
                                              "trtllm"):
            export_plan(plan, fmt, tmp_path / "out.json")
    other = ActivationTables.load(DATA_DIR / "tiny" / "tables-0.npz")
    with pytest.raises(PrismError, match="the tables is for a different model: layers"):
        export_plan(plan, "sglang", tmp_path / "out.json", tables=other)
    assert not any(tmp_path.iterdir())
