"""Latency objective past the MILP and the enumeration of server sets: proven gap within a time limit.

Demand and clusters as in latency_milp.py (synthetic Zipf demand, random heterogeneous links and compute);
8 servers still take the full enumeration, 16 and 32 the decomposition of latency_decomposition.py.
Run: python bench/latency_scale.py [--time-limit S]
"""

from __future__ import annotations

import argparse

from latency_milp import exact_latency, zipf_latency_problem


CASES = [("qwen3-30b-a3b", 8), ("qwen3-30b-a3b", 16), ("deepseek-v3", 16), ("deepseek-v3", 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per case")
    args = ap.parse_args()
    print(f"{'case':14} {'servers':>7} {'status':>9} {'objective ms/token':>18} {'bound':>9} {'gap':>8} "
          f"{'seconds':>8}")
    for name, servers in CASES:
        problem = zipf_latency_problem(name, servers)
        res, seconds, gap, bound = exact_latency(problem, args.time_limit)
        print(f"{name:14} {servers:>7} {res.status:>9} {1e3 * res.objective:>18.4f} {bound:>9} {gap:>8} "
              f"{seconds:>8.2f}")


if __name__ == "__main__":
    main()
