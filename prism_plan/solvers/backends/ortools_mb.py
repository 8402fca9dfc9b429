"""SCIP through OR-Tools' model_builder, fed straight from sparse arrays (no per-term Python)."""

from __future__ import annotations

import time

import numpy as np

from prism_plan.solvers.backends.base import MilpBackend, MilpModel, MilpSolution, interrupt_after, remaining_time

_INF = 1e30  # model_builder treats magnitudes >= 1e20 as infinite


class ScipBackend(MilpBackend):
    """SCIP (bundled with OR-Tools), with a starting solution when one is given."""

    name = "scip"
    supports_hint = True

    def solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        from ortools.linear_solver.python import model_builder as mb
        from ortools.linear_solver.python import model_builder_helper as mbh

        start = time.perf_counter()
        helper = mb.Model().helper
        clip = lambda a: np.clip(np.asarray(a, dtype=float), -_INF, _INF)  # noqa: E731
        helper.fill_model_from_sparse_data(clip(model.lb), clip(model.ub), np.asarray(model.c, float),
                                           clip(model.row_lb), clip(model.row_ub), model.A.tocsr())
        for i in np.flatnonzero(model.integer).tolist():
            helper.set_var_integrality(i, True)
        helper.set_maximize(model.maximize)
        if model.hint is not None:
            for i, v in enumerate(np.asarray(model.hint, float).tolist()):
                helper.add_hint(i, v)
        solver = mbh.ModelSolverHelper("scip")
        remaining = remaining_time(time_limit, start)
        if remaining is not None:
            solver.set_time_limit_in_seconds(remaining)
        with interrupt_after(remaining, solver.interrupt_solve):
            solver.solve(helper)
        return self._result(solver, mbh.SolveStatus, model, time.perf_counter() - start)

    @staticmethod
    def _result(solver, codes, model: MilpModel, seconds: float) -> MilpSolution:
        status = solver.status()
        has = solver.has_solution()
        x = np.asarray(solver.variable_values()) if has else None
        if x is not None:
            x = np.where(model.integer, np.round(x), x)
        obj = float(model.c @ x) if x is not None else None
        bound = float(solver.best_objective_bound()) if status in (codes.OPTIMAL, codes.FEASIBLE) else None
        if status == codes.OPTIMAL:
            label = "optimal"
        elif status == codes.INFEASIBLE:
            label = "infeasible"
        elif has:
            label = "feasible"
        else:
            label = "timeout"
        if bound is not None and not np.isfinite(bound):
            bound = None
        return MilpSolution(x, label, obj, bound, seconds)

