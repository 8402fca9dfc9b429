"""Matrix-form MILP and the base class of its back ends."""

from __future__ import annotations

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
    objective: float | None
    bound: float | None
    seconds: float


class MilpBackend(ABC):
    """One solver back end."""

    name: ClassVar[str]
    supports_hint: ClassVar[bool] = False

    @abstractmethod
    def solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        """Solve `model` within `time_limit` seconds (None: no limit)."""


# Grace after the time limit before a solve is interrupted from outside (solvers overrun their own limit).
_GRACE = 0.05


def remaining_time(time_limit: float | None, start: float) -> float | None:
    """Seconds left of `time_limit` counted from `start` (a perf_counter reading); None for no limit."""
    return None if time_limit is None else max(0.01, time_limit - (time.perf_counter() - start))


@contextmanager
def interrupt_after(seconds: float | None, interrupt):
    """Call `interrupt()` if the block is still running a little after `seconds` (None: never)."""
    timer = None
    if seconds is not None:
        timer = threading.Timer(seconds * (1 + _GRACE) + 0.5, interrupt)
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
