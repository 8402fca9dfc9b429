"""What every solver sees: a PlacementProblem (with the tables, cluster and model it came from), and what a
model or heuristic hands back, a Solution."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from prism_plan.errors import InfeasibleError, PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.cluster import ClusterSpec, SlotLayout
from prism_plan.placement.layout import layout_violation
from prism_plan.placement.metrics import memory_used
from prism_plan.placement.model import ModelSpec, model_from_meta
from prism_plan.placement.offload import Offload
from prism_plan.placement.simulator import CostModel, Workload, check_concurrency, prepare_workload
from prism_plan.traces.tables import ActivationTables
from prism_plan.units import human_bytes


@dataclass(frozen=True)
class OffloadTerms:
    """What loading experts on demand costs, for clusters whose GPUs cannot hold every expert.

    load_seconds: [servers, layers] seconds one load of an expert of the layer takes from the server's slow tier
    (inf without one); host_budget: [servers] bytes each slow tier holds (inf: the whole model, 0: none);
    touches: [servers, layers, experts] batches at the server's origins that use each expert (a batch loads an
    expert once per layer); requests: requests behind `touches`; steps: batch steps they run in (all origins'
    batches of a step run at the same time).
    """

    load_seconds: np.ndarray
    host_budget: np.ndarray
    touches: np.ndarray
    requests: float
    steps: float


@dataclass(frozen=True)
class PlacementProblem:
    """A placement problem in arrays.

    weight: [servers, layers, experts] float64, activations that arrive at the server's origins.
    layer_bytes: [layers] int64, bytes of one expert of each MoE layer.
    budget: [servers] int64, bytes each server has for routed experts.
    hop_seconds: [servers, servers] float64, time to send one token's hidden state between servers.
    min_replicas: copies every expert must have.
    costs: link and compute costs (latency and traffic objectives); tokens: tokens behind `weight`.
    workload: the token-level trace, cut into steps, for objectives judged by replaying it.
    tables, cluster, model, homes: what the problem was built from (None for problems made by hand);
    homes: [origins] the server index of each of the tables' origins.
    layout: the equal slots per server and MoE layer a serving system needs (None: memory alone limits);
    node: [servers] int64, the node each server is in (None: each its own).
    offload: the slow tiers' costs when the GPUs cannot hold `min_replicas` copies and experts load on demand
    (None: every expert is pinned on a GPU).
    """

    weight: np.ndarray
    layer_bytes: np.ndarray
    budget: np.ndarray
    hop_seconds: np.ndarray
    min_replicas: int = 1
    server_names: tuple[str, ...] = ()
    costs: CostModel | None = None
    tokens: float = 0.0
    workload: Workload | None = None
    tables: ActivationTables | None = field(default=None, repr=False)
    cluster: ClusterSpec | None = field(default=None, repr=False)
    model: ModelSpec | None = field(default=None, repr=False)
    homes: np.ndarray | None = field(default=None, repr=False)
    layout: SlotLayout | None = None
    node: np.ndarray | None = field(default=None, repr=False)
    offload: OffloadTerms | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(servers, layers, experts)."""
        return self.weight.shape

    @property
    def uniform(self) -> bool:
        """True when all experts have one size: memory is then a count of expert slots."""
        return bool(np.all(self.layer_bytes == self.layer_bytes[0]))

    @property
    def slots(self) -> np.ndarray:
        """[servers] int64, experts each server can hold (uniform sizes), at most one per (layer, expert)."""
        s, l, e = self.shape
        return np.minimum(self.budget // self.layer_bytes.max(), l * e)

    @property
    def cell_bytes(self) -> np.ndarray:
        """bytes: [servers, layers, experts] int64 (a read-only broadcast), the size of each placement cell."""
        return np.broadcast_to(self.layer_bytes[None, :, None], self.shape)

    @property
    def per_token(self) -> float:
        """1 / tokens behind `weight` (1 when unknown): turns profile totals into per-token figures."""
        return 1.0 / self.tokens if self.tokens else 1.0

    @property
    def round_trip(self) -> np.ndarray:
        """seconds: [servers, servers], sending one token's hidden state from row to column server and back."""
        return self.hop_seconds + self.hop_seconds.T

    @property
    def act_seconds(self) -> np.ndarray:
        """seconds: [servers], computing one activation (one token in one expert); 0 without costs."""
        if self.costs is None:
            return np.zeros(self.shape[0])
        return self.costs.expert_flops / self.costs.flops

    @property
    def demand(self) -> np.ndarray:
        """[layers, experts] float64, activations summed over servers (origin-blind load)."""
        return self.weight.sum(axis=0)

    @property
    def nodes(self) -> np.ndarray:
        """[servers] int64, the node of each server (each its own when none are given)."""
        return np.arange(self.shape[0]) if self.node is None else self.node

    @property
    def speed(self) -> np.ndarray:
        """[servers] float64, each server's expert throughput relative to the mean (1 without costs)."""
        act = self.act_seconds
        return (1.0 / act) / np.mean(1.0 / act) if act.all() else np.ones(self.shape[0])

    def memory(self, hosted: np.ndarray) -> np.ndarray:
        """bytes: [servers] int64, what `hosted` ([servers, layers, experts] bool) takes on each server."""
        return memory_used(hosted, self.layer_bytes)


@dataclass
class Solution:
    """A placement a model or heuristic found, with what it proves.

    hosted: [servers, layers, experts] bool; status: optimal | feasible | heuristic | timeout; bound: the best
    bound proven on the optimum of the objective solved (None when unknown); routing: [servers, layers,
    experts] the serving server of each home server's activations, when the model chose it (else the nearest
    replica serves); extra: model-specific evidence for the plan file; weak_bound: the bound is a cheap one,
    loose by construction; offload: cache sizes and slow-tier contents, for problems with `offload` terms.
    """

    hosted: np.ndarray
    status: str
    bound: float | None = None
    routing: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    weak_bound: bool = False
    offload: Offload | None = None


def build_problem(tables: ActivationTables, cluster: ClusterSpec, model: ModelSpec | None = None, *,
                  min_replicas: int = 1, trace=None, concurrency: int = 1) -> PlacementProblem:
    """Check that tables, cluster and model describe the same thing, and gather the solver's arrays.

    model: default the one the tables were recorded from. trace: the Trace the tables were built from, for
    objectives judged by replaying it (its requests batched `concurrency` per origin and step, as in the
    simulator).
    """
    integer(min_replicas, "`min_replicas`", low=1, fix="ask for at least one copy of every expert",
            parameters=("min_replicas",))
    check_concurrency(concurrency)
    model = model_from_meta(tables.meta, "the tables") if model is None else model
    if tuple(tables.layers) != tuple(model.layers) or tables.num_experts != model.num_experts:
        raise PrismError(f"tables are for layers {_span(tables.layers)} x {tables.num_experts} experts but model "
                         f"{model.name!r} has layers {_span(model.layers)} x {model.num_experts}; pass the `model` "
                         f"the trace was recorded with", parameters=("model",))
    homes = cluster.homes(list(tables.origins))
    weight = np.zeros((cluster.num_servers,) + tables.freq.shape[1:])
    np.add.at(weight, homes, tables.freq)
    workload = None
    if trace is not None:
        model.check_same_shape(trace.meta, "the trace", "pass the `trace` the tables were built from",
                               ("trace",))
        origins = tuple(trace.origins)
        workload = prepare_workload(trace, origins, cluster.homes(list(origins)), concurrency)
    problem = PlacementProblem(weight, model.layer_bytes, cluster.budgets, cluster.hop_seconds(model.token_bytes),
                               int(min_replicas), tuple(cluster.names), CostModel.of(cluster, model),
                               float(tables.tokens.sum()), workload, tables, cluster, model, homes, cluster.layout,
                               cluster.node_index if cluster.has_nodes else None)
    if cluster.has_slow_tier and memory_shortfall(problem) > 0:
        problem = with_offload(problem)
    check_feasible(problem)
    return problem


def with_offload(problem: PlacementProblem) -> PlacementProblem:
    """`problem` with its offload terms, computed for it where it has none (a baseline that swaps experts on a
    cluster whose GPUs could hold them)."""
    return problem if problem.offload is not None else replace(problem, offload=offload_terms(problem))


def offload_terms(problem: PlacementProblem) -> OffloadTerms:
    """The slow tiers' costs of a problem built from tables and a cluster. Batches that use each expert are
    counted from the workload when there is one, else estimated from the tables: each request one batch whose
    tokens pick the expert independently at its observed rate."""
    cluster, tables = problem.cluster, problem.tables
    with np.errstate(divide="ignore"):
        load = cluster.load_latency[:, None] + problem.layer_bytes[None, :] / cluster.load_bandwidth[:, None]
    s_n, l_n, e_n = problem.shape
    w = problem.workload
    if w is not None:
        server = w.home[w.origin]
        cell = ((w.step * s_n + server)[:, None, None] * l_n + np.arange(l_n)[None, :, None]) * e_n + w.experts
        used = np.unique(cell.ravel()) % (s_n * l_n * e_n)
        touches = np.bincount(used, minlength=s_n * l_n * e_n).reshape(s_n, l_n, e_n).astype(float)
        requests, steps = float(w.num_requests), float(w.num_steps)
    else:
        spans = tables.meta.get("requests") or {}
        count = np.array([sum(b - a + 1 for a, b in spans.get(o, [])) or t for o, t in
                          zip(tables.origins, tables.tokens)], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.nan_to_num(tables.freq / tables.tokens[:, None, None])
            per_request = np.nan_to_num(tables.tokens / count)
        used = count[:, None, None] * -np.expm1(per_request[:, None, None] * np.log1p(-np.minimum(rate, 1 - 1e-12)))
        touches = np.zeros(problem.shape)
        np.add.at(touches, problem.homes, used)
        requests, steps = float(count.sum()), float(count.max(initial=1.0))
    return OffloadTerms(load, cluster.host_budgets, touches, requests, steps)


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "[]"


_LISTED = 8  # servers named in an infeasibility message; a long list would bury the shortfall


def gpu_capacity(problem: PlacementProblem) -> tuple[int, int]:
    """(bytes `min_replicas` copies of every expert need, bytes of whole experts the GPUs can hold)."""
    s, l, e = problem.shape
    need = problem.min_replicas * e * int(problem.layer_bytes.sum())
    if problem.uniform:
        have = int(problem.slots.sum()) * int(problem.layer_bytes[0])
    else:  # a server holds each (layer, expert) once: memory beyond one full copy of the model is no use
        have = int(np.minimum(problem.budget, e * int(problem.layer_bytes.sum())).sum())
    return need, have


def memory_shortfall(problem: PlacementProblem) -> int:
    """Bytes the GPUs lack to pin `min_replicas` copies of every expert (0 when they have room)."""
    need, have = gpu_capacity(problem)
    return max(need - have, 0)


def check_feasible(problem: PlacementProblem) -> None:
    """Raise InfeasibleError, naming the shortfall in GiB, when the cluster cannot hold every expert
    `min_replicas` times: on its GPUs, or, with slow tiers, on its GPUs and in its slow tiers together."""
    s, l, e = problem.shape
    r = problem.min_replicas
    if r > s:
        raise InfeasibleError(f"`min_replicas` {r} needs at least {r} servers, the cluster has {s}; lower "
                              f"`min_replicas` or add servers", parameters=("min_replicas",))
    if problem.offload is not None:
        check_offload(problem)
        return
    if problem.layout is not None:
        check_layout(problem)
    need, have = gpu_capacity(problem)
    if have < need:
        shown = [f"{n} {human_bytes(b)}" for n, b in zip(problem.server_names[:_LISTED], problem.budget)]
        lines = ", ".join(shown + ([f"and {s - _LISTED} more"] if s > _LISTED else []))
        raise InfeasibleError(f"infeasible budget: {r} cop{'y' if r == 1 else 'ies'} of every expert need "
                              f"{human_bytes(need)} but the servers hold {human_bytes(have)} of whole experts "
                              f"({lines}); short by {human_bytes(need - have)}: raise memory_gib or add a server")


def check_offload(problem: PlacementProblem) -> None:
    """Raise InfeasibleError unless every expert can be pinned on some GPU or held in some slow tier
    `min_replicas` times, every server has a slow tier, and some has GPU memory for one expert to load into."""
    s, l, e = problem.shape
    if problem.layout is not None:
        raise InfeasibleError("the cluster's [layout] asks for every slot pinned, but its GPUs cannot hold the "
                              "model, so experts must load from the slow tiers: drop the [layout] table, or give "
                              "the GPUs memory for every expert")
    biggest = int(problem.layer_bytes.max())
    tier = np.isfinite(problem.offload.load_seconds).all(axis=1)
    if not tier.all():
        # a server without one could serve its own tokens only from pins: not planned (yet)
        names = ", ".join(n for n, t in zip(problem.server_names, tier) if not t)
        raise InfeasibleError(f"the GPUs cannot hold the model and {names} ha{'s' if (~tier).sum() == 1 else 've'} no "
                              f"slow tier: give every server `load_gbps` (and `load_latency_ms`), or the GPUs memory "
                              f"for every expert")
    can_load = tier & (problem.budget >= biggest)
    if not can_load.any():
        raise InfeasibleError(f"no server with a slow tier has GPU memory for one expert "
                              f"({human_bytes(biggest)}) to load into: raise memory_gib of a server with `load_gbps`")
    copy = e * int(problem.layer_bytes.sum())
    need = problem.min_replicas * copy
    # every server that loads keeps room for one expert to load into
    have = int(np.minimum(problem.budget, copy).sum() + np.minimum(problem.offload.host_budget, copy).sum()
               - biggest * can_load.sum())
    if have < need:
        raise InfeasibleError(f"infeasible budget: {problem.min_replicas} cop{'y' if problem.min_replicas == 1 else 'ies'}"
                              f" of every expert need {human_bytes(need)} but the GPUs and slow tiers together hold "
                              f"{human_bytes(have)}; raise host_memory_gib or memory_gib, or add a server")


def check_layout(problem: PlacementProblem) -> None:
    """Raise InfeasibleError when no placement gives every server `slots_per_layer` distinct experts of each
    layer within its memory with every expert `min_replicas` times."""
    s, l, e = problem.shape
    r, slots = problem.min_replicas, problem.layout.slots_per_layer
    if slots > e:
        raise InfeasibleError(f"[layout] slots_per_layer {slots} is more than the {e} experts of a layer, and a "
                              f"server holds each expert once: give at most {e}")
    if s * slots < r * e:
        raise InfeasibleError(f"[layout] {s} servers x {slots} slots per layer hold {s * slots} experts, fewer "
                              f"than {r} cop{'y' if r == 1 else 'ies'} of the {e} experts of a layer: give "
                              f"slots_per_layer at least {-(-r * e // s)} or add servers")
    need = slots * int(problem.layer_bytes.sum())
    short = np.flatnonzero(problem.budget < need)
    if len(short):
        names = problem.server_names or tuple(map(str, range(s)))
        raise InfeasibleError(f"infeasible budget: [layout] slots_per_layer {slots} needs {human_bytes(need)} per "
                              f"server but {names[short[0]]} holds {human_bytes(int(problem.budget[short[0]]))}"
                              f"{f' (and {len(short) - 1} more servers are short)' if len(short) > 1 else ''}: "
                              f"raise memory_gib or lower slots_per_layer")


def placement_fits(problem: PlacementProblem, hosted: np.ndarray) -> bool:
    """Whether `hosted` ([servers, layers, experts] bool) keeps every server within its memory, every expert at
    min_replicas copies, and the layout's slots when there is one."""
    return bool((problem.memory(hosted) <= problem.budget).all()
                and hosted.sum(axis=0).min() >= problem.min_replicas
                and (problem.layout is None or layout_violation(hosted, problem.layout.slots_per_layer) is None))
