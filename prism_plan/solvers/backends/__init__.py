"""MILP back ends behind one interface: a MilpModel in matrix form in, a MilpSolution out.

Adding a back end means one file here with a MilpBackend subclass and one line in BACKENDS; model code
(solvers/*.py) never changes.
"""

from prism_plan.solvers.backends.base import MilpBackend, MilpModel, MilpSolution
from prism_plan.solvers.backends.cbc import CbcBackend
from prism_plan.solvers.backends.mathopt import MathOptHighsBackend
from prism_plan.solvers.backends.ortools_mb import ScipBackend

BACKENDS: dict[str, type[MilpBackend]] = {b.name: b for b in (MathOptHighsBackend, ScipBackend, CbcBackend)}

__all__ = ["BACKENDS", "MilpBackend", "MilpModel", "MilpSolution"]
