"""HiGHS through OR-Tools MathOpt, the model written straight into its protocol buffer from arrays.

Unlike model_builder, MathOpt hands HiGHS a starting solution, so MILPs start from the best heuristic.
"""

from __future__ import annotations

import time

import numpy as np
from ortools.math_opt import callback_pb2, model_parameters_pb2, model_pb2, parameters_pb2, result_pb2
from ortools.math_opt.core.python import solver as core
from ortools.util.python import pybind_solve_interrupter

from prism_plan.solvers.backends.base import (MilpBackend, MilpModel, MilpSolution, integral,
                                              interrupt_after, remaining_time, status_label)

# MathOpt's termination reasons to our labels; the reasons left out (unbounded, imprecise, errors) count as
# stops without proof, as status_label says.
STATUS = {
    result_pb2.TERMINATION_REASON_OPTIMAL: "optimal",
    result_pb2.TERMINATION_REASON_INFEASIBLE: "infeasible",
    result_pb2.TERMINATION_REASON_FEASIBLE: "feasible",
    result_pb2.TERMINATION_REASON_NO_SOLUTION_FOUND: "timeout",
}


def _model_proto(model: MilpModel) -> model_pb2.ModelProto:
    """`model` as a MathOpt ModelProto: variable j has id j, row i of A has id i."""
    proto = model_pb2.ModelProto(name="prism-plan")
    n = len(model.c)
    proto.variables.ids.extend(range(n))
    proto.variables.lower_bounds.extend(np.asarray(model.lb, float).tolist())
    proto.variables.upper_bounds.extend(np.asarray(model.ub, float).tolist())
    proto.variables.integers.extend(np.asarray(model.integer, bool).tolist())
    proto.objective.maximize = bool(model.maximize)
    nz = np.flatnonzero(model.c)
    proto.objective.linear_coefficients.ids.extend(nz.tolist())
    proto.objective.linear_coefficients.values.extend(np.asarray(model.c, float)[nz].tolist())
    rows = model.A.shape[0]
    proto.linear_constraints.ids.extend(range(rows))
    proto.linear_constraints.lower_bounds.extend(np.asarray(model.row_lb, float).tolist())
    proto.linear_constraints.upper_bounds.extend(np.asarray(model.row_ub, float).tolist())
    a = model.A.tocsr()
    a.sum_duplicates()
    a.sort_indices()
    matrix = proto.linear_constraint_matrix
    matrix.row_ids.extend(np.repeat(np.arange(rows), np.diff(a.indptr)).tolist())
    matrix.column_ids.extend(a.indices.tolist())
    matrix.coefficients.extend(a.data.astype(float).tolist())
    return proto


def _model_parameters(model: MilpModel) -> model_parameters_pb2.ModelSolveParametersProto:
    """Per-model parameters: the model's hint, if any, as a solution hint."""
    params = model_parameters_pb2.ModelSolveParametersProto()
    if model.hint is not None:
        hint = params.solution_hints.add()
        hint.variable_values.ids.extend(range(len(model.c)))
        hint.variable_values.values.extend(np.asarray(model.hint, float).tolist())
    return params


def _result(model: MilpModel, result: result_pb2.SolveResultProto) -> MilpSolution:
    """The MilpSolution of MathOpt's `result` for `model`."""
    x = None
    if result.solutions and result.solutions[0].HasField("primal_solution"):
        sol = result.solutions[0].primal_solution.variable_values
        x = np.zeros(len(model.c))
        x[np.asarray(sol.ids, dtype=np.int64)] = np.asarray(sol.values, dtype=float)
        x = integral(model, x)
    bound = result.termination.objective_bounds.dual_bound
    return MilpSolution(x, status_label(STATUS, result.termination.reason, x is not None),
                        float(bound) if np.isfinite(bound) else None)


class MathOptHighsBackend(MilpBackend):
    """HiGHS via MathOpt, with the model's start passed as a solution hint."""

    name = "highs"

    # Measured: HiGHS ran 7.6 s on a 2.8 s limit, its interrupt unheeded; MilpBackend.solve runs this in a child
    # process that is killed past the limit.
    def _solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        start = time.perf_counter()
        proto = _model_proto(model)
        params = parameters_pb2.SolveParametersProto(enable_output=False, relative_gap_tolerance=1e-7,
                                                     absolute_gap_tolerance=0.0)
        interrupter = pybind_solve_interrupter.PySolveInterrupter()
        remaining = remaining_time(time_limit, start)
        if remaining is not None:
            params.time_limit.FromNanoseconds(int(remaining * 1e9))
        with interrupt_after(remaining, interrupter.interrupt):
            result = core.solve(proto, parameters_pb2.SOLVER_TYPE_HIGHS,
                                parameters_pb2.SolverInitializerProto(), params, _model_parameters(model),
                                None, callback_pb2.CallbackRegistrationProto(), None, interrupter)
        return _result(model, result)
