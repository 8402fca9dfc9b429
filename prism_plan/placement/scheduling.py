"""Run-time token scheduling for an offload tier, as Sirius does it: each group of tokens goes to the server
where it finishes soonest, given what each server pins and caches right now.

A group is the tokens of one origin that need one expert in one batch step and layer. It can be served by a
server that holds the expert (pins it, or has it in its cache), paying the network trip, or by a server that
stores it in its slow tier, paying the trip (none at home) and a load. The simulator (`offload_replay`) and the
distributed MoE layer call the same pure function with the same inputs (the routing counts, the plan and the
cache contents), so they take the same decisions and count the same loads.
"""

from __future__ import annotations

import numpy as np


def schedule_groups(n: np.ndarray, home: np.ndarray, pinned: np.ndarray, cached: np.ndarray, stored: np.ndarray,
                    load_seconds: np.ndarray, fallback: np.ndarray, *, latency: np.ndarray, bandwidth: np.ndarray,
                    token_bytes: float, act_seconds: np.ndarray, backlog: np.ndarray | None = None,
                    wait: np.ndarray | None = None) -> np.ndarray:
    """[origins, experts] int64, the server that serves each group of one (batch step, MoE layer).

    n: [origins, experts] tokens of each origin that need each expert; home: [origins] server of each origin;
    pinned, cached, stored: [servers, experts] bool, what each server pins (plan.hosted[:, l]), holds in its
    cache now, and keeps in its slow tier; load_seconds: [servers] seconds one load of this layer's expert takes
    (load latency + expert bytes / load bandwidth; inf where a server has no slow tier); fallback: [origins,
    experts] the plan's server (plan.routing[:, l]); latency: [servers, servers] s; bandwidth: [servers, servers]
    bytes/s; token_bytes: one hidden state, bytes; act_seconds: [servers] seconds of one activation; backlog:
    [servers] seconds each load path is still busy with earlier loads (prefetches; default 0); wait: [servers,
    experts] seconds until a cached expert still loading is there (default 0).

    As in Sirius, a group loads an expert at its home server or joins a load another server makes anyway for
    its own tokens; otherwise it goes only to a server that pins or caches the expert, so that no load path
    queues loads for others alone (measured on ESFT: letting groups make loads anywhere piled them onto one
    load path and doubled p99 TTFT at 25% of a copy).

    A group's cost at server s is its estimated finish time: max(arrival of its tokens, its weights ready) +
    queued work at s + its own compute + the trip back. The trip, one message each way, is latency + n *
    token_bytes / bandwidth (0 at home; each group is priced as if it travelled alone, while the replay shares
    a token's trip between its experts on one server). Weights are ready at 0 where s pins the expert, after
    `wait` where it caches it, and where s only stores it once s has loaded it, loads running one after another
    on s's load path behind its backlog.

    Two passes, each vectorised over [origins, experts, servers]: pass 1 prices every group alone (no queued
    work, each load first on its path) with loads only at home; pass 2 also lets a group join the loads pass 1
    made, takes as queued work at s what every other group was given at s in pass 1, and as the loads ahead of
    expert e at s the pass-1 loads at s of lower expert ids (the order the cache looks up what it lacks), one
    load per (server, expert) however many groups share it. A group takes its pass-2 server where pass 1 chose
    it too or where it joins a pass-1 load, and its `fallback` server otherwise: each pass prices the others'
    choices of the pass before, so a move the two passes disagree on rests on a queue that will not be there
    (measured on ESFT at 100% of a copy: taking every pass-2 move tripled mean TTFT). It also keeps `fallback`
    unless another server is strictly cheaper (ties and groups no server can serve stay there), and groups
    with n = 0 get their fallback too.
    """
    n = np.asarray(n, dtype=np.float64)
    home, fallback = np.asarray(home, np.int64), np.asarray(fallback, np.int64)
    out, back = _trips(n, home, latency, bandwidth, token_bytes)
    compute = n[:, :, None] * np.asarray(act_seconds, np.float64)[None, None, :]  # [origins, experts, servers]
    pinned = np.asarray(pinned, bool)
    held = pinned | np.asarray(cached, bool)  # [servers, experts]
    s_n = held.shape[0]
    lag = np.zeros(held.shape) if wait is None else np.where(pinned, 0.0, np.asarray(wait, np.float64))
    behind = np.zeros(s_n) if backlog is None else np.asarray(backlog, np.float64)
    load_s = np.asarray(load_seconds, np.float64)[:, None]
    active = n > 0
    at_home = np.arange(s_n)[None, None, :] == home[:, None, None]  # [origins, 1, servers]
    loadable = np.asarray(stored, bool) & ~held

    def priced(work: np.ndarray, ahead: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        ready = np.where(held, lag, np.where(loadable, behind[:, None] + (ahead + 1) * load_s, np.inf))
        return np.where(allowed, _finish(out, back, work, ready), np.inf)

    at_home_only = held.T[None] | (loadable.T[None] & at_home)
    first = _pick(priced(compute, np.zeros(held.shape), at_home_only), fallback, active)
    loads = _loads(first, active, loadable)
    queue = _queued_work(compute, first, active)
    joins = at_home_only | loads.T[None]
    second = _pick(priced(compute + queue, np.cumsum(loads, axis=1) - loads, joins), fallback, active)
    joined = np.take_along_axis(loads.T[None] & ~at_home, second[:, :, None], axis=2)[:, :, 0]
    return np.where((second == first) | joined, second, fallback)


def _trips(n: np.ndarray, home: np.ndarray, latency: np.ndarray, bandwidth: np.ndarray,
           token_bytes: float) -> tuple[np.ndarray, np.ndarray]:
    """(out, back): [origins, experts, servers] seconds for each group's message to each server and its results'
    message home; 0 at the group's home server."""
    s_n = latency.shape[0]
    away = (np.arange(s_n)[None, :] != home[:, None])[:, None, :]  # [origins, 1, servers]
    size = n[:, :, None] * token_bytes
    out = latency[home][:, None, :] + size / bandwidth[home][:, None, :]
    back = latency.T[home][:, None, :] + size / bandwidth.T[home][:, None, :]
    return np.where(away, out, 0.0), np.where(away, back, 0.0)


def _finish(out: np.ndarray, back: np.ndarray, work: np.ndarray, ready: np.ndarray) -> np.ndarray:
    """[origins, experts, servers] estimated finish of each group at each server (inf where it cannot run)."""
    return np.maximum(out, ready.T[None, :, :]) + work + back


def _pick(cost: np.ndarray, fallback: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[origins, experts] the cheapest server of each active group, its fallback unless strictly cheaper."""
    best = np.argmin(cost, axis=2)
    best_cost = np.take_along_axis(cost, best[:, :, None], axis=2)[:, :, 0]
    stay = np.take_along_axis(cost, fallback[:, :, None], axis=2)[:, :, 0]
    return np.where(active & (best_cost < stay), best, fallback)


def _queued_work(compute: np.ndarray, choice: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[origins, experts, servers] seconds of work the other active groups were given at each server."""
    s_n = compute.shape[2]
    mine = (np.arange(s_n)[None, None, :] == choice[:, :, None]) & active[:, :, None]
    given = np.where(mine, compute, 0.0)
    return given.sum(axis=(0, 1))[None, None, :] - given


def _loads(choice: np.ndarray, active: np.ndarray, loadable: np.ndarray) -> np.ndarray:
    """[servers, experts] bool, the loads each server makes for the choice: one per (server, expert)."""
    loads = np.zeros(loadable.shape, bool)
    o, e = np.nonzero(active)
    loads[choice[o, e], e] = True
    return loads & loadable
