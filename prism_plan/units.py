"""Numbers as people read them, one style on every verb, report and notebook: latencies in ms, shares and
changes in %, memory in GiB (MiB, KiB below), traffic in MB/token, durations of work in s."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Bytes as B, KiB, MiB or GiB (two decimals past bytes)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def milliseconds(seconds: float, digits: int = 2) -> str:
    """A latency given in seconds, as `183.99 ms`."""
    return f"{1e3 * seconds:,.{digits}f} ms"


def percent(fraction: float | None, digits: int = 2) -> str:
    """A share given as a fraction, as `57.74%` (`n/a` for None)."""
    return "n/a" if fraction is None else f"{100 * fraction:.{digits}f}%"


def change(value: float, reference: float, digits: int = 1) -> str:
    """How `value` differs from `reference`, signed, as `-44.1%` (lower is faster for times)."""
    return f"{100 * (value / reference - 1):+.{digits}f}%" if reference else "n/a"


def per_token(bytes_per_token: float) -> str:
    """Network bytes per token, as `0.326 MB/token` (decimal megabytes, as link bandwidths are decimal)."""
    return f"{bytes_per_token / 1e6:.3f} MB/token"


def count(n: float) -> str:
    """A count with thousands separators: `3,067,970`."""
    return f"{round(n):,}"
