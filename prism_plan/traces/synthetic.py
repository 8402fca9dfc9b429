"""Synthetic routing of a model's shape, skewed and origin-dependent, for studies at scales no bundled trace has
(DeepSeek-V3 over 64 GPUs, one data-parallel rank per origin).

Each request has a topic; each topic ranks the experts of every layer in its own random order and routes with
Zipf-like popularity over that order (exponent `skew`), so experts of one topic are co-activated and a token's
experts in consecutive layers are correlated. Each origin draws its requests' topics mostly from its own few
(`affinity`), the rest evenly, so demand depends on the origin as it does between data-parallel ranks serving
different users.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer, number
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.trace import Trace, TraceMeta

# Tokens routed per step: the Gumbel scores of a step are [tokens, layers, experts] floats.
_CHUNK = 512


def synthetic_trace(model: ModelSpec, origins: Sequence[str], tokens_per_origin: int, *, skew: float = 1.0,
                    affinity: float = 0.7, topics: int | None = None, request_tokens: int = 128,
                    seed: int = 0) -> Trace:
    """A prefill trace of `tokens_per_origin` tokens for each origin, in requests of `request_tokens`.

    skew: Zipf exponent of expert popularity within a topic (0: uniform); affinity: share of an origin's requests
    on its own topics (0: every origin alike); topics: default twice the origins, each origin owning two."""
    return synthetic_windows(model, origins, tokens_per_origin, 1, skew=skew, affinity=affinity, topics=topics,
                             request_tokens=request_tokens, seed=seed)[0]


def synthetic_windows(model: ModelSpec, origins: Sequence[str], tokens_per_origin: int, windows: int, *,
                      shift: float = 1.0, skew: float = 1.0, affinity: float = 0.7, topics: int | None = None,
                      request_tokens: int = 128, seed: int = 0) -> list[Trace]:
    """`windows` traces of drifting traffic, as `synthetic_trace` makes one: the topics stay, and each origin's
    preference moves linearly from its own topics to `shift` of the way to the next origin's by the last
    window (1: wholly the next origin's). Request ids run on across windows."""
    origins = tuple(origins)
    if not origins or len(set(origins)) != len(origins):
        raise PrismError("`origins` must name at least one origin, each once", parameters=("origins",))
    tokens_per_origin = integer(tokens_per_origin, "`tokens_per_origin`", low=1, parameters=("tokens_per_origin",))
    windows = integer(windows, "`windows`", low=1, parameters=("windows",))
    request_tokens = integer(request_tokens, "`request_tokens`", low=1, parameters=("request_tokens",))
    skew = number(skew, "`skew`", low=0.0, high=10.0, parameters=("skew",))
    affinity = number(affinity, "`affinity`", low=0.0, high=1.0, parameters=("affinity",))
    shift = number(shift, "`shift`", low=0.0, high=1.0, parameters=("shift",))
    topics = 2 * len(origins) if topics is None else integer(topics, "`topics`", low=1, parameters=("topics",))
    rank = np.argsort(np.random.default_rng(seed).random((topics, model.num_layers, model.num_experts)), axis=2)
    log_p = -skew * np.log1p(rank)  # [topics, layers, experts]: each topic's own order of the experts
    own = _topic_mix(len(origins), topics, affinity)
    meta = TraceMeta.for_model(model, source=f"synthetic (skew {skew}, affinity {affinity}, {topics} topics, "
                                             f"seed {seed})")
    out = []
    for w in range(windows):
        a = shift * w / (windows - 1) if windows > 1 else 0.0
        mix = (1 - a) * own + a * np.roll(own, -1, axis=0)
        rng = np.random.default_rng([seed, w])
        out.append(_route(meta, origins, tokens_per_origin, request_tokens, log_p, mix, rng,
                          first_request=w * -(-tokens_per_origin // request_tokens)))
    return out


def _topic_mix(n_origins: int, topics: int, affinity: float) -> np.ndarray:
    """[origins, topics] probabilities: topic t belongs to origin t mod origins and gets `affinity` of its
    requests (shared with the origin's other topics), the rest spread over all topics."""
    own = np.arange(topics) % n_origins
    mix = np.full((n_origins, topics), (1 - affinity) / topics)
    owned = np.bincount(own, minlength=n_origins)
    mix[own, np.arange(topics)] += affinity / owned[own]
    lonely = owned == 0  # more origins than topics: those without one of their own draw evenly
    mix[lonely] = 1.0 / topics
    return mix


def _route(meta: TraceMeta, origins: tuple[str, ...], tokens_per_origin: int, request_tokens: int,
           log_p: np.ndarray, mix: np.ndarray, rng: np.random.Generator, first_request: int) -> Trace:
    """One trace: each request's topic drawn from its origin's row of `mix`, each token's top-k per layer drawn
    without replacement from the topic's popularity (Gumbel top-k)."""
    topics, l_n, e_n = log_p.shape
    k = meta.top_k
    n_req = -(-tokens_per_origin // request_tokens)
    origin = np.repeat(np.arange(len(origins), dtype=np.int32), tokens_per_origin)
    within = np.tile(np.arange(tokens_per_origin), len(origins))
    request = (within // request_tokens).astype(np.int64)
    topic = np.stack([rng.choice(topics, n_req, p=m / m.sum()) for m in mix])[origin, request]
    experts = np.empty((len(origin), l_n, k), np.int16)
    for start in range(0, len(origin), _CHUNK):
        t = topic[start:start + _CHUNK]
        scores = log_p[t] + rng.gumbel(size=(len(t), l_n, e_n))
        experts[start:start + _CHUNK] = np.argpartition(-scores, k - 1, axis=2)[:, :, :k]
    return Trace(meta, origins, origin, request + first_request, (within % request_tokens).astype(np.int32),
                 np.zeros(len(origin), bool), experts)
