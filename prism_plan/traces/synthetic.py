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
    origins = tuple(origins)
    if not origins or len(set(origins)) != len(origins):
        raise PrismError("`origins` must name at least one origin, each once", parameters=("origins",))
    tokens_per_origin = integer(tokens_per_origin, "`tokens_per_origin`", low=1, parameters=("tokens_per_origin",))
    request_tokens = integer(request_tokens, "`request_tokens`", low=1, parameters=("request_tokens",))
    skew = number(skew, "`skew`", low=0.0, high=10.0, parameters=("skew",))
    affinity = number(affinity, "`affinity`", low=0.0, high=1.0, parameters=("affinity",))
    topics = 2 * len(origins) if topics is None else integer(topics, "`topics`", low=1, parameters=("topics",))
    rng = np.random.default_rng(seed)
    l_n, e_n, k = model.num_layers, model.num_experts, model.top_k
    rank = np.argsort(rng.random((topics, l_n, e_n)), axis=2)  # each topic's order of the experts per layer
    log_p = -skew * np.log1p(rank)  # [topics, layers, experts]
    own = np.arange(topics) % len(origins)  # topic t belongs to origin t mod origins
    mix = np.full((len(origins), topics), (1 - affinity) / topics)
    mix[own, np.arange(topics)] += affinity / np.bincount(own, minlength=len(origins))[own]
    n_req = -(-tokens_per_origin // request_tokens)
    origin = np.repeat(np.arange(len(origins), dtype=np.int32), tokens_per_origin)
    position = np.tile(np.arange(tokens_per_origin) % request_tokens, len(origins)).astype(np.int32)
    request = np.tile(np.arange(tokens_per_origin) // request_tokens, len(origins)).astype(np.int64)
    topic_of_request = np.stack([rng.choice(topics, n_req, p=m) for m in mix])  # [origins, requests]
    topic = topic_of_request[origin, request]
    experts = np.empty((len(origin), l_n, k), np.int16)
    for start in range(0, len(origin), _CHUNK):
        t = topic[start:start + _CHUNK]
        scores = log_p[t] + rng.gumbel(size=(len(t), l_n, e_n))  # Gumbel top-k: k draws without replacement
        experts[start:start + _CHUNK] = np.argpartition(-scores, k - 1, axis=2)[:, :, :k]
    meta = TraceMeta.for_model(model, source=f"synthetic (skew {skew}, affinity {affinity}, {topics} topics, "
                                             f"seed {seed})")
    return Trace(meta, origins, origin, request, position, np.zeros(len(origin), bool), experts)
