"""Is `time_limit` kept? Wall time of each solver at a 5 s limit on a 500-server coverage problem and a
16-server latency problem (the promise: at most the limit + 2 s).

Coverage: synthetic Zipf demand at DeepSeek-V2-Lite shape (26 x 64 experts), 500 servers, memory 1.3 x one copy
of the model. Latency: the bundled ESFT tables with each domain's requests split over 8 or 16 origins, one per
server (mixed memory, 10 Gbit/s, 0.5 ms), replayed for local search; at 8 servers the latency MILP is stopped
by the limit.
Run: python bench/time_limits.py [--time-limit 5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from prism_plan.placement.cluster import parse_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.solvers import build_problem, get_solver
from prism_plan.studies.bundled import BUNDLED_MODEL, BUNDLED_TRACE
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace
from solver_scaling import zipf_problem


def latency_problem(servers: int = 16, seed: int = 0):
    """ESFT with each domain's requests dealt to servers / 4 origins, one origin per server."""
    model = resolve_model(BUNDLED_MODEL)
    trace = load_trace(BUNDLED_TRACE)
    per = -(-servers // len(trace.origins))
    names = tuple(f"{d}-{i}" for d in trace.origins for i in range(per))[:servers]
    origin = trace.origin * per + trace.request % per
    keep = origin < servers
    split = replace(trace.select(keep), origins=names, origin=origin[keep].astype(np.int32))
    rng = np.random.default_rng(seed)
    share = rng.uniform(0.5, 1.5, servers)
    memory = share / share.sum() * 1.3 * model.routed_bytes / 2**30
    cluster = parse_cluster({"defaults": {"bandwidth_gbps": 10.0, "latency_ms": 0.5},
                             "server": [{"name": f"s{i}", "memory_gib": float(memory[i]), "compute_tflops": 50.0,
                                         "origins": [names[i]]} for i in range(servers)]})
    return build_problem(build_tables([split], pairs=False), cluster, model, trace=split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=5.0)
    args = ap.parse_args()
    limit = args.time_limit
    cases = [("coverage, 500 servers", zipf_problem("deepseek-v2-lite", 500), [
                 ("greedy", "coverage"), ("exact", "coverage")]),
             ("latency, 8 servers", latency_problem(8), [("exact", "latency")]),
             ("latency, 16 servers", latency_problem(), [
                 ("greedy", "latency"), ("exact", "latency"), ("local-search", "simulated_ttft")])]
    print(f"{'problem':22} {'solver':>13} {'objective':>15} {'status':>10} {'gap':>14} {'wall s':>7} "
          f"{'limit + 2 s':>11}")
    for label, problem, runs in cases:
        for solver, objective in runs:
            t = time.perf_counter()
            res = get_solver(solver, time_limit=limit).solve(problem, objective)
            wall = time.perf_counter() - t
            gap = "n/a" if res.gap is None else f"{100 * res.gap:.2f}%" + (" (weak)" if res.weak_bound else "")
            print(f"{label:22} {solver:>13} {objective:>15} {res.status:>10} {gap:>14} {wall:>7.2f} "
                  f"{'kept' if wall <= limit + 2 else 'BROKEN':>11}")


if __name__ == "__main__":
    main()
