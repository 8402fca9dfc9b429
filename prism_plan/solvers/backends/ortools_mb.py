"""SCIP through OR-Tools' model_builder, fed straight from sparse arrays (no per-term Python)."""

from __future__ import annotations

import time

import numpy as np
from ortools.linear_solver.python import model_builder_helper as mbh

from prism_plan.solvers.backends.base import (MilpBackend, MilpModel, MilpSolution, integral, interrupt_after,
                                              remaining_time, status_label)

_INF = 1e30  # model_builder treats magnitudes >= 1e20 as infinite

# model_builder's statuses to our labels; the statuses left out (NOT_SOLVED, which a time limit without a
# solution gives, unbounded, abnormal, invalid models or parameters) count as stops without proof, as
# status_label says: feasible with a solution, else timeout.
STATUS = {
    mbh.SolveStatus.OPTIMAL: "optimal",
    mbh.SolveStatus.FEASIBLE: "feasible",
    mbh.SolveStatus.INFEASIBLE: "infeasible",
    mbh.SolveStatus.CANCELLED_BY_USER: "feasible",  # interrupt_after's stop
}


def _helper(model: MilpModel) -> mbh.ModelBuilderHelper:
    """`model` in a model_builder helper, with its hint; infinite bounds clipped to _INF."""
    helper = mbh.ModelBuilderHelper()
    clip = lambda a: np.clip(np.asarray(a, dtype=float), -_INF, _INF)  # noqa: E731
    helper.fill_model_from_sparse_data(clip(model.lb), clip(model.ub), np.asarray(model.c, float),
                                       clip(model.row_lb), clip(model.row_ub), model.A.tocsr())
    for i in np.flatnonzero(model.integer).tolist():
        helper.set_var_integrality(i, True)
    helper.set_maximize(model.maximize)
    if model.hint is not None:
        for i, v in enumerate(np.asarray(model.hint, float).tolist()):
            helper.add_hint(i, v)
    return helper


def _result(model: MilpModel, solver: mbh.ModelSolverHelper) -> MilpSolution:
    """The MilpSolution of a finished `solver` for `model`."""
    x = integral(model, np.asarray(solver.variable_values())) if solver.has_solution() else None
    label = status_label(STATUS, solver.status(), x is not None)
    bound = float(solver.best_objective_bound()) if label in ("optimal", "feasible") else None
    return MilpSolution(x, label, bound if bound is not None and np.isfinite(bound) else None)


class ScipBackend(MilpBackend):
    """SCIP (bundled with OR-Tools), with a starting solution when one is given."""

    name = "scip"

    def _solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        start = time.perf_counter()
        helper = _helper(model)
        solver = mbh.ModelSolverHelper("scip")
        remaining = remaining_time(time_limit, start)
        if remaining is not None:
            solver.set_time_limit_in_seconds(remaining)
        with interrupt_after(remaining, solver.interrupt_solve):
            solver.solve(helper)
        return _result(model, solver)
