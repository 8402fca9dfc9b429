import json
import subprocess
import sys

import pytest

from prism_plan.cli import main
from prism_plan.fileio import DATA_DIR
from prism_plan.studies.comparison import ROWS
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
from prism_plan.traces.tables import ActivationTables, build_tables
from prism_plan.traces.trace import load_trace


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tables_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "tables.npz"
    assert main(["profile", "tables", str(BUNDLED_TRACE), "-o", str(path)]) == 0
    return path


def test_import_tables_solve(tmp_path, capsys, esft_dir):
    code, out, _ = run(capsys, "profile", "import", "--format", "esft", esft_dir / "law", "-o", tmp_path / "t.parquet",
                       "--quiet", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 8327
    code, out, _ = run(capsys, "profile", "tables", tmp_path / "t.parquet", "-o", tmp_path / "t.npz", "--json")
    assert code == 0 and json.loads(out)["origins"] == ["law"]
    cluster = tmp_path / "c.toml"
    cluster.write_text('[defaults]\n[[server]]\nname="a"\nmemory_gib=20\norigins=["law"]\n'
                       '[[server]]\nname="b"\nmemory_gib=20\n')
    code, out, _ = run(capsys, "solve", "--tables", tmp_path / "t.npz", "--cluster", cluster, "-o",
                       tmp_path / "p.json", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["solver"]["status"] == "optimal"
    assert (tmp_path / "p.json").exists()


@pytest.mark.parametrize("solver", ["greedy", "eplb"])
def test_solve_text_output(tmp_path, capsys, tables_file, solver):
    code, out, _ = run(capsys, "solve", "--tables", tables_file, "--cluster", BUNDLED_CLUSTER, "--model",
                       "deepseek-v2-lite", "--solver", solver, "-o", tmp_path / "p.json")
    assert code == 0 and f"{solver} heuristic" in out and "local coverage" in out


def test_infeasible_budget_exit_2_no_file(tmp_path, capsys, tables_file):
    cluster = tmp_path / "small.toml"
    cluster.write_text(BUNDLED_CLUSTER.read_text().replace("memory_gib = 12.0", "memory_gib = 1.0"))
    code, out, err = run(capsys, "solve", "--tables", tables_file, "--cluster", cluster, "-o", tmp_path / "p.json")
    assert code == 2 and out == ""
    assert err.startswith("error: infeasible budget") and "short by 1.84 GiB" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_existing_plan_survives_a_failed_solve(tmp_path, capsys, tables_file):
    plan = tmp_path / "p.json"
    assert run(capsys, "solve", "--tables", tables_file, "--cluster", BUNDLED_CLUSTER, "-o", plan)[0] == 0
    before = plan.read_bytes()
    code, _, err = run(capsys, "solve", "--tables", tables_file, "--cluster", BUNDLED_CLUSTER, "--model",
                       "mixtral-8x7b", "-o", plan)
    assert code == 2 and "pass the --model" in err
    assert plan.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["solve", "--tables", "nope.npz", "--cluster", str(BUNDLED_CLUSTER), "-o", "x.json"], "no tables file"),
    (["profile", "tables", "nope.parquet", "-o", "x.npz"], "no trace file"),
    (["profile", "import", "--format", "jsonl", "nope.jsonl", "--model", "deepseek-v2-lite", "-o", "x.parquet"],
     "no JSONL file"),
    (["profile", "import", "--format", "jsonl", "nope.jsonl", "--model", "gpt-5", "-o", "x.parquet"],
     "unknown model"),
])
def test_user_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_solver_name(tmp_path, capsys, tables_file):
    code, _, err = run(capsys, "solve", "--tables", tables_file, "--cluster", BUNDLED_CLUSTER, "--solver", "magic",
                       "-o", tmp_path / "p.json")
    assert code == 2 and "'magic' is not one of 'exact'" in err


def test_usage_error_exit_2(capsys):
    code, _, err = run(capsys, "solve")
    assert code == 2 and "Missing option" in err


def test_quickstart_json_from_the_installed_package(tmp_path):
    # Run outside the source tree so that the installed package (and the data it ships) is what runs.
    res = subprocess.run([sys.executable, "-m", "prism_plan.cli", "quickstart", "-o", "qs", "--quiet", "--json"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = {r["label"]: r for r in json.loads(res.stdout)}
    tmp_path = tmp_path / "qs"
    assert list(rows) == [label for label, _, _ in ROWS]
    assert rows["exact-coverage"]["status"] == "optimal" and rows["exact-coverage"]["gap"] == 0.0
    assert rows["latency-MILP"]["status"] == "optimal"
    best = min(r["simulated_ttft_s"] for r in rows.values())
    assert best <= 0.7 * min(rows["linear"]["simulated_ttft_s"], rows["eplb"]["simulated_ttft_s"])
    assert (tmp_path / "plan.json").exists() and (tmp_path / "tables.npz").exists()
    # the two halves: the tables are the profiling half's, and together the halves are the bundled trace
    profile, holdout = load_trace(tmp_path / "profile.parquet"), load_trace(tmp_path / "holdout.parquet")
    assert profile.num_tokens + holdout.num_tokens == load_trace(BUNDLED_TRACE).num_tokens
    assert ActivationTables.load(tmp_path / "tables.npz").sha256() == build_tables([profile]).sha256()
    seen = {(profile.origins[o], r) for o, r in zip(profile.origin, profile.request)}
    assert not seen & {(holdout.origins[o], r) for o, r in zip(holdout.origin, holdout.request)}


def test_console_script_runs_as_module(tmp_path):
    res = subprocess.run([sys.executable, "-m", "prism_plan.cli", "solve", "--tables", tmp_path / "none.npz",
                          "--cluster", BUNDLED_CLUSTER, "-o", tmp_path / "p.json"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: no tables file")


@pytest.fixture(scope="module")
def drift_windows(tmp_path_factory):
    """A drifting workload from the bundled trace, its tables per window, and a plan for window 0."""
    d = tmp_path_factory.mktemp("drift")
    assert main(["profile", "drift", str(BUNDLED_TRACE), "-o", str(d / "drift.parquet"), "--windows", "3",
                 "--window-tokens", "1500"]) == 0
    assert main(["profile", "tables", str(d / "drift.parquet"), "--window", "6000", "-o", str(d / "win"),
                 "--quiet"]) == 0
    assert main(["solve", "--tables", str(d / "win" / "window-0000.npz"), "--cluster", str(BUNDLED_CLUSTER),
                 "-o", str(d / "plan0.json")]) == 0
    return d


def test_windowed_tables_folder(drift_windows, capsys):
    d = drift_windows
    windows = ["window-0000.npz", "window-0001.npz", "window-0002.npz"]
    assert sorted(p.name for p in (d / "win").iterdir()) == ["manifest.json", *windows]
    assert json.loads((d / "win" / "manifest.json").read_text())["windows"] == windows
    code, out, _ = run(capsys, "profile", "tables", d / "drift.parquet", "--window", "6000", "-o", d / "win2",
                       "--quiet", "--json")
    summary = json.loads(out)
    assert code == 0 and [s["window"]["index"] for s in summary] == [0, 1, 2]
    assert all(sum(s["tokens"]) == 6000 for s in summary)
    # a rerun with larger windows replaces the set whole: no window of the first run is left beside the new one
    assert run(capsys, "profile", "tables", d / "drift.parquet", "--window", "18000", "-o", d / "win2")[0] == 0
    assert sorted(p.name for p in (d / "win2").iterdir()) == ["manifest.json", "window-0000.npz"]


def test_migrate_writes_plan_and_verified_moves(drift_windows, capsys, tmp_path):
    from prism_plan.placement.cluster import load_cluster
    from prism_plan.placement.migration import MigrationPlan, verify_migration
    from prism_plan.placement.plan import Plan

    d = drift_windows
    code, out, _ = run(capsys, "migrate", "--plan", d / "plan0.json", "--tables", d / "win" / "window-0002.npz",
                       "--cluster", BUNDLED_CLUSTER, "--budget-gib", "0.5", "-o", tmp_path / "p1.json", "--moves",
                       tmp_path / "m1.json", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["migrated"] and 0 < summary["bytes"] <= 2**29
    old, new = Plan.load(d / "plan0.json"), Plan.load(tmp_path / "p1.json")
    moves = MigrationPlan.load(tmp_path / "m1.json")
    assert moves.from_sha256 == old.sha256() and moves.to_sha256 == new.sha256()
    verify_migration(moves, old.hosted, new.hosted, load_cluster(BUNDLED_CLUSTER))
    code, out, _ = run(capsys, "migrate", "--plan", d / "plan0.json", "--tables", d / "win" / "window-0002.npz",
                       "--cluster", BUNDLED_CLUSTER, "--min-gain", "0.9", "-o", tmp_path / "p2.json", "--moves",
                       tmp_path / "m2.json")
    assert code == 0 and "kept the current placement" in out
    assert json.loads((tmp_path / "m2.json").read_text())["stages"] == []


def test_impossible_migration_exit_2_and_touches_nothing(drift_windows, capsys, tmp_path):
    d = drift_windows
    before = (d / "plan0.json").read_bytes()
    shrunk = tmp_path / "shrunk.toml"
    shrunk.write_text(BUNDLED_CLUSTER.read_text().replace("memory_gib = 12.0", "memory_gib = 3.0"))
    code, out, err = run(capsys, "migrate", "--plan", d / "plan0.json", "--tables", d / "win" / "window-0001.npz",
                         "--cluster", shrunk, "--budget-gib", "0.1", "-o", tmp_path / "new.json", "--moves",
                         tmp_path / "m.json")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: move budget 102.40 MiB is too small") and "raise --budget-gib" in err
    assert (d / "plan0.json").read_bytes() == before and not (tmp_path / "m.json").exists()
    assert not (tmp_path / "new.json").exists()
    code, _, err = run(capsys, "migrate", "--plan", d / "plan0.json", "--tables", d / "win" / "window-0001.npz",
                       "--cluster", tmp_path / "nope.toml", "-o", tmp_path / "x.json", "--moves", tmp_path / "m.json")
    assert code == 2 and "no cluster file" in err


def test_swap_with_no_room_anywhere_exit_2(tmp_path, capsys):
    import numpy as np

    from prism_plan.placement.model import ModelSpec
    from prism_plan.placement.plan import Plan
    from prism_plan.traces.tables import ActivationTables

    # Two servers with room for one 1 GiB expert each; the traffic wants them swapped.
    model = ModelSpec("tiny", (1,), 2, 1, 2**30, 8)
    hosted = np.array([[[True, False]], [[False, True]]])
    old = Plan(model, ("a", "b"), ("a", "b"), hosted, np.array([[[0, 1]], [[0, 1]]]), "coverage",
               {"name": "hand", "status": "feasible"})
    old.save(tmp_path / "old.json")
    ActivationTables(("a", "b"), (1,), np.array([[[0.0, 9.0]], [[9.0, 0.0]]]), np.array([9, 9])).save(
        tmp_path / "t.npz")
    (tmp_path / "c.toml").write_text('[defaults]\n[[server]]\nname="a"\nmemory_gib=1\n'
                                     '[[server]]\nname="b"\nmemory_gib=1\n')
    before = (tmp_path / "old.json").read_bytes()
    code, out, err = run(capsys, "migrate", "--plan", tmp_path / "old.json", "--tables", tmp_path / "t.npz",
                         "--cluster", tmp_path / "c.toml", "-o", tmp_path / "new.json", "--moves", tmp_path / "m.json")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "cannot order the moves" in err and "give a server room for one more expert" in err
    assert (tmp_path / "old.json").read_bytes() == before
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "new.json").exists()


def test_library_errors_name_the_verbs_flags(tmp_path, capsys, tables_file):
    code, _, err = run(capsys, "solve", "--tables", tables_file, "--cluster", "edge-4", "--objective", "traffic",
                       "-o", tmp_path / "p.json")
    assert code == 2 and "pass the --trace the tables were built from" in err and "`" not in err
    assert not (tmp_path / "p.json").exists()
    code, _, err = run(capsys, "solve", "--tables", tables_file, "--cluster", "edge-4", "--min-replicas", "5",
                       "-o", tmp_path / "p.json")
    assert code == 2 and "lower --min-replicas" in err


def test_weak_bounds_are_labelled(tmp_path, capsys, tables_file):
    code, out, _ = run(capsys, "solve", "--tables", tables_file, "--cluster", "edge-4", "--solver", "eplb",
                       "--objective", "traffic", "--trace", BUNDLED_TRACE, "-o", tmp_path / "p.json")
    assert code == 0 and "bound (weak)" in out
    code, out, _ = run(capsys, "solve", "--tables", tables_file, "--cluster", "edge-4", "-o", tmp_path / "q.json")
    assert code == 0 and "bound (weak)" not in out and "exact optimal" in out


def test_local_search_with_max_iterations_gives_the_same_plan_but_for_timing(tmp_path):
    tiny = DATA_DIR / "tiny"
    docs = []
    for i in range(2):
        assert main(["solve", "--tables", str(tiny / "tables-0.npz"), "--cluster", str(tiny / "cluster.toml"),
                     "--solver", "local-search", "--objective", "traffic", "--trace", str(tiny / "trace.parquet"),
                     "--max-iterations", "30", "--seed", "3", "-o", str(tmp_path / f"p{i}.json"), "--quiet"]) == 0
        doc = json.loads((tmp_path / f"p{i}.json").read_text())
        assert set(doc.pop("timing")) == {"solve_seconds"}
        docs.append(doc)
    assert docs[0] == docs[1]
