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
from prism_plan.units import human_bytes

FORMAT = "prism-plan/plan"
VERSION = 1


class PlanError(PrismError):
    """A plan that is not valid for its model and cluster."""


@dataclass
class Plan:
    """A placement.

    hosted: [servers, layers, experts] bool; routing: [origins, layers, experts] int, the server index that
    serves each origin's activations of each expert. solver: name, status, objective, bound, gap: what two runs
    with the same inputs and seed reproduce. timing: how long the steps took (solve_seconds), kept apart so that
    such runs give plan files that differ only there.
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

    def memory_bytes(self) -> np.ndarray:
        """bytes: [servers], memory the plan's experts take on each server."""
        return memory_used(self.hosted, self.model.layer_bytes)

    def check(self, cluster: ClusterSpec | None = None) -> None:
        """Raise PlanError when the plan is inconsistent or breaks a memory budget of `cluster`."""
        m = self.model
        shape = (len(self.servers), m.num_layers, m.num_experts)
        if self.hosted.shape != shape:
            raise PlanError(f"plan placement has shape {list(self.hosted.shape)}, expected {list(shape)}")
        if self.routing.shape != (len(self.origins),) + shape[1:]:
            raise PlanError(f"plan routing has shape {list(self.routing.shape)}, expected "
                            f"{[len(self.origins), *shape[1:]]}")
        copies = self.hosted.sum(axis=0)
        if copies.min() < self.min_replicas:
            l, e = np.unravel_index(int(np.argmin(copies)), copies.shape)
            raise PlanError(f"plan hosts expert {e} of layer {m.layers[l]} {int(copies[l, e])} time(s), fewer "
                            f"than min_replicas={self.min_replicas}")
        if len(self.origins):
            r = self.routing
            if r.min() < 0 or r.max() >= len(self.servers):
                raise PlanError("plan routing names a server index outside the plan's servers")
            served = self.hosted[r, np.arange(shape[1])[None, :, None], np.arange(shape[2])[None, None, :]]
            if not served.all():
                o, l, e = np.argwhere(~served)[0]
                raise PlanError(f"plan routes origin {self.origins[o]!r} layer {m.layers[l]} expert {e} to "
                                f"{self.servers[r[o, l, e]]!r}, which does not host it")
        if cluster is not None:
            self.check_cluster(cluster)

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
        return {"format": FORMAT, "version": VERSION, "model": self.model.to_dict(), "servers": list(self.servers),
                "placement": placement, "routing": routing, "objective": self.objective, "solver": self.solver,
                "metrics": self.metrics, "inputs": self.inputs, "constraints": {"min_replicas": self.min_replicas},
                "timing": self.timing}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def sha256(self) -> str:
        """Hash of the placement and routing (what a migration moves between)."""
        d = self.to_dict()
        return hashlib.sha256(json.dumps([d["placement"], d["routing"]], sort_keys=True).encode()).hexdigest()

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
        hosted = np.zeros((len(servers), model.num_layers, e_n), bool)
        placement = keys(d.get("placement"), "`placement`", servers)
        for s, srv in enumerate(servers):
            by_layer = keys(placement[srv], f"`placement` of {srv!r}", layers)
            for l, key in enumerate(layers):
                ids = by_layer[key]
                what = f"`placement` of {srv!r} layer {key}"
                if not isinstance(ids, list):
                    fail(f"{what} must be a list of expert ids, got {ids!r}")
                for e in ids:
                    integer(e, f"{where}: every expert id in {what}", low=0, high=e_n - 1, fix=fix)
                if len(set(ids)) != len(ids):
                    fail(f"{what} lists an expert twice: {ids}")
                hosted[s, l, ids] = True
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
        plan = cls(model, tuple(servers), origins, hosted, routing, objective, solver,
                   table(d.get("metrics", {}), "`metrics`"), table(d.get("inputs", {}), "`inputs`"), min_replicas,
                   timing)
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
