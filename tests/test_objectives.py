"""Latency and traffic objectives: the MILP against brute force, local search, bounds, the simulator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.errors import PrismError, TimeLimitError
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
from prism_plan.pipeline import make_plan
from prism_plan.placement.simulator import simulate
from prism_plan.solvers import build_problem, get_solver
from prism_plan.solvers.latency import lagrangian
from prism_plan.solvers import latency
from prism_plan.solvers.objectives import (latency_lower_bound, latency_terms, simulated_ttft_lower_bound, simulated_ttft_value,
                                           traffic_lower_bound, traffic_value)
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace
from tiny import feasible_placements, small_latency_problem


@pytest.mark.parametrize("seed", range(4))
def test_latency_milp_matches_brute_force(seed):
    problem = small_latency_problem(seed)
    best = min(sum(latency_terms(problem, hosted)) for hosted in feasible_placements(problem))
    res = get_solver("exact", time_limit=30).solve(problem, "latency")
    assert res.status == "optimal"
    assert res.objective == pytest.approx(best, rel=1e-6)
    assert res.bound <= res.objective * (1 + 1e-6)
    assert latency_lower_bound(problem) <= best * (1 + 1e-9)
    bound, rounded = lagrangian(problem, upper=2 * best)
    assert bound <= best * (1 + 1e-9)
    if rounded is not None:
        assert (rounded.sum(axis=0) >= 1).all()
        assert ((rounded.sum(axis=(1, 2)) * 10) <= problem.budget).all()
        assert sum(latency_terms(problem, rounded)) >= best * (1 - 1e-9)


def test_lagrangian_alone_proves_a_small_gap_where_the_milp_is_too_big(monkeypatch, replay_problem):
    with_milp = get_solver("exact", time_limit=60).solve(replay_problem, "latency")
    monkeypatch.setattr(latency, "milp_fits", lambda problem: False)
    alone = get_solver("exact", time_limit=60).solve(replay_problem, "latency")
    assert alone.bound <= with_milp.objective * (1 + 1e-9)
    assert alone.objective >= with_milp.bound * (1 - 1e-9)
    assert alone.gap < 0.05


@pytest.fixture(scope="module")
def halves(esft_dir):
    """The bundled trace, first half of each origin's requests (profiling) and the rest (evaluation)."""
    return load_trace(BUNDLED_TRACE).split_requests(0.5)


@pytest.fixture(scope="module")
def replay_problem(halves, edge4, dsv2):
    profile, _ = halves
    return build_problem(build_tables([profile]), edge4, dsv2, trace=profile)


def test_objectives_agree_with_the_simulator(replay_problem, halves, edge4, dsv2):
    profile, _ = halves
    res = get_solver("eplb").solve(replay_problem, "traffic")
    plan = make_plan(replay_problem, res)
    sim = simulate(plan, profile, edge4)
    assert simulated_ttft_value(replay_problem, res.hosted) == pytest.approx(sim.simulated_ttft, rel=1e-12)
    assert traffic_value(replay_problem, res.hosted) == pytest.approx(sim.summary()["remote_bytes_per_token"],
                                                                      rel=1e-12)
    assert res.objective == pytest.approx(sim.summary()["remote_bytes_per_token"], rel=1e-12)


def test_bounds_hold_for_every_placement(replay_problem):
    t_bound, s_bound = traffic_lower_bound(replay_problem), simulated_ttft_lower_bound(replay_problem)
    assert t_bound > 0 and s_bound > 0
    for name in ("exact", "greedy", "linear", "round-robin", "popularity", "eplb", "random"):
        hosted = get_solver(name, seed=1).solve(replay_problem).hosted
        assert traffic_value(replay_problem, hosted) >= t_bound
        assert simulated_ttft_value(replay_problem, hosted) >= s_bound
    everywhere = np.ones(replay_problem.shape, bool)
    assert traffic_value(replay_problem, everywhere) == 0.0
    l_bound = latency_lower_bound(replay_problem)
    for name in ("exact", "greedy", "eplb"):
        assert sum(latency_terms(replay_problem, get_solver(name).solve(replay_problem).hosted)) >= l_bound


@pytest.mark.parametrize("objective", ["simulated_ttft", "traffic"])
def test_local_search_never_worsens_its_start(replay_problem, objective):
    # eplb-memory fills every server's memory; faithful EPLB leaves one copy per expert on edge-4, which swaps
    # cannot improve without dropping a last copy
    start = get_solver("eplb-memory").solve(replay_problem).hosted
    res = get_solver("local-search", time_limit=8, start=start).solve(replay_problem, objective)
    value = simulated_ttft_value if objective == "simulated_ttft" else traffic_value
    assert res.objective == pytest.approx(value(replay_problem, res.hosted))
    assert res.objective < value(replay_problem, start)
    assert res.status == "heuristic" and res.bound <= res.objective and 0 <= res.gap < 1 and res.weak_bound
    assert (res.hosted.sum(axis=0) >= 1).all()
    used = (res.hosted.sum(axis=2) * replay_problem.layer_bytes).sum(axis=1)
    assert (used <= replay_problem.budget).all()


def test_latency_plan_beats_the_baselines_on_unseen_requests(halves, replay_problem, edge4, dsv2):
    profile, evaluation = halves
    mean = {}
    for name, objective in [("linear", "coverage"), ("eplb", "coverage"), ("eplb-memory", "coverage"),
                            ("exact", "latency")]:
        res = get_solver(name, time_limit=60).solve(replay_problem, objective)
        mean[name] = simulate(make_plan(replay_problem, res), evaluation, edge4).simulated_ttft
    assert mean["exact"] < 0.8 * min(mean["eplb"], mean["eplb-memory"], mean["linear"])


def test_replay_objectives_need_the_trace(esft_tables, edge4, dsv2):
    problem = build_problem(esft_tables, edge4, dsv2)
    with pytest.raises(PrismError, match="pass the `trace`"):
        get_solver("local-search").solve(problem, "simulated_ttft")
    with pytest.raises(PrismError, match="pass the `trace`"):
        get_solver("exact").solve(problem, "traffic")
    for objective in ("coverage", "latency"):
        with pytest.raises(PrismError, match="optimises simulated_ttft or traffic"):
            get_solver("local-search").solve(problem, objective)


def test_solve_latency_cli(tmp_path, capsys, esft_tables):
    esft_tables.save(tmp_path / "t.npz")
    out = tmp_path / "p.json"
    assert main(["solve", "--tables", str(tmp_path / "t.npz"), "--cluster", str(BUNDLED_CLUSTER),
                 "--objective", "latency", "-o", str(out), "--time-limit", "60"]) == 0
    assert "exact optimal" in capsys.readouterr().out
    assert main(["solve", "--tables", str(tmp_path / "t.npz"), "--cluster", str(BUNDLED_CLUSTER),
                 "--solver", "local-search", "--objective", "traffic", "--trace", str(BUNDLED_TRACE),
                 "--start", str(out), "--time-limit", "3", "-o", str(tmp_path / "q.json"), "--json"]) == 0
    assert '"local-search"' in capsys.readouterr().out
    assert main(["solve", "--tables", str(tmp_path / "t.npz"), "--cluster", str(BUNDLED_CLUSTER),
                 "--start", str(out), "-o", str(tmp_path / "r.json")]) == 2
    assert "does not take --start" in capsys.readouterr().err


def test_time_limit_is_kept_by_the_milp(replay_problem):
    res = get_solver("exact", time_limit=0.5).solve(replace(replay_problem, workload=None), "latency")
    assert res.seconds < 10
    assert res.status in ("optimal", "feasible", "timeout")
    assert res.gap is None or res.gap >= 0


def test_local_search_with_max_iterations_is_the_same_on_every_run(replay_problem, monkeypatch):
    start = get_solver("eplb-memory").solve(replay_problem).hosted
    search = lambda **kw: get_solver("local-search", start=start, **kw).solve(replay_problem, "traffic")  # noqa: E731
    runs = [search(max_iterations=12, time_limit=t) for t in (None, 600.0, 300.0)]
    assert all(np.array_equal(r.hosted, runs[0].hosted) and r.objective == runs[0].objective for r in runs)
    assert not np.array_equal(search(max_iterations=3).hosted, runs[0].hosted)  # the iterations are the bound
    assert np.array_equal(search(max_iterations=0).hosted, start)
    # On a machine too slow for the iterations asked within the limit, the search fails rather than differ.
    from prism_plan.solvers import deadline
    clock = iter(np.arange(0.0, 1e6, 1.0))
    monkeypatch.setattr(deadline.time, "perf_counter", lambda: next(clock))
    with pytest.raises(TimeLimitError, match=r"after \d+ of `max_iterations` 12 iterations; raise `time_limit`"):
        search(max_iterations=12, time_limit=5.0)
    assert search(time_limit=5.0).status == "heuristic"  # without max_iterations it stops with what it has


def test_local_search_start_cut_by_the_clock_is_an_error_with_max_iterations(replay_problem):
    with pytest.raises(TimeLimitError, match="same result on every run, but its start"):
        get_solver("local-search", max_iterations=5, time_limit=0.01).solve(replay_problem, "simulated_ttft")


@pytest.mark.parametrize("options, message", [
    ({"max_iterations": -1}, "`max_iterations` must be an integer of at least 0, got -1"),
    ({"max_iterations": 2.5}, "got 2.5"),
    ({"max_iterations": True}, "got True"),
    ({"candidates": 0}, "`candidates` must be an integer of at least 1"),
    ({"seed": -1}, "`seed` must be an integer of at least 0, got -1"),
    ({"seed": 1.0}, "`seed` must be an integer"),
    ({"time_limit": float("inf")}, "`time_limit` must be a positive number"),
    ({"time_limit": float("nan")}, "`time_limit` must be a positive number"),
    ({"time_limit": "5"}, "`time_limit` must be a positive number"),
])
def test_local_search_options_are_checked(options, message):
    with pytest.raises(PrismError, match=message) as e:
        get_solver("local-search", **options)
    assert set(e.value.parameters) <= set(options)
