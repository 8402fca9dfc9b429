"""Every solver and baseline on one cluster, judged by replaying requests the plans did not see."""

from __future__ import annotations

import textwrap

from prism_plan.pipeline import solve_problem
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.model import resolve_model
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import simulate
from prism_plan.progress import track
from prism_plan.solvers import build_problem
from prism_plan.studies.bundled import BUNDLED_MODEL
from prism_plan.traces.tables import build_tables
from prism_plan.units import change, per_token, percent

# (label, solver, objective): the serving systems' baselines first, then prism-plan's solvers.
ROWS = [("linear", "linear", "coverage"), ("round-robin", "round-robin", "coverage"),
        ("popularity", "popularity", "coverage"), ("eplb", "eplb", "coverage"),
        ("eplb-memory", "eplb-memory", "coverage"), ("random", "random", "coverage"),
        ("greedy", "greedy", "coverage"), ("exact-coverage", "exact", "coverage"),
        ("latency-MILP", "exact", "latency"), ("traffic", "local-search", "traffic"),
        ("local-search", "local-search", "simulated_ttft")]
BASELINES = ("linear", "round-robin", "popularity", "eplb", "eplb-memory", "random")


def compare(cluster: ClusterSpec, profile, evaluation, *, model: str = BUNDLED_MODEL, time_limit: float = 60.0,
            quiet: bool = True) -> tuple[list[dict], dict[str, Plan]]:
    """Plan from the `profile` trace with every row of ROWS, replay `evaluation` through each plan.

    Returns (rows: label, objective, status, gap, weak_bound, solve seconds, the simulator's summary and, for a
    baseline adapted to the cluster, `note` saying how; plans by label). time_limit: seconds per solve.
    """
    spec = resolve_model(model)
    problem = build_problem(build_tables([profile]), cluster, spec, trace=profile)
    rows, plans = [], {}
    for label, solver, objective in track(ROWS, "solving and simulating", quiet=quiet, name=lambda row: row[0]):
        plan = plans[label] = solve_problem(problem, solver, objective=objective, time_limit=time_limit)
        s = plan.solver
        sim = simulate(plan, evaluation, cluster).summary()
        rows.append({"label": label, "objective": objective, "status": s["status"], "gap": s["gap"],
                     "weak_bound": s["weak_bound"], "seconds": plan.timing["solve_seconds"], **sim,
                     **({"note": s["note"]} if s.get("note") else {})})
    return rows, plans


def best_row(rows: list[dict]) -> dict:
    """prism-plan's row with the lowest mean simulated time per request."""
    return min((r for r in rows if r["label"] not in BASELINES), key=lambda r: r["simulated_ttft_s"])


def _gap(row: dict) -> str:
    return percent(row["gap"]) + ("*" if row["gap"] is not None and row["weak_bound"] else "")


def format_rows(rows: list[dict]) -> str:
    """The comparison as an aligned text table, with the simulated time's change against linear and eplb, and
    under it the notes of baselines adapted to the cluster."""
    base = {r["label"]: r["simulated_ttft_s"] for r in rows}
    head = ["placement", "objective", "TTFT mean ms", "p99 ms", "remote MB/token", "local cov", "solve s", "status",
            "gap", "vs linear", "vs eplb"]
    body = [[r["label"], r["objective"], f"{1e3 * r['ttft_mean_s']:.2f}", f"{1e3 * r['ttft_p99_s']:.2f}",
             per_token(r["remote_bytes_per_token"]).split()[0], percent(r["local_coverage"]), f"{r['seconds']:.2f}",
             r["status"], _gap(r), change(r["simulated_ttft_s"], base["linear"]),
             change(r["simulated_ttft_s"], base["eplb"])] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = best_row(rows)
    lines += [textwrap.fill(r["note"], 116, subsequent_indent="  ") for r in rows if r.get("note")]
    if any(r["weak_bound"] for r in rows):
        lines.append("* against a cheap bound, loose by construction (no solver proved a tighter one); gaps of "
                     "different objectives do not compare")
    lines.append(f"best prism-plan placement ({best['label']}): mean simulated time per request "
                 f"{100 * (1 - best['simulated_ttft_s'] / base['linear']):.1f}% below linear, "
                 f"{100 * (1 - best['simulated_ttft_s'] / base['eplb']):.1f}% below eplb")
    return "\n".join(lines)
