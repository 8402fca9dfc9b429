"""Simulated MoE latency of every solver and baseline on the real ESFT traces, judged on unseen requests.

The bundled trace (DeepSeek-V2-Lite routing of four ESFT domains) is split per domain by request id: plans are
made from the first half of each domain's requests and replayed on the second half. Clusters: the documented
edge-4 (prism_plan/data/edge-4.toml: 6/8/10/12 GiB, 30-120 TFLOP/s, links 2.5-10 Gbit/s on a chain and 1 Gbit/s,
2 ms elsewhere) and two held-out clusters with other budgets and links (HELD_OUT below).
Run: python bench/latency_experiment.py [--time-limit S] [--cluster NAME ...]
"""

from __future__ import annotations

import argparse

from prism_plan.studies.comparison import compare, format_rows
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
from prism_plan.placement.cluster import load_cluster, parse_cluster
from prism_plan.traces.trace import load_trace


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

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per searching solver")
    ap.add_argument("--cluster", action="append", choices=["edge-4", *HELD_OUT], help="default: all")
    args = ap.parse_args()
    profile, evaluation = load_trace(BUNDLED_TRACE).split_requests(0.5)
    print(f"profiling half: {profile.num_tokens} tokens; evaluation half: {evaluation.num_tokens} tokens")
    clusters = {"edge-4": load_cluster(BUNDLED_CLUSTER), **{k: parse_cluster(v, k) for k, v in HELD_OUT.items()}}
    for name in args.cluster or list(clusters):
        rows, _ = compare(clusters[name], profile, evaluation, time_limit=args.time_limit)
        print(f"\n{name}: plans from the profiling half, replayed on the evaluation half")
        print(format_rows(rows))


if __name__ == "__main__":
    main()
