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
from prism_plan.placement.cluster import GIB, ClusterSpec
from prism_plan.placement.metrics import memory_used
from prism_plan.placement.model import ModelSpec

FORMAT = "prism-plan/plan"
VERSION = 1


class PlanError(PrismError):
    """A plan that is not valid for its model and cluster."""


@dataclass
class Plan:
    """A placement.

    hosted: [servers, layers, experts] bool; routing: [origins, layers, experts] int, the server index that
    serves each origin's activations of each expert. solver: status, objective, bound, gap, seconds.
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
        used = self.memory_bytes()
        over = used - cluster.budgets
        if (over > 0).any():
            s = int(np.argmax(over))
            raise PlanError(f"plan puts {used[s] / GIB:.2f} GiB of experts on server {self.servers[s]!r}, which "
                            f"has {cluster.budgets[s] / GIB:.2f} GiB: {over[s] / GIB:.2f} GiB too much")

    def summary(self) -> dict:
        """Headline figures: the solver's evidence, local coverage, remote bytes per token, memory per server."""
        m = self.metrics
        return {"objective": self.objective, "solver": self.solver, "local_coverage": m.get("local_coverage"),
                "remote_bytes_per_token": m.get("remote_bytes_per_token"), "memory_bytes": m.get("memory_bytes")}

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
                "metrics": self.metrics, "inputs": self.inputs, "constraints": {"min_replicas": self.min_replicas}}

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
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        """Parse and check a plan document."""
        check_header(d, FORMAT, VERSION, "plan", where, PlanError, "re-solve")
        try:
            model = ModelSpec.from_dict(d["model"])
            servers = tuple(d["servers"])
            layers = [str(x) for x in model.layers]
            hosted = np.zeros((len(servers), model.num_layers, model.num_experts), bool)
            for s, srv in enumerate(servers):
                for l, key in enumerate(layers):
                    hosted[s, l, np.asarray(d["placement"][srv].get(key, []), dtype=np.int64)] = True
            origins = tuple(d.get("routing", {}))
            index = {srv: i for i, srv in enumerate(servers)}
            routing = np.array([[[index[d["routing"][o][key][str(e)]] for e in range(model.num_experts)]
                                 for key in layers] for o in origins], dtype=np.int64).reshape(
                len(origins), model.num_layers, model.num_experts)
            plan = cls(model, servers, origins, hosted, routing, d.get("objective", "coverage"), d["solver"],
                       d.get("metrics", {}), d.get("inputs", {}), int(d.get("constraints", {}).get("min_replicas", 1)))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise PlanError(f"{where} is malformed ({type(e).__name__}: {e}); re-create it with prism-plan solve")
        plan.check()
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file."""
        d = read_user_json(path, "plan file", PlanError)
        return cls.from_dict(d, where=str(path))
