"""Next-layer expert prediction from cross-layer transition tables, for speculative prefetch.

While MoE layer i computes, the experts layer i + 1 will need are loaded ahead. The predictor holds
P(expert f at layer i + 1 | expert e at layer i) from the tables' transition counts, pulled a little toward the
layer i + 1 marginal so that experts never seen after e stay possible. A batch (a prefill batch) loads an expert
once per layer, so batch prediction ranks experts by the scores summed over the batch's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import Trace


@dataclass(frozen=True)
class NextLayerPredictor:
    """cond: [layers - 1, experts, experts] float64, row e of layer i = P(f at layer i + 1 | e at layer i), rows
    summing to 1; marginal: [layers, experts] float64, each layer's share of activations; top_k: experts per token."""

    cond: np.ndarray
    marginal: np.ndarray
    top_k: int

    @classmethod
    def from_tables(cls, tables: ActivationTables, *, smoothing: float = 1.0) -> "NextLayerPredictor":
        """Predictor from `tables.trans`; smoothing: pseudo-tokens (> 0) of the layer i + 1 marginal added to
        every row, so a row never observed falls back to the marginal."""
        if tables.trans is None:
            raise PrismError("tables have no cross-layer transitions; build the tables with pairs "
                             "(build_tables(..., pairs=True) or `prism-plan profile tables` without --no-pairs)",
                             parameters=("tables",))
        if not np.isfinite(smoothing) or smoothing <= 0:
            raise PrismError(f"smoothing must be a positive number of pseudo-tokens, got {smoothing}",
                             parameters=("smoothing",))
        marginal = _marginal(tables)
        top_k = tables.top_k or 1
        # trans rows count top_k next-layer activations per token: divide by top_k to get tokens per row
        rows = tables.trans / top_k
        cond = (rows + smoothing * marginal[1:, None, :]) / (rows.sum(axis=2, keepdims=True) + smoothing)
        return cls(cond, marginal, top_k)

    def frequency_only(self) -> "NextLayerPredictor":
        """The baseline that ignores the current experts: every row is the next layer's marginal."""
        cond = np.broadcast_to(self.marginal[1:, None, :], self.cond.shape)
        return NextLayerPredictor(cond, self.marginal, self.top_k)

    @property
    def num_experts(self) -> int:
        return self.cond.shape[2]

    def scores(self, experts_at_layer: np.ndarray, layer: int) -> np.ndarray:
        """[tokens, experts] expected activations at MoE layer index layer + 1 (0-based, into the tables' layers)
        of tokens routed to experts_at_layer [tokens, top_k] at `layer`: the mean of the conditionals of the
        token's current experts, times top_k."""
        experts = self._checked(experts_at_layer, layer)
        return self.cond[layer][experts].mean(axis=1) * self.top_k

    def predict(self, experts_at_layer: np.ndarray, layer: int, *, budget: int) -> np.ndarray:
        """[tokens, budget] int64, each token's `budget` most likely experts at layer + 1, most likely first."""
        return _top(self.scores(experts_at_layer, layer), self._budget(budget))

    def predict_batch(self, experts_at_layer: np.ndarray, layer: int, *, budget: int) -> np.ndarray:
        """[budget] int64, the experts to load once for a whole batch ([tokens, top_k] at `layer`): the top
        `budget` of the scores summed over its tokens, i.e. of the expected tokens per expert at layer + 1."""
        return _top(self.scores(experts_at_layer, layer).sum(axis=0, keepdims=True), self._budget(budget))[0]

    def _budget(self, budget: int) -> int:
        if not 1 <= int(budget) <= self.num_experts:
            raise PrismError(f"budget must be 1..{self.num_experts} experts, got {budget}", parameters=("budget",))
        return int(budget)

    def _checked(self, experts_at_layer: np.ndarray, layer: int) -> np.ndarray:
        if not 0 <= layer < self.cond.shape[0]:
            raise PrismError(f"layer must be 0..{self.cond.shape[0] - 1} (a layer that has a next one), got {layer}",
                             parameters=("layer",))
        experts = np.asarray(experts_at_layer)
        if experts.ndim != 2 or experts.size and (experts.min() < 0 or experts.max() >= self.num_experts):
            raise PrismError(f"experts_at_layer must be [tokens, top_k] expert ids in 0..{self.num_experts - 1}",
                             parameters=("experts_at_layer",))
        return experts.astype(np.int64)


def _marginal(tables: ActivationTables) -> np.ndarray:
    """[layers, experts] share of each layer's activations, summed over origins (every layer has some, as the
    tables have tokens and each token activates experts in every layer)."""
    act = tables.freq.sum(axis=0)
    return act / act.sum(axis=1, keepdims=True)


def _top(scores: np.ndarray, m: int) -> np.ndarray:
    """[rows, m] column indices of each row's m largest scores, largest first (ties to the lower index)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :m]


def _one_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[rows, experts] bool, True at the ids of each row (ids: [rows, n])."""
    out = np.zeros((len(ids), num_experts), bool)
    out[np.arange(len(ids))[:, None], ids] = True
    return out


def batch_ids(trace: Trace, batch_tokens: int | None = None) -> np.ndarray:
    """[tokens] int64 batch number of each token: one batch per request (origin, request), or, with
    batch_tokens, runs of that many consecutive tokens of a request in trace order."""
    pairs = np.stack([trace.origin.astype(np.int64), trace.request.astype(np.int64)], axis=1)
    _, req = np.unique(pairs, axis=0, return_inverse=True)
    req = req.ravel()
    if batch_tokens is None:
        return req
    if int(batch_tokens) < 1:
        raise PrismError(f"batch_tokens must be a positive token count, got {batch_tokens}",
                         parameters=("batch_tokens",))
    order = np.argsort(req, kind="stable")
    starts = np.searchsorted(req[order], req[order])  # first sorted slot of each token's request
    rank = np.empty(len(req), np.int64)
    rank[order] = np.arange(len(req)) - starts
    _, chunk = np.unique(np.stack([req, rank // int(batch_tokens)], axis=1), axis=0, return_inverse=True)
    return chunk.ravel()


def _counts(predicted: np.ndarray, used: np.ndarray) -> np.ndarray:
    """[hits, predicted, used] of bool [rows, experts] predictions against use."""
    return np.array([(predicted & used).sum(), predicted.sum(), used.sum()], np.int64)


def _layer_counts(predictor: NextLayerPredictor, trace: Trace, layer: int, budget: int,
                  order: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-token, per-batch) [hits, predicted, used] for the prediction of layer + 1 from layer."""
    e = predictor.num_experts
    scores = predictor.scores(trace.experts[:, layer], layer)
    used = _one_hot(trace.experts[:, layer + 1].astype(np.int64), e)
    token = _counts(_one_hot(_top(scores, budget), e), used)
    batch_scores = np.add.reduceat(scores[order], starts, axis=0)
    batch_used = np.logical_or.reduceat(used[order], starts, axis=0)
    batch = _counts(_one_hot(_top(batch_scores, budget), e), batch_used)
    return token, batch


def _accuracy(predictor: NextLayerPredictor, trace: Trace, budget: int, groups: np.ndarray) -> dict:
    """Precision and recall, per token and per batch, summed over layers 0..L-2."""
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
    token, batch = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for layer in range(predictor.cond.shape[0]):  # a loop over layers, not tokens
        t, b = _layer_counts(predictor, trace, layer, budget, order, starts)
        token += t
        batch += b
    return {"token_precision": float(token[0] / token[1]), "token_recall": float(token[0] / token[2]),
            "batch_precision": float(batch[0] / batch[1]), "batch_recall": float(batch[0] / batch[2])}


def prefetch_accuracy(predictor: NextLayerPredictor, trace: Trace, *, budget: int,
                      batch_tokens: int | None = None) -> dict:
    """Precision (predicted experts used at the next layer / predicted) and recall (used experts that were
    predicted / used) of `predictor` on `trace` (held-out tokens), summed over layer pairs (i, i + 1).

    Per token: the token's top `budget` experts. Per batch (each request, or runs of batch_tokens consecutive
    tokens of a request): the top `budget` of the batch's summed scores against the union of the experts its
    tokens use. Returns {budget, tokens, batches, token_precision, token_recall, batch_precision, batch_recall,
    frequency: the same four for the frequency-only baseline of the same tables}.
    """
    budget = predictor._budget(budget)
    if trace.num_tokens == 0:
        raise PrismError("trace holds no tokens to judge the predictor on", parameters=("trace",))
    if trace.experts.shape[1:] != (predictor.cond.shape[0] + 1, predictor.top_k) or \
            trace.meta.num_experts != predictor.num_experts:
        raise PrismError(f"trace has {trace.experts.shape[1]} layers x top-{trace.experts.shape[2]} of "
                         f"{trace.meta.num_experts} experts, the predictor's tables "
                         f"{predictor.cond.shape[0] + 1} x top-{predictor.top_k} of {predictor.num_experts}; "
                         f"give a trace of the same model", parameters=("trace",))
    groups = batch_ids(trace, batch_tokens)
    return {"budget": budget, "tokens": trace.num_tokens, "batches": int(groups.max()) + 1,
            **_accuracy(predictor, trace, budget, groups),
            "frequency": _accuracy(predictor.frequency_only(), trace, budget, groups)}
