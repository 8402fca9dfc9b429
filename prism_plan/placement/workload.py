"""A trace cut into batch steps (`Workload`), what moving and computing tokens costs (`CostModel`), and the
queueing and per-request sums every replay shares (the plain simulator and the offload replay)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.model import ModelSpec


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


def messages(cell: np.ndarray, serve: np.ndarray, home: np.ndarray, costs: CostModel) -> tuple[np.ndarray, ...]:
    """(trips, arrive, back): [cells, servers] the tokens each cell (a batch of one origin) sends to each other
    server, once however many of a token's experts sit there, and the seconds its message there and its
    results' message back take (latency + trips * token_bytes / bandwidth; 0 where it sends nothing).
    cell: [tokens] cell index; serve: [tokens, top_k] server of each activation; home: [cells] server."""
    s_n = len(costs.flops)
    tok = np.arange(len(cell))
    need = np.zeros((len(cell), s_n), bool)
    need[tok[:, None], serve] = True
    need[tok, home[cell]] = False
    trips = np.bincount((cell[:, None] * s_n + np.arange(s_n)).ravel(), weights=need.ravel(),
                        minlength=len(home) * s_n).reshape(len(home), s_n)
    sent = trips > 0
    arrive = np.where(sent, costs.latency[home] + trips * costs.token_bytes / costs.bandwidth[home], 0.0)
    back = np.where(sent, costs.latency.T[home] + trips * costs.token_bytes / costs.bandwidth.T[home], 0.0)
    return trips, arrive, back


def request_times(w: Workload, step_time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ttft, tpot): [requests] seconds from step_time [steps, origins]: a request's time to first token is the
    time of its prefill step, its time per output token the mean over its decode steps (nan without any)."""
    per_pair = step_time[w.pair_step, w.pair_origin]
    r_n = w.num_requests
    ttft = np.bincount(w.pair_request, weights=np.where(w.pair_decode, 0.0, per_pair), minlength=r_n)
    n_dec = np.bincount(w.pair_request, weights=w.pair_decode.astype(float), minlength=r_n)
    dec_sum = np.bincount(w.pair_request, weights=np.where(w.pair_decode, per_pair, 0.0), minlength=r_n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ttft, np.where(n_dec > 0, dec_sum / n_dec, np.nan)


@dataclass
class RequestTimes:
    """What every replay measures per request: servers and origins (names), and per request [requests] its
    origin (index), id, tokens, ttft (s) and tpot (s; nan without decode steps)."""

    servers: tuple[str, ...]
    origins: tuple[str, ...]
    request_origin: np.ndarray
    request_id: np.ndarray
    request_tokens: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray

    def request_records(self) -> list[dict]:
        """Per request, plain data for JSON: origin name, request, tokens, ttft_s and tpot_s (None: no decode)."""
        return [{"origin": self.origins[o], "request": int(r), "tokens": int(n), "ttft_s": float(a),
                 "tpot_s": None if np.isnan(b) else float(b)}
                for o, r, n, a, b in zip(self.request_origin, self.request_id, self.request_tokens, self.ttft,
                                         self.tpot)]


def pair_records(servers: tuple[str, ...], matrix: np.ndarray) -> dict:
    """{"a->b": matrix[a, b]} for every ordered pair of distinct servers. matrix: [servers, servers]."""
    return {f"{a}->{b}": float(matrix[i, j]) for i, a in enumerate(servers) for j, b in enumerate(servers) if i != j}
