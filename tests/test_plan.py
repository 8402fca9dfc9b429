import json

import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.pipeline import solve_placement
from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.plan import Plan, PlanError


@pytest.fixture(scope="module")
def plan(esft_tables, edge4, dsv2):
    return solve_placement(esft_tables, edge4, dsv2)


def test_plan_json_follows_the_contract(plan, tmp_path, edge4):
    plan.save(tmp_path / "p.json", edge4)
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["format"] == "prism-plan/plan" and d["version"] == 1
    assert d["servers"] == edge4.names and d["objective"] == "coverage"
    assert d["model"]["expert_bytes"] == 17301504 and d["model"]["layers"][0] == 1
    assert set(d["placement"]["edge-a"]) == {str(x) for x in range(1, 27)}
    assert d["routing"]["intent"]["1"]["0"] in edge4.names
    assert set(d["solver"]) >= {"name", "status", "objective", "bound", "gap"} and "seconds" not in d["solver"]
    assert d["solver"]["status"] == "optimal" and d["solver"]["gap"] == 0.0
    assert set(d["inputs"]) == {"tables_sha256", "cluster_sha256"}
    assert 0 < d["metrics"]["local_coverage"] < 1


def test_round_trip(plan, tmp_path):
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert np.array_equal(back.hosted, plan.hosted) and np.array_equal(back.routing, plan.routing)
    assert back.model == plan.model and back.sha256() == plan.sha256()


def test_routing_prefers_home_then_cheapest_host(plan, edge4):
    homes = np.arange(4)
    at_home = plan.hosted[homes]  # [origins, layers, experts]
    assert (plan.routing[at_home] == np.broadcast_to(homes[:, None, None], at_home.shape)[at_home]).all()
    # intent (edge-a) reaches edge-b over the 1 ms link: edge-b serves what edge-a lacks and edge-b holds
    lacks = ~plan.hosted[0] & plan.hosted[1]
    assert (plan.routing[0][lacks] == 1).all()


def test_invalid_plans_are_errors_never_files(plan, tmp_path, edge4):
    missing = plan.hosted.copy()
    missing[:, 3, 7] = False
    bad = Plan(plan.model, plan.servers, plan.origins, missing, plan.routing, "coverage", plan.solver)
    with pytest.raises(PlanError, match="expert 7 of layer 4 0 time"):
        bad.save(tmp_path / "bad.json")
    full = plan.hosted.copy()
    full[0] = True
    fat = Plan(plan.model, plan.servers, plan.origins, full, plan.routing, "coverage", plan.solver)
    with pytest.raises(PlanError, match=r"server 'edge-a'.*too much"):
        fat.save(tmp_path / "fat.json", edge4)
    assert not any(tmp_path.iterdir())


def test_plan_for_another_cluster(plan):
    other = parse_cluster({"defaults": {}, "server": [{"name": "x", "memory_gib": 99.0}]})
    with pytest.raises(PlanError, match="plan is for servers"):
        plan.check_cluster(other)


def test_load_errors(tmp_path, plan):
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(PrismError, match="not valid JSON"):
        Plan.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(PrismError, match="not a prism-plan plan"):
        Plan.load(tmp_path / "b.json")
    d = plan.to_dict()
    d["version"] = 99
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(PrismError, match="version 99"):
        Plan.load(tmp_path / "c.json")
    d = plan.to_dict()
    del d["routing"]["law"]["5"]
    (tmp_path / "d.json").write_text(json.dumps(d))
    with pytest.raises(PrismError, match=r"d.json: `routing` of origin 'law' lacks \['5'\]; re-create it"):
        Plan.load(tmp_path / "d.json")


def _edited(plan, edit):
    d = json.loads(plan.to_json())
    edit(d)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["placement"]["edge-a"].__setitem__("1", [-1]), r"expert id in `placement` of 'edge-a' layer 1 must "
                                                               r"be an integer from 0 to 63, got -1"),
    (lambda d: d["placement"]["edge-a"].__setitem__("1", ["3"]), "got '3'"),
    (lambda d: d["placement"]["edge-a"].__setitem__("1", [3.0]), "got 3.0"),
    (lambda d: d["placement"]["edge-a"].__setitem__("1", [True]), "got True"),
    (lambda d: d["placement"]["edge-a"].__setitem__("1", [64]), "got 64"),
    (lambda d: d["placement"]["edge-a"].__setitem__("1", [3, 3]), "lists an expert twice"),
    (lambda d: d["placement"]["edge-a"].__setitem__("1", 3), "must be a list of expert ids"),
    (lambda d: d["placement"]["edge-a"].__setitem__("99", []), r"names \['99'\], which are not among"),
    (lambda d: d["placement"]["edge-a"].pop("26"), r"`placement` of 'edge-a' lacks \['26'\]"),
    (lambda d: d["placement"].__setitem__("edge-z", d["placement"].pop("edge-a")), r"names \['edge-z'\]"),
    (lambda d: d.__setitem__("servers", ["edge-a", "edge-a", "edge-c", "edge-d"]), "names a server twice"),
    (lambda d: d.__setitem__("servers", "edge-a"), "`servers` must be a non-empty list"),
    (lambda d: d["routing"]["law"]["1"].__setitem__("0", "edge-z"), "expert 0 names 'edge-z'"),
    (lambda d: d["routing"]["law"]["1"].__setitem__("64", "edge-a"), r"names \['64'\]"),
    (lambda d: d["routing"].__setitem__("law", []), "`routing` of origin 'law' must be a JSON object"),
    (lambda d: d.__setitem__("solver", None), "`solver` must be a JSON object"),
    (lambda d: d.__setitem__("metrics", [1]), "`metrics` must be a JSON object"),
    (lambda d: d.__setitem__("objective", 3), "`objective` must be"),
    (lambda d: d.__setitem__("constraints", {"min_replicas": "1"}), "`constraints.min_replicas` must be an integer"),
    (lambda d: d.__setitem__("constraints", {"min_replicas": 9}), "from 1 to 4, got 9"),
    (lambda d: d["model"].__setitem__("layers", 5), "`layers` must be a non-empty list"),
    (lambda d: d["model"].__setitem__("top_k", "6"), "`top_k` .* must be an integer from 1 to 64, got '6'"),
    (lambda d: d["model"].__setitem__("expert_bytes", 1.5e7), "`expert_bytes` must be an integer"),
    (lambda d: d["model"].pop("num_experts"), "model description lacks num_experts"),
    (lambda d: d.__setitem__("model", [1]), "the model description must be a JSON object"),
])
def test_hostile_plan_files_are_refused_naming_the_file(plan, tmp_path, edit, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_edited(plan, edit)))
    with pytest.raises(PrismError, match=message) as e:
        Plan.load(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_timing_is_kept_apart_and_old_plans_still_read(plan, tmp_path):
    timed = Plan(plan.model, plan.servers, plan.origins, plan.hosted, plan.routing, plan.objective, plan.solver,
                 plan.metrics, plan.inputs, timing={"solve_seconds": 1.5})
    d = json.loads(timed.to_json())
    assert d["timing"] == {"solve_seconds": 1.5} and "seconds" not in d["solver"]
    again = Plan(**{**timed.__dict__, "timing": {"solve_seconds": 2.5}})
    assert json.loads(again.to_json()) == {**d, "timing": {"solve_seconds": 2.5}}
    # A plan written before `timing` kept the solve time in the solver's evidence.
    old = {k: v for k, v in d.items() if k != "timing"}
    old["solver"] = {**old["solver"], "seconds": 0.25}
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = Plan.load(tmp_path / "old.json")
    assert back.timing == {"solve_seconds": 0.25} and "seconds" not in back.solver
    assert back.sha256() == plan.sha256()
