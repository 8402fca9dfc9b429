"""Matrix-form MILP and the base class of its back ends."""

from __future__ import annotations

import multiprocessing
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp


@dataclass
class MilpModel:
    """maximise (or minimise) c @ x  s.t.  row_lb <= A @ x <= row_ub,  lb <= x <= ub,  x[integer] integral.

    c, lb, ub: [vars]; A: [rows, vars] CSR; row_lb, row_ub: [rows] (+-inf for one-sided rows);
    integer: [vars] bool; hint: [vars] a feasible start, or None.
    """

    c: np.ndarray
    A: sp.csr_matrix
    row_lb: np.ndarray
    row_ub: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integer: np.ndarray
    maximize: bool = True
    hint: np.ndarray | None = None


@dataclass
class MilpSolution:
    """x: [vars] or None when no solution was found; status: optimal | feasible | infeasible | timeout;
    bound: best proven bound on the optimum (None when the back end gives none)."""

    x: np.ndarray | None
    status: str
    bound: float | None


# Models this small (a few dozen binaries in practice) solve in about a millisecond, under the 16 ms a fork costs
# (measured); an interrupt waits for such a solve to return, which is the price.
TINY_VARS = 256


class MilpBackend(ABC):
    """One solver back end.

    in_process: the back end's solve runs in this process and can be stopped from outside (CBC: a program of its
    own); the others run in a forked child (unless the model is tiny), since a solver inside a C++ call neither
    keeps its time limit nor lets Python see Ctrl-C or SIGTERM until it returns.
    """

    name: ClassVar[str]
    in_process: ClassVar[bool] = False

    def solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        """Solve `model` within `time_limit` seconds (None: no limit)."""
        # Crossed bounds are infeasible on their face; MathOpt rejects them and MPS cannot say them.
        if np.any(model.lb > model.ub) or np.any(model.row_lb > model.row_ub):
            return MilpSolution(None, "infeasible", None)
        if self.in_process or len(model.c) <= TINY_VARS:
            return self._solve(model, time_limit)
        return in_child_process(self._solve, model, time_limit)

    @abstractmethod
    def _solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        """solve() for a model whose bounds are not crossed."""


def status_label(labels: dict, code, has_solution: bool) -> str:
    """The label (optimal | feasible | infeasible | timeout) that a back end's map `labels` gives its status
    `code`; a stop (`feasible`, also for codes the map lacks) without a solution is `timeout`."""
    label = labels.get(code, "feasible")
    return "timeout" if label == "feasible" and not has_solution else label


def integral(model: MilpModel, x: np.ndarray) -> np.ndarray:
    """`x` ([vars]) with the integer variables rounded, as solvers return them within a tolerance."""
    return np.where(model.integer, np.round(x), x)


# Seconds past its time limit after which a solve is interrupted from outside: solvers overrun their own
# limits (HiGHS by 39 s on 120 s), and a caller's time limit is a promise of the limit plus about a second.
_GRACE = 0.5


def remaining_time(time_limit: float | None, start: float) -> float | None:
    """Seconds left of `time_limit` counted from `start` (a perf_counter reading); None for no limit."""
    return None if time_limit is None else max(0.01, time_limit - (time.perf_counter() - start))


def overrun_deadline(seconds: float) -> float:
    """Seconds after its start at which a solve given `seconds` is stopped from outside if still running."""
    return seconds + _GRACE


@contextmanager
def interrupt_after(seconds: float | None, interrupt):
    """Call `interrupt()` if the block is still running a little after `seconds` (None: never)."""
    timer = None
    if seconds is not None:
        timer = threading.Timer(overrun_deadline(seconds), interrupt)
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _run_and_send(solve, model: MilpModel, time_limit: float, send) -> None:
    try:
        send.send(solve(model, time_limit))
    except BaseException as e:  # the parent re-raises it: the child has no one to tell
        send.send(e)


def in_child_process(solve, model: MilpModel, time_limit: float | None) -> MilpSolution:
    """`solve(model, time_limit)` in a forked process that is killed when it is still running a little past
    `overrun_deadline(time_limit)` (None: never), or when the wait is interrupted (Ctrl-C, SIGTERM): for solvers
    whose own limit and interrupt do not hold (HiGHS' first LP runs to its end). A killed solve returns `timeout`
    without a solution."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_run_and_send, args=(solve, model, time_limit, send), daemon=True)
    child.start()
    send.close()
    try:
        if not recv.poll(None if time_limit is None else overrun_deadline(time_limit) + _GRACE):
            return MilpSolution(None, "timeout", None)
        answer = recv.recv()
    except EOFError:  # the child died without a word (out of memory, say)
        raise RuntimeError(f"the MILP back end's process ended with code {child.exitcode} and no answer")
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        recv.close()
    if isinstance(answer, BaseException):
        raise answer
    return answer
