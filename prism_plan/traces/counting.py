"""Counting a batch of routing into the activation tables, at memory speed.

Activations per (origin, layer, expert), expert pairs among a token's top-k (co-activation) and between its
top-k in one layer and the next (transitions), and the check of every id on the way (in 0..E-1, distinct
within a token's top-k: a trace read for counting needs no check of its own). With numba (the `fast` extra)
two compiled kernels do it: with pairs, the layers split over the cores, each thread alone with its layer's
E x E tables (512 KiB each at 256 experts, in cache while the batch's tokens stream by); activations alone,
the tokens split over the cores, each reading its rows front to back. Without numba, numpy makes the same
counts with one bincount per layer and table (9x slower at DeepSeek-V3's shape, `bench/tables_speed.py`).
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.traces.trace import routing_ids

try:  # optional: a compiled kernel where numpy's bincounts cannot reach memory speed
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

# The activations-only kernel gives each thread a copy of freq: above this, it splits the layers instead.
FREQ_PARTS_BYTES = 64 << 20


def _count_layers(origin, experts, freq, coact, trans, pairs):  # pragma: no cover - compiled
    """Kernel: experts [tokens, layers, k] int16, origin [tokens] int64; adds to freq [origins, layers, E],
    coact [layers, E, E] (slot i < slot j only) and trans [layers - 1, E, E], int64, and returns [layers]: per
    layer the first token with an id out of range or repeated (or -1). The layers split over the cores, each
    thread alone with its layer's tables; a stamp per expert (the last token that used it) finds a repeat in
    one look per id, and a bad id is never counted (nor is anything after it in its layer)."""
    n, n_l, k = experts.shape
    e = freq.shape[2]
    bad = np.full(n_l, -1, np.int64)
    for l in numba.prange(n_l):
        stamp = np.full(e, -1, np.int64)
        for t in range(n):
            o = origin[t]
            for i in range(k):
                a = experts[t, l, i]
                if a < 0 or a >= e or stamp[a] == t:
                    bad[l] = t
                    break
                stamp[a] = t
                freq[o, l, a] += 1
            if bad[l] >= 0:
                break
            if pairs:
                last = l + 1 < n_l
                for i in range(k):
                    a = experts[t, l, i]
                    for j in range(i + 1, k):
                        coact[l, a, experts[t, l, j]] += 1
                    if last:
                        for j in range(k):
                            b = experts[t, l + 1, j]
                            if 0 <= b < e:  # the next layer's own check refuses the batch otherwise
                                trans[l, a, b] += 1
    return bad


def _count_freq(origin, experts, freq, chunks):  # pragma: no cover - compiled
    """Kernel for activations alone: the tokens split into `chunks` runs over the cores, each run reading its
    tokens' rows front to back into its own freq; returns [chunks]: per run its first bad token (or -1)."""
    n, n_l, k = experts.shape
    e = freq.shape[2]
    bad = np.full(chunks, -1, np.int64)
    part = np.zeros((chunks,) + freq.shape, np.int64)
    for c in numba.prange(chunks):
        stamp = np.full((n_l, e), -1, np.int64)
        mine = part[c]
        for t in range(c * n // chunks, (c + 1) * n // chunks):
            o = origin[t]
            for l in range(n_l):
                for i in range(k):
                    a = experts[t, l, i]
                    if a < 0 or a >= e or stamp[l, a] == t:
                        bad[c] = t
                        break
                    stamp[l, a] = t
                    mine[o, l, a] += 1
                if bad[c] >= 0:
                    break
            if bad[c] >= 0:
                break
    for c in range(chunks):
        freq += part[c]
    return bad


_jit = (lambda f: f) if numba is None else numba.njit(parallel=True, cache=True, nogil=True)
_kernel, _freq_kernel = _jit(_count_layers), _jit(_count_freq)


def _numpy_counts(origin: np.ndarray, experts: np.ndarray, num_experts: int, freq: np.ndarray,
                  coact: np.ndarray | None, trans: np.ndarray | None) -> None:
    """The kernels' counts with numpy, one bincount per layer and table, of checked ids [layers, tokens, k]."""
    n_l, n, k = experts.shape
    e, o_n = num_experts, freq.shape[0]
    iu, ju = np.triu_indices(k, 1)
    by_origin = origin[:, None] * e
    for l in range(n_l):
        ids = experts[l].astype(np.int64)  # [tokens, k]
        freq[:, l] += np.bincount((by_origin + ids).ravel(), minlength=o_n * e).reshape(o_n, e)
        if coact is not None:
            coact[l] += np.bincount((ids[:, iu] * e + ids[:, ju]).ravel(), minlength=e * e).reshape(e, e)
            if l + 1 < n_l:
                pair = (ids[:, :, None] * e + experts[l + 1].astype(np.int64)[:, None, :]).ravel()
                trans[l] += np.bincount(pair, minlength=e * e).reshape(e, e)


def _check_arrays(origin: np.ndarray, experts: np.ndarray, num_experts: int, freq: np.ndarray,
                  coact: np.ndarray | None, trans: np.ndarray | None) -> None:
    """PrismErrors for arrays that do not fit together: the kernels index without bounds checks."""
    if experts.ndim != 3 or origin.shape != experts.shape[:1]:
        raise PrismError(f"`experts` must be [tokens, layers, top_k] and `origin` [tokens], got {list(experts.shape)} "
                         f"and {list(origin.shape)}", parameters=("experts", "origin"))
    n, layers, _ = experts.shape
    want = {"freq": (freq, (freq.shape[0], layers, num_experts))}
    if (coact is None) != (trans is None):
        raise PrismError("`coact` and `trans` are counted together: pass both or neither",
                         parameters=("coact", "trans"))
    if coact is not None:
        want.update(coact=(coact, (layers, num_experts, num_experts)),
                    trans=(trans, (max(layers - 1, 0), num_experts, num_experts)))
    for name, (array, shape) in want.items():
        if array.shape != shape or array.dtype != np.int64 or not array.flags.c_contiguous:
            raise PrismError(f"`{name}` must be a C-contiguous int64 array of shape {list(shape)}, got "
                             f"{array.dtype} {list(array.shape)}", parameters=(name,))
    if n and (origin.min() < 0 or origin.max() >= freq.shape[0]):
        raise PrismError(f"`origin` holds {origin.min()}..{origin.max()}, outside the {freq.shape[0]} origins of "
                         f"`freq`", parameters=("origin",))


def count_batch(origin: np.ndarray, experts: np.ndarray, num_experts: int, freq: np.ndarray,
                coact: np.ndarray | None = None, trans: np.ndarray | None = None, *, where: str = "the trace",
                first_row: int = 0, use_numba: bool | None = None) -> None:
    """Add one batch to the counts, after checking its ids.

    origin: [tokens] origin index; experts: [tokens, layers, top_k] expert ids; freq: [origins, layers, E] int64;
    coact: [layers, E, E] int64 counting slot i < slot j of each token (mirror it at the end), trans:
    [layers - 1, E, E] int64, both None to count activations only. A PrismError naming the row (first_row +
    the token) when an id lies outside 0..E-1 or repeats within a token's top-k; the counts are then part-way
    and must be dropped. use_numba: default when numba is installed.
    """
    experts = np.ascontiguousarray(experts)
    origin = np.ascontiguousarray(origin, dtype=np.int64)
    _check_arrays(origin, experts, num_experts, freq, coact, trans)
    fast = (numba is not None) if use_numba is None else use_numba
    if fast and numba is None:
        raise PrismError("counting with numba needs it installed: pip install 'prism-plan[fast]'",
                         parameters=("use_numba",))
    fix = "re-import the trace with prism-plan"

    def refuse() -> None:  # routing_ids names the first bad row, as a reader that checks would
        routing_ids(experts, num_experts, where, fix, rows=lambda t: f" row {first_row + t}")

    if not fast:
        refuse()
        _numpy_counts(origin, experts.transpose(1, 0, 2), num_experts, freq, coact, trans)
        return
    chunks = max(1, min(numba.get_num_threads(), len(origin)))
    dummy = np.zeros((1, 1, 1), np.int64)
    if coact is None and chunks * freq.nbytes <= FREQ_PARTS_BYTES:
        bad = _freq_kernel(origin, experts, freq, chunks)
    elif coact is None:  # many origins: split the layers instead, no copies of freq
        bad = _kernel(origin, experts, freq, dummy, dummy, False)
    else:
        bad = _kernel(origin, experts, freq, coact, trans if trans.size else dummy, True)
    if (bad >= 0).any():
        refuse()
