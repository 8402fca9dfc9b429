"""Every solver and baseline on one cluster, judged by replaying requests the plans did not see."""

from __future__ import annotations

import time

from prism_plan.pipeline import BUNDLED_MODEL, make_plan
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.model import resolve_model
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import simulate
from prism_plan.progress import track
from prism_plan.solvers import build_problem, get_solver
from prism_plan.traces.tables import build_tables

# (label, solver, objective): the serving systems' baselines first, then prism-plan's solvers.
ROWS = [("linear", "linear", "coverage"), ("round-robin", "round-robin", "coverage"),
        ("popularity", "popularity", "coverage"), ("eplb", "eplb", "coverage"), ("random", "random", "coverage"),
        ("greedy", "greedy", "coverage"), ("exact-coverage", "exact", "coverage"),
        ("latency-MILP", "exact", "latency"), ("traffic", "local-search", "traffic"),
        ("local-search", "local-search", "latency")]
BASELINES = ("linear", "round-robin", "popularity", "eplb", "random")


def compare(cluster: ClusterSpec, profile, evaluation, model: str = BUNDLED_MODEL, time_limit: float = 60.0,
            quiet: bool = True) -> tuple[list[dict], dict[str, Plan]]:
    """Plan from the `profile` trace with every row of ROWS, replay `evaluation` through each plan.

    Returns (rows: label, objective, status, gap, solve seconds and the simulator's summary; plans by label).
    time_limit: seconds per searching solver.
    """
    spec = resolve_model(model)
    tables = build_tables([profile])
    problem = build_problem(tables, cluster, spec, trace=profile)
    rows, plans = [], {}
    for label, solver, objective in track(ROWS, "solving and simulating", quiet=quiet):
        t = time.perf_counter()
        res = get_solver(solver, time_limit=time_limit).solve(problem, objective)
        seconds = time.perf_counter() - t
        plans[label] = make_plan(tables, cluster, spec, problem, res)
        sim = simulate(plans[label], evaluation, cluster).summary()
        rows.append({"label": label, "objective": objective, "status": res.status, "gap": res.gap,
                     "seconds": seconds, **sim})
    return rows, plans


def best_row(rows: list[dict]) -> dict:
    """prism-plan's row with the lowest mean simulated latency."""
    return min((r for r in rows if r["label"] not in BASELINES), key=lambda r: r["mean_latency_s"])


def format_rows(rows: list[dict]) -> str:
    """The comparison as an aligned text table, with the latency change against linear and eplb."""
    base = {r["label"]: r["mean_latency_s"] for r in rows}
    head = ["placement", "objective", "TTFT mean ms", "p99 ms", "remote kB/tok", "local cov", "solve s", "status",
            "gap", "vs linear", "vs eplb"]
    body = [[r["label"], r["objective"], f"{1e3 * r['ttft_mean_s']:.2f}", f"{1e3 * r['ttft_p99_s']:.2f}",
             f"{r['remote_bytes_per_token'] / 1e3:.1f}", f"{100 * r['local_coverage']:.2f}%", f"{r['seconds']:.2f}",
             r["status"], "n/a" if r["gap"] is None else f"{100 * r['gap']:.2f}%",
             f"{100 * (r['mean_latency_s'] / base['linear'] - 1):+.1f}%",
             f"{100 * (r['mean_latency_s'] / base['eplb'] - 1):+.1f}%"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = best_row(rows)
    lines.append(f"best prism-plan placement ({best['label']}): mean latency "
                 f"{100 * (1 - best['mean_latency_s'] / base['linear']):.1f}% below linear, "
                 f"{100 * (1 - best['mean_latency_s'] / base['eplb']):.1f}% below eplb")
    return "\n".join(lines)
