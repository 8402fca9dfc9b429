"""The quickstart: bundled real traces -> tables -> every solver on a bundled edge cluster -> a table."""

from __future__ import annotations

from pathlib import Path

from prism_plan.pipeline import BUNDLED_CLUSTER, BUNDLED_MODEL, BUNDLED_TRACE, make_plan
from prism_plan.placement.cluster import load_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.progress import track
from prism_plan.solvers import SOLVERS, build_problem, get_solver
from prism_plan.traces.tables import tables_from_trace


def run_quickstart(out_dir: str | Path, time_limit: float | None = None, quiet: bool = False) -> list[dict]:
    """Solve the bundled problem with every solver; write tables.npz and plan.json (exact) to `out_dir`.

    Returns one row per solver: status, local coverage, remote bytes per token, seconds, proven gap, and the
    shortfall against the exact optimum.
    """
    out_dir = Path(out_dir)
    tables = tables_from_trace(BUNDLED_TRACE)
    tables.save(out_dir / "tables.npz")
    cluster = load_cluster(BUNDLED_CLUSTER)
    model = resolve_model(BUNDLED_MODEL)
    problem = build_problem(tables, cluster, model)
    plans = {}
    for name in track(list(SOLVERS), "solving", quiet=quiet):
        plans[name] = make_plan(tables, cluster, model, problem,
                                get_solver(name, time_limit=time_limit).solve(problem))
    plans["exact"].save(out_dir / "plan.json", cluster)
    best = plans["exact"].solver["objective"]
    return [{"solver": name, "status": p.solver["status"], "local_coverage": p.metrics["local_coverage"],
             "remote_bytes_per_token": p.metrics["remote_bytes_per_token"], "seconds": p.solver["seconds"],
             "gap": p.solver["gap"], "below_optimum": 1 - p.solver["objective"] / best if best else 0.0}
            for name, p in plans.items()]


def format_rows(rows: list[dict]) -> str:
    """The quickstart table as aligned text."""
    head = ["solver", "status", "local coverage", "remote kB/token", "solve s", "proven gap", "below optimum"]
    body = [[r["solver"], r["status"], f"{100 * r['local_coverage']:.2f}%", f"{r['remote_bytes_per_token'] / 1e3:.2f}",
             f"{r['seconds']:.3f}", "n/a" if r["gap"] is None else f"{100 * r['gap']:.2f}%",
             f"{100 * r['below_optimum']:.2f}%"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
