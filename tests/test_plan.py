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
    assert set(d["solver"]) >= {"name", "status", "objective", "bound", "gap", "seconds"}
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
    with pytest.raises(PrismError, match="malformed"):
        Plan.load(tmp_path / "d.json")
