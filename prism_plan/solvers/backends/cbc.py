"""CBC, the binary PuLP ships, run as a subprocess on a free-format MPS file written from the arrays.

PuLP's model objects cost 8-15 us per term to build, so the model never becomes PuLP variables: numpy turns
the sparse matrix into MPS lines, CBC runs in a temporary folder, and the values come back through CBC's
binary solution file (full double precision; its text solution file prints 8 digits).
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pulp

from prism_plan.errors import PrismError
from prism_plan.solvers.backends.base import (MilpBackend, MilpModel, MilpSolution, integral,
                                              overrun_deadline, remaining_time, status_label)

# CBC's status words (the first words of its text solution file) to our labels. After a stop the file says
# "(no integer solution - continuous used)" when it holds only the LP's values: status_label's has_solution.
STATUS = {
    "Optimal": "optimal",
    "Infeasible": "infeasible",
    "Integer infeasible": "infeasible",
    "Stopped on time": "feasible",
    "Stopped on iterations": "feasible",  # also what SIGINT ends in
    "Stopped on solutions": "feasible",
    "Stopped on difficulties": "feasible",
    "Stopped on ctrl-c": "feasible",
    "Unbounded": "timeout",  # no finite optimum to report; the values are a ray's start, not a solution
}
_NO_INTEGER_SOLUTION = "no integer solution"
# "Partial search - best objective 12 (best possible 10), took ..." in CBC's log after a stop.
_BEST_POSSIBLE = re.compile(r"best possible (\S+)\)")
# The log prints bounds to 8 significant digits; widen them by that much so that they stay bounds.
_PRINTED_PRECISION = 1e-7
# Seconds CBC gets to stop and write its incumbent after SIGINT before it is killed.
_SIGINT_GRACE = 0.5


def cbc_path() -> str:
    """Path of the CBC binary that PuLP ships, or else of a `cbc` on PATH."""
    # The class attribute rather than PULP_CBC_CMD().path: making that object warns of its removal in PuLP 4.
    bundled = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)
    path = (bundled and pulp.COIN_CMD.executable(bundled)) or pulp.COIN_CMD.executable("cbc")
    if not path:
        raise PrismError("the cbc MILP back end needs the CBC binary that PuLP ships (pip install 'pulp<4') "
                         "or a cbc on PATH; or choose the highs back end")
    return path


def _lines(pattern: str, *columns: np.ndarray) -> list[str]:
    """`pattern` %-formatted with one row of `columns` (equal-length [k] arrays) per line."""
    return list(map(pattern.__mod__, zip(*(np.asarray(c).tolist() for c in columns))))


def _masked(pattern: str, mask: np.ndarray, *values: np.ndarray) -> list[str]:
    """`pattern` %-formatted with the index j and values[..][j] for each j where `mask` ([k] bool) holds."""
    return _lines(pattern, np.flatnonzero(mask), *(v[mask] for v in values))


def column_order(model: MilpModel) -> np.ndarray:
    """[vars] variable indices in MPS column order: the integer ones first, so one MARKER block holds them."""
    return np.argsort(~np.asarray(model.integer, bool), kind="stable")


def _split_rows(model: MilpModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, kinds, rhs), each [k]: indices into A's rows, their MPS kinds E/L/G and right-hand sides.

    Equal sides make one E row and every other finite side its own L or G row (plainer than MPS RANGES,
    whose meaning depends on the row's kind and the range's sign); free rows are left out.
    """
    lb, ub = np.asarray(model.row_lb, float), np.asarray(model.row_ub, float)
    equal = lb == ub
    eq, le, ge = (np.flatnonzero(m) for m in (equal, ~equal & np.isfinite(ub), ~equal & np.isfinite(lb)))
    kinds = np.repeat(np.array(["E", "L", "G"]), [len(eq), len(le), len(ge)])
    return np.concatenate([eq, le, ge]), kinds, np.concatenate([lb[eq], ub[le], lb[ge]])


def _column_lines(model: MilpModel, rows: np.ndarray) -> list[str]:
    """COLUMNS section: per column its cost (row R0) and its entries in A's `rows` ([k], as rows R1..Rk).

    A column without entries gets an explicit zero cost: BOUNDS may only name columns that COLUMNS lists.
    """
    n = len(model.c)
    cost = np.asarray(model.c, float) * (-1.0 if model.maximize else 1.0)  # MPS minimises
    a = model.A.tocsr()[rows].tocoo()
    listed = np.zeros(n, bool)
    listed[a.col] = True
    costed = np.flatnonzero((cost != 0) | ~listed)
    col = np.concatenate([costed, a.col])
    row = np.concatenate([np.zeros(len(costed), np.int64), a.row + 1])
    val = np.concatenate([cost[costed], a.data.astype(float)])
    rank = np.empty(n, np.int64)
    rank[column_order(model)] = np.arange(n)
    order = np.lexsort((row, rank[col]))
    col, row, val = col[order], row[order], val[order]
    entries = _lines(" C%d R%d %r", col, row, val)
    split = np.count_nonzero(np.asarray(model.integer, bool)[col])
    if not split:
        return entries
    return [" MARKER 'MARKER' 'INTORG'", *entries[:split], " MARKER 'MARKER' 'INTEND'", *entries[split:]]


def _bound_lines(model: MilpModel) -> list[str]:
    """BOUNDS section (lb = 0, ub = +inf are MPS's defaults, for integer columns too)."""
    lb, ub = np.asarray(model.lb, float), np.asarray(model.ub, float)
    fixed = lb == ub
    free = ~fixed & np.isneginf(lb) & np.isposinf(ub)
    bounded = ~fixed & ~free
    # Every lower bound before any upper one: CBC rejects a LO line after a negative UP.
    return (_masked(" FX BND C%d %r", fixed, lb) + _masked(" FR BND C%d", free)
            + _masked(" MI BND C%d", bounded & np.isneginf(lb))
            + _masked(" LO BND C%d %r", bounded & np.isfinite(lb) & (lb != 0), lb)
            + _masked(" UP BND C%d %r", bounded & np.isfinite(ub), ub))


def write_mps(model: MilpModel, path: Path) -> None:
    """Write `model` to `path` as free-format MPS: variable j is column C<j>, R0 the objective (negated when
    maximising), R1... the rows of _split_rows."""
    rows, kinds, rhs = _split_rows(model)
    names = np.arange(1, len(rows) + 1)
    given = rhs != 0
    path.write_text("\n".join([
        "NAME prism FREE", "ROWS", " N R0", *_lines(" %s R%d", kinds, names),
        "COLUMNS", *_column_lines(model, rows),
        "RHS", *_lines(" RHS R%d %r", names[given], rhs[given]),
        "BOUNDS", *_bound_lines(model), "ENDATA", ""]))


def _write_start(hint: np.ndarray, path: Path) -> None:
    """Write the [vars] `hint` as a CBC MIP start: one `index name value` line per variable."""
    path.write_text("\n".join(_lines("%d C%d %r", np.arange(len(hint)), np.arange(len(hint)),
                                     np.asarray(hint, float))) + "\n")


@contextmanager
def _running(args: list[str], folder: Path):
    """CBC started in `folder` with its log in log.txt; killed on leaving, also on KeyboardInterrupt."""
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(args, cwd=folder, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _wait(proc: subprocess.Popen, seconds: float | None) -> None:
    """Wait for CBC given `seconds`: past the overrun deadline send SIGINT (CBC then stops and writes its
    incumbent) and wait _SIGINT_GRACE more; leaving _running kills it if it is still running then."""
    try:
        proc.wait(None if seconds is None else overrun_deadline(seconds))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(_SIGINT_GRACE)


def _values(path: Path) -> tuple[float, np.ndarray]:
    """(objective, column values [columns]) from CBC's saveSolution file: two int32 (rows, columns), then
    doubles: the objective, row activities [rows], row duals [rows], column values [columns], reduced
    costs [columns]."""
    raw = path.read_bytes()
    rows, columns = np.frombuffer(raw, np.int32, 2).tolist()
    doubles = np.frombuffer(raw, np.float64, offset=8)
    return float(doubles[0]), doubles[1 + 2 * rows:1 + 2 * rows + columns]


def _best_possible(log: str) -> float | None:
    """CBC's last proven lower bound on its (minimised) objective in `log`, widened by its print precision."""
    found = _BEST_POSSIBLE.findall(log)
    if not found:
        return None
    value = float(found[-1])
    return value - abs(value) * _PRINTED_PRECISION if abs(value) < 1e49 else None  # 1e50 stands for none


def _solution(model: MilpModel, folder: Path) -> tuple[float, np.ndarray]:
    """(CBC's minimised objective, x [vars]) from the saveSolution file in `folder`."""
    objective, values = _values(folder / "values.bin")
    x = np.empty(len(model.c))
    x[column_order(model)] = values
    return objective, integral(model, x)


def _result(model: MilpModel, folder: Path) -> MilpSolution:
    """The MilpSolution from CBC's files in `folder`; a timeout without a bound when CBC was killed."""
    status_file = folder / "status.txt"
    if not status_file.exists():
        return MilpSolution(None, "timeout", None)
    head = status_file.read_text().partition("\n")[0]
    words = re.split(r" \(| - objective value", head)[0]
    label = status_label(STATUS, words, has_solution=_NO_INTEGER_SOLUTION not in head)
    if label == "infeasible":
        return MilpSolution(None, label, None)
    x, lower = None, _best_possible((folder / "log.txt").read_text())
    if label in ("optimal", "feasible"):
        objective, x = _solution(model, folder)
        if label == "optimal":
            lower = objective
    return MilpSolution(x, label, None if lower is None else (-lower if model.maximize else lower))


class CbcBackend(MilpBackend):
    """CBC (the binary bundled with PuLP), with the model's hint as a MIP start."""

    name = "cbc"
    in_process = True

    def _solve(self, model: MilpModel, time_limit: float | None) -> MilpSolution:
        start = time.perf_counter()
        args = [cbc_path(), "model.mps"]
        with tempfile.TemporaryDirectory(prefix="prism-cbc-") as tmp:
            folder = Path(tmp)
            write_mps(model, folder / "model.mps")
            if model.hint is not None:
                _write_start(model.hint, folder / "start.txt")
                args += ["-mips", "start.txt"]
            remaining = remaining_time(time_limit, start)
            if remaining is not None:
                args += ["-sec", repr(remaining), "-timeMode", "elapsed"]
            # Values before status: a status file (CBC killed while writing files) then implies whole values.
            args += ["-solve", "-saveSolution", "values.bin", "-solution", "status.txt"]
            with _running(args, folder) as proc:
                _wait(proc, remaining)
            return _result(model, folder)
