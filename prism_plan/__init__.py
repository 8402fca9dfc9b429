"""prism-plan: activation-aware expert placement for Mixture-of-Experts serving.

The pipeline from Python: `load_trace` or `import_trace` -> `tables_from_trace` -> `solve_placement` ->
`migrate_placement` -> `simulate` / `export_plan` / `write_report`; every function takes objects or the
paths of their files.
"""

__version__ = "0.6.0"

from prism_plan.errors import InfeasibleError, MissingInputError, PrismError
from prism_plan.fileio import DATA_DIR
from prism_plan.pipeline import make_plan, migrate_placement, solve_placement, solve_problem
from prism_plan.placement.cluster import ClusterSpec, load_cluster
from prism_plan.placement.export import export_plan
from prism_plan.placement.migration import MigrationError, MigrationPlan, plan_migration, verify_migration
from prism_plan.placement.model import ModelSpec, resolve_model
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import SimulationResult, simulate
from prism_plan.report import write_report
from prism_plan.solvers import build_problem, get_solver
from prism_plan.traces.drift import drifting_workload
from prism_plan.traces.importing import import_trace
from prism_plan.traces.tables import ActivationTables, build_tables, tables_from_trace
from prism_plan.traces.trace import Trace, load_trace

load_tables = ActivationTables.load
load_plan = Plan.load
load_moves = MigrationPlan.load

__all__ = [
    "__version__",
    "ActivationTables", "ClusterSpec", "DATA_DIR", "InfeasibleError", "MigrationError", "MigrationPlan",
    "MissingInputError", "ModelSpec", "Plan", "PrismError", "SimulationResult", "Trace",
    "build_problem", "build_tables", "drifting_workload", "export_plan", "get_solver", "import_trace",
    "load_cluster", "load_moves", "load_plan", "load_tables", "load_trace", "make_plan", "migrate_placement",
    "plan_migration", "resolve_model", "simulate", "solve_placement", "solve_problem", "tables_from_trace",
    "verify_migration", "write_report",
]
