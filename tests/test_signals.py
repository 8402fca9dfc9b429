"""SIGINT and SIGTERM in the middle of a long phase (a MILP solve, an import, a windowed tables run): the run
stops, prints one line saying nothing was written, exits 130 or 143, and leaves the old files as they were and no
temporary behind. The seconds from signal to exit are measured in bench/interrupts.py; here a generous guard only
catches a run that carries on."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from prism_plan.fileio import DATA_DIR
from prism_plan.studies.bundled import BUNDLED_TRACE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from interrupts import interrupt, latency_inputs, routing_jsonl, start  # noqa: E402

GUARD_S = 20  # far above the 2 s the runs take, far below the time they would run on


def wait_for(cond, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "the phase never started"
        time.sleep(0.05)


def stopped_cleanly(proc, signum: int, folder: Path, before: dict[str, bytes]) -> None:
    """Interrupt `proc`: it exits 128 + signum with one line saying nothing was written, and `folder` holds
    exactly `before` (no temporary, old files intact)."""
    assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
    code, err, _ = interrupt(proc, signum, GUARD_S)
    assert code == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "nothing was written" in lines[0], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.fixture(scope="module")
def milp_inputs(tmp_path_factory):
    return latency_inputs(tmp_path_factory.mktemp("milp"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_milp_solve(milp_inputs, tmp_path, signum):
    (tmp_path / "plan.json").write_text('{"an": "old plan"}')
    tables, cluster = milp_inputs
    proc = start(["solve", "--tables", str(tables), "--cluster", str(cluster), "--objective", "latency", "-o",
                  "plan.json"], tmp_path)
    time.sleep(6)  # past loading and the model build: HiGHS is solving
    stopped_cleanly(proc, signum, tmp_path, {"plan.json": b'{"an": "old plan"}'})


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    return routing_jsonl(tmp_path_factory.mktemp("jsonl") / "big.jsonl")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_an_import(big_jsonl, tmp_path, signum):
    (tmp_path / "trace.parquet").write_bytes(b"old trace")
    proc = start(["profile", "import", "--format", "jsonl", str(big_jsonl), "--model", str(DATA_DIR / "tiny" / "model"),
                  "-o", "trace.parquet"], tmp_path)
    wait_for(lambda: any(p.name.endswith(".tmp") for p in tmp_path.iterdir()))  # the writer has begun
    stopped_cleanly(proc, signum, tmp_path, {"trace.parquet": b"old trace"})


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_windowed_tables(tmp_path, signum):
    (tmp_path / "win").mkdir()
    manifest = b'{"format": "prism-plan/windows", "windows": ["window-0000.npz"]}'
    (tmp_path / "win" / "manifest.json").write_bytes(manifest)
    (tmp_path / "win" / "window-0000.npz").write_bytes(b"an earlier run's window")
    proc = start(["profile", "tables", str(BUNDLED_TRACE), "--window", "50", "-o", "win"], tmp_path)
    wait_for(lambda: any(p.name.endswith(".tmp") and any(p.iterdir()) for p in tmp_path.iterdir()))
    stopped_cleanly(proc, signum, tmp_path / "win", {"manifest.json": manifest,
                                                     "window-0000.npz": b"an earlier run's window"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["win"]
