"""The pipeline's steps as library calls: tables -> solve -> Plan. The CLI only wraps these."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.metrics import coverage_metrics, memory_used, route
from prism_plan.placement.migration import MigrationPlan, plan_migration
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan
from prism_plan.solvers import IncrementalSolver, build_problem, get_solver
from prism_plan.solvers.base import PlacementProblem, SolveResult, placement_fits, relative_gap
from prism_plan.solvers.incremental import traffic_move_cost
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


def migrate_placement(plan: Plan, tables: ActivationTables, cluster: ClusterSpec, move_cost: float = 0.0,
                      budget_bytes: int | None = None, min_gain: float = 0.0, min_replicas: int | None = None,
                      time_limit: float | None = None, objective: str = "coverage") -> tuple[Plan, MigrationPlan]:
    """Re-plan `plan` for the activations in `tables` and order the moves there.

    objective: coverage or latency (the latency model's MILP). move_cost: bytes copied count move_cost times as
    much as the remote-traffic bytes the new placement saves over the tables' tokens (0: only prefer fewer moves
    among equally good placements). budget_bytes: most bytes to copy (None: no limit). min_gain: keep the current
    placement (no moves) unless the new one improves the objective by this fraction. min_replicas: default the
    plan's. Raises a PrismError when the budget cannot reach a placement that fits, or the moves cannot be ordered.
    """
    plan.check_servers(cluster)
    model = plan.model
    r = plan.min_replicas if min_replicas is None else min_replicas
    problem = build_problem(tables, cluster, model, r)
    current = plan.hosted
    solver = IncrementalSolver(time_limit=time_limit, current=current, budget_bytes=budget_bytes,
                               move_cost=traffic_move_cost(problem, move_cost, objective))
    result = solver.solve(problem, objective)
    now = solver.gross(problem, current, objective)
    new_value = result.extra["objective_without_moves"]
    gain = (new_value - now if objective == "coverage" else now - new_value) / max(abs(now), 1e-300)
    migrate = not placement_fits(problem, current) or gain >= min_gain
    if not migrate:  # the solver's bound still says how far the kept placement is from the best one
        result = replace(result, hosted=current.copy(), routing=None, status="feasible", objective=now,
                         gap=relative_gap(now, result.bound, objective == "coverage"),
                         extra={**result.extra, "copied_bytes": 0, "objective_without_moves": now})
    result.extra.update({"migrated": bool(migrate), "predicted_gain": gain, "min_gain": min_gain,
                         "move_cost": move_cost})
    new = make_plan(tables, cluster, model, problem, result)
    new.inputs["from_plan_sha256"] = plan.sha256()
    moves = plan_migration(current, new.hosted, cluster, model, r)
    moves.from_sha256, moves.to_sha256 = plan.sha256(), new.sha256()
    return new, moves
