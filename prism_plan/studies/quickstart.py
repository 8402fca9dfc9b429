"""The quickstart: bundled real traces -> tables -> every solver on a bundled edge cluster -> simulated latency."""

from __future__ import annotations

from pathlib import Path

from prism_plan.fileio import check_output, transaction
from prism_plan.placement.cluster import load_cluster
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
from prism_plan.studies.comparison import best_row, compare
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace

QUICK_SECONDS = 10.0
OUTPUTS = ("tables.npz", "plan.json", "profile.parquet", "holdout.parquet")


def run_quickstart(out_dir: str | Path = "prism-quickstart", *, time_limit: float | None = None,
                   quiet: bool = False) -> list[dict]:
    """Plan from the first half of each ESFT domain's requests with every solver, replay the second half on the
    bundled edge-4 cluster; write to `out_dir` tables.npz (of the profiling half), plan.json (the lowest latency),
    profile.parquet (the profiling half) and holdout.parquet (the replayed half), for the next steps to use.

    Returns the comparison rows (see prism_plan.studies.comparison). time_limit: seconds per solve (default
    QUICK_SECONDS).
    """
    out_dir = Path(out_dir)
    for name in OUTPUTS:  # before the minutes of solving
        check_output(out_dir / name)
    profile, evaluation = load_trace(BUNDLED_TRACE).split_requests(0.5)
    cluster = load_cluster(BUNDLED_CLUSTER)
    rows, plans = compare(cluster, profile, evaluation, time_limit=time_limit or QUICK_SECONDS, quiet=quiet)
    with transaction():
        build_tables([profile]).save(out_dir / OUTPUTS[0])
        plans[best_row(rows)["label"]].save(out_dir / OUTPUTS[1], cluster)
        profile.save(out_dir / OUTPUTS[2])
        evaluation.save(out_dir / OUTPUTS[3])
    return rows
