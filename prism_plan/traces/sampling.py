"""Enough data, not all data: a seeded random subset of a trace's requests, or its first tokens.

Whether a request is kept depends only on (seed, origin name, request id), through a 64-bit hash computed with
array code, so the same requests are kept whatever the batch boundaries, the order of the file's rows or the
worker process that reads them; and a request kept at one fraction is kept at every larger one.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import numpy as np

from prism_plan.placement.checks import integer, number
from prism_plan.traces.trace import Trace

_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 values (wrapping arithmetic): nearby inputs give unrelated outputs."""
    with np.errstate(over="ignore"):
        x = x + _MIX[0]
        x = (x ^ (x >> np.uint64(30))) * _MIX[1]
        x = (x ^ (x >> np.uint64(27))) * _MIX[2]
        return x ^ (x >> np.uint64(31))


def _origin_key(name: str, seed: int) -> np.uint64:
    """A 64-bit key of (seed, origin name); hashlib rather than hash(), which differs between processes."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def request_draws(trace: Trace, seed: int = 0) -> np.ndarray:
    """[tokens] float64 in [0, 1): each token's request's draw, the same for every token of one (origin,
    request) and for that request in any batch; keeping draws below f keeps a share f of the requests."""
    keys = np.array([_origin_key(o, seed) for o in trace.origins], dtype=np.uint64)
    if not len(keys):
        return np.zeros(0)
    h = _mix64(keys[trace.origin] ^ _mix64(trace.request.astype(np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits: exact in a float64


def check_sampling(fraction: float | None, max_tokens: int | None, seed: int) -> None:
    """A PrismError naming the parameter when `fraction` is not in (0, 1], `max_tokens` not an integer >= 1 or
    `seed` not an integer (None means: no such limit)."""
    if fraction is not None:
        number(fraction, "`fraction`", low=0.0, high=1.0, low_open=True,
               fix="give the share of requests to keep, e.g. 0.25", parameters=("fraction",))
    if max_tokens is not None:
        integer(max_tokens, "`max_tokens`", low=1, fix="give how many tokens to read at most",
                parameters=("max_tokens",))
    integer(seed, "`seed`", fix="give an integer seed", parameters=("seed",))


def sampled(batches: Iterable[Trace], *, fraction: float | None = None, max_tokens: int | None = None,
            seed: int = 0) -> Iterator[Trace]:
    """The trace batches `batches`, thinned: with `fraction`, the tokens of each (origin, request) kept with
    probability `fraction` (whole requests, decided by `request_draws` with `seed`); with `max_tokens`, no more
    than that many of the kept tokens, the stream cut at a row once they are reached (the rest is not read).
    Neither: every token. Batches left empty are skipped. Arguments are checked here, before any batch is read."""
    check_sampling(fraction, max_tokens, seed)
    return _thinned(iter(batches), fraction, max_tokens, seed)


def _thinned(batches: Iterator[Trace], fraction: float | None, max_tokens: int | None,
             seed: int) -> Iterator[Trace]:
    """The generator behind `sampled`, on checked arguments."""
    left = max_tokens
    for t in batches:
        if fraction is not None and fraction < 1:
            t = t.select(request_draws(t, seed) < fraction)
        if left is not None and t.num_tokens > left:
            t = t.select(slice(0, left))
        if t.num_tokens:
            yield t
        if left is not None:
            left -= t.num_tokens
            if left == 0:
                return
