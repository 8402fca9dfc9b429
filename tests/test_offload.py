"""The offload tier: slow-tier cluster keys, plans with pins, caches and loads, and the solver that makes them."""

import itertools
import json

import numpy as np
import pytest

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.pipeline import solve_placement
from prism_plan.placement.cluster import GIB, parse_cluster
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.offload import ExpertCache, Offload
from prism_plan.placement.plan import Plan, PlanError
from prism_plan.solvers import build_problem
from prism_plan.solvers.offload import cheapest_routing, option_costs, plan_offload
from prism_plan.solvers.deadline import Deadline
from prism_plan.traces.synthetic import synthetic_trace
from prism_plan.traces.tables import build_tables

MODEL = ModelSpec("tiny-offload", layers=(1, 2), num_experts=4, top_k=2, expert_bytes=1 << 20, hidden_size=64,
                  act_bytes=2)
COPY = 2 * 4 * (1 << 20)  # bytes of one copy of the routed experts


def cluster(share: float, *, load_gbps: float | None = 100.0, host_gib: float | None = None, servers: int = 2,
            bandwidth_gbps: float = 10.0):
    """`servers` servers whose GPUs together hold `share` of one copy."""
    per = share * COPY / servers / GIB
    tier = {} if load_gbps is None else {"load_gbps": load_gbps, "load_latency_ms": 0.01}
    if host_gib is not None:
        tier["host_memory_gib"] = host_gib
    return parse_cluster({"defaults": {"bandwidth_gbps": bandwidth_gbps, "latency_ms": 0.1},
                          "server": [{"name": f"s{i}", "memory_gib": per, "origins": [f"o{i}"], **tier}
                                     for i in range(servers)]}, "test.toml")


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(MODEL, ["o0", "o1"], 256, request_tokens=32, seed=3)


@pytest.fixture(scope="module")
def tables(trace):
    return build_tables([trace])


def test_slow_tier_keys_parse_and_hash():
    c = cluster(0.5, host_gib=1.0)
    assert c.has_slow_tier and c.load_bandwidth[0] == 100e9 / 8 and c.load_latency[0] == 1e-5
    assert c.host_budgets[0] == GIB
    plain = cluster(0.5, load_gbps=None)
    assert not plain.has_slow_tier and plain.host_budgets.tolist() == [0.0, 0.0]
    assert "load_gbps" not in plain.to_dict()["servers"][0]  # the hash of every older cluster stays the same
    assert c.sha256() != plain.sha256()


@pytest.mark.parametrize("server, words", [
    ({"host_memory_gib": 4.0}, "needs `load_gbps`"),
    ({"load_gbps": float("nan")}, "load_gbps"),
    ({"load_gbps": 0}, "load_gbps"),
    ({"load_gbps": 10, "load_latency_ms": -1}, "load_latency_ms"),
    ({"load_gbps": 10, "host_memory_gib": "big"}, "host_memory_gib"),
])
def test_bad_slow_tier_keys_say_which(server, words):
    with pytest.raises(PrismError, match=words):
        parse_cluster({"server": [{"name": "a", "memory_gib": 1.0, **server}]}, "bad.toml")


def test_without_a_slow_tier_small_memory_is_still_infeasible(tables):
    with pytest.raises(InfeasibleError, match="infeasible budget"):
        build_problem(tables, cluster(0.5, load_gbps=None), MODEL)


def test_with_room_for_a_copy_the_slow_tier_is_not_used(tables):
    problem = build_problem(tables, cluster(1.5), MODEL)
    assert problem.offload is None


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_plans_below_one_copy_state_pins_caches_and_routing(tables, trace, share, tmp_path):
    c = cluster(share)
    plan = solve_placement(tables, c, MODEL, objective="latency", trace=trace)
    assert plan.offload is not None
    assert (plan.memory_bytes() <= c.budgets).all() and (plan.offload.cache_bytes >= MODEL.layer_bytes.max()).all()
    assert plan.hosted.sum() < 8 and plan.offload.stored.all()  # default slow tiers hold the whole model
    assert plan.metrics["loaded_share"] > 0 and plan.solver["bound"] <= plan.solver["objective"] + 1e-12
    path = tmp_path / "plan.json"
    plan.save(path, c)
    again = Plan.load(path)
    again.check(c)
    assert (again.offload.stored == plan.offload.stored).all()
    assert (again.offload.cache_bytes == plan.offload.cache_bytes).all() and again.sha256() == plan.sha256()


def test_solver_is_exact_against_brute_force(tables):
    """Every placement of pins within the slots, each routed at its cheapest: none beats the exact plan."""
    problem = build_problem(tables, cluster(0.5), MODEL)
    sol = plan_offload(problem, "latency", Deadline(None))
    cache, stored = sol.offload.cache_bytes, sol.offload.stored
    load, remote = option_costs(problem, "latency")
    slots = (problem.budget - cache) // MODEL.layer_bytes.max()
    best = np.inf
    cells = [np.array(bits, bool) for bits in itertools.product((0, 1), repeat=8)]
    for a, b in itertools.product(cells, cells):
        if a.sum() > slots[0] or b.sum() > slots[1]:
            continue
        hosted = np.stack([a, b]).reshape(problem.shape)
        _, cost = cheapest_routing(problem, "latency", hosted, stored, cache, load, remote)
        best = min(best, cost.sum() / problem.offload.requests)
    assert sol.extra["value"] == pytest.approx(best, rel=1e-9)
    assert sol.status == "optimal" and sol.bound <= sol.extra["value"] * (1 + 1e-6)


def test_swap_baseline_serves_every_origin_at_home(tables):
    plan = solve_placement(tables, cluster(0.5), MODEL, solver="swap", objective="latency")
    homes = np.arange(2)[:, None, None]
    assert (plan.routing == homes).all() and plan.metrics["pinned_remote_share"] == 0
    exact = solve_placement(tables, cluster(0.5), MODEL, objective="latency")
    assert exact.solver["objective"] <= plan.solver["objective"]


def test_coverage_plans_pin_each_expert_once(tables):
    plan = solve_placement(tables, cluster(0.5), MODEL, objective="coverage")
    assert plan.hosted.sum(axis=0).max() == 1 and plan.solver["status"] == "optimal"


def test_other_solvers_and_objectives_say_what_to_use(tables):
    with pytest.raises(PrismError, match="pass `solver` exact"):
        solve_placement(tables, cluster(0.5), MODEL, solver="greedy")
    with pytest.raises(PrismError, match="pass `objective` latency"):
        solve_placement(tables, cluster(0.5), MODEL, objective="balance")
    with pytest.raises(PrismError, match="give the servers `load_gbps`"):
        solve_placement(tables, cluster(1.5, load_gbps=None), MODEL, solver="swap")
    # where the GPUs hold the model, swap is still the baseline: each server alone, loading what it lacks
    swap = solve_placement(tables, cluster(1.5), MODEL, solver="swap", objective="latency")
    assert swap.offload is not None and swap.hosted.sum(axis=0).min() == 0


def test_small_slow_tiers_are_planned_and_must_cover_the_model(tables):
    # each slow tier holds 3 of the 8 experts; each GPU, 2, one of them a cache: together they cover all 8
    c = cluster(0.5, host_gib=3 * (1 << 20) / GIB)
    plan = solve_placement(tables, c, MODEL, objective="latency")
    assert plan.offload.stored.sum(axis=(1, 2)).max() <= 3 and plan.copies().min() >= 1
    plan.check(c)
    with pytest.raises(InfeasibleError, match="GPUs and slow tiers together"):
        build_problem(tables, cluster(0.5, host_gib=1 * (1 << 20) / GIB), MODEL)


def _plan(c, tables):
    return solve_placement(tables, c, MODEL, objective="latency")


def test_verifier_rejects_broken_offload_plans(tables):
    c = cluster(0.5)
    plan = _plan(c, tables)
    bad = Plan.from_dict(plan.to_dict())
    bad.offload.stored[0] = False  # server s0 loads what it does not pin from a slow tier it no longer has
    with pytest.raises(PlanError, match="s0.*neither pins it nor holds it"):
        bad.check()
    bad.offload.stored[:] = False
    bad.hosted[:] = False
    with pytest.raises(PlanError, match="pins or keeps in a slow tier expert 0 of layer 1 0 time"):
        bad.check()
    small = Plan.from_dict(plan.to_dict())
    small.offload.cache_bytes[:] = 10
    with pytest.raises(PlanError, match="room for one expert"):
        small.check()
    big = Plan.from_dict(plan.to_dict())
    big.offload.cache_bytes[:] = 10 * COPY
    with pytest.raises(PlanError, match="too much"):
        big.check(c)
    with pytest.raises(PlanError, match="has no slow tier"):
        plan.check(cluster(0.5, load_gbps=None))
    doc = plan.to_dict()
    doc["offload"]["policy"] = "fifo"
    with pytest.raises(PlanError, match="policy"):
        Plan.from_dict(doc)


def test_expert_cache_is_lru_by_bytes():
    cache = ExpertCache(30)
    assert cache.get((0, 1), 10) == (True, []) and cache.get((0, 2), 10)[0]
    assert cache.get((0, 1), 10) == (False, [])
    assert cache.prefetch((0, 3), 10) == (True, []) and cache.prefetch((0, 3), 10) == (False, [])
    assert cache.get((0, 4), 10) == (True, [(0, 2)])
    assert cache.keys() == [(0, 1), (0, 3), (0, 4)]
    assert (cache.hits, cache.misses, cache.bytes_loaded) == (1, 3, 40)
    with pytest.raises(PrismError, match="does not fit"):
        cache.get((1, 0), 31)
    with pytest.raises(PrismError, match="policy"):
        Offload(np.zeros(1), np.zeros((1, 1, 1)), policy="mru")


QUARTER_EDGE = """
[defaults]
bandwidth_gbps = 10.0
latency_ms = 0.5
""" + "".join(f"""
[[server]]
name = "edge-{x}"
memory_gib = {m}
origins = ["{o}"]
load_gbps = 128.0
load_latency_ms = 0.05
""" for x, m, o in (("a", 1.2, "intent"), ("b", 1.5, "law"), ("c", 1.8, "summary"), ("d", 2.2, "translation")))


def test_cli_solves_and_simulates_esft_at_a_quarter_of_one_copy(tmp_path, capsys):
    """The bundled real routing on GPUs that hold 25% of DeepSeek-V2-Lite's experts: plan on one half of the
    requests, replay the other half with scheduling and prefetch."""
    from prism_plan.cli import main
    from prism_plan.studies.bundled import BUNDLED_TRACE
    from prism_plan.traces.trace import load_trace
    fit, held = load_trace(BUNDLED_TRACE).split_requests(0.5)
    fit.save(tmp_path / "fit.parquet")
    held.save(tmp_path / "held.parquet")
    (tmp_path / "c.toml").write_text(QUARTER_EDGE)
    assert main(["profile", "tables", str(tmp_path / "fit.parquet"), "-o", str(tmp_path / "t.npz"), "--quiet"]) == 0
    args = ["--tables", tmp_path / "t.npz", "--cluster", tmp_path / "c.toml", "--objective", "latency", "--quiet"]
    for solver in ("exact", "swap"):
        assert main(["solve", *map(str, args), "--solver", solver, "-o", str(tmp_path / f"{solver}.json")]) == 0
    out = capsys.readouterr().out
    assert "offload:" in out and "loaded from slow tiers" in out
    ttft = {}
    for name, extra in (("swap", []), ("exact", ["--schedule", "--prefetch", "12",
                                                  "--prefetch-tables", str(tmp_path / "t.npz")])):
        capsys.readouterr()
        code = main(["simulate", "--plan", str(tmp_path / f"{name}.json"), "--trace", str(tmp_path / "held.parquet"),
                     "--cluster", str(tmp_path / "c.toml"), "--json", "--quiet", *extra])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0 and summary["bytes_loaded"] > 0
        ttft[name] = summary["ttft_mean_s"]
    assert ttft["exact"] < ttft["swap"]
    assert summary["prefetch_precision"] > 0.5 and 0 < summary["hidden_share"] <= 1
    code = main(["simulate", "--plan", str(tmp_path / "swap.json"), "--trace", str(tmp_path / "held.parquet"),
                 "--cluster", str(tmp_path / "c.toml"), "--prefetch", "4"])
    assert code == 2 and "pass --prefetch-tables" in capsys.readouterr().err


def test_a_server_without_a_slow_tier_is_named_when_the_model_does_not_fit(tables):
    doc = {"defaults": {"bandwidth_gbps": 10.0, "latency_ms": 0.1},
           "server": [{"name": "s0", "memory_gib": 0.25 * COPY / GIB, "origins": ["o0"]},
                      {"name": "s1", "memory_gib": 0.25 * COPY / GIB, "origins": ["o1"], "load_gbps": 100.0}]}
    with pytest.raises(InfeasibleError, match="s0 has no slow tier"):
        solve_placement(tables, parse_cluster(doc, "m.toml"), MODEL, objective="latency")
