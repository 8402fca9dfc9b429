"""`prism-plan calibrate` on CPU: the snippet it writes is a cluster file that `solve` and `simulate` accept, every
figure within sane ranges and commented; two local ranks measure the link between them; bad options are refused
before anything is written."""

from __future__ import annotations

import json
import re

import pytest

from prism_plan.cli import main
from prism_plan.executor.calibrate import Calibration, calibrate
from prism_plan.fileio import DATA_DIR
from prism_plan.placement.cluster import GIB, load_cluster
from prism_plan.placement.model import resolve_model

TINY = DATA_DIR / "tiny" / "model"


@pytest.fixture(scope="module")
def tiny_tables(tmp_path_factory):
    """Tables of the bundled tiny routing (origins a and b)."""
    d = tmp_path_factory.mktemp("tiny")
    assert main(["profile", "import", "--format", "jsonl", str(DATA_DIR / "tiny" / "routing.jsonl"), "--model",
                 str(TINY), "-o", str(d / "tiny.parquet"), "--quiet"]) == 0
    assert main(["profile", "tables", str(d / "tiny.parquet"), "-o", str(d / "t.npz"), "--quiet"]) == 0
    return d / "tiny.parquet", d / "t.npz"


def sane(cluster) -> None:
    for s in cluster.servers:
        assert 1e-6 <= s.compute_tflops <= 1e4
        assert 1e-3 <= s.load_gbps <= 1e5 and 0 <= s.load_latency_ms <= 1e3
        assert 0 < s.memory_bytes <= 1 << 50


def commented(text: str) -> None:
    """Every number in the snippet has its comment."""
    numbers = [line for line in text.splitlines() if re.match(r"^\w+ = [0-9.e+-]+", line)]
    assert numbers and all("  # " in line for line in numbers)


def solve_and_simulate(tmp_path, cluster, tiny_tables) -> None:
    trace, tables = tiny_tables
    assert main(["solve", "--tables", str(tables), "--cluster", str(cluster), "-o", str(tmp_path / "p.json"),
                 "--quiet"]) == 0
    assert main(["simulate", "--plan", str(tmp_path / "p.json"), "--trace", str(trace), "--cluster", str(cluster),
                 "--quiet"]) == 0


def test_one_server_snippet_is_a_cluster_file(tmp_path, tiny_tables, capsys):
    out = tmp_path / "server.toml"
    assert main(["calibrate", "--model", str(TINY), "--origins", "a,b", "-o", str(out), "--quiet", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["path"] == str(out) and s["rank"] is None and s["device"] == "cpu" and s["dtype"] == "bfloat16"
    assert [p["tokens"] for p in s["servers"][0]["curve"]] == [1, 16, 128, 1024]
    cluster = load_cluster(out)
    assert cluster.num_servers == 1 and cluster.servers[0].origins == ("a", "b") and cluster.has_slow_tier
    sane(cluster)
    commented(out.read_text())
    solve_and_simulate(tmp_path, out, tiny_tables)


def test_the_sustained_figure_is_the_best_of_the_curve_and_round_trips():
    cal = calibrate(resolve_model(str(TINY)), batches=(4, 64), dtype="float32", name="box")
    assert cal.compute_tflops[0] == max(p.tflops for p in cal.curve[0])
    assert cal.names == ("box",) and cal.rank is None and cal.memory_bytes[0] > GIB // 16
    again = Calibration.from_summary(json.loads(json.dumps(cal.summary())))
    assert again.to_toml() == cal.to_toml()


def test_two_ranks_measure_the_link_between_them(tmp_path, tiny_tables, capsys):
    out = tmp_path / "two.toml"
    assert main(["calibrate", "--model", str(TINY), "--nproc", "2", "--origins", "a,b", "--name", "box", "-o",
                 str(out)]) == 0
    assert "link box-0 - box-1" in capsys.readouterr().out
    cluster = load_cluster(out)
    assert cluster.names == ["box-0", "box-1"]
    sane(cluster)
    bandwidth, latency = cluster.bandwidth[0, 1] * 8 / 1e9, cluster.latency[0, 1]
    assert 1e-3 < bandwidth < 1e6 and 0 < latency < 1.0
    commented(out.read_text())
    solve_and_simulate(tmp_path, out, tiny_tables)


@pytest.mark.parametrize("args, words", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--nproc", "2", "--origins", "a,b,c"], "one per rank"),
    (["--model", "no-such-model"], "no-such-model"),
])
def test_bad_options_write_nothing(tmp_path, capsys, args, words):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "server.toml"
    out.write_text("# mine\n")
    model = [] if "--model" in args else ["--model", str(TINY)]
    assert main(["calibrate", *model, *args, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0]
    assert out.read_text() == "# mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["server.toml"]
