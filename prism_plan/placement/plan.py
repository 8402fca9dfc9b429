"""Plan: which server hosts which experts, who serves whom, and the evidence behind it.

Saved as versioned JSON (DESIGN.md, "Plan file"). A plan that breaks a memory budget or leaves an expert
without its copies is an error, never a file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prism_plan.fileio import check_header, read_user_json, write_text_atomic
from prism_plan.errors import PrismError
from prism_plan.placement.checks import integer
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.layout import layout_violation
from prism_plan.placement.metrics import memory_used
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.offload import CACHE_POLICIES, Offload
from prism_plan.units import human_bytes

FORMAT = "prism-plan/plan"
VERSION = 1


class PlanError(PrismError):
    """A plan that is not valid for its model and cluster."""


@dataclass
class Plan:
    """A placement.

    hosted: [servers, layers, experts] bool, the experts each server pins in GPU memory; routing: [origins,
    layers, experts] int, the server index that serves each origin's activations of each expert (from its
    pinned copy, or, with an `offload` tier, loaded from its slow tier into its cache when it does not pin it).
    solver: name, status, objective, bound, gap: what two runs with the same inputs and seed reproduce. timing:
    how long the steps took (solve_seconds), kept apart so that such runs give plan files that differ only there.
    """

    model: ModelSpec
    servers: tuple[str, ...]
    origins: tuple[str, ...]
    hosted: np.ndarray
    routing: np.ndarray
    objective: str
    solver: dict
    metrics: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    min_replicas: int = 1
    timing: dict = field(default_factory=dict)
    offload: Offload | None = None

    def memory_bytes(self) -> np.ndarray:
        """bytes: [servers], GPU memory the plan takes on each server: its pinned experts and its cache."""
        pinned = memory_used(self.hosted, self.model.layer_bytes)
        return pinned if self.offload is None else pinned + self.offload.cache_bytes

    def copies(self) -> np.ndarray:
        """[layers, experts] int, copies of each expert: pinned ones, and with an offload tier those slow tiers
        hold (which a server can load)."""
        held = self.hosted if self.offload is None else self.hosted | self.offload.stored
        return held.sum(axis=0)

    def check(self, cluster: ClusterSpec | None = None) -> None:
        """Raise PlanError when the plan is inconsistent or breaks a memory budget of `cluster`."""
        m = self.model
        shape = (len(self.servers), m.num_layers, m.num_experts)
        if self.hosted.shape != shape:
            raise PlanError(f"plan placement has shape {list(self.hosted.shape)}, expected {list(shape)}")
        if self.routing.shape != (len(self.origins),) + shape[1:]:
            raise PlanError(f"plan routing has shape {list(self.routing.shape)}, expected "
                            f"{[len(self.origins), *shape[1:]]}")
        if self.offload is not None:
            self._check_offload_shape(shape)
        copies = self.copies()
        if copies.min() < self.min_replicas:
            l, e = np.unravel_index(int(np.argmin(copies)), copies.shape)
            held = "hosts" if self.offload is None else "pins or keeps in a slow tier"
            raise PlanError(f"plan {held} expert {e} of layer {m.layers[l]} {int(copies[l, e])} time(s), fewer "
                            f"than min_replicas={self.min_replicas}")
        if len(self.origins):
            r = self.routing
            if r.min() < 0 or r.max() >= len(self.servers):
                raise PlanError("plan routing names a server index outside the plan's servers")
            cell = (r, np.arange(shape[1])[None, :, None], np.arange(shape[2])[None, None, :])
            served = self.hosted[cell]
            if self.offload is not None:
                self._check_loads(r, cell, served)
                served = served | self.offload.stored[cell]
            if not served.all():
                o, l, e = np.argwhere(~served)[0]
                where = "neither pins it nor holds it in its slow tier" if self.offload is not None else \
                    "does not host it"
                raise PlanError(f"plan routes origin {self.origins[o]!r} layer {m.layers[l]} expert {e} to "
                                f"{self.servers[r[o, l, e]]!r}, which {where}")
        if cluster is not None:
            self.check_cluster(cluster)

    def _check_offload_shape(self, shape: tuple[int, int, int]) -> None:
        off = self.offload
        if off.stored.shape != shape or off.cache_bytes.shape != shape[:1]:
            raise PlanError(f"plan offload tier has slow-tier contents of shape {list(off.stored.shape)} and "
                            f"{len(off.cache_bytes)} cache sizes, expected {list(shape)} and {shape[0]}")
        if (off.cache_bytes < 0).any():
            raise PlanError(f"plan gives server {self.servers[int(np.argmin(off.cache_bytes))]!r} a negative cache")

    def _check_loads(self, routing: np.ndarray, cell: tuple, pinned: np.ndarray) -> None:
        """Every server that loads an expert has a cache with room for it."""
        room = self.offload.cache_bytes[routing] >= self.model.layer_bytes[None, :, None]
        short = ~pinned & ~room
        if short.any():
            o, l, e = np.argwhere(short)[0]
            s = int(routing[o, l, e])
            raise PlanError(f"plan has server {self.servers[s]!r} load expert {e} of layer {self.model.layers[l]} "
                            f"({human_bytes(int(self.model.layer_bytes[l]))}) into a cache of "
                            f"{human_bytes(int(self.offload.cache_bytes[s]))}; give its cache room for one expert")

    def check_servers(self, cluster: ClusterSpec) -> None:
        """Raise PlanError when the plan is for other servers than `cluster`'s."""
        if tuple(cluster.names) != tuple(self.servers):
            raise PlanError(f"plan is for servers {list(self.servers)} but the cluster has {cluster.names}; "
                            f"pass the cluster file the plan was made for")

    def check_cluster(self, cluster: ClusterSpec) -> None:
        """Raise PlanError when the plan is for other servers or does not fit their memory."""
        self.check_servers(cluster)
        if cluster.layout is not None:
            bad = layout_violation(self.hosted, cluster.layout.slots_per_layer)
            if bad is not None:
                s, l, held = bad
                raise PlanError(f"plan gives server {self.servers[s]!r} {held} experts of layer "
                                f"{self.model.layers[l]} but the cluster's [layout] needs exactly "
                                f"{cluster.layout.slots_per_layer} on every server in every MoE layer; re-solve "
                                f"for this cluster")
        used = self.memory_bytes()
        over = used - cluster.budgets
        if (over > 0).any():
            s = int(np.argmax(over))
            raise PlanError(f"plan puts {human_bytes(used[s])} of experts on server {self.servers[s]!r}, which has "
                            f"{human_bytes(cluster.budgets[s])}: {human_bytes(over[s])} too much; pass the cluster the "
                            f"plan was made for, or re-solve for this one")
        if self.offload is not None:
            self._check_slow_tiers(cluster)

    def _check_slow_tiers(self, cluster: ClusterSpec) -> None:
        """What the plan keeps in each slow tier exists there and fits it."""
        held = memory_used(self.offload.stored, self.model.layer_bytes)
        over = held - cluster.host_budgets
        if (over > 0).any():
            s = int(np.argmax(over))
            has = "has no slow tier (no `load_gbps`)" if not cluster.servers[s].has_slow_tier else \
                f"holds {human_bytes(int(cluster.host_budgets[s]))} there"
            raise PlanError(f"plan keeps {human_bytes(int(held[s]))} of experts in the slow tier of server "
                            f"{self.servers[s]!r}, which {has}; pass the cluster the plan was made for, or re-solve "
                            f"for this one")

    def summary(self) -> dict:
        """Headline figures: the solver's evidence, local coverage, remote bytes per token, memory per server, and
        the timing."""
        m = self.metrics
        return {"objective": self.objective, "solver": self.solver, "local_coverage": m.get("local_coverage"),
                "remote_bytes_per_token": m.get("remote_bytes_per_token"), "memory_bytes": m.get("memory_bytes"),
                "timing": self.timing}

    def to_dict(self) -> dict:
        """The JSON document (DESIGN.md, "Plan file")."""
        layers = [str(x) for x in self.model.layers]
        placement = {srv: {layers[l]: np.flatnonzero(self.hosted[s, l]).tolist() for l in range(len(layers))}
                     for s, srv in enumerate(self.servers)}
        names = np.array(self.servers, dtype=object)
        routing = {org: {layers[l]: dict(zip(map(str, range(self.model.num_experts)),
                                             names[self.routing[o, l]].tolist()))
                         for l in range(len(layers))}
                   for o, org in enumerate(self.origins)}
        doc = {"format": FORMAT, "version": VERSION, "model": self.model.to_dict(), "servers": list(self.servers),
               "placement": placement, "routing": routing, "objective": self.objective, "solver": self.solver,
               "metrics": self.metrics, "inputs": self.inputs, "constraints": {"min_replicas": self.min_replicas},
               "timing": self.timing}
        if self.offload is not None:
            off = self.offload
            doc["offload"] = {
                "policy": off.policy,
                "cache_bytes": dict(zip(self.servers, off.cache_bytes.tolist())),
                "slow_tier": {srv: {layers[l]: np.flatnonzero(off.stored[s, l]).tolist() for l in range(len(layers))}
                              for s, srv in enumerate(self.servers)}}
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def sha256(self) -> str:
        """Hash of the placement and routing (what a migration moves between)."""
        d = self.to_dict()
        moved = [d["placement"], d["routing"]] + ([d["offload"]] if "offload" in d else [])
        return hashlib.sha256(json.dumps(moved, sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path, cluster: ClusterSpec | None = None) -> None:
        """Check the plan, then write it atomically; an invalid plan raises and writes nothing."""
        self.check(cluster)
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, d: object, where: str = "plan") -> "Plan":
        """Parse and check a plan document: every key of the contract with its exact type, servers and layers
        those of the plan's own lists, expert ids integers in range; plans that keep their solve time in
        `solver.seconds` (before `timing` was separate) read as well."""
        check_header(d, FORMAT, VERSION, "plan", where, PlanError, "re-solve")
        fix = "re-create it with prism-plan solve"

        def fail(msg: str) -> None:
            raise PlanError(f"{where}: {msg}; {fix}")

        def table(value: object, what: str) -> dict:
            if not isinstance(value, dict):
                fail(f"{what} must be a JSON object, got {value!r}"[:200])
            return value

        def keys(value: object, what: str, expected: list[str]) -> dict:
            """`value` when it is an object with exactly the keys `expected` (the plan's servers, layers, ids)."""
            value = table(value, what)
            extra, lacking = sorted(set(value) - set(expected)), sorted(set(expected) - set(value), key=expected.index)
            if extra:
                fail(f"{what} names {extra[:8]}, which are not among the plan's {expected[:8]}")
            if lacking:
                fail(f"{what} lacks {lacking[:8]}")
            return value

        model = ModelSpec.from_dict(d.get("model"), where, fix)
        servers = d.get("servers")
        if not isinstance(servers, list) or not servers or not all(isinstance(x, str) and x for x in servers):
            fail(f"`servers` must be a non-empty list of server names, got {servers!r}")
        if len(set(servers)) != len(servers):
            fail(f"`servers` names a server twice: {servers}")
        layers = [str(x) for x in model.layers]
        e_n = model.num_experts
        def experts_of(value: object, what: str) -> np.ndarray:
            """[servers, layers, experts] bool from {server: {layer: [expert ids]}}."""
            out = np.zeros((len(servers), model.num_layers, e_n), bool)
            value = keys(value, what, servers)
            for s, srv in enumerate(servers):
                by_layer = keys(value[srv], f"{what} of {srv!r}", layers)
                for l, key in enumerate(layers):
                    ids = by_layer[key]
                    cell = f"{what} of {srv!r} layer {key}"
                    if not isinstance(ids, list):
                        fail(f"{cell} must be a list of expert ids, got {ids!r}")
                    for e in ids:
                        integer(e, f"{where}: every expert id in {cell}", low=0, high=e_n - 1, fix=fix)
                    if len(set(ids)) != len(ids):
                        fail(f"{cell} lists an expert twice: {ids}")
                    out[s, l, ids] = True
            return out

        hosted = experts_of(d.get("placement"), "`placement`")
        routing_doc = table(d.get("routing", {}), "`routing`")
        origins = tuple(routing_doc)
        if "" in origins:
            fail("`routing` names an origin \"\"; every origin needs a name")
        index = {srv: i for i, srv in enumerate(servers)}
        experts = [str(e) for e in range(e_n)]
        routing = np.zeros((len(origins), model.num_layers, e_n), np.int64)
        for o, org in enumerate(origins):
            by_layer = keys(routing_doc[org], f"`routing` of origin {org!r}", layers)
            for l, key in enumerate(layers):
                served = keys(by_layer[key], f"`routing` of origin {org!r} layer {key}", experts)
                for e, name in enumerate(served[x] for x in experts):
                    if not isinstance(name, str) or name not in index:
                        fail(f"`routing` of origin {org!r} layer {key} expert {e} names {name!r}, not one of the "
                             f"plan's servers {servers}")
                    routing[o, l, e] = index[name]
        objective = d.get("objective", "coverage")
        if not isinstance(objective, str) or not objective:
            fail(f"`objective` must be an objective's name, got {objective!r}")
        solver = dict(table(d.get("solver"), "`solver`"))
        timing = dict(table(d.get("timing", {}), "`timing`"))
        if "seconds" in solver:
            timing.setdefault("solve_seconds", solver.pop("seconds"))
        constraints = table(d.get("constraints", {}), "`constraints`")
        min_replicas = integer(constraints.get("min_replicas", 1), f"{where}: `constraints.min_replicas`", low=1,
                               high=len(servers), fix=fix)
        offload = None
        if "offload" in d:
            raw = keys(d["offload"], "`offload`", ["policy", "cache_bytes", "slow_tier"])
            if raw["policy"] not in CACHE_POLICIES:
                fail(f"`offload.policy` must be one of {list(CACHE_POLICIES)}, got {raw['policy']!r}")
            sizes = keys(raw["cache_bytes"], "`offload.cache_bytes`", servers)
            cache = [integer(sizes[x], f"{where}: `offload.cache_bytes` of {x!r}", low=0, fix=fix) for x in servers]
            offload = Offload(np.array(cache, np.int64), experts_of(raw["slow_tier"], "`offload.slow_tier`"),
                              raw["policy"])
        plan = cls(model, tuple(servers), origins, hosted, routing, objective, solver,
                   table(d.get("metrics", {}), "`metrics`"), table(d.get("inputs", {}), "`inputs`"), min_replicas,
                   timing, offload)
        try:
            plan.check()
        except PlanError as e:
            raise PlanError(f"{where}: {e}; {fix}") from None
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file."""
        d = read_user_json(path, "plan file", PlanError)
        return cls.from_dict(d, where=str(path))
