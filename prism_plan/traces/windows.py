"""Windows of a trace in arrival order (the order of its rows), and the activation tables of each, so drift can
be studied: how the hot experts of each origin change from one window to the next.

A window holds `size` tokens, or `size` requests: it ends where the (size + 1)-th request begins (a request's
later tokens that arrive after that count in the window they arrive in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import atomic_path, MANIFEST, write_text_atomic
from prism_plan.placement.checks import integer
from prism_plan.progress import track
from prism_plan.traces.tables import ActivationTables, build_tables, tables_from_trace
from prism_plan.traces.trace import Trace, iter_trace

UNITS = ("tokens", "requests")
MAX_WINDOW = 2**62  # window bounds are int64 arithmetic


_REQUEST_KEY = np.dtype((np.void, 16))  # (origin index, request id) as one sortable 16-byte value


def _request_starts(t: Trace, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `t` where a request not in `seen` begins, `seen` grown by them). Requests are keyed by
    (origin index, request id)."""
    pairs = np.stack([t.origin.astype(np.int64), t.request.astype(np.int64)], axis=1)
    keys = np.ascontiguousarray(pairs).view(_REQUEST_KEY).ravel()
    uniq, first = np.unique(keys, return_index=True)
    fresh = ~np.isin(uniq, seen, assume_unique=True)
    return np.sort(first[fresh]), np.union1d(seen, uniq)


def iter_windows(batches: Iterable[Trace], size: int, unit: str = "tokens") -> Iterator[Trace]:
    """Cut a stream of trace batches into consecutive windows of `size` tokens or requests; yields one Trace
    per window (the last may be smaller). Memory: one window at a time."""
    if unit not in UNITS:
        raise PrismError(f"window unit must be one of {', '.join(UNITS)}, got {unit!r}")
    integer(size, "`size`", low=1, high=MAX_WINDOW, fix=f"give a number of {unit} per window",
            parameters=("size",))
    parts: list[Trace] = []
    filled = 0  # tokens or requests in the open window
    seen = np.zeros(0, _REQUEST_KEY)
    for t in batches:
        if unit == "tokens":
            marks = np.arange(t.num_tokens)  # every token counts one
        else:
            marks, seen = _request_starts(t, seen)
        # cut at the mark that would be the (size + 1)-th of the open window, and every size marks after it
        at = np.arange(size - filled, len(marks), size)
        begin = 0
        for c in marks[at]:
            if c > begin:
                parts.append(t.select(slice(begin, c)))
            yield Trace.concat(parts)
            parts, begin = [], c
        filled = filled + len(marks) if not len(at) else len(marks) - int(at[-1])
        if begin < t.num_tokens:
            parts.append(t.select(slice(begin, t.num_tokens)))
    if parts and sum(p.num_tokens for p in parts):
        yield Trace.concat(parts)


def window_tables(path: str | Path, size: int, unit: str = "tokens", pairs: bool = True,
                  quiet: bool = True) -> Iterator[ActivationTables]:
    """ActivationTables of each window of a trace file, in order; each carries meta["window"] with its index,
    unit, size, first token (0-based row) and token count."""
    stream = track(iter_trace(path, distinct=False), f"counting activations in windows of {size} {unit}", quiet=quiet)
    return tables_of_windows(stream, size, unit, pairs, where=str(path))


def tables_of_windows(batches: Iterable[Trace], size: int, unit: str, pairs: bool,
                      where: str) -> Iterator[ActivationTables]:
    """window_tables of trace batches (from the file `where`, named with the row of a bad id)."""
    first = 0
    for i, w in enumerate(iter_windows(batches, size, unit)):
        yield build_tables([w], pairs=pairs, window={"index": i, "unit": unit, "size": size, "first_token": first,
                                                    "tokens": w.num_tokens}, where=where, first_row=first)
        first += w.num_tokens


def write_tables(path: str | Path, out: str | Path, *, window: int | None = None, unit: str = "tokens",
                 pairs: bool = True, quiet: bool = True) -> list[tuple[Path, ActivationTables]]:
    """Write the activation tables of the trace at `path` to `out` (.npz), or with `window`, the tables of
    each window of that many tokens or requests (`unit`) to the folder `out` as window-0000.npz, ... beside
    manifest.json (which lists them); returns (path, tables) of each file written."""
    if window is not None:
        integer(window, "`window`", low=1, high=MAX_WINDOW, fix=f"give a number of {unit} per window",
                parameters=("window",))
    if window is None:
        tables = tables_from_trace(path, pairs=pairs, quiet=quiet)
        tables.save(out)
        return [(Path(out), tables)]
    return save_windows(window_tables(path, window, unit, pairs=pairs, quiet=quiet), out, unit=unit, size=window,
                        inputs=[Path(path)], trace=str(path))


def save_windows(windows: Iterable[ActivationTables], out: str | Path, *, unit: str, size: int,
                 inputs: list[Path], trace: str | list[str]) -> list[tuple[Path, ActivationTables]]:
    """Write `windows` to the folder `out` as window-0000.npz, ... beside manifest.json (naming `trace`, the
    input or inputs); returns (path, tables) of each file written."""
    out_dir = Path(out)
    written = []
    # The window set is one output: a temporary folder with a manifest of its windows replaces `out` whole
    # (so no window of an earlier run survives beside the new ones), and only once every window is written.
    with atomic_path(out_dir, folder=True, inputs=inputs) as tmp_dir:
        for tables in windows:
            name = f"window-{tables.meta['window']['index']:04d}.npz"
            tables.save(tmp_dir / name)
            written.append((out_dir / name, tables))
        manifest = {"format": "prism-plan/windows", "version": 1, "trace": trace, "unit": unit, "size": size,
                    "windows": [p.name for p, _ in written]}
        write_text_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=1))
    return written
