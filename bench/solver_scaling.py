"""Coverage solver scaling: exact (min-cost flow) and greedy on model shapes up to DeepSeek-V3.

Demand is synthetic Zipf: every origin draws tokens over experts from a Zipf law (exponent 1.1) whose
ranking it shuffles per layer, so origins prefer different experts, as the real ESFT domains do.
Memory: every server gets a mixed share of 1.3 x one copy of the model. Run: python bench/solver_scaling.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from prism_plan.placement.model import resolve_model
from prism_plan.solvers import get_solver
from prism_plan.solvers.problem import PlacementProblem

CASES = [("deepseek-v2-lite", 4), ("qwen3-30b-a3b", 8), ("deepseek-v3", 16)]


def zipf_problem(model_name: str, servers: int, seed: int = 0, tokens: int = 100_000) -> PlacementProblem:
    """Origin i lives on server i; integer token counts per (server, layer, expert)."""
    model = resolve_model(model_name)
    rng = np.random.default_rng(seed)
    l, e = model.num_layers, model.num_experts
    p = 1.0 / np.arange(1, e + 1) ** 1.1
    p /= p.sum()
    weight = np.empty((servers, l, e))
    for s in range(servers):
        for j in range(l):
            weight[s, j, rng.permutation(e)] = rng.multinomial(tokens * model.top_k, p)
    share = rng.uniform(0.5, 1.5, servers)
    budget = (share / share.sum() * 1.3 * model.routed_bytes).astype(np.int64)
    return PlacementProblem(weight, model.layer_bytes, budget, np.zeros((servers, servers)), 1,
                            tuple(f"s{i}" for i in range(servers)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the table shows the fastest")
    args = ap.parse_args()
    print(f"{'model':18} {'layers x experts':>16} {'servers':>7} {'solver':>7} {'status':>10} "
          f"{'seconds':>8} {'gap':>9} {'below exact':>11}")
    for name, servers in CASES:
        problem = zipf_problem(name, servers)
        _, l, e = problem.shape
        best = None
        for solver in ("exact", "greedy"):
            runs = []
            for _ in range(args.repeat if solver == "exact" else 1):
                t = time.perf_counter()
                res = get_solver(solver).solve(problem)
                runs.append((time.perf_counter() - t, res))
            seconds, res = min(runs, key=lambda r: r[0])
            best = res.objective if solver == "exact" else best
            print(f"{name:18} {f'{l} x {e}':>16} {servers:>7} {solver:>7} {res.status:>10} {seconds:>8.3f} "
                  f"{100 * res.gap:>8.4f}% {100 * (1 - res.objective / best):>10.3f}%")


if __name__ == "__main__":
    main()
