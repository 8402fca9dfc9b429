"""The pipeline's steps as library calls: tables -> solve -> Plan. The CLI only wraps these."""

from __future__ import annotations

from pathlib import Path

from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.metrics import coverage_metrics, memory_used, route
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan
from prism_plan.solvers import build_problem, get_solver
from prism_plan.solvers.base import PlacementProblem, SolveResult
from prism_plan.traces.tables import ActivationTables

DATA = Path(__file__).parent / "data"
BUNDLED_TRACE = DATA / "esft-deepseek-v2-lite.parquet"
BUNDLED_CLUSTER = DATA / "edge-4.toml"
BUNDLED_MODEL = "deepseek-v2-lite"


def make_plan(tables: ActivationTables, cluster: ClusterSpec, model: ModelSpec, problem: PlacementProblem,
              result: SolveResult) -> Plan:
    """Wrap a solver's placement into a checked Plan with routing, metrics and provenance."""
    homes = cluster.homes(list(tables.origins))
    routing = route(result.hosted, homes, problem.hop_seconds) if result.routing is None else result.routing[homes]
    metrics = coverage_metrics(tables.freq, tables.tokens, homes, routing, result.hosted, model.layer_bytes,
                               model.token_bytes)
    metrics["memory_bytes"] = dict(zip(cluster.names, memory_used(result.hosted, model.layer_bytes).tolist()))
    plan = Plan(model, tuple(cluster.names), tuple(tables.origins), result.hosted, routing,
                result.objective_name, result.evidence(), metrics,
                {"tables_sha256": tables.sha256(), "cluster_sha256": cluster.sha256()}, problem.min_replicas)
    plan.check(cluster)
    return plan


def solve_placement(tables: ActivationTables, cluster: ClusterSpec, model: ModelSpec, solver: str = "exact",
                    objective: str = "coverage", time_limit: float | None = None, min_replicas: int = 1,
                    seed: int = 0, trace=None, concurrency: int = 1, **options) -> Plan:
    """Solve for a placement of `model`'s experts on `cluster` under the activations in `tables`.

    time_limit: seconds for solvers that search (None: no limit). trace: the Trace behind `tables`, needed by
    objectives judged by replaying it (traffic, local-search latency). options: solver options (local-search:
    start, a hosted array to improve).
    """
    problem = build_problem(tables, cluster, model, min_replicas, trace, concurrency)
    result = get_solver(solver, time_limit=time_limit, seed=seed, **options).solve(problem, objective)
    return make_plan(tables, cluster, model, problem, result)
