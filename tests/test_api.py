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
