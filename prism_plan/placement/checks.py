"""Exact-type checks for values read from users' files and arguments: an integer is an int (never a bool, a float
or a string that looks like one), a number is a finite int or float within a stated range. Each failure is one
PrismError that says what was wrong, where, and how to fix it."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from prism_plan.errors import PrismError


def is_integer(value: Any) -> bool:
    """Whether `value` is an integer of Python or NumPy (bools are not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """Whether `value` is an integer or a float of Python or NumPy (bools are not); NaN and inf count."""
    return is_integer(value) or isinstance(value, (float, np.floating))


def _shown(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range(low: float | None, high: float | None, low_open: bool) -> str:
    """The range part of a message: " from 1 to 6", " of at least 0", " above 0 and at most 10", or ""."""
    if low is not None and high is not None and not low_open:
        return f" from {_shown(low)} to {_shown(high)}"
    if low is not None and not low_open and high is None:
        return f" of at least {_shown(low)}"
    parts = [] if low is None else [f"above {_shown(low)}"]
    return (" " if low is not None or high is not None else "") + " and ".join(
        parts + ([] if high is None else [f"at most {_shown(high)}"]))


def _fail(what: str, kind: str, value: Any, fix: str, parameters: Iterable[str]) -> None:
    raise PrismError(f"{what} must be {kind}, got {value!r}{f'; {fix}' if fix else ''}", parameters=parameters)


def integer(value: Any, what: str, *, low: int | None = None, high: int | None = None, fix: str = "",
            parameters: Iterable[str] = ()) -> int:
    """`value` as an int when it is an integer within [low, high]; else a PrismError that names `what` (a key of
    a file, or a `parameter`) and says how to `fix` it."""
    kind = f"an integer{_range(low, high, False)}"
    if not is_integer(value) or (low is not None and value < low) or (high is not None and value > high):
        _fail(what, kind, value, fix, parameters)
    return int(value)


def number(value: Any, what: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           fix: str = "", parameters: Iterable[str] = ()) -> float:
    """`value` as a float when it is a finite number within [low, high] (low excluded when `low_open`); else a
    PrismError as `integer` raises."""
    kind = f"a finite number{_range(low, high, low_open)}"
    if not is_number(value) or not math.isfinite(value) or (low is not None and (value <= low if low_open else
                                                                                    value < low)) \
            or (high is not None and value > high):
        _fail(what, kind, value, fix, parameters)
    return float(value)


def finite_array(value: Any, name: str, *, ndim: int, shape: str, holds: str, positive: bool = False) -> np.ndarray:
    """`value` as a float64 array of `ndim` dimensions, not empty, every entry finite and >= 0 (> 0 when
    `positive`); else a PrismError naming the parameter `name`. shape: what it must be ("a [layers, experts]
    array of loads"); holds: what its entries must be, and how to fix them."""
    a = np.asarray(value)
    if a.ndim != ndim or not a.size or a.dtype.kind not in "iuf":
        raise PrismError(f"`{name}` must be {shape}, got shape {list(a.shape)} of {a.dtype}", parameters=(name,))
    a = a.astype(np.float64)
    if not np.isfinite(a).all() or ((a <= 0) if positive else (a < 0)).any():
        raise PrismError(f"`{name}` must hold {holds}", parameters=(name,))
    return a


def text(value: Any, what: str, *, fix: str = "") -> str:
    """`value` when it is a non-empty string; else a PrismError naming `what`."""
    if not isinstance(value, str) or not value:
        _fail(what, "a non-empty string", value, fix, ())
    return value
