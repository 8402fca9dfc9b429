"""Simulated MoE latency of every solver and baseline on the real ESFT traces, judged on unseen requests.

The bundled trace (DeepSeek-V2-Lite routing of four ESFT domains) is split per domain by request id: plans are
made from the first half of each domain's requests and replayed on the second half. Clusters: the documented
edge-4 (prism_plan/data/edge-4.toml: 6/8/10/12 GiB, 30-120 TFLOP/s, links 2.5-10 Gbit/s on a chain and 1 Gbit/s,
2 ms elsewhere) and two held-out clusters with other budgets and links (HELD_OUT below).
Run: python bench/latency_experiment.py [--time-limit S] [--cluster NAME ...]
"""

from __future__ import annotations

import argparse
import time

from prism_plan.pipeline import BUNDLED_CLUSTER, BUNDLED_MODEL, BUNDLED_TRACE, make_plan
from prism_plan.placement.cluster import load_cluster, parse_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.placement.simulator import simulate
from prism_plan.solvers import build_problem, get_solver
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import read_trace


def _servers(memory, compute):
    domains = ["intent", "law", "summary", "translation"]
    return [{"name": f"s{i}", "memory_gib": m, "compute_tflops": c, "origins": [d]}
            for i, (m, c, d) in enumerate(zip(memory, compute, domains))]


HELD_OUT = {
    # Equal 9 GiB servers on a 10 Gbit/s, 0.5 ms switch: little room for replicas, fast links.
    "flat-10g": {"name": "flat-10g", "server": _servers([9, 9, 9, 9], [60, 60, 60, 60]),
                 "defaults": {"bandwidth_gbps": 10.0, "latency_ms": 0.5}},
    # Big and small servers on a slow 1 Gbit/s ring of 1-3 ms links (other pairs route around the ring).
    "ring-1g": {"name": "ring-1g", "server": _servers([14, 5, 12, 7], [120, 30, 90, 30]),
                "link": [{"a": "s0", "b": "s1", "bandwidth_gbps": 1.0, "latency_ms": 1.0},
                         {"a": "s1", "b": "s2", "bandwidth_gbps": 1.0, "latency_ms": 3.0},
                         {"a": "s2", "b": "s3", "bandwidth_gbps": 1.0, "latency_ms": 1.0},
                         {"a": "s3", "b": "s0", "bandwidth_gbps": 1.0, "latency_ms": 2.0}]},
}

# (label, solver, objective): baselines first, then prism-plan's solvers.
ROWS = [("linear", "linear", "coverage"), ("round-robin", "round-robin", "coverage"),
        ("popularity", "popularity", "coverage"), ("eplb", "eplb", "coverage"), ("random", "random", "coverage"),
        ("greedy", "greedy", "coverage"), ("exact-coverage", "exact", "coverage"),
        ("latency-MILP", "exact", "latency"), ("traffic", "local-search", "traffic"),
        ("local-search", "local-search", "latency")]
BASELINES = ("linear", "round-robin", "popularity", "eplb", "random")


def run(cluster, profile, evaluation, time_limit: float) -> list[dict]:
    model = resolve_model(BUNDLED_MODEL)
    tables = build_tables([profile])
    problem = build_problem(tables, cluster, model, trace=profile)
    rows = []
    for label, solver, objective in ROWS:
        t = time.perf_counter()
        res = get_solver(solver, time_limit=time_limit).solve(problem, objective)
        seconds = time.perf_counter() - t
        sim = simulate(make_plan(tables, cluster, model, problem, res), evaluation, cluster).summary()
        rows.append({"label": label, "seconds": seconds, "gap": res.gap, "status": res.status, **sim})
    return rows


def print_table(name: str, rows: list[dict]) -> None:
    base = {r["label"]: r["mean_latency_s"] for r in rows}
    print(f"\n{name}: plans from the profiling half, replayed on the evaluation half")
    print(f"{'placement':15} {'TTFT mean ms':>12} {'p99 ms':>8} {'remote kB/tok':>13} {'local cov':>9} "
          f"{'solve s':>8} {'status':>9} {'gap':>8} {'vs linear':>9} {'vs eplb':>8}")
    for r in rows:
        gap = "n/a" if r["gap"] is None else f"{100 * r['gap']:.2f}%"
        vs = lambda b: f"{100 * (r['mean_latency_s'] / base[b] - 1):+.1f}%"  # noqa: E731
        print(f"{r['label']:15} {1e3 * r['ttft_mean_s']:>12.2f} {1e3 * r['ttft_p99_s']:>8.2f} "
              f"{r['remote_bytes_per_token'] / 1e3:>13.1f} {100 * r['local_coverage']:>8.2f}% {r['seconds']:>8.2f} "
              f"{r['status']:>9} {gap:>8} {vs('linear'):>9} {vs('eplb'):>8}")
    ours = min((r for r in rows if r["label"] not in BASELINES), key=lambda r: r["mean_latency_s"])
    print(f"best prism-plan placement ({ours['label']}): mean latency "
          f"{100 * (1 - ours['mean_latency_s'] / base['linear']):.1f}% below linear, "
          f"{100 * (1 - ours['mean_latency_s'] / base['eplb']):.1f}% below eplb")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per searching solver")
    ap.add_argument("--cluster", action="append", choices=["edge-4", *HELD_OUT], help="default: all")
    args = ap.parse_args()
    profile, evaluation = read_trace(BUNDLED_TRACE).split_requests(0.5)
    print(f"profiling half: {profile.num_tokens} tokens; evaluation half: {evaluation.num_tokens} tokens")
    clusters = {"edge-4": load_cluster(BUNDLED_CLUSTER), **{k: parse_cluster(v, k) for k, v in HELD_OUT.items()}}
    for name in args.cluster or list(clusters):
        print_table(name, run(clusters[name], profile, evaluation, args.time_limit))


if __name__ == "__main__":
    main()
