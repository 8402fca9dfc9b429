"""Replay a drifting workload window by window under migration strategies: plan on window w - 1's tables,
serve window w with that plan in the simulator, count what each re-plan moves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_plan.pipeline import migrate_placement, solve_problem
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.migration import plan_migration
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import simulate
from prism_plan.progress import track
from prism_plan.solvers import build_problem
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import Trace


@dataclass(frozen=True)
class Strategy:
    """How to re-plan each window: `never`, `scratch` (the exact coverage optimum from scratch) or
    `incremental` (migrate_placement with a move cost and an optional budget per window, bytes); all under
    `objective` (coverage or latency)."""

    label: str
    kind: str
    move_cost: float = 0.0
    budget_bytes: int | None = None
    min_gain: float = 0.0
    objective: str = "latency"


DEFAULT_STRATEGIES = (
    Strategy("never", "never"), Strategy("from scratch", "scratch"),
    Strategy("incremental", "incremental"),
    Strategy("incremental, cost 0.02", "incremental", move_cost=0.02),
    Strategy("incremental, 1 GiB", "incremental", budget_bytes=2**30),
    Strategy("incremental, 0.5 GiB", "incremental", budget_bytes=2**29),
    Strategy("incremental, 0.25 GiB", "incremental", budget_bytes=2**28),
    Strategy("incremental, 0 GiB", "incremental", budget_bytes=0),
)


def _next_plan(strategy: Strategy, plan: Plan, tables, cluster: ClusterSpec, model: ModelSpec,
               time_limit: float | None) -> Plan:
    if strategy.kind == "never":
        return plan
    if strategy.kind == "scratch":
        problem = build_problem(tables, cluster, model, min_replicas=plan.min_replicas)
        return solve_problem(problem, "exact", objective=strategy.objective, time_limit=time_limit)
    new, _ = migrate_placement(plan, tables, cluster, objective=strategy.objective, move_cost=strategy.move_cost,
                               budget_bytes=strategy.budget_bytes, min_gain=strategy.min_gain, time_limit=time_limit)
    return new


def replay_drift(windows: list[Trace], cluster: ClusterSpec, model: ModelSpec, *,
                 strategies=DEFAULT_STRATEGIES, time_limit: float | None = 60.0, quiet: bool = True) -> list[dict]:
    """Per strategy: mean simulated TTFT (seconds) and local coverage per window (windows 1..), bytes and experts
    copied per window, stages, and the totals. Every strategy starts from the exact plan of window 0 under its objective.
    time_limit: seconds per solve."""
    tables = [build_tables([w]) for w in windows]
    problem = build_problem(tables[0], cluster, model)
    first = {obj: solve_problem(problem, "exact", objective=obj, time_limit=time_limit)
             for obj in sorted({s.objective for s in strategies})}
    rows = []
    for strategy in track(strategies, "replaying strategies", quiet=quiet):
        plan, ttft, local, copied, experts, stages = first[strategy.objective], [], [], [], [], []
        for w in range(1, len(windows)):
            new = _next_plan(strategy, plan, tables[w - 1], cluster, model, time_limit)
            moves = plan_migration(plan.hosted, new.hosted, cluster, model, plan.min_replicas)
            copied.append(moves.bytes)
            experts.append(moves.num_copies)
            stages.append(len(moves.stages))
            plan = new
            served = simulate(plan, windows[w], cluster).summary()
            ttft.append(served["ttft_mean_s"])
            local.append(served["local_coverage"])
        rows.append({"label": strategy.label, "ttft_s": ttft, "local_coverage": local, "copied_bytes": copied,
                     "copies": experts, "stages": stages, "mean_ttft_s": float(np.mean(ttft)),
                     "mean_local_coverage": float(np.mean(local)), "total_bytes": int(sum(copied)),
                     "total_copies": int(sum(experts))})
    return rows


def with_benefit(rows: list[dict], *, never: str = "never", reference: str = "from scratch") -> list[dict]:
    """Add each row's benefit (mean TTFT saved against `never`, seconds), its share of the `reference` row's
    benefit (None when the reference gains nothing), and its bytes as a share of the reference's."""
    by = {r["label"]: r for r in rows}
    base, ref = by[never]["mean_ttft_s"], by[reference]
    ref_benefit = base - ref["mean_ttft_s"]
    for r in rows:
        r["benefit_s"] = base - r["mean_ttft_s"]
        r["benefit_share"] = r["benefit_s"] / ref_benefit if ref_benefit > 0 else None
        r["bytes_share"] = r["total_bytes"] / ref["total_bytes"] if ref["total_bytes"] else None
    return rows
