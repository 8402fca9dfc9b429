"""Seconds from SIGINT / SIGTERM to exit in the middle of long phases: a latency MILP (HiGHS in a child process),
a JSONL import, a windowed tables run, local search. The promise is 2 s.

Run: python bench/interrupts.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_limits import latency_problem  # noqa: E402

from prism_plan.fileio import DATA_DIR  # noqa: E402
from prism_plan.studies.bundled import BUNDLED_TRACE  # noqa: E402
from prism_plan.traces.tables import tables_from_trace  # noqa: E402


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """`prism-plan ARGS --quiet` started in `cwd`, its output piped."""
    return subprocess.Popen([sys.executable, "-m", "prism_plan.cli", *args, "--quiet"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt(proc: subprocess.Popen, signum: int, guard_s: float = 20) -> tuple[int, str, float]:
    """Send `signum` and wait (at most `guard_s`, then kill); (exit code, stderr, seconds to exit)."""
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended before the signal: {proc.communicate()}")
    t = time.perf_counter()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=guard_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err, time.perf_counter() - t


def latency_inputs(d: Path) -> tuple[Path, Path]:
    """Tables and cluster of 8 servers whose latency MILP runs for minutes without a time limit."""
    problem = latency_problem(8)
    problem.tables.save(d / "tables.npz")
    lines = ["[defaults]", "bandwidth_gbps = 10.0", "latency_ms = 0.5"]
    for name, memory, origin in zip(problem.cluster.names, problem.budget / 2**30, problem.tables.origins):
        lines += ["[[server]]", f'name = "{name}"', f"memory_gib = {memory:.6f}", "compute_tflops = 50.0",
                  f'origins = ["{origin}"]']
    (d / "cluster.toml").write_text("\n".join(lines) + "\n")
    return d / "tables.npz", d / "cluster.toml"


def routing_jsonl(path: Path, tokens: int = 400_000) -> Path:
    """`tokens` lines of random routing of the bundled tiny model (3 layers, 6 experts, top-2) as JSONL."""
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((tokens, 3, 6)), axis=2)[:, :, :2].tolist()
    path.write_text("".join(json.dumps({"origin": "ab"[i % 2], "request": i // 50, "position": i % 50,
                                        "experts": e}) + "\n" for i, e in enumerate(experts)))
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tables, cluster = latency_inputs(d)
        jsonl = routing_jsonl(d / "big.jsonl")
        esft = d / "esft.npz"
        tables_from_trace(BUNDLED_TRACE).save(esft)
        phases = [
            ("latency MILP (HiGHS)", ["solve", "--tables", str(tables), "--cluster", str(cluster), "--objective",
                                      "latency", "-o", "plan.json"], 6.0),
            ("local search", ["solve", "--tables", str(esft), "--cluster", "edge-4", "--objective",
                              "simulated_ttft", "--solver", "local-search", "--trace", str(BUNDLED_TRACE), "-o",
                              "plan.json"], 8.0),
            ("JSONL import", ["profile", "import", "--format", "jsonl", str(jsonl), "--model",
                              str(DATA_DIR / "tiny" / "model"), "-o", "trace.parquet"], 2.0),
            ("windowed tables", ["profile", "tables", str(BUNDLED_TRACE), "--window", "50", "-o", "win"], 2.0),
        ]
        print(f"{'phase':<22} {'signal':<8} {'exit':>4} {'s to exit':>9}  left behind")
        for name, args, after in phases:
            for signum in (signal.SIGINT, signal.SIGTERM):
                work = Path(tempfile.mkdtemp(dir=d))
                proc = start(args, work)
                time.sleep(after)
                code, err, seconds = interrupt(proc, signum)
                left = sorted(p.name for p in work.iterdir())
                print(f"{name:<22} {signal.Signals(signum).name:<8} {code:>4} {seconds:>9.2f}  {left or '-'}")


if __name__ == "__main__":
    main()
