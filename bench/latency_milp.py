"""Latency MILP: proven gap within a time limit at ESFT and Qwen3-30B-A3B shapes.

Demand: the real ESFT tables on the bundled edge-4 cluster, and synthetic Zipf demand (as in
solver_scaling.py) on random heterogeneous clusters: links 1-10 Gbit/s and 0.3-2 ms, compute 30-120 TFLOP/s.
Run: python bench/latency_milp.py [--time-limit S]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from solver_scaling import zipf_problem

from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_MODEL, BUNDLED_TRACE
from prism_plan.placement.cluster import load_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.placement.simulator import CostModel
from prism_plan.solvers import build_problem, get_solver
from prism_plan.solvers.problem import PlacementProblem
from prism_plan.traces.tables import tables_from_trace


def random_costs(model_name: str, servers: int, seed: int = 0) -> CostModel:
    """Symmetric random links and compute for `servers` servers."""
    rng = np.random.default_rng(seed)
    bw = rng.uniform(1, 10, (servers, servers)) * 1e9 / 8
    lat = rng.uniform(0.3e-3, 2e-3, (servers, servers))
    bw, lat = np.triu(bw, 1) + np.triu(bw, 1).T, np.triu(lat, 1) + np.triu(lat, 1).T
    np.fill_diagonal(bw, np.inf)
    model = resolve_model(model_name)
    return CostModel(lat, bw, rng.uniform(30, 120, servers) * 1e12, model.token_bytes, model.expert_flops)


def zipf_latency_problem(model_name: str, servers: int, seed: int = 0) -> PlacementProblem:
    problem = zipf_problem(model_name, servers, seed)
    costs = random_costs(model_name, servers, seed)
    hop = costs.latency + costs.token_bytes / costs.bandwidth
    return replace(problem, hop_seconds=hop, costs=costs, tokens=100_000.0 * servers)


def exact_latency(problem: PlacementProblem, limit: float):
    """exact's latency solve within `limit` seconds: (result, seconds, gap as text, bound in ms/token as text)."""
    t = time.perf_counter()
    res = get_solver("exact", time_limit=limit).solve(problem, "latency")
    seconds = time.perf_counter() - t
    gap = "n/a" if res.gap is None else f"{100 * res.gap:.3f}%"
    bound = "n/a" if res.bound is None else f"{1e3 * res.bound:.4f}"
    return res, seconds, gap, bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, nargs=2, default=[60.0, 120.0], metavar=("ESFT", "QWEN3"),
                    help="seconds for the ESFT case and the Qwen3 case")
    args = ap.parse_args()
    model = resolve_model(BUNDLED_MODEL)
    esft = build_problem(tables_from_trace(BUNDLED_TRACE), load_cluster(BUNDLED_CLUSTER), model)
    cases = [("ESFT, edge-4", esft, args.time_limit[0]),
             ("Qwen3-30B-A3B Zipf", zipf_latency_problem("qwen3-30b-a3b", 8), args.time_limit[1])]
    print(f"{'case':20} {'layers x experts':>16} {'servers':>7} {'limit s':>7} {'status':>9} {'seconds':>8} "
          f"{'objective ms/token':>18} {'bound':>9} {'gap':>8}")
    for name, problem, limit in cases:
        s, l, e = problem.shape
        res, seconds, gap, bound = exact_latency(problem, limit)
        print(f"{name:20} {f'{l} x {e}':>16} {s:>7} {limit:>7.0f} {res.status:>9} {seconds:>8.2f} "
              f"{1e3 * res.objective:>18.4f} {bound:>9} {gap:>8}")


if __name__ == "__main__":
    main()
