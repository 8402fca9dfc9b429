"""What a placement is judged by: coverage, the latency model, network traffic, simulated latency.

Every objective gives a value for any placement (so heuristics and baselines can be compared under it) and,
where one is cheap, a bound no placement can beat.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.placement.metrics import route
from prism_plan.placement.simulator import layer_objective, layer_serve, layer_traffic, replay_layer
from prism_plan.solvers.base import PlacementProblem, coverage_upper_bound, coverage_value


def nearest_routing(problem: PlacementProblem, hosted: np.ndarray, homes: np.ndarray | None = None) -> np.ndarray:
    """[homes, layers, experts]: the hosting server each home server's origins reach fastest (their own when
    it hosts the expert). homes: server indices (default: every server)."""
    homes = np.arange(problem.shape[0]) if homes is None else homes
    return route(hosted, homes, problem.hop_seconds)


def layer_makespan(problem: PlacementProblem, routing: np.ndarray) -> np.ndarray:
    """seconds: [layers], the busiest server's compute time per layer over the whole profile.
    routing: [servers, layers, experts] serving server for each home server."""
    s, l, _ = problem.shape
    load = np.zeros((s, l))
    np.add.at(load, (routing, np.broadcast_to(np.arange(l)[None, :, None], routing.shape)), problem.weight)
    return (load * problem.act_seconds[:, None]).max(axis=0)


def latency_terms(problem: PlacementProblem, hosted: np.ndarray, routing: np.ndarray | None = None):
    """(network seconds, compute makespan seconds), each per token, of the latency model.

    Network: every remote activation pays the round trip of one hidden state to its serving server.
    Makespan: per layer, the busiest server's compute time over the whole profile, spread over its tokens.
    routing: [servers, layers, experts] serving server for each home server (default: nearest replica).
    """
    s, l, e = problem.shape
    routing = nearest_routing(problem, hosted) if routing is None else routing
    home = np.arange(s)[:, None, None]
    tokens = problem.tokens or 1.0
    network = float((problem.weight * problem.round_trip[home, routing]).sum()) / tokens
    return network, float(layer_makespan(problem, routing).sum()) / tokens


def latency_value(problem: PlacementProblem, hosted: np.ndarray) -> float:
    """Expected MoE seconds per token under the latency model, nearest-replica routing."""
    return float(sum(latency_terms(problem, hosted)))


def _workload(problem: PlacementProblem, objective: str):
    if problem.workload is None or problem.costs is None:
        raise PrismError(f"objective {objective!r} replays the token-level trace: pass the trace the tables were "
                         f"built from (--trace)")
    return problem.workload, problem.costs


def replay_layers(problem: PlacementProblem, hosted: np.ndarray, layers=None):
    """Replay the problem's workload through `hosted` with nearest-replica routing; yields
    (layer, LayerReplay) for each layer in `layers` (default all)."""
    w, costs = _workload(problem, "simulated")
    routing = nearest_routing(problem, hosted, w.home)
    for l in range(problem.shape[1]) if layers is None else layers:
        yield l, replay_layer(w, layer_serve(w, routing, l), costs)


def simulated_value(problem: PlacementProblem, hosted: np.ndarray) -> float:
    """Mean MoE seconds per request when the workload is replayed through `hosted` (the simulator's model)."""
    w, _ = _workload(problem, "latency")
    return float(sum(layer_objective(w, rep) for _, rep in replay_layers(problem, hosted)))


def simulated_lower_bound(problem: PlacementProblem) -> float:
    """A bound no placement beats in the simulator: per step, origin and layer, either every activation runs
    at home (at least their compute there) or some token goes out (at least one round trip and one expert)."""
    w, costs = _workload(problem, "latency")
    s_n = problem.shape[0]
    one_remote = np.where(np.eye(s_n, dtype=bool), np.inf,
                          problem.round_trip + problem.act_seconds[None, :]).min(axis=1)
    acts = np.bincount(w.step * len(w.origins) + w.origin, minlength=w.num_steps * len(w.origins))
    acts = acts.reshape(w.num_steps, len(w.origins)) * w.experts.shape[2]
    local = acts * problem.act_seconds[w.home][None, :]
    per_layer = np.where(acts > 0, np.minimum(local, one_remote[w.home][None, :]), 0.0)
    return float((w.pairs * per_layer).sum()) * problem.shape[1] / max(w.num_requests, 1)


def traffic_value(problem: PlacementProblem, hosted: np.ndarray) -> float:
    """Bytes per token crossing the network on replay: one trip out and back per token, layer and remote
    server it needs."""
    w, costs = _workload(problem, "traffic")
    return float(sum(layer_traffic(w, rep, costs) for _, rep in replay_layers(problem, hosted)))


def traffic_lower_bound(problem: PlacementProblem) -> float:
    """Bytes per token no placement beats: a trip carries at most top_k activations of one token, and at least
    (activations - the coverage bound) activations are remote."""
    w, costs = _workload(problem, "traffic")
    s, l, e = problem.shape
    k = w.experts.shape[2]
    cell = (w.home[w.origin][:, None, None] * l + np.arange(l)[None, :, None]) * e + w.experts
    weight = np.bincount(cell.ravel(), minlength=s * l * e).reshape(problem.shape).astype(float)
    remote = weight.sum() - coverage_upper_bound(replace(problem, weight=weight))
    return 2 * costs.token_bytes * max(remote, 0.0) / k / max(w.num_tokens, 1)


@dataclass(frozen=True)
class Objective:
    """How placements are scored: value(problem, hosted), its direction, units, and a cheap bound if any."""

    name: str
    maximize: bool
    measure: str
    value: Callable[[PlacementProblem, np.ndarray], float]
    bound: Callable[[PlacementProblem], float] | None = None


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("coverage", True, "activations served at their origin's server", coverage_value,
              coverage_upper_bound),
    Objective("latency", False, "expected MoE seconds per token (latency model)", latency_value),
    Objective("traffic", False, "network bytes per token (replayed trace)", traffic_value, traffic_lower_bound),
)}

# Local search judges latency by replaying the trace rather than by the latency model.
SIMULATED_LATENCY = Objective("latency", False, "simulated mean MoE seconds per request (replayed trace)",
                              simulated_value, simulated_lower_bound)
