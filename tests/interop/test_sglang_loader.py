"""prism-plan's SGLang export loads through SGLang's own loader (sglang/srt/eplb/expert_location.py), started with
exactly the flags the export prints, and every (server, layer) of the loaded layout is the plan's."""

from __future__ import annotations

import argparse
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
import torch  # noqa: F401  (imported before real_modules, which drops what is imported inside it)

from interop.wheels import real_modules, require_or_skip, stand_in
from prism_plan.pipeline import make_plan
from prism_plan.placement.export import export_plan
from prism_plan.solvers import build_problem, get_solver

# the flags an SGLang export prints: the ServerArgs fields they set, and their types
FLAGS = {"tp_size": int, "ep_size": int, "ep_num_redundant_experts": int, "init_expert_location": str}


@pytest.fixture(scope="module")
def plan(esft_tables, edge4, dsv2):
    problem = build_problem(esft_tables, edge4, dsv2)
    return make_plan(problem, get_solver("exact").solve(problem))


def parse_flags(flags: str, root) -> argparse.Namespace:
    """The printed flags parsed as SGLang's fields (its CLI names a field `--` + name with dashes); an unknown flag
    fails."""
    declared = "".join((root / "sglang/srt/arg_groups/fields" / f).read_text() for f in ("exec_.py", "parallel.py"))
    parser = argparse.ArgumentParser(exit_on_error=False)
    for name, kind in FLAGS.items():
        assert f"    {name}: A[" in declared, f"SGLang has no field {name}"
        parser.add_argument("--" + name.replace("_", "-"), type=kind, required=True)
    return parser.parse_args(shlex.split(flags))


def load(args: argparse.Namespace, num_hidden_layers: int, num_experts: int, rank: int):
    """SGLang's ExpertLocationMetadata for EP rank `rank`, from compute_initial_expert_location_metadata with the
    server arguments `args`; static dispatch over an all-to-all backend, so each rank gets its dispatch table."""
    moe = SimpleNamespace(init_expert_location=args.init_expert_location,
                          ep_num_redundant_experts=args.ep_num_redundant_experts, ep_dispatch_algorithm="static",
                          moe_a2a_backend="deepep", ep_join_mode=None, eplb_algorithm="auto")
    # one GPU per server: each is its own node
    parallel = SimpleNamespace(ep_size=args.ep_size, tp_size=args.tp_size, nnodes=args.ep_size,
                               elastic_ep_initial_size=None)

    class DeepseekV2:  # the model class: its expert-location config, as DeepSeek's model file reads it
        @staticmethod
        def get_model_config_for_expert_location(config):
            from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation
            return ModelConfigForExpertLocation(num_layers=config.num_hidden_layers,
                                                num_logical_experts=config.n_routed_experts, num_groups=config.n_group)

    stand_ins = (
        stand_in("sglang.srt.runtime_context", get_device=lambda: SimpleNamespace(device="cpu"),
                 get_exec=lambda: SimpleNamespace(moe=moe), get_parallel=lambda: parallel,
                 get_resources=lambda: SimpleNamespace(expert_location_metadata=None)),
        stand_in("sglang.srt.elastic_ep.elastic_ep", elastic_expanded_world_enabled=lambda: False),
        stand_in("sglang.srt.model_loader", get_model_architecture=lambda config: (DeepseekV2, "DeepseekV2")),
    )
    hf_config = SimpleNamespace(num_hidden_layers=num_hidden_layers, n_routed_experts=num_experts, n_group=1)
    with real_modules("sglang", "sglang.srt.eplb.expert_location", stand_ins=stand_ins,
                      packages=("sglang.srt.elastic_ep",)) as mods:
        location = mods["sglang.srt.eplb.expert_location"]
        return location.compute_initial_expert_location_metadata(SimpleNamespace(hf_config=hf_config), rank)


def test_sglang_loads_the_export_with_its_printed_flags_as_the_plan_places_it(plan, esft_tables, tmp_path):
    root = require_or_skip("sglang")
    summary = export_plan(plan, "sglang", tmp_path / "location.json", tables=esft_tables)
    args = parse_flags(summary["flags"], root)
    m, ep, per = plan.model, len(plan.servers), summary["slots_per_gpu"]
    assert args.ep_size == args.tp_size == ep
    for rank in range(ep):
        meta = load(args, m.num_hidden_layers, m.num_experts, rank)
        assert meta.num_layers == m.num_hidden_layers  # the rows SGLang's DeepSeek model indexes by layer id
        assert meta.num_physical_experts == m.num_experts + args.ep_num_redundant_experts
        assert meta.ep_size == ep and meta.num_local_physical_experts == per
        p2l = meta.physical_to_logical_map_cpu.numpy()
        dispatch = meta.logical_to_rank_dispatch_physical_map.numpy()  # [hidden layers, E] this rank's slot
        for i, layer in enumerate(m.layers):
            for s in range(ep):
                assert set(p2l[layer, s * per:(s + 1) * per]) == set(np.flatnonzero(plan.hosted[s, i]))
            # every expert goes to a slot holding it, and to this rank's own slot when the plan puts it here
            assert (p2l[layer, dispatch[layer]] == np.arange(m.num_experts)).all()
            local = dispatch[layer] // per == rank
            assert np.array_equal(local, plan.hosted[rank, i])
        assert set(p2l[0]) == set(range(m.num_experts))  # the dense layer keeps SGLang's trivial layout
