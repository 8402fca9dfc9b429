"""Trace-driven simulator: replay a routing trace through a plan on a cluster and time every MoE layer.

The model, per batch step and MoE layer:
- a step batches, for every origin, `concurrency` of its requests: their whole prompts (prefill), or one
  token each (the d-th decode step); all origins run their steps at the same time;
- an origin's activations of experts its server hosts run there; every other activation runs at the server
  the plan's routing names; a token travels to each remote server it needs in the layer once, however many of
  its experts sit there (co-activated experts share the trip), and its result comes back the same way;
- a message of n tokens from server a to b takes latency[a, b] + n * token_bytes / bandwidth[a, b];
- each server computes its activations (expert_flops / FLOP/s each) first come, first served, in order of
  arrival: local work at time 0, each origin's remote batch when it lands (queueing between origins);
- an origin's layer time is when its last result is back; a request's time to first token is the sum of its
  prefill step's layer times, its time per output token the mean over its decode steps.
Shared experts, attention and everything outside the routed experts are left out: the simulator measures
what placement changes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import loaded, write_text_atomic
from prism_plan.placement.checks import integer
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan
from prism_plan.progress import track
from prism_plan.traces.trace import Trace


@dataclass(frozen=True)
class CostModel:
    """What moving and computing tokens costs.

    latency: [servers, servers] seconds per message; bandwidth: [servers, servers] bytes/s (inf on the diagonal);
    flops: [servers] FLOP/s of expert compute; token_bytes: one hidden state (bytes); expert_flops: FLOPs of
    one token in one expert.
    """

    latency: np.ndarray
    bandwidth: np.ndarray
    flops: np.ndarray
    token_bytes: int
    expert_flops: int

    @classmethod
    def of(cls, cluster: ClusterSpec, model: ModelSpec) -> "CostModel":
        return cls(cluster.latency, cluster.bandwidth, cluster.flops, model.token_bytes, model.expert_flops)


@dataclass(frozen=True)
class Workload:
    """A trace cut into batch steps, ready for replay.

    origin: [tokens] int, index into `origins`; home: [origins] server index; step: [tokens] batch step;
    experts: [tokens, layers, top_k] int; pair_step, pair_origin, pair_decode, pair_request: one entry per
    (request, step) the request takes part in; pairs: [steps, origins] float, how many requests of each origin
    take part in each step (the weights of the mean request latency).
    """

    origins: tuple[str, ...]
    home: np.ndarray
    origin: np.ndarray
    step: np.ndarray
    experts: np.ndarray
    num_steps: int
    num_requests: int
    request_origin: np.ndarray
    request_id: np.ndarray
    request_tokens: np.ndarray
    pair_step: np.ndarray
    pair_origin: np.ndarray
    pair_decode: np.ndarray
    pair_request: np.ndarray
    pairs: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.origin)


def check_concurrency(concurrency: int) -> int:
    """`concurrency`, once it is an integer of at least 1 (a PrismError naming it otherwise)."""
    return integer(concurrency, "`concurrency`", low=1, fix="batch at least one request per origin and step",
                   parameters=("concurrency",))


def prepare_workload(trace, origins: tuple[str, ...], home: np.ndarray, concurrency: int = 1) -> Workload:
    """Cut `trace` (a Trace with tokens) into batch steps: each origin runs its requests in id order,
    `concurrency` (checked by `check_concurrency`) at a time; prefill is one step, each decode token one more.
    origins/home: the origin names routing is indexed by and their servers."""
    if not trace.num_tokens:  # every figure of the replay would be 0 / 0
        raise PrismError("the trace holds no tokens, so there is nothing to replay; pass a `trace` with tokens",
                         parameters=("trace",))
    index = {o: i for i, o in enumerate(origins)}
    missing = [o for o in trace.origins if o not in index]
    if missing:
        raise PrismError(f"trace origin(s) {missing} are not in the plan (it routes {list(origins)}); solve "
                         f"with tables that include them")
    origin = np.array([index[o] for o in trace.origins], dtype=np.int64)[trace.origin]
    n = len(origin)
    # One id per request (origin, request), ranked by request id within its origin.
    req_keys = np.stack([origin, trace.request.astype(np.int64)], axis=1)
    uniq, req = np.unique(req_keys, axis=0, return_inverse=True) if n else (np.zeros((0, 2), np.int64),
                                                                             np.zeros(0, np.int64))
    req = req.reshape(-1)
    first_of_origin = np.searchsorted(uniq[:, 0], uniq[:, 0], side="left")
    rank = np.arange(len(uniq)) - first_of_origin
    round_of_req = rank // concurrency
    # Decode tokens of a request, in position order, are its decode steps 1, 2, ...
    order = np.lexsort((trace.position, req))
    dec = trace.decode[order].astype(np.int64)
    cum = np.cumsum(dec)
    starts = np.searchsorted(req[order], req[order], side="left")
    before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0)
    dindex = np.empty(n, np.int64)
    dindex[order] = np.where(dec == 1, cum - before, 0)
    key = round_of_req[req] * (int(dindex.max(initial=0)) + 1) + dindex
    steps, step = np.unique(key, return_inverse=True)
    step = step.reshape(-1)
    # (request, step) pairs: a request's prefill tokens share one step, each decode token has its own.
    pair_keys = np.unique(req * len(steps) + step)
    pair_request, pair_step = pair_keys // max(len(steps), 1), pair_keys % max(len(steps), 1)
    decode_of_step = np.zeros(len(steps), bool)
    decode_of_step[step] = dindex > 0
    pair_origin = uniq[pair_request, 0] if n else np.zeros(0, np.int64)
    pairs = np.zeros((len(steps), len(origins)))
    np.add.at(pairs, (pair_step, pair_origin), 1.0)
    return Workload(tuple(origins), np.asarray(home, np.int64), origin, step,
                    trace.experts.astype(np.int64), len(steps), len(uniq), uniq[:, 0], uniq[:, 1],
                    np.bincount(req, minlength=len(uniq)), pair_step, pair_origin, decode_of_step[pair_step],
                    pair_request, pairs)


@dataclass
class LayerReplay:
    """One MoE layer over every step.

    time: [steps, origins] seconds until the origin's last result is back (0 where it has no tokens);
    trips: [steps, origins, servers] tokens sent from the origin's server to each server;
    activations: [steps, origins, servers] activations served at each server; busy: [servers] seconds computing.
    """

    time: np.ndarray
    trips: np.ndarray
    activations: np.ndarray
    busy: np.ndarray


def fifo_finish(release: np.ndarray, work: np.ndarray, axis: int) -> np.ndarray:
    """Completion time of each job on one machine that serves jobs in release order, without idling while a
    job waits. release, work: same shape, seconds; jobs lie along `axis`."""
    order = np.argsort(release, axis=axis, kind="stable")
    r = np.take_along_axis(release, order, axis=axis)
    p = np.take_along_axis(work, order, axis=axis)
    done = np.cumsum(p, axis=axis)
    # The i-th job ends at max over j <= i of (r_j + work of jobs j..i).
    finish = np.maximum.accumulate(r - (done - p), axis=axis) + done
    out = np.empty_like(finish)
    np.put_along_axis(out, order, finish, axis=axis)
    return out


def replay_layer(w: Workload, serve: np.ndarray, costs: CostModel) -> LayerReplay:
    """Time one MoE layer. serve: [tokens, top_k] server index of each activation."""
    t_n, o_n, s_n = w.num_steps, len(w.origins), len(costs.flops)
    cell = w.step * o_n + w.origin  # [tokens] index of the (step, origin) the token belongs to
    act = np.bincount((cell[:, None] * s_n + serve).ravel(), minlength=t_n * o_n * s_n).reshape(t_n, o_n, s_n)
    need = np.zeros((len(cell), s_n), bool)
    need[np.arange(len(cell))[:, None], serve] = True
    need[np.arange(len(cell)), w.home[w.origin]] = False
    trips = np.bincount((cell[:, None] * s_n + np.arange(s_n)).ravel(), weights=need.ravel(),
                        minlength=t_n * o_n * s_n).reshape(t_n, o_n, s_n)
    home = w.home
    sent = trips > 0
    arrive = np.where(sent, costs.latency[home] + trips * costs.token_bytes / costs.bandwidth[home], 0.0)
    back = np.where(sent, costs.latency.T[home] + trips * costs.token_bytes / costs.bandwidth.T[home], 0.0)
    work = act * (costs.expert_flops / costs.flops)
    finish = fifo_finish(arrive, work, axis=1)
    time_ = np.where(act > 0, finish + back, 0.0).max(axis=2, initial=0.0)
    return LayerReplay(time_, trips, act, work.sum(axis=(0, 1)))


def layer_serve(w: Workload, routing: np.ndarray, l: int) -> np.ndarray:
    """[tokens, top_k] the server of each activation in layer index l. routing: [origins, layers, experts]."""
    return routing[w.origin[:, None], l, w.experts[:, l, :]]


def layer_objective(w: Workload, rep: LayerReplay) -> float:
    """This layer's share of the mean request latency (seconds): sum over steps of layer time, per request."""
    return float((w.pairs * rep.time).sum()) / max(w.num_requests, 1)


def layer_traffic(w: Workload, rep: LayerReplay, costs: CostModel) -> float:
    """This layer's network bytes per token: every trip out and back."""
    return 2 * costs.token_bytes * float(rep.trips.sum()) / max(w.num_tokens, 1)


@dataclass
class SimulationResult:
    """What a replay measured.

    requests: per request (origin, request id, tokens, ttft_s, tpot_s (nan without decode steps));
    server_activations, server_busy_s: [servers]; link_bytes: [servers, servers] bytes sent from row to
    column; layer_seconds: [layers] mean request latency spent in each layer; memory_bytes: [servers].
    """

    servers: tuple[str, ...]
    origins: tuple[str, ...]
    request_origin: np.ndarray
    request_id: np.ndarray
    request_tokens: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray
    server_activations: np.ndarray
    server_busy: np.ndarray
    link_bytes: np.ndarray
    layer_seconds: np.ndarray
    memory_bytes: np.ndarray
    local_activations: float
    tokens: int
    events: int
    seconds: float

    @property
    def simulated_ttft(self) -> float:
        """seconds: the `simulated_ttft` objective, the mean over requests of MoE time: the time to first token
        (`ttft_mean_s`), plus every decode step when the trace has them."""
        return float(self.layer_seconds.sum())

    def sending_seconds(self, cluster: ClusterSpec) -> np.ndarray:
        """seconds: [servers, servers] time each link spends sending its bytes at its bandwidth over the whole
        replay (per-message latency apart; 0 on the diagonal)."""
        off = ~np.eye(len(self.servers), dtype=bool)
        return np.where(off, self.link_bytes / cluster.bandwidth, 0.0)

    def summary(self) -> dict:
        """Headline numbers (seconds, bytes)."""
        tp = self.tpot[~np.isnan(self.tpot)]
        total_acts = float(self.server_activations.sum())
        return {
            "requests": int(len(self.ttft)), "tokens": self.tokens,
            "ttft_mean_s": float(self.ttft.mean()) if len(self.ttft) else 0.0,
            "ttft_p50_s": float(np.percentile(self.ttft, 50)) if len(self.ttft) else 0.0,
            "ttft_p99_s": float(np.percentile(self.ttft, 99)) if len(self.ttft) else 0.0,
            "tpot_mean_s": float(tp.mean()) if len(tp) else None,
            "simulated_ttft_s": self.simulated_ttft,
            "remote_bytes": float(self.link_bytes.sum()),
            "remote_bytes_per_token": float(self.link_bytes.sum()) / max(self.tokens, 1),
            "local_coverage": self.local_activations / total_acts if total_acts else 1.0,
            "events": self.events, "events_per_s": self.events / self.seconds if self.seconds else None,
        }

    def save(self, path: str | Path) -> None:
        """Write `to_dict()` as JSON atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    def to_dict(self) -> dict:
        """Everything, as plain data for JSON."""
        return {
            "summary": self.summary(), "servers": list(self.servers),
            "requests": [{"origin": self.origins[o], "request": int(r), "tokens": int(n), "ttft_s": float(a),
                          "tpot_s": None if np.isnan(b) else float(b)}
                         for o, r, n, a, b in zip(self.request_origin, self.request_id, self.request_tokens,
                                                  self.ttft, self.tpot)],
            "server": {s: {"activations": float(a), "busy_s": float(b), "memory_bytes": int(m)}
                       for s, a, b, m in zip(self.servers, self.server_activations, self.server_busy,
                                             self.memory_bytes)},
            "link_bytes": {f"{a}->{b}": float(self.link_bytes[i, j]) for i, a in enumerate(self.servers)
                           for j, b in enumerate(self.servers) if i != j},
            "layer_seconds": self.layer_seconds.tolist(),
        }


def replay(w: Workload, routing: np.ndarray, costs: CostModel, quiet: bool = True):
    """Replay every layer. routing: [origins, layers, experts] serving server.

    Returns (step_time [steps, origins] seconds summed over layers, layer_seconds [layers], link_bytes
    [servers, servers], server_activations [servers], server_busy [servers], local activations).
    """
    s_n = len(costs.flops)
    o_n, l_n = len(w.origins), w.experts.shape[1]
    step_time = np.zeros((w.num_steps, o_n))
    layer_seconds = np.zeros(l_n)
    link = np.zeros((s_n, s_n))
    acts, busy, local = np.zeros(s_n), np.zeros(s_n), 0.0
    for l in track(range(l_n), "simulating layers", total=l_n, quiet=quiet):
        rep = replay_layer(w, layer_serve(w, routing, l), costs)
        step_time += rep.time
        layer_seconds[l] = layer_objective(w, rep)
        per_origin = rep.trips.sum(axis=0) * costs.token_bytes  # [origins, servers]
        np.add.at(link, w.home, per_origin)
        np.add.at(link.T, w.home, per_origin)  # results come back the same way
        per_server = rep.activations.sum(axis=0)
        acts += per_server.sum(axis=0)
        local += float(per_server[np.arange(o_n), w.home].sum())
        busy += rep.busy
    return step_time, layer_seconds, link, acts, busy, local


def simulate(plan: Plan | str | Path, trace: Trace | str | Path, cluster: ClusterSpec | str | Path, *,
             concurrency: int = 1, quiet: bool = True) -> SimulationResult:
    """Replay `trace` through `plan` on `cluster` (each an object or its file), `concurrency` requests per
    origin batched in one step."""
    start = time.perf_counter()
    concurrency = check_concurrency(concurrency)
    plan, trace, cluster = loaded(plan, Plan), loaded(trace, Trace), loaded(cluster, ClusterSpec)
    plan.check_cluster(cluster)
    plan.model.check_same_shape(trace.meta, "the trace", "replay a `trace` of the plan's model", ("trace",))
    w = prepare_workload(trace, plan.origins, cluster.homes(list(plan.origins)), concurrency)
    costs = CostModel.of(cluster, plan.model)
    step_time, layer_seconds, link, acts, busy, local = replay(w, plan.routing, costs, quiet)
    per_pair = step_time[w.pair_step, w.pair_origin]
    r_n = w.num_requests
    ttft = np.bincount(w.pair_request, weights=np.where(w.pair_decode, 0.0, per_pair), minlength=r_n)
    n_dec = np.bincount(w.pair_request, weights=w.pair_decode.astype(float), minlength=r_n)
    dec_sum = np.bincount(w.pair_request, weights=np.where(w.pair_decode, per_pair, 0.0), minlength=r_n)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(n_dec > 0, dec_sum / n_dec, np.nan)
    return SimulationResult(tuple(plan.servers), tuple(plan.origins), w.request_origin, w.request_id,
                            w.request_tokens, ttft, tpot, acts, busy, link, layer_seconds, plan.memory_bytes(),
                            local, w.num_tokens, w.num_tokens * w.experts.shape[1], time.perf_counter() - start)
