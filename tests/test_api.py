"""The Python API: paths or objects, keyword-only options checked up front, errors that name parameters."""

from __future__ import annotations

import pytest

import prism_plan
from prism_plan import MissingInputError, PrismError, load_cluster, solve_placement
from prism_plan.studies.bundled import BUNDLED_CLUSTER


def test_errors_follow_the_standard_library():
    assert issubclass(PrismError, ValueError)
    assert issubclass(MissingInputError, PrismError) and issubclass(MissingInputError, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="no cluster file at"):
        load_cluster("no-such-cluster")


def test_bundled_cluster_by_name():
    assert load_cluster("edge-4").names == load_cluster(BUNDLED_CLUSTER).names
    assert load_cluster("edge-4.toml").sha256() == load_cluster(BUNDLED_CLUSTER).sha256()


def test_paths_and_objects_alike(tmp_path, esft_tables, edge4):
    esft_tables.save(tmp_path / "t.npz")
    from_paths = solve_placement(tmp_path / "t.npz", "edge-4")
    from_objects = solve_placement(esft_tables, edge4, "deepseek-v2-lite")
    assert (from_paths.hosted == from_objects.hosted).all()
    assert from_paths.model.name == "deepseek-v2-lite"  # taken from the tables


def test_options_are_keyword_only_and_checked_first(esft_tables, edge4):
    with pytest.raises(TypeError):
        solve_placement(esft_tables, edge4, None, "greedy")
    with pytest.raises(PrismError, match="`time_limit` must be a positive number"):
        solve_placement(esft_tables, edge4, time_limit=-1)
    with pytest.raises(PrismError, match="`min_replicas` must be an integer"):
        solve_placement(esft_tables, edge4, min_replicas=0)
    with pytest.raises(PrismError, match="unknown objective 'speed'"):
        solve_placement(esft_tables, edge4, objective="speed")
    with pytest.raises(PrismError, match="does not take `backend`") as e:
        solve_placement(esft_tables, edge4, solver="greedy", backend="cbc")
    assert "backend" in e.value.parameters


def test_the_pipeline_is_exported():
    for name in ("solve_placement", "migrate_placement", "simulate", "export_plan", "load_trace", "load_tables",
                 "load_plan", "load_moves", "write_report", "solve_problem", "make_plan"):
        assert callable(getattr(prism_plan, name)), name


def test_options_are_checked_before_the_inputs_are_read(tmp_path):
    missing = tmp_path / "no-tables.npz"  # a read would fail with MissingInputError first
    with pytest.raises(PrismError, match="`seed` must be an integer"):
        solve_placement(missing, "edge-4", seed="x")
    with pytest.raises(PrismError, match="does not take `start`"):
        solve_placement(missing, "edge-4", solver="exact", start=tmp_path / "p.json")
    with pytest.raises(PrismError, match="unknown MILP back end"):
        prism_plan.migrate_placement(tmp_path / "p.json", missing, "edge-4", backend="glpk")


def test_a_folder_is_never_an_output(tmp_path, esft_tables):
    with pytest.raises(PrismError, match="is a folder"):
        esft_tables.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_checks_its_inputs(tmp_path, esft_tables, edge4):
    plan = solve_placement(esft_tables, edge4, solver="greedy")
    with pytest.raises(PrismError, match="`layer` picks the co-activation figure"):
        prism_plan.write_report(plan, tmp_path / "r.html", layer=3)
    assert not (tmp_path / "r.html").exists()
