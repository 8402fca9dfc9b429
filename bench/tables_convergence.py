"""How much routing is enough? Coverage plans of the bundled ESFT trace (DeepSeek-V2-Lite, 4 domains) on the
edge-4 cluster from 1/16, 1/8, 1/4, 1/2 and all of its requests, against the plan of all of them; then the
step at which the data settle for other seeds of the request draw.

Run: python bench/tables_convergence.py
"""

from __future__ import annotations

from prism_plan.placement.cluster import load_cluster
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.studies.convergence import convergence, format_convergence, settled_step
from prism_plan.traces.trace import load_trace

TOPK, PLAN = 0.9, 0.95  # the overlaps asked of "settled" data
SEEDS = range(5)


def settled(rows: list[dict]) -> str:
    """Where top-k overlap >= TOPK, plan overlap >= PLAN and both hold from on (each: the first step from
    which it holds at every larger step), as one line."""
    parts = []
    for what, topk, plan in (("top-k", TOPK, 0.0), ("plan", 0.0, PLAN), ("both", TOPK, PLAN)):
        row = settled_step(rows, topk=topk, plan=plan)
        where = ("never" if row is None else "only with all the data" if row["step"] == 1 and row is rows[-1]
                 else f"step {row['step']:g} ({row['tokens']} tokens)")
        parts.append(f"{what}: {where}")
    return "; ".join(parts)


def main() -> None:
    trace, cluster = load_trace(BUNDLED_TRACE), load_cluster("edge-4")
    rows = convergence(trace, cluster)
    print(f"{trace.num_tokens} tokens of {len(trace.origins)} origins on {cluster.name}, seed 0; top-k = "
          f"{trace.meta.top_k}")
    print(format_convergence(rows))
    print(f"settled (top-k overlap with all data >= {TOPK}, plan overlap >= {PLAN}, at that step and every larger "
          f"one): {settled(rows)}")
    for seed in SEEDS:
        print(f"seed {seed}: {settled(convergence(trace, cluster, seed=seed))}")


if __name__ == "__main__":
    main()
