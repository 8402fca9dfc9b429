"""The pipeline's steps as library calls: tables -> problem -> solve -> Plan, and a re-plan with its moves.

Every function takes the objects or the paths of the files that hold them (a bundled cluster by name); the
CLI and the studies go through `solve_problem` and `make_plan`, the one path from a problem to a plan.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.fileio import loaded
from prism_plan.placement.checks import number
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.metrics import coverage_metrics
from prism_plan.placement.migration import MigrationPlan, plan_migration
from prism_plan.placement.model import ModelSpec, model_from_meta, resolve_model
from prism_plan.placement.plan import Plan
from prism_plan.solvers import IncrementalSolver, build_problem, get_solver
from prism_plan.solvers.objectives import get_objective, nearest_routing, relative_gap, serving_metrics
from prism_plan.solvers.base import SolveResult, check_time_limit
from prism_plan.solvers.exact import check_backend
from prism_plan.solvers.offload import offload_metrics
from prism_plan.solvers.incremental import traffic_move_cost
from prism_plan.solvers.problem import PlacementProblem, placement_fits
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import Trace
from prism_plan.units import human_bytes

TablesLike = ActivationTables | str | Path
ClusterLike = ClusterSpec | str | Path
PlanLike = Plan | str | Path


def make_plan(problem: PlacementProblem, result: SolveResult) -> Plan:
    """Wrap a solver's placement for a problem built by `build_problem` into a checked Plan with routing,
    metrics and provenance."""
    tables, cluster, model = problem.tables, problem.cluster, problem.model
    if tables is None or cluster is None or model is None:
        raise PrismError("make_plan needs a `problem` made by build_problem (it names the tables, cluster and model "
                         "behind it)", parameters=("problem",))
    homes = problem.homes
    routing = nearest_routing(problem, result.hosted, homes) if result.routing is None else result.routing[homes]
    metrics = coverage_metrics(tables.freq, tables.tokens, homes, routing, result.hosted, model.layer_bytes,
                               model.token_bytes)
    memory = problem.memory(result.hosted) + (0 if result.offload is None else result.offload.cache_bytes)
    metrics["memory_bytes"] = dict(zip(cluster.names, memory.tolist()))
    if result.offload is not None:
        metrics.update(offload_metrics(problem, result.hosted, result.routing, result.offload))
    elif cluster.layout is not None or cluster.has_nodes:
        metrics.update(serving_metrics(problem, result.hosted, result.routing))
    plan = Plan(model, tuple(cluster.names), tuple(tables.origins), result.hosted, routing,
                result.objective_name, result.evidence(), metrics,
                {"tables_sha256": tables.sha256(), "cluster_sha256": cluster.sha256()}, problem.min_replicas,
                timing=result.timing(), offload=result.offload)
    plan.check(cluster)
    return plan


def solve_problem(problem: PlacementProblem, solver: str = "exact", *, objective: str = "coverage",
                  **options) -> Plan:
    """Solve a problem built by `build_problem` with the solver named `solver` (its keyword `options`:
    time_limit, seed, backend, start...) for `objective`, and make the plan."""
    return make_plan(problem, get_solver(solver, **options).solve(problem, objective))


def solve_placement(tables: TablesLike, cluster: ClusterLike, model: ModelSpec | str | Path | None = None, *,
                    solver: str = "exact", objective: str = "coverage", time_limit: float | None = None,
                    min_replicas: int = 1, seed: int = 0, backend: str | None = None, trace: Trace | str | Path | None = None,
                    concurrency: int = 1, start: PlanLike | None = None, max_iterations: int | None = None) -> Plan:
    """Solve for a placement of the model's experts on `cluster` under the activations in `tables`.

    model: default the one the tables were recorded from. time_limit: seconds for the whole solve (None: no
    limit). backend: the MILP back end of exact (highs, scip, cbc). trace: the Trace behind `tables`, needed by
    objectives judged by replaying it (traffic, simulated_ttft). start: a plan local-search improves.
    max_iterations: neighbourhoods local-search examines (None: until the time limit or no move helps); with it
    the result depends on the seed only, never on the time.
    """
    get_objective(objective)
    options = {"time_limit": time_limit, "seed": seed}
    if backend is not None:
        options["backend"] = backend
    if start is not None:
        options["start"] = None
    if max_iterations is not None:
        options["max_iterations"] = max_iterations
    get_solver(solver, **options)  # checks the solver's options before any input is read
    tables, cluster = loaded(tables, ActivationTables), loaded(cluster, ClusterSpec)
    model = None if model is None else resolve_model(model)
    trace = loaded(trace, Trace)
    problem = build_problem(tables, cluster, model, min_replicas=min_replicas, trace=trace, concurrency=concurrency)
    if start is not None:
        start = loaded(start, Plan)
        start.check_cluster(cluster)
        problem.model.check_same_shape(start.model, "the start plan", "pass a `start` plan of this model", ("start",))
        options["start"] = start.hosted
    return solve_problem(problem, solver, objective=objective, **options)


def migrate_placement(plan: PlanLike, tables: TablesLike, cluster: ClusterLike, *, objective: str = "coverage",
                      move_cost: float = 0.0, budget_bytes: int | None = None, min_gain: float = 0.0,
                      min_replicas: int | None = None, time_limit: float | None = None,
                      backend: str = "highs") -> tuple[Plan, MigrationPlan]:
    """Re-plan `plan` for the activations in `tables` and order the moves there.

    objective: coverage, latency (the latency model) or balance (a slot layout). move_cost: bytes copied count
    move_cost times as much as the remote-traffic bytes the new placement saves over the tables' tokens (with
    nodes, a byte over a link k times slower than the fastest counts k times; 0: only prefer fewer moves among
    equally good placements). budget_bytes: most bytes to copy (None: no limit). min_gain: keep the current
    placement (no moves) unless the new one improves the objective by this fraction. min_replicas: default the
    plan's. Raises a PrismError when the budget cannot reach a placement that fits, or the moves cannot be ordered.
    """
    check_time_limit(time_limit)
    check_backend(backend)
    plan, tables, cluster = loaded(plan, Plan), loaded(tables, ActivationTables), loaded(cluster, ClusterSpec)
    if objective not in IncrementalSolver.objectives:
        raise PrismError(f"migrate re-plans for coverage, latency or balance, not {objective!r}: pass `objective` "
                         f"as one of them", parameters=("objective",))
    for name, value in (("move_cost", move_cost), ("min_gain", min_gain)):
        number(value, f"`{name}`", low=0.0, parameters=(name,))
    plan.check_servers(cluster)
    r = plan.min_replicas if min_replicas is None else min_replicas
    try:
        problem = build_problem(tables, cluster, plan.model, min_replicas=r)
    except InfeasibleError as e:
        raise InfeasibleError(f"{e}{_size_note(plan.model, tables)}", parameters=e.parameters) from None
    current = plan.hosted
    solver = IncrementalSolver(current, move_cost=traffic_move_cost(problem, move_cost, objective),
                               budget_bytes=budget_bytes, time_limit=time_limit, backend=backend)
    result = solver.solve(problem, objective)
    maximize = get_objective(objective).maximize
    now = get_objective(objective).value(problem, current)
    new_value = result.extra["objective_without_moves"]
    gain = (new_value - now if maximize else now - new_value) / max(abs(now), 1e-300)
    migrate = not placement_fits(problem, current) or gain >= min_gain
    if not migrate:  # the solver's bound still says how far the kept placement is from the best one
        result = replace(result, hosted=current.copy(), routing=None, status="feasible", objective=now,
                         gap=relative_gap(now, result.bound, maximize),
                         extra={**result.extra, "copied_bytes": 0, "objective_without_moves": now})
    result.extra.update({"migrated": bool(migrate), "predicted_gain": gain, "min_gain": min_gain,
                         "move_cost": move_cost})
    new = make_plan(problem, result)
    old_sha256 = plan.sha256()
    new.inputs["from_plan_sha256"] = old_sha256
    moves = plan_migration(current, new.hosted, cluster, plan.model, r)
    moves.from_sha256, moves.to_sha256 = old_sha256, new.sha256()
    return new, moves


def _size_note(model: ModelSpec, tables: ActivationTables) -> str:
    """A note for an infeasible re-plan whose plan gives the experts other sizes than the model the tables were
    recorded from (a plan for another model, or a hand-edited one), else ""."""
    if not tables.meta.get("spec"):
        return ""
    recorded = model_from_meta(tables.meta, "the tables")
    if recorded.layer_bytes.shape != model.layer_bytes.shape or (recorded.layer_bytes == model.layer_bytes).all():
        return ""
    return (f"; note that the plan's experts take {human_bytes(int(model.layer_bytes.max()))} but those of "
            f"{recorded.name!r}, which the tables were recorded from, {human_bytes(int(recorded.layer_bytes.max()))}: "
            f"is the plan for this model?")
