"""Plan metrics from activation tables: locality, remote traffic, memory."""

from __future__ import annotations

import numpy as np


def route(hosted: np.ndarray, homes: np.ndarray, hop_seconds: np.ndarray) -> np.ndarray:
    """[origins, layers, experts] int: the server that serves each origin's activations of each expert:
    the origin's own server when it hosts the expert, else the hosting server cheapest to reach.

    hosted: [servers, layers, experts] bool; homes: [origins] server index; hop_seconds: [servers, servers].
    """
    cost = hop_seconds[homes][:, :, None, None]  # [origins, servers, 1, 1]
    return np.argmin(np.where(hosted[None], cost, np.inf), axis=1)


def memory_used(hosted: np.ndarray, layer_bytes: np.ndarray) -> np.ndarray:
    """bytes: [servers] int64, memory the hosted experts take."""
    return (hosted.sum(axis=2) * layer_bytes[None, :]).sum(axis=1).astype(np.int64)


def coverage_metrics(freq: np.ndarray, tokens: np.ndarray, homes: np.ndarray, routing: np.ndarray,
                     hosted: np.ndarray, layer_bytes: np.ndarray, token_bytes: int) -> dict:
    """Locality metrics of a placement under the activations `freq`.

    freq: [origins, layers, experts] activations; tokens: [origins]; homes: [origins] server index;
    routing: [origins, layers, experts] serving server; token_bytes: one token's hidden state in bytes.
    Each remote activation sends the hidden state out and the expert output back (2 x token_bytes); tokens
    whose co-activated experts share a remote server share that trip in the simulator, not here.
    """
    local_mask = routing == homes[:, None, None]
    total = float(freq.sum())
    local = float((freq * local_mask).sum())
    remote = total - local
    per_origin = (freq * local_mask).sum(axis=(1, 2)) / np.maximum(freq.sum(axis=(1, 2)), 1e-300)
    n_tokens = int(tokens.sum())
    copies = hosted.sum(axis=0)
    return {
        "local_coverage": local / total if total else 1.0,
        "local_activations": local,
        "remote_activations": remote,
        "remote_bytes": remote * 2 * token_bytes,
        "remote_bytes_per_token": remote * 2 * token_bytes / n_tokens if n_tokens else 0.0,
        "tokens": n_tokens,
        "local_coverage_by_origin": per_origin.tolist(),
        "replicas": {"min": int(copies.min()), "max": int(copies.max()), "total": int(copies.sum())},
    }
