"""prism-plan: activation-aware expert placement for Mixture-of-Experts serving."""

__version__ = "0.1.0"

from prism_plan.errors import PrismError
from prism_plan.placement.cluster import ClusterSpec, load_cluster
from prism_plan.placement.migration import MigrationError, MigrationPlan, plan_migration, verify_migration
from prism_plan.placement.model import ModelSpec, resolve_model
from prism_plan.placement.plan import Plan
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import Trace

__all__ = [
    "__version__",
    "ActivationTables",
    "ClusterSpec",
    "MigrationError",
    "MigrationPlan",
    "ModelSpec",
    "Plan",
    "PrismError",
    "Trace",
    "load_cluster",
    "plan_migration",
    "resolve_model",
    "verify_migration",
]
