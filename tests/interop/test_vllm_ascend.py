"""vLLM-Ascend's own loader (vllm_ascend/eplb/core/eplb_utils.py: init_eplb_config, which reads the map with
expert_file_to_tensor and numbers slots with generate_log2phy_map), configured by the real EplbConfig from exactly
the flags the export prints, sends every (layer, rank, expert) of a prism-plan export to a slot holding that expert:
for the quickstart-like plan on edge-4 and for a homogeneous cluster."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from interop.wheels import real_modules, require_or_skip, stand_in
from prism_plan.pipeline import make_plan
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.export import export_plan, physical_layout
from prism_plan.solvers import build_problem, get_solver

ORIGINS = ("intent", "law", "summary", "translation")


def exact_plan(tables, cluster, model):
    problem = build_problem(tables, cluster, model)
    return make_plan(problem, get_solver("exact").solve(problem))


@pytest.fixture(scope="module")
def edge4_plan(esft_tables, edge4, dsv2):
    return exact_plan(esft_tables, edge4, dsv2)


@pytest.fixture(scope="module")
def even_plan(esft_tables, dsv2):
    """Four equal servers with edge-4's total memory."""
    servers = [{"name": f"gpu{i}", "memory_gib": 9.0, "origins": [o]} for i, o in enumerate(ORIGINS)]
    return exact_plan(esft_tables, parse_cluster({"defaults": {"bandwidth_gbps": 1.0, "latency_ms": 1.0},
                                                  "server": servers}), dsv2)


def parse_flags(flags: str) -> argparse.Namespace:
    """The printed flags parsed with vLLM's names for them (checked in its wheel); an unknown flag fails."""
    arg_utils = (require_or_skip("vllm") / "vllm/engine/arg_utils.py").read_text()
    parser = argparse.ArgumentParser(exit_on_error=False)
    for flag, options in (("--tensor-parallel-size", {"type": int, "required": True}),
                          ("--enable-expert-parallel", {"action": "store_true"}),
                          ("--additional-config", {"type": json.loads, "required": True})):
        assert f'"{flag}"' in arg_utils, f"vLLM has no flag {flag}"
        parser.add_argument(flag, **options)
    return parser.parse_args(shlex.split(flags))


def dispatch(args: argparse.Namespace, num_layers: int, num_experts: int, monkeypatch) -> np.ndarray:
    """[MoE layers, EP ranks, experts] the physical slot vLLM-Ascend sends each expert's tokens to on each rank,
    and checks the redundancy it derives from the map against the one the flags give."""
    stand_ins = (stand_in("vllm.logger", logger=logging.getLogger("vllm")),
                 stand_in("vllm.utils.math_utils", cdiv=lambda a, b: -(-a // b)),
                 # used only without a map: a call means the export's map was not read
                 stand_in("vllm.model_executor.layers.fused_moe.expert_map_manager", determine_expert_map=None))
    monkeypatch.setattr(torch.Tensor, "npu", lambda self: self, raising=False)  # no Ascend device here
    ep = args.tensor_parallel_size
    with real_modules("vllm_ascend", "vllm_ascend.eplb.core.eplb_utils", "vllm_ascend.ascend_config",
                      stand_ins=stand_ins) as mods:
        config = mods["vllm_ascend.ascend_config"].EplbConfig(args.additional_config["eplb_config"])
        init = mods["vllm_ascend.eplb.core.eplb_utils"].init_eplb_config
        slots = np.zeros((num_layers, ep, num_experts), np.int64)
        for layer in range(num_layers):
            for rank in range(ep):
                moe = SimpleNamespace(num_experts=num_experts, ep_size=ep, ep_rank=rank)
                _, _, log2phy, redundant = init(config, layer, moe, tp_size=ep)
                assert redundant == config.num_redundant_experts
                slots[layer, rank] = log2phy.numpy()
    return slots


def misrouted(doc: dict, slots: np.ndarray) -> int:
    """How many (layer, rank, expert) entries of `slots` name a physical slot that does not hold the expert."""
    held = np.array([[d["device_expert"] for d in layer["device_list"]] for layer in doc["layer_list"]])
    flat = held.reshape(len(held), -1)  # [layers, P]: slot p is entry p % per of device p // per
    got = np.take_along_axis(flat, slots.reshape(len(flat), -1), axis=1).reshape(slots.shape)
    return int((got != np.arange(slots.shape[2])).sum())


@pytest.mark.parametrize("which", ["edge4_plan", "even_plan"])
def test_vllm_ascend_sends_every_expert_to_a_slot_holding_it(which, esft_tables, tmp_path, monkeypatch, request):
    require_or_skip("vllm_ascend")
    plan = request.getfixturevalue(which)
    summary = export_plan(plan, "vllm-ascend", tmp_path / "map.json", tables=esft_tables)
    args = parse_flags(summary["flags"])
    assert args.enable_expert_parallel and args.tensor_parallel_size == len(plan.servers)
    doc = json.loads((tmp_path / "map.json").read_text())
    slots = dispatch(args, plan.model.num_layers, plan.model.num_experts, monkeypatch)
    assert misrouted(doc, slots) == 0
    assert args.additional_config["eplb_config"]["num_redundant_experts"] == summary["physical_experts"] - 64


def test_second_copies_on_a_device_misroute_in_vllm_ascend(edge4_plan, tmp_path, monkeypatch):
    """What the export did before: spare slots held second copies, and the loader's slot numbering (by distinct
    experts on rank 0) pointed most entries at other experts."""
    require_or_skip("vllm_ascend")
    layout = physical_layout(edge4_plan)
    devices = [[{"device_id": s, "device_expert": layout.slots[l, s].tolist()} for s in range(4)] for l in range(26)]
    doc = {"moe_layer_count": 26, "layer_list": [{"layer_id": l, "device_count": 4, "device_list": devices[l]}
                                                 for l in range(26)]}
    (tmp_path / "map.json").write_text(json.dumps(doc))
    config = {"eplb_config": {"expert_map_path": str(tmp_path / "map.json"),
                              "num_redundant_experts": layout.physical - 64}}
    args = argparse.Namespace(tensor_parallel_size=4, additional_config=config)
    assert misrouted(doc, dispatch(args, 26, 64, monkeypatch)) > 26 * 4 * 64 // 2
