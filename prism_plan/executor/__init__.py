"""The torch executor: expert stores, applying MigrationPlans over torch.distributed, a placement-aware
distributed MoE layer. Needs torch (`pip install 'prism-plan[torch]'`); nothing else in prism_plan imports it."""

from __future__ import annotations

from prism_plan.errors import PrismError

INSTALL = "pip install 'prism-plan[torch]'  (torch==2.13.0)"


def require_torch():
    """The torch module, or a PrismError that says how to install it."""
    try:
        import torch
    except ImportError:
        raise PrismError(f"the executor needs torch, which is not installed: {INSTALL}")
    return torch
