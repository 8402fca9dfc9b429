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
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.offload_replay import OffloadReplay, replay_offload
from prism_plan.placement.plan import Plan
from prism_plan.placement.workload import (CostModel, RequestTimes, Workload, check_concurrency,  # noqa: F401
                                           fifo_finish, messages, pair_records, prepare_workload, request_times)
from prism_plan.progress import track
from prism_plan.traces.prefetch import NextLayerPredictor
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import Trace


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


def replay_layer(w: Workload, serve: np.ndarray, costs: CostModel) -> LayerReplay:
    """Time one MoE layer. serve: [tokens, top_k] server index of each activation."""
    t_n, o_n, s_n = w.num_steps, len(w.origins), len(costs.flops)
    cell = w.step * o_n + w.origin  # [tokens] index of the (step, origin) the token belongs to
    act = np.bincount((cell[:, None] * s_n + serve).ravel(), minlength=t_n * o_n * s_n).reshape(t_n, o_n, s_n)
    trips, arrive, back = (a.reshape(t_n, o_n, s_n) for a in messages(cell, serve, np.tile(w.home, t_n), costs))
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
class SimulationResult(RequestTimes):
    """What a replay measured.

    requests: per request (origin, request id, tokens, ttft_s, tpot_s (nan without decode steps));
    server_activations, server_busy_s: [servers]; link_bytes: [servers, servers] bytes sent from row to
    column; layer_seconds: [layers] mean request latency spent in each layer; memory_bytes: [servers].
    """

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
            "requests": self.request_records(),
            "server": {s: {"activations": float(a), "busy_s": float(b), "memory_bytes": int(m)}
                       for s, a, b, m in zip(self.servers, self.server_activations, self.server_busy,
                                             self.memory_bytes)},
            "link_bytes": pair_records(self.servers, self.link_bytes),
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
             concurrency: int = 1, schedule: bool = False, prefetch: int = 0,
             prefetch_tables: ActivationTables | str | Path | None = None,
             quiet: bool = True) -> SimulationResult | OffloadReplay:
    """Replay `trace` through `plan` on `cluster` (each an object or its file), `concurrency` requests per
    origin batched in one step.

    A plan with an offload tier replays through its caches and slow tiers (`replay_offload`, an OffloadReplay
    back): schedule: pick each group's server at run time from the cache state (Sirius' rule); prefetch:
    experts each server loads ahead per layer, predicted from the transitions of `prefetch_tables` (the tables
    the plan was made from)."""
    start = time.perf_counter()
    concurrency = check_concurrency(concurrency)
    plan, trace, cluster = loaded(plan, Plan), loaded(trace, Trace), loaded(cluster, ClusterSpec)
    prefetch_tables = loaded(prefetch_tables, ActivationTables)
    plan.check_cluster(cluster)
    plan.model.check_same_shape(trace.meta, "the trace", "replay a `trace` of the plan's model", ("trace",))
    if plan.offload is None and (schedule or prefetch):
        raise PrismError("`schedule` and `prefetch` act on experts loaded from slow tiers, and this plan pins every "
                         "expert: replay it without them, or plan for a cluster with `load_gbps`",
                         parameters=("schedule", "prefetch"))
    if prefetch and prefetch_tables is None:
        raise PrismError("`prefetch` predicts from cross-layer transitions: pass `prefetch_tables`, the tables the "
                         "plan was made from", parameters=("prefetch_tables",))
    w = prepare_workload(trace, plan.origins, cluster.homes(list(plan.origins)), concurrency)
    costs = CostModel.of(cluster, plan.model)
    if plan.offload is not None:
        if prefetch_tables is not None and (tuple(prefetch_tables.layers), prefetch_tables.num_experts) != \
                (tuple(plan.model.layers), plan.model.num_experts):
            raise PrismError(f"the prefetch tables are for layers {list(prefetch_tables.layers)[:4]}... x "
                             f"{prefetch_tables.num_experts} experts, the plan's model {plan.model.name!r} has "
                             f"{list(plan.model.layers)[:4]}... x {plan.model.num_experts}: pass the tables the plan "
                             f"was made from", parameters=("prefetch_tables",))
        predictor = NextLayerPredictor.from_tables(prefetch_tables) if prefetch else None
        return replay_offload(w, plan.hosted, plan.routing, plan.offload, costs, plan.model.layer_bytes,
                              cluster.load_bandwidth, cluster.load_latency, schedule=schedule, predictor=predictor,
                              prefetch=prefetch, servers=tuple(plan.servers), quiet=quiet)
    step_time, layer_seconds, link, acts, busy, local = replay(w, plan.routing, costs, quiet)
    ttft, tpot = request_times(w, step_time)
    return SimulationResult(tuple(plan.servers), tuple(plan.origins), w.request_origin, w.request_id,
                            w.request_tokens, ttft, tpot, acts, busy, link, layer_seconds, plan.memory_bytes(),
                            local, w.num_tokens, w.num_tokens * w.experts.shape[1], time.perf_counter() - start)
