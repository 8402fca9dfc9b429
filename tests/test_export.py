"""Exports to SGLang, vLLM-Ascend and EPLB: the readers' checks, and the round trip back to the plan."""

import json

import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.errors import PrismError
from prism_plan.fileio import DATA_DIR
from prism_plan.pipeline import make_plan
from prism_plan.placement.export import (ExportError, export_plan, origin_activations, physical_layout, read_eplb,
                                         read_sglang, read_vllm_ascend, to_sglang)
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


@pytest.mark.parametrize("fmt, reader", [("vllm-ascend", read_vllm_ascend), ("eplb", read_eplb)])
def test_other_exports_round_trip(plan, tmp_path, fmt, reader):
    out = tmp_path / ("x.npz" if fmt == "eplb" else "x.json")
    export_plan(plan, fmt, out)
    if fmt == "eplb":
        with np.load(out) as z:
            doc = {k: z[k] for k in z.files}
        assert doc["phy2log"].shape[0] == 26 and (doc["logcnt"] >= 1).all()
    else:
        doc = json.loads(out.read_text())
        assert doc["moe_layer_count"] == 26 and len(doc["layer_list"][0]["device_list"]) == 4
    assert np.array_equal(reader(doc, plan), plan.hosted)


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
    assert main(["export", "--plan", str(tmp_path / "p.json"), "--format", "tensorrt", "-o", "x"]) == 2


def test_export_options_are_checked_before_anything_is_written(plan, tmp_path):
    for fmt in ("SGLang", "trtllm", None):
        with pytest.raises(ExportError, match="unknown export format .*; choose one of sglang, vllm-ascend, eplb"):
            export_plan(plan, fmt, tmp_path / "out.json")
    other = ActivationTables.load(DATA_DIR / "tiny" / "tables-0.npz")
    with pytest.raises(PrismError, match="the tables is for a different model: layers"):
        export_plan(plan, "sglang", tmp_path / "out.json", tables=other)
    assert not any(tmp_path.iterdir())
