"""Replay a trace through a plan with an offload tier: per-server expert caches, on-demand loads from the slow
tier, run-time token scheduling and speculative prefetch.

The model adds to the simulator's (`prism_plan.placement.simulator`: batch steps, network trips shared by a
token's co-activated experts on one server, first-come-first-served compute per server):
- steps run one after another, and within a step the MoE layers in order, in lockstep: a layer ends for all
  origins when the slowest origin has its results back, and the cache state carries from one to the next;
- a server serves an activation from its pinned copy, or from its cache (`ExpertCache`, the plan's policy);
  an expert it does not hold it loads from its own slow tier; the lookups go servers in index order, each
  server's distinct unpinned experts of the (step, layer) in `lookup_order` (the executor's order too, so
  that both count the same loads);
- each server has one load path, first in first out: a load starts when the path is free (and not before the
  layer starts) and takes load_latency + expert bytes / load bandwidth; the path's backlog carries into the
  next layer, so loads overlap compute;
- a group (one origin's tokens of one expert) is released for compute at its server when its tokens have
  arrived and the weights are there (at once if pinned or loaded before the layer; else when its load ends);
  an expert loaded within a layer is computed even if a later load of the same layer evicts it (the pipeline
  streams it through the cache);
- with `schedule`, each (step, layer) picks the serving server of every group with `schedule_groups` from the
  current cache contents, instead of the plan's routing;
- with a predictor and `prefetch` > 0, once a layer's demand loads are queued, the servers prefetch experts
  of the next layer that the plan has some server load (`_prefetch`: most likely first, while the odds pay
  for the load time that runs past the layer's end), on their load paths behind those loads;
  with `schedule` any server that stores such an expert may take it (the scheduler sends the tokens to it),
  else only the servers that load it; a prefetch finished before the next layer starts costs that layer
  nothing.
A request's time to first token is the sum of its origin's layer times over its prefill step (as `simulate`
counts it), its time per output token the mean over its decode steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import write_text_atomic
from prism_plan.placement.checks import integer
from prism_plan.placement.offload import ExpertCache, Offload, lookup_order
from prism_plan.placement.scheduling import schedule_groups
from prism_plan.placement.workload import (CostModel, RequestTimes, Workload, fifo_finish, messages,
                                          pair_records, request_times)
from prism_plan.progress import track
from prism_plan.traces.prefetch import NextLayerPredictor

if TYPE_CHECKING:
    from prism_plan.solvers.deadline import Deadline


@dataclass
class OffloadReplay(RequestTimes):
    """What an offload replay measured.

    requests: per request (origin, request id, tokens, ttft_s, tpot_s: nan without decode steps);
    layer_seconds: [layers] mean request seconds spent in each layer; network_bytes: [servers, servers] bytes
    sent from row to column. Per server, [servers]: bytes_loaded (demand loads and prefetches), hits, misses
    (demand lookups), prefetches and prefetch_bytes (prefetch loads), prefetch_used (prefetched experts used in
    the next layer of the same step), prefetch_reach (demand lookups of layers 1.. that loaded or found such a
    prefetch: the recall's base), load_seconds (of every load), hidden_load_seconds (of each used prefetch, the
    part that ran before the layer that first used it started).
    """

    layer_seconds: np.ndarray
    network_bytes: np.ndarray
    bytes_loaded: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    prefetches: np.ndarray
    prefetch_bytes: np.ndarray
    prefetch_used: np.ndarray
    prefetch_reach: np.ndarray
    load_seconds: np.ndarray
    hidden_load_seconds: np.ndarray
    tokens: int
    seconds: float

    @property
    def hit_rate(self) -> np.ndarray:
        """[servers] hits / demand lookups (nan where a server looked nothing up)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits / (self.hits + self.misses)

    def summary(self) -> dict:
        """Headline numbers (seconds, bytes); ratios with nothing to count are None."""
        tp = self.tpot[~np.isnan(self.tpot)]
        load = float(self.load_seconds.sum())
        hidden = float(self.hidden_load_seconds.sum())
        return {
            "requests": int(len(self.ttft)), "tokens": self.tokens,
            "ttft_mean_s": float(self.ttft.mean()) if len(self.ttft) else 0.0,
            "ttft_p99_s": float(np.percentile(self.ttft, 99)) if len(self.ttft) else 0.0,
            "tpot_mean_s": float(tp.mean()) if len(tp) else None,
            "simulated_ttft_s": float(self.layer_seconds.sum()),
            "bytes_loaded": int(self.bytes_loaded.sum()), "prefetch_bytes": int(self.prefetch_bytes.sum()),
            "network_bytes": float(self.network_bytes.sum()),
            "hit_rate": _ratio(self.hits.sum(), self.hits.sum() + self.misses.sum()),
            "load_seconds": load, "hidden_load_seconds": hidden, "hidden_share": hidden / load if load else 0.0,
            "prefetch_precision": _ratio(self.prefetch_used.sum(), self.prefetches.sum()),
            "prefetch_recall": _ratio(self.prefetch_used.sum(), self.prefetch_reach.sum()),
            "server": {name: {"bytes_loaded": int(self.bytes_loaded[s]), "hits": int(self.hits[s]),
                              "misses": int(self.misses[s]),
                              "hit_rate": _ratio(self.hits[s], self.hits[s] + self.misses[s]),
                              "load_seconds": float(self.load_seconds[s]),
                              "hidden_load_seconds": float(self.hidden_load_seconds[s])}
                       for s, name in enumerate(self.servers)},
        }

    def to_dict(self) -> dict:
        """Everything, as plain data for JSON."""
        return {
            "summary": self.summary(), "servers": list(self.servers),
            "requests": self.request_records(),
            "network_bytes": pair_records(self.servers, self.network_bytes),
            "layer_seconds": self.layer_seconds.tolist(),
        }

    def save(self, path) -> None:
        """Write `to_dict()` as JSON atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


class _Tier:
    """Every server's cache and load path during one replay. Times are seconds since the replay began.

    held, ready: [servers, layers, experts] what each cache holds and when its weights are (or were) there;
    prefetch_start: when a prefetch not used yet began loading (nan: none); prefetch_step: the step whose
    next layer it was made for.
    """

    def __init__(self, offload: Offload, load_s: np.ndarray, layer_bytes: np.ndarray) -> None:
        self.caches = [ExpertCache(int(c), offload.policy) for c in offload.cache_bytes]
        self.stored, self.load_s, self.size = offload.stored, load_s, layer_bytes
        s_n = len(self.caches)
        self.held = np.zeros(offload.stored.shape, bool)
        self.ready = np.zeros(offload.stored.shape)
        self.prefetch_start = np.full(offload.stored.shape, np.nan)
        self.prefetch_step = np.full(offload.stored.shape, -1, np.int64)
        self.free = np.zeros(s_n)  # when each load path has done all it was given
        self.load_seconds, self.hidden = np.zeros(s_n), np.zeros(s_n)
        self.prefetches, self.prefetch_bytes, self.used, self.reach = (np.zeros(s_n, np.int64) for _ in range(4))

    def can_load(self, s: int, l: int, e: int) -> bool:
        return bool(self.stored[s, l, e]) and bool(np.isfinite(self.load_s[s, l]))

    def use(self, s: int, l: int, e: int, now: float, step: int) -> float:
        """Demand lookup of expert (l, e) at server s in a layer starting at `now`: seconds after `now` until
        its weights are there."""
        if (l, e) not in self.caches[s] and not self.can_load(s, l, e):
            raise PrismError(f"server {s} must serve expert {e} of MoE layer index {l}, which it neither pins nor "
                             f"can load from a slow tier; route it to a server that pins it or stores it "
                             f"(`routing`, `offload`)", parameters=("routing", "offload"))
        loaded, evicted = self.caches[s].get((l, e), int(self.size[l]))
        self._forget(s, evicted)
        if loaded:
            self._load(s, l, e, now)
            self.reach[s] += l > 0  # layer 0 has no layer before it to prefetch from
        elif not np.isnan(self.prefetch_start[s, l, e]):  # first use of a prefetch
            self.hidden[s] += min(max(now - self.prefetch_start[s, l, e], 0.0), self.load_s[s, l])
            if self.prefetch_step[s, l, e] == step:
                self.used[s] += 1
                self.reach[s] += 1
            self.prefetch_start[s, l, e] = np.nan
        return max(self.ready[s, l, e] - now, 0.0)

    def prefetch(self, s: int, l: int, e: int, now: float, step: int) -> None:
        """Prefetch expert (l, e) at server s, issued at `now` behind what its load path already has."""
        loaded, evicted = self.caches[s].prefetch((l, e), int(self.size[l]))
        self._forget(s, evicted)
        if loaded:
            self.prefetch_start[s, l, e] = self._load(s, l, e, now)
            self.prefetch_step[s, l, e] = step
            self.prefetches[s] += 1
            self.prefetch_bytes[s] += int(self.size[l])

    def _load(self, s: int, l: int, e: int, now: float) -> float:
        """Queue a load of (l, e) on s's load path; when it starts."""
        start = max(self.free[s], now)
        self.free[s] = self.ready[s, l, e] = start + self.load_s[s, l]
        self.held[s, l, e] = True
        self.load_seconds[s] += self.load_s[s, l]
        return start

    def _forget(self, s: int, evicted: list[tuple[int, int]]) -> None:
        for l, e in evicted:
            self.held[s, l, e] = False
            self.prefetch_start[s, l, e] = np.nan


def load_seconds_of(layer_bytes: np.ndarray, load_bandwidth: np.ndarray, load_latency: np.ndarray) -> np.ndarray:
    """seconds: [servers, layers] one load of an expert of each layer at each server: load_latency [servers] s +
    layer_bytes [layers] / load_bandwidth [servers] bytes/s; inf where the bandwidth is 0 (no slow tier)."""
    bw = np.asarray(load_bandwidth, np.float64)[:, None]
    with np.errstate(divide="ignore"):
        per_byte = np.where(bw > 0, 1.0 / bw, np.inf)
    return np.asarray(load_latency, np.float64)[:, None] + np.asarray(layer_bytes, np.float64)[None, :] * per_byte


def _group_counts(origin: np.ndarray, experts: np.ndarray, o_n: int, e_n: int) -> np.ndarray:
    """[origins, experts] activations of each origin's tokens (origin [n]) of each expert (experts [n, top_k])."""
    return np.bincount((origin[:, None] * e_n + experts).ravel(), minlength=o_n * e_n).reshape(o_n, e_n)


def _demand(tier: _Tier, serve: np.ndarray, n: np.ndarray, pinned: np.ndarray, l: int, now: float,
            step: int) -> np.ndarray:
    """[servers, experts] seconds after the layer start until each server has the weights it serves from
    (0 where pinned), after the ORDER RULE's lookups. serve, n: [origins, experts]; pinned: [servers, experts]."""
    go, ge = np.nonzero(n)
    gs = serve[go, ge]
    ready = np.zeros(pinned.shape)
    unpinned = ~pinned[gs, ge]
    e_n = pinned.shape[1]
    keys = np.unique(gs[unpinned] * e_n + ge[unpinned])  # by server, then expert id
    for s in np.unique(keys // e_n):
        for e in lookup_order(keys[keys // e_n == s] % e_n, tier.caches[s], l):
            ready[s, e] = tier.use(int(s), l, int(e), now, step)
    return ready


def _fifo_by_server(server: np.ndarray, release: np.ndarray, work: np.ndarray, s_n: int) -> np.ndarray:
    """[jobs] finish of each job (server, release, work: [jobs]) on its server's first-come-first-served queue."""
    order = np.argsort(server, kind="stable")
    srt = server[order]
    counts = np.bincount(server, minlength=s_n)
    slot = np.arange(len(server)) - (np.cumsum(counts) - counts)[srt]
    # Padding jobs (release 0, no work) delay nobody.
    rel, wrk = np.zeros((s_n, counts.max(initial=0))), np.zeros((s_n, counts.max(initial=0)))
    rel[srt, slot], wrk[srt, slot] = release[order], work[order]
    finish = np.empty(len(server))
    finish[order] = fifo_finish(rel, wrk, axis=1)[srt, slot]
    return finish


def _layer_time(origin: np.ndarray, experts: np.ndarray, n: np.ndarray, serve: np.ndarray, home: np.ndarray,
                ready: np.ndarray, costs: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(time [origins] seconds until each origin's last result is back, trips [origins, servers] tokens sent)
    of one (step, layer). origin: [tokens]; experts: [tokens, top_k]; n, serve: [origins, experts];
    ready: [servers, experts] seconds until the weights are there."""
    o_n, s_n = serve.shape[0], len(costs.flops)
    trips, arrive, back = messages(origin, serve[origin[:, None], experts], home, costs)
    go, ge = np.nonzero(n)  # groups, origin-major as the simulator queues origins
    gs = serve[go, ge]
    release = np.maximum(arrive[go, gs], ready[gs, ge])
    finish = _fifo_by_server(gs, release, n[go, ge] * (costs.expert_flops / costs.flops[gs]), s_n)
    time_ = np.zeros(o_n)
    np.maximum.at(time_, go, finish + back[go, gs])
    return time_, trips


def _prefetch(tier: _Tier, predictor: NextLayerPredictor, budget: int, home_of_token: np.ndarray,
              experts: np.ndarray, loads_next: np.ndarray, l: int, now: float, horizon: float, step: int,
              latency: np.ndarray | None) -> None:
    """Prefetch experts of layer l + 1 that the plan has some server load for its own tokens (`loads_next`:
    [servers, experts] bool, it neither pins it nor sends it to a pinned copy), at most `budget` per server.

    A server prefetches for its own tokens and, given `latency` ([servers, servers] s; the scheduler then
    sends tokens to whoever holds an expert), for those of every server whose round trip to it is shorter than
    that server's load. With p the chance that those tokens use the expert, the part of the load a server's
    path runs before `horizon` (when layer l + 1 starts; the path would idle then) is saved with probability
    p, and the part after it delays that layer's demand loads with probability 1 - p. Greedily, the server
    whose path frees first takes its most likely expert no one holds yet, while that pays.
    experts: [tokens, top_k] at layer l; home_of_token: [tokens] server."""
    s_n, e_n = loads_next.shape
    miss = np.zeros((s_n, e_n))  # log P(no token of home h that loads e uses it), [servers, experts]
    for h in np.unique(home_of_token):
        per_token = np.minimum(predictor.scores(experts[home_of_token == h], l), 1.0 - 1e-12)
        miss[h] = np.where(loads_next[h], np.log1p(-per_token).sum(axis=0), 0.0)
    near = np.eye(s_n, dtype=bool)  # [home, server]: the home's tokens would come to the server
    if latency is not None:
        near |= 2 * latency < tier.load_s[:, l + 1, None]
    used = -np.expm1(near.T.astype(np.float64) @ miss)  # [servers, experts] P(the batch uses e there)
    # a copy helps where the tokens can reach it: anywhere the scheduler sends them, else only at the server
    held = tier.held[:, l + 1].any(axis=0) if latency is not None else np.zeros(e_n, bool)
    count = np.zeros(s_n, np.int64)
    candidates = tier.stored[:, l + 1] & np.isfinite(tier.load_s[:, l + 1, None]) & (used > 0)
    while True:
        open_ = np.nonzero((count < budget) & candidates.any(axis=1))[0]
        if not len(open_):
            return
        s = int(open_[np.argmin(np.maximum(tier.free[open_], now))])
        choice = np.where(candidates[s] & ~held & ~tier.held[s, l + 1], used[s], -1.0)
        e = int(np.argmax(choice))
        p, load_s = choice[e], tier.load_s[s, l + 1]
        before = min(max(horizon - max(tier.free[s], now), 0.0), load_s)
        if p < 0 or p * before <= (1.0 - p) * (load_s - before):
            candidates[s] = False  # nothing left pays here: the path frees no earlier
            continue
        tier.prefetch(s, l + 1, e, now, step)
        held[e] = True
        count[s] += 1


def _check_inputs(w: Workload, hosted: np.ndarray, routing: np.ndarray, offload: Offload, costs: CostModel,
                  layer_bytes: np.ndarray, load_bandwidth: np.ndarray, load_latency: np.ndarray,
                  predictor: NextLayerPredictor | None, prefetch: int) -> int:
    """PrismErrors naming what does not fit together; the prefetch budget."""
    s_n, l_n = len(costs.flops), w.experts.shape[1]
    e_n = hosted.shape[2] if hosted.ndim == 3 else 0
    shapes = [("hosted", "hosted", hosted.shape, (s_n, l_n, e_n)),
              ("routing", "routing", routing.shape, (len(w.origins), l_n, e_n)),
              ("offload", "offload.stored", offload.stored.shape, (s_n, l_n, e_n)),
              ("offload", "offload.cache_bytes", offload.cache_bytes.shape, (s_n,)),
              ("layer_bytes", "layer_bytes", np.shape(layer_bytes), (l_n,)),
              ("load_bandwidth", "load_bandwidth", np.shape(load_bandwidth), (s_n,)),
              ("load_latency", "load_latency", np.shape(load_latency), (s_n,))]
    for name, label, got, want in shapes:
        if tuple(got) != want:
            raise PrismError(f"`{label}` has shape {list(got)}, expected {list(want)} ({s_n} servers, {l_n} MoE "
                             f"layers, {e_n} experts); pass arrays of the plan the workload was made for",
                             parameters=(name,))
    budget = integer(prefetch, "`prefetch`", low=0, high=e_n, fix="give how many experts each server prefetches "
                     "per layer", parameters=("prefetch",))
    if budget and predictor is None:
        raise PrismError("`prefetch` needs a `predictor` (NextLayerPredictor.from_tables)",
                         parameters=("predictor",))
    if budget and predictor.cond.shape != (l_n - 1, e_n, e_n):
        raise PrismError(f"the predictor covers {predictor.cond.shape[0] + 1} layers of {predictor.num_experts} "
                         f"experts, the plan {l_n} of {e_n}; build it from tables of the plan's model",
                         parameters=("predictor",))
    return budget


def replay_offload(w: Workload, hosted: np.ndarray, routing: np.ndarray, offload: Offload, costs: CostModel,
                   layer_bytes: np.ndarray, load_bandwidth: np.ndarray, load_latency: np.ndarray, *,
                   schedule: bool = False, predictor: NextLayerPredictor | None = None, prefetch: int = 0,
                   servers: tuple[str, ...] = (), deadline: "Deadline | None" = None,
                   quiet: bool = True) -> OffloadReplay:
    """Replay workload `w` step by step and layer by layer through an offload tier (module docstring).

    hosted: [servers, layers, experts] bool pinned experts; routing: [origins, layers, experts] serving server
    (the fallback when `schedule`); offload: cache sizes, slow-tier contents and policy; layer_bytes: [layers]
    bytes of one expert; load_bandwidth: [servers] bytes/s (0: no slow tier); load_latency: [servers] s;
    schedule: pick servers at run time with `schedule_groups`; predictor, prefetch: experts each server
    prefetches per layer (0: none); servers: names for the summary (default their indices); deadline: checked
    at every step, a PrismError when it has passed (a replay cut short would misstate every figure).
    """
    start = time.perf_counter()
    hosted, routing = np.asarray(hosted, bool), np.asarray(routing, np.int64)
    budget = _check_inputs(w, hosted, routing, offload, costs, layer_bytes, load_bandwidth, load_latency,
                           predictor, prefetch)
    s_n, (o_n, l_n, e_n) = len(costs.flops), routing.shape
    load_s = load_seconds_of(layer_bytes, load_bandwidth, load_latency)
    tier = _Tier(offload, load_s, np.asarray(layer_bytes, np.int64))
    step_time, layer_seconds, link = np.zeros((w.num_steps, o_n)), np.zeros(l_n), np.zeros((s_n, s_n))
    home_loads = np.zeros(hosted.shape, bool)  # [servers, layers, experts]: loaded for the server's own origins
    for o, h in enumerate(w.home):
        home_loads[h] |= (routing[o] == h) & ~hosted[h]
    order = np.argsort(w.step, kind="stable")
    bounds = np.searchsorted(w.step[order], np.arange(w.num_steps + 1))
    now = 0.0
    for t in track(range(w.num_steps), "replaying steps", total=w.num_steps, quiet=quiet):
        if deadline is not None and deadline.expired():
            raise PrismError(f"the offload replay ran out of time after {t} of {w.num_steps} steps; give it more "
                             f"time or a shorter trace", parameters=("deadline",))
        tokens = order[bounds[t]:bounds[t + 1]]
        origin = w.origin[tokens]
        for l in range(l_n):
            experts = w.experts[tokens, l]
            n = _group_counts(origin, experts, o_n, e_n)
            serve = schedule_groups(n, w.home, hosted[:, l], tier.held[:, l], offload.stored[:, l], load_s[:, l],
                                    routing[:, l], latency=costs.latency, bandwidth=costs.bandwidth,
                                    token_bytes=costs.token_bytes, act_seconds=costs.expert_flops / costs.flops,
                                    backlog=np.maximum(tier.free - now, 0.0),
                                    wait=np.maximum(tier.ready[:, l] - now, 0.0)) \
                if schedule else routing[:, l]
            ready = _demand(tier, serve, n, hosted[:, l], l, now, t)
            layer_time, trips = _layer_time(origin, experts, n, serve, w.home, ready, costs)
            if budget and l + 1 < l_n:
                # The cost model's end of this layer, known once its gate has routed the tokens (in a real
                # run an estimate: the same model the scheduler prices with).
                horizon = now + float(layer_time.max(initial=0.0))
                _prefetch(tier, predictor, budget, w.home[origin], experts, home_loads[:, l + 1], l, now, horizon,
                          t, costs.latency if schedule else None)
            step_time[t] += layer_time
            layer_seconds[l] += float((w.pairs[t] * layer_time).sum()) / max(w.num_requests, 1)
            sent = trips * costs.token_bytes  # [origins, servers]
            np.add.at(link, w.home, sent)
            np.add.at(link.T, w.home, sent)  # results come back the same way
            now += float(layer_time.max(initial=0.0))
    ttft, tpot = request_times(w, step_time)
    caches = tier.caches
    return OffloadReplay(
        tuple(servers) or tuple(str(s) for s in range(s_n)), w.origins, w.request_origin, w.request_id,
        w.request_tokens, ttft, tpot, layer_seconds, link,
        np.array([c.bytes_loaded for c in caches], np.int64), np.array([c.hits for c in caches], np.int64),
        np.array([c.misses for c in caches], np.int64), tier.prefetches, tier.prefetch_bytes, tier.used,
        tier.reach, tier.load_seconds, tier.hidden, w.num_tokens, time.perf_counter() - start)
