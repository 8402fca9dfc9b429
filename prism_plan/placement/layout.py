"""What serving layouts are judged by: per-GPU load with an expert's tokens split over its copies as the serving
system splits them, balancedness and overload, and the token copies that cross nodes.

Dispatch `even` splits an expert's tokens evenly over its copies (SGLang's dynamic dispatch, EPLB's model);
`static` sends each origin's tokens of an expert to the one copy the routing names.
"""

from __future__ import annotations

import numpy as np

# Tokens per chunk when expected node visits are computed token by token: [chunk, layers, top_k, nodes] floats.
_CHUNK_CELLS = 2_000_000


def by_node(values: np.ndarray, node: np.ndarray) -> np.ndarray:
    """[nodes, ...] `values` ([servers, ...]) summed over each node's servers; node: [servers] node index."""
    member = np.zeros((int(node.max()) + 1, len(node)))
    member[node, np.arange(len(node))] = 1.0
    # A product with the membership matrix: np.add.at is unbuffered and ten times slower here.
    return (member @ values.reshape(len(node), -1).astype(float)).reshape((len(member),) + values.shape[1:])


def layout_violation(hosted: np.ndarray, slots_per_layer: int) -> tuple[int, int, int] | None:
    """(server, layer, experts it holds) of the first (server, layer) not holding exactly `slots_per_layer`
    experts, None when all do. hosted: [servers, layers, experts] bool."""
    count = hosted.sum(axis=2)
    bad = np.argwhere(count != slots_per_layer)
    if not len(bad):
        return None
    s, l = bad[0]
    return int(s), int(l), int(count[s, l])


def gpu_load(hosted: np.ndarray | None, weight: np.ndarray, routing: np.ndarray | None = None) -> np.ndarray:
    """activations: [servers, layers], what each server computes.

    hosted: [servers, layers, experts] bool (may be None with a routing over the home servers themselves);
    weight: [homes, layers, experts] activations arriving at each home server; routing: [homes, layers, experts]
    the serving server of each (static dispatch), None to split every expert's activations evenly over its
    copies."""
    s, l = (weight.shape[:2] if hosted is None else hosted.shape[:2])
    if routing is None:
        copies = np.maximum(hosted.sum(axis=0), 1)
        return (hosted * (weight.sum(axis=0) / copies)[None]).sum(axis=2)
    load = np.zeros((s, l))
    np.add.at(load, (routing, np.broadcast_to(np.arange(l)[None, :, None], routing.shape)), weight)
    return load


def balance_metrics(load: np.ndarray, speed: np.ndarray | None = None) -> dict:
    """`balancedness` (mean over layers of ideal / busiest server time) and `overload` (mean over layers of
    (busiest - ideal) / ideal), where a server's time is its load / speed and the ideal is the layer's load
    spread over all servers in proportion to their speed; with equal speeds these are EPLB's mean / max and
    (max - mean) / mean. Layers without load count as balanced.

    load: [servers, layers] activations; speed: [servers] relative throughput (default equal)."""
    speed = np.ones(load.shape[0]) if speed is None else np.asarray(speed, float) / np.mean(speed)
    busiest = (load / speed[:, None]).max(axis=0)
    ideal = load.sum(axis=0) / speed.sum()
    used = busiest > 0
    ratio = np.where(used, ideal / np.where(used, busiest, 1.0), 1.0)
    return {"balancedness": float(ratio.mean()), "overload": float(np.mean(1.0 / ratio - 1.0))}


def node_visits(experts: np.ndarray, home: np.ndarray, hosted: np.ndarray, node: np.ndarray,
                routing: np.ndarray | None = None, cost: np.ndarray | None = None) -> float:
    """Expected token copies sent to other nodes per token, summed over layers (`layer_node_visits`)."""
    return float(layer_node_visits(experts, home, hosted, node, routing, cost).sum())


def layer_node_visits(experts: np.ndarray, home: np.ndarray, hosted: np.ndarray, node: np.ndarray,
                      routing: np.ndarray | None = None, cost: np.ndarray | None = None) -> np.ndarray:
    """[layers]: expected token copies sent to other nodes per token in each layer: a token goes once to every
    node other than its home's that serves one of its experts in a layer (co-activated experts on one node share
    the trip, as DeepEP's dispatch forwards within a node).

    experts: [tokens, layers, top_k] expert ids; home: [tokens] home server; hosted: [servers, layers, experts];
    node: [servers] node index; routing: [servers, layers, experts] serving server per home server (static
    dispatch), None for even dispatch (each expert's copy drawn evenly: a node is visited unless no expert of the
    token is drawn there); cost: [servers, nodes] what a visit from a home server to a node costs (default 1: a
    count)."""
    tokens, layers, k = experts.shape
    if not tokens:
        return np.zeros(layers)
    n_nodes = int(node.max()) + 1
    cost = np.ones((hosted.shape[0], n_nodes)) if cost is None else cost
    lay = np.arange(layers)[None, :, None]
    share = by_node(hosted, node) / np.maximum(hosted.sum(axis=0), 1)[None]  # [nodes, layers, experts]
    chunk = max(1, _CHUNK_CELLS // max(1, layers * k * n_nodes))
    total = np.zeros(layers)
    for start in range(0, tokens, chunk):
        ex, hm = experts[start:start + chunk], home[start:start + chunk]
        rows = np.arange(len(hm))
        if routing is not None:
            served = node[routing[hm[:, None, None], lay, ex]]  # [chunk, layers, top_k]
            visit = np.zeros((n_nodes, len(hm), layers))
            visit[served, rows[:, None, None], lay] = 1.0
        else:
            visit = 1.0 - np.prod(1.0 - share[:, lay[0], ex], axis=3)  # [nodes, chunk, layers]
        visit[node[hm], rows] = 0.0
        total += (visit * cost[hm].T[:, :, None]).sum(axis=(0, 1))
    return total / tokens


def node_round_trip(round_trip: np.ndarray, node: np.ndarray) -> np.ndarray:
    """seconds: [servers, nodes], a hidden state from each server to a node and back: to its nearest server
    there (DeepEP sends one copy per node and forwards it inside). round_trip: [servers, servers]."""
    n_nodes = int(node.max()) + 1
    out = np.full((round_trip.shape[0], n_nodes), np.inf)
    np.minimum.at(out.T, node, round_trip.T)
    return out


def activation_node_visits(weight: np.ndarray, tokens: float, hosted: np.ndarray, node: np.ndarray,
                           routing: np.ndarray | None = None) -> float:
    """Activations per token served on another node than their home's, summed over layers: `node_visits` when no
    two experts of a token share a trip (an upper bound on it, for tables without the token-level trace).

    weight: [servers, layers, experts] activations per home server; tokens: tokens behind them; routing as in
    `node_visits`."""
    if routing is None:
        copies = np.maximum(hosted.sum(axis=0), 1)
        away = 1.0 - by_node(hosted, node)[node] / copies[None]  # [servers, layers, experts]: served elsewhere
    else:
        away = (node[routing] != node[:, None, None]).astype(float)
    return float((weight * away).sum()) / tokens if tokens else 0.0
