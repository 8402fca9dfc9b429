"""A drifting workload built from real requests: the mix of domains each stream receives changes over time.

Stream i is named after origin i of the source trace (an ESFT domain, say) and arrives where that origin
arrives in the cluster file. In window w it draws each request from the source origins with the probabilities
mix[w, i, :]; the default mix rotates: stream i starts on its own domain and moves linearly to domain
i + shift (mod domains) by the last window. Every stream gets exactly `window_tokens` tokens per window (the
last request is cut short), so `prism-plan profile tables --window <window_tokens x streams>` recovers the
windows of the written trace exactly. Each domain's requests are dealt from a shuffled deck that is reshuffled
when it runs out, so consecutive windows share as few requests as the data allows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.progress import spinner
from prism_plan.traces.trace import Trace, load_trace

# The workload is built in memory whole: past this many tokens (about 100 GiB for DeepSeek-V2-Lite) it cannot be.
MAX_TOKENS = 2**31


def rotation_mix(windows: int, domains: int, shift: int = 1) -> np.ndarray:
    """mix: [windows, streams = domains, domains], stream i goes from domain i to domain i + shift linearly."""
    a = np.linspace(0.0, 1.0, windows) if windows > 1 else np.zeros(1)
    own, nxt = np.eye(domains), np.roll(np.eye(domains), shift, axis=1)
    return (1 - a)[:, None, None] * own[None] + a[:, None, None] * nxt[None]


def _request_slices(trace: Trace) -> list[list[np.ndarray]]:
    """Per origin, the row indices of each request in position order."""
    order = np.lexsort((trace.position, trace.request, trace.origin))
    o, r = trace.origin[order], trace.request[order]
    bounds = np.flatnonzero((np.diff(o) != 0) | (np.diff(r) != 0)) + 1
    out: list[list[np.ndarray]] = [[] for _ in trace.origins]
    for rows in np.split(order, bounds):
        if len(rows):
            out[int(trace.origin[rows[0]])].append(rows)
    return out


def drifting_workload(trace: Trace, windows: int, window_tokens: int, mix: np.ndarray | None = None,
                      seed: int = 0) -> list[Trace]:
    """One Trace per window (its streams one after another), from the requests of `trace`.

    mix: [windows, streams, origins] probabilities (rows sum to 1); default rotation_mix(windows, origins).
    window_tokens: tokens per stream and window. Request ids are numbered per stream across all windows.
    """
    if not trace.num_tokens:
        raise PrismError("the trace holds no tokens to draw requests from; give a trace with routed tokens")
    domains = len(trace.origins)
    mix = rotation_mix(windows, domains) if mix is None else np.asarray(mix, float)
    if windows < 1 or window_tokens < 1:
        raise PrismError("a drifting workload needs at least one window of at least one token")
    if mix.shape[0] != windows or mix.shape[2] != domains or mix.shape[1] > domains:
        raise PrismError(f"mix has shape {list(mix.shape)}, expected [{windows}, streams <= {domains}, {domains}]")
    if (mix < 0).any() or not np.allclose(mix.sum(axis=2), 1.0):
        raise PrismError("every row of mix must hold probabilities that sum to 1")
    requests = _request_slices(trace)
    empty = [trace.origins[d] for d in range(domains) if not requests[d] and mix[:, :, d].any()]
    if empty:
        raise PrismError(f"origin(s) {empty} have no requests in the trace to draw from")
    rng = np.random.default_rng(seed)
    decks: list[list[int]] = [[] for _ in range(domains)]
    next_id = np.zeros(mix.shape[1], np.int64)
    out = []
    for w in range(windows):
        rows, origin, request, position = [], [], [], []
        for i in range(mix.shape[1]):
            left = window_tokens
            while left > 0:
                d = int(rng.choice(domains, p=mix[w, i]))
                if not decks[d]:
                    decks[d] = rng.permutation(len(requests[d])).tolist()
                take = requests[d][decks[d].pop()][:left]
                rows.append(take)
                origin.append(np.full(len(take), i, np.int32))
                request.append(np.full(len(take), next_id[i], np.int64))
                position.append(np.arange(len(take), dtype=np.int32))
                next_id[i] += 1
                left -= len(take)
        idx = np.concatenate(rows)
        out.append(Trace(trace.meta, trace.origins[:mix.shape[1]], np.concatenate(origin), np.concatenate(request),
                         np.concatenate(position), trace.decode[idx], trace.experts[idx],
                         None if trace.weights is None else trace.weights[idx]))
    return out


def write_drifting_workload(path: str | Path, output: str | Path, *, windows: int = 8, window_tokens: int = 2000,
                            shift: int = 1, seed: int = 0, quiet: bool = True) -> dict:
    """Write the rotating drifting workload built from the trace at `path` (stream i moves from origin i to
    origin i + shift) to `output`, under a spinner naming each step unless `quiet`; returns what was written:
    streams, windows, tokens and the window size in tokens that `--window` / window_tables needs to recover the
    windows."""
    with spinner(f"reading {Path(path).name}", quiet) as step:
        source = load_trace(path)
        if not source.num_tokens:
            raise PrismError(f"{path} holds no tokens to draw requests from; give a trace with routed tokens")
        total = windows * window_tokens * len(source.origins)
        if total > MAX_TOKENS:
            raise PrismError(f"{windows} windows x {window_tokens} tokens x {len(source.origins)} streams is "
                             f"{total:,} tokens, more than the {MAX_TOKENS:,} one workload can hold in memory; lower "
                             f"`windows` or `window_tokens`", parameters=("windows", "window_tokens"))
        mix = rotation_mix(windows, len(source.origins), shift)
        step(f"drawing {windows} windows of requests")
        workload = Trace.concat(drifting_workload(source, windows, window_tokens, mix, seed))
        step(f"writing {Path(output).name}")
        workload.save(output)
    size = window_tokens * len(source.origins)
    return {"path": str(output), "windows": windows, "streams": list(source.origins), "window_tokens": window_tokens,
            "tokens": size * windows, "window": size}
