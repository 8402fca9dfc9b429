"""MigrationPlan: the ordered copies and evictions that turn one placement into another, and their verifier.

Within a stage every eviction applies first, then every copy; a copy reads from a server that still holds the
expert after the stage's evictions. Copies over different links run at the same time, copies over one link one
after another. Every plan made here passes `verify_migration`, which checks:

1. memory: each server receiving copies has room for all of them once the stage's evictions are done, so no
   server ever holds more than its budget (one the old placement already overfills only shrinks);
2. replicas: no expert ever has fewer than `min_replicas` copies;
3. sources: each copy reads from the holder cheapest to send from (link latency + bytes / bandwidth);
4. result: applying every stage to the old placement gives exactly the new one.

A moves file records the hashes of both placements, so that `starting_placement` can tie it to its plans: worked
back from the plan it leads to, its steps must give the placement it records as its start (an edited step gives
another one).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import check_header, read_user_json, write_text_atomic
from prism_plan.placement.checks import integer, is_integer, number
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.metrics import memory_used
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan
from prism_plan.units import human_bytes

FORMAT = "prism-plan/moves"
# 2: the placements' hashes (from_placement_sha256, to_placement_sha256), which version 1 lacked, and the seal
# of the whole file (content_sha256), so that no edit goes unnoticed
VERSION = 2
REDO = "re-create it with `prism-plan migrate`"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MigrationError(PrismError):
    """Moves that cannot be ordered safely, or a moves file that breaks an invariant."""


def placement_sha256(hosted: np.ndarray) -> str:
    """Hash of a placement ([servers, layers, experts] bool): its shape and the cells it hosts."""
    doc = {"shape": list(hosted.shape), "hosted": np.argwhere(hosted).tolist()}
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


@dataclass(frozen=True)
class Stage:
    """One step of a migration.

    evicts: [n, 3] int64 (layer index, expert, server); copies: [m, 4] int64 (layer index, expert, src, dst);
    temporary: [m] bool, copies (or, for evicts, removals) that only make room for others and are undone later.
    """

    evicts: np.ndarray
    copies: np.ndarray
    temporary: np.ndarray

    @classmethod
    def make(cls, evicts=(), copies=(), temporary=None) -> "Stage":
        ev = np.asarray(evicts, np.int64).reshape(-1, 3)
        cp = np.asarray(copies, np.int64).reshape(-1, 4)
        tmp = np.zeros(len(cp), bool) if temporary is None else np.asarray(temporary, bool)
        return cls(ev, cp, tmp)


def expert_seconds(cluster: ClusterSpec, layer_bytes: np.ndarray) -> np.ndarray:
    """seconds: [servers (src), servers (dst), layers], sending one expert of each layer (latency + bytes /
    bandwidth)."""
    return cluster.latency[:, :, None] + layer_bytes[None, None, :] / cluster.bandwidth[:, :, None]


def copy_seconds(copies: np.ndarray, cluster: ClusterSpec, layer_bytes: np.ndarray) -> np.ndarray:
    """seconds: [copies], one expert over its link. copies: [m, 4] as in Stage."""
    return expert_seconds(cluster, layer_bytes)[copies[:, 2], copies[:, 3], copies[:, 0]]


def stage_seconds(copies: np.ndarray, cluster: ClusterSpec, layer_bytes: np.ndarray) -> float:
    """seconds: a stage's copies, links in parallel and each link's copies in sequence."""
    if not len(copies):
        return 0.0
    s = cluster.num_servers
    per_link = np.bincount(copies[:, 2] * s + copies[:, 3], weights=copy_seconds(copies, cluster, layer_bytes),
                           minlength=s * s)
    return float(per_link.max())


@dataclass
class MigrationPlan:
    """Stages that move a placement of `model` on `servers` to a new one; bytes and seconds come from the
    cluster the plan was made for. lower_bound_bytes: the bytes of copies the new placement needs at the least
    (its experts that are not already where they must be). from_sha256 / to_sha256: the plans moved between
    (set by `migrate_placement`), from_placement_sha256 / to_placement_sha256: their placements."""

    model: ModelSpec
    servers: tuple[str, ...]
    stages: list[Stage]
    min_replicas: int
    lower_bound_bytes: int
    stage_seconds: list[float] = field(default_factory=list)
    from_sha256: str = ""
    to_sha256: str = ""
    from_placement_sha256: str = ""
    to_placement_sha256: str = ""

    def _all(self, attr: str) -> np.ndarray:
        width = 3 if attr == "evicts" else 4
        parts = [getattr(st, attr) for st in self.stages]
        return np.concatenate(parts) if parts else np.zeros((0, width), np.int64)

    @property
    def bytes(self) -> int:
        """Bytes copied in all."""
        return int(self.model.layer_bytes[self._all("copies")[:, 0]].sum())

    @property
    def seconds(self) -> float:
        """Estimated seconds, stages one after another."""
        return float(sum(self.stage_seconds))

    @property
    def num_copies(self) -> int:
        return len(self._all("copies"))

    @property
    def num_evicts(self) -> int:
        return len(self._all("evicts"))

    @property
    def temporary_copies(self) -> int:
        """Copies made only to break a cycle (to free space, or to put back an expert moved aside)."""
        return int(sum(int(st.temporary.sum()) for st in self.stages))

    def apply(self, hosted: np.ndarray, stages: int | None = None) -> np.ndarray:
        """The placement after the first `stages` stages (default all; [servers, layers, experts] bool), without
        checks."""
        out = hosted.copy()
        for st in self.stages[:stages]:
            out[st.evicts[:, 2], st.evicts[:, 0], st.evicts[:, 1]] = False
            out[st.copies[:, 3], st.copies[:, 0], st.copies[:, 1]] = True
        return out

    def placement_before(self, after: np.ndarray) -> np.ndarray:
        """The placement the moves start from, given where they end: the stages undone in reverse (each expert
        a stage copies was absent before it, each it evicts was present)."""
        out = after.copy()
        for st in reversed(self.stages):
            out[st.copies[:, 3], st.copies[:, 0], st.copies[:, 1]] = False
            out[st.evicts[:, 2], st.evicts[:, 0], st.evicts[:, 1]] = True
        return out

    def starting_placement(self, plan: Plan, cluster: ClusterSpec, where: str = "the moves",
                           plan_where: str = "the plan") -> np.ndarray:
        """The placement these moves start from when they lead to `plan`, once they are shown to belong to it:
        the same model and servers, its hash and placement as their end, and, worked back from it, the start
        they recorded; then `verify_migration` on `cluster`. Raises MigrationError naming `where` (the moves)
        and `plan_where`."""
        belong = f"pass the plan `prism-plan migrate` wrote with {where}, or re-create them with it"
        if self.model.to_dict() != plan.model.to_dict():
            raise MigrationError(f"{where} are for model {self.model.name!r} ({self.model.num_layers} MoE layers x "
                                 f"{self.model.num_experts} experts), {plan_where} for {plan.model.name!r} "
                                 f"({plan.model.num_layers} x {plan.model.num_experts}); {belong}")
        if tuple(self.servers) != tuple(plan.servers):
            raise MigrationError(f"{where} are for servers {list(self.servers)}, {plan_where} for "
                                 f"{list(plan.servers)}; {belong}")
        if not self.from_placement_sha256 or not self.to_placement_sha256:
            raise MigrationError(f"{where} do not record the placements they move between, so they cannot be "
                                 f"checked against {plan_where}; re-create them with `prism-plan migrate`")
        if (self.to_sha256 and self.to_sha256 != plan.sha256()) or \
                self.to_placement_sha256 != placement_sha256(plan.hosted):
            raise MigrationError(f"{where} lead to another plan than {plan_where} (their to_plan_sha256 or "
                                 f"to_placement_sha256 differs); {belong}")
        _check_steps(self, plan.hosted.shape)
        start = self.placement_before(plan.hosted)
        if placement_sha256(start) != self.from_placement_sha256:
            raise MigrationError(f"{where} do not start where they say: worked back from {plan_where}, their steps "
                                 f"give another placement than their from_placement_sha256, so a step was changed "
                                 f"after `prism-plan migrate` wrote them; re-create them with `prism-plan migrate`")
        try:
            verify_migration(self, start, plan.hosted, cluster)
        except MigrationError as e:
            raise MigrationError(f"{where} break an invariant on this cluster ({e}); re-create them with "
                                 f"`prism-plan migrate` for this cluster") from None
        return start

    def sha256(self) -> str:
        """Hash of the moves file's content (its `content_sha256`): what a journal of their progress belongs to."""
        return content_sha256(self._body())

    def summary(self) -> dict:
        return {"stages": len(self.stages), "bytes": self.bytes, "lower_bound_bytes": self.lower_bound_bytes,
                "copies": self.num_copies, "evicts": self.num_evicts, "temporary_copies": self.temporary_copies,
                "seconds": self.seconds}

    def to_dict(self) -> dict:
        """The moves file (DESIGN.md, "Moves file"), sealed with its `content_sha256`."""
        body = self._body()
        return {**body, "content_sha256": content_sha256(body)}

    def _body(self) -> dict:
        """The moves file without its seal; layers are the model's layer numbers."""
        layers, names, size = list(self.model.layers), self.servers, self.model.layer_bytes
        stages = []
        for st, secs in zip(self.stages, self.stage_seconds):
            steps = [{"op": "evict", "layer": layers[l], "expert": int(e), "server": names[s], "bytes": int(size[l])}
                     for l, e, s in st.evicts.tolist()]
            steps += [{"op": "copy", "layer": layers[l], "expert": int(e), "src": names[a], "dst": names[b],
                       "bytes": int(size[l]), "temporary": bool(t)}
                      for (l, e, a, b), t in zip(st.copies.tolist(), st.temporary.tolist())]
            stages.append({"seconds": secs, "steps": steps})
        return {"format": FORMAT, "version": VERSION, "from_plan_sha256": self.from_sha256,
                "to_plan_sha256": self.to_sha256, "from_placement_sha256": self.from_placement_sha256,
                "to_placement_sha256": self.to_placement_sha256, "model": self.model.to_dict(),
                "servers": list(self.servers),
                "min_replicas": self.min_replicas, **self.summary(), "stages": stages}

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: object, where: str = "moves") -> "MigrationPlan":
        """Parse a moves file, checking every field's type and range, every step's layer, expert, servers and
        bytes against the file's model and servers, and its totals against its steps (tie it to its plans with
        `starting_placement`)."""
        if isinstance(d, dict) and d.get("format") == FORMAT and d.get("version") == 1:
            raise MigrationError(f"{where} is a version-1 moves file, which does not record the placement it "
                                 f"starts from, so it cannot be checked against its plans; {REDO}")
        check_header(d, FORMAT, VERSION, "moves file", where, MigrationError, REDO)
        model = _checked(ModelSpec.from_dict, _get(d, "model", where), where, REDO)
        servers = _get(d, "servers", where)
        if not isinstance(servers, list) or not servers or not all(isinstance(x, str) and x for x in servers) \
                or len(set(servers)) != len(servers):
            raise MigrationError(f"{where}: \"servers\" must be a list of distinct server names, got {servers!r}; "
                                 f"{REDO}")
        servers = tuple(servers)
        raw_stages = _get(d, "stages", where)
        if not isinstance(raw_stages, list):
            raise MigrationError(f"{where}: \"stages\" must be a list, got {raw_stages!r}; {REDO}")
        stages, secs = [], []
        for k, raw in enumerate(raw_stages, 1):
            at = f"{where}, stage {k}"
            secs.append(_checked(number, _get(raw, "seconds", at), f'{at}: "seconds"', REDO, low=0))
            steps = _get(raw, "steps", at)
            if not isinstance(steps, list):
                raise MigrationError(f"{at}: \"steps\" must be a list, got {steps!r}; {REDO}")
            stages.append(_parse_stage(steps, model, servers, at))
        sums = {"min_replicas": _int(d, "min_replicas", where, 1, len(servers)),
                "lower_bound_bytes": _int(d, "lower_bound_bytes", where, 0)}
        plan = cls(model, servers, stages, sums["min_replicas"], sums["lower_bound_bytes"], secs,
                   *(_sha256(d, key, where) for key in ("from_plan_sha256", "to_plan_sha256",
                                                         "from_placement_sha256", "to_placement_sha256")))
        if plan.lower_bound_bytes > plan.bytes:
            raise MigrationError(f'{where}: "lower_bound_bytes" is {plan.lower_bound_bytes} but its steps copy only '
                                 f"{plan.bytes} bytes; the file was edited after `prism-plan migrate` wrote it; {REDO}")
        for key in ("bytes", "copies", "evicts", "temporary_copies", "seconds"):  # totals the steps determine
            given, value = _checked(number, _get(d, key, where), f'{where}: "{key}"', REDO, low=0), plan.summary()[key]
            if not math.isclose(given, value, rel_tol=1e-9, abs_tol=1e-12):
                raise MigrationError(f'{where}: "{key}" is {given:g} but its steps make {value:g}; the file was '
                                     f"edited after `prism-plan migrate` wrote it; {REDO}")
        if _sha256(d, "content_sha256", where) != content_sha256(d):  # last: the checks above say more
            raise MigrationError(f"{where} was edited after `prism-plan migrate` wrote it (its content_sha256 does "
                                 f"not match what it holds); {REDO}")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "MigrationPlan":
        d = read_user_json(path, "moves file", MigrationError)
        return cls.from_dict(d, where=str(path))


def content_sha256(doc: dict) -> str:
    """The seal of a moves file: sha256 of its JSON without `content_sha256`, keys sorted (so neither layout nor
    key order matter, every value does)."""
    return hashlib.sha256(json.dumps({k: v for k, v in doc.items() if k != "content_sha256"},
                                     sort_keys=True).encode()).hexdigest()


def _checked(check, value, what: str, fix: str, **kwargs):
    """check(value, what, ...) (a reader of `checks` or ModelSpec.from_dict), its PrismError a MigrationError."""
    try:
        return check(value, what, fix=fix, **kwargs)
    except MigrationError:
        raise
    except PrismError as e:
        raise MigrationError(str(e)) from None


def _get(d: object, key: str, where: str):
    """d[key] of a JSON object read from a moves file, or a MigrationError naming `where`."""
    if not isinstance(d, dict):
        raise MigrationError(f"{where} must be a JSON object, got {d!r}; {REDO}")
    if key not in d:
        raise MigrationError(f'{where} has no "{key}"; {REDO}')
    return d[key]


def _int(d: object, key: str, where: str, low: int, high: int | None = None) -> int:
    return _checked(integer, _get(d, key, where), f'{where}: "{key}"', REDO, low=low, high=high)


def _sha256(d: object, key: str, where: str) -> str:
    """A hash field: 64 hex digits, or "" for moves made without plans."""
    value = _get(d, key, where)
    if not isinstance(value, str) or value and not _SHA256.fullmatch(value):
        raise MigrationError(f'{where}: "{key}" must be a sha256 (64 hex digits) or "", got {value!r}; {REDO}')
    return value


def _name(step: dict, key: str, servers: tuple[str, ...], at: str) -> int:
    value = _get(step, key, at)
    if value not in servers or not isinstance(value, str):
        raise MigrationError(f'{at}: "{key}" must be one of the servers {list(servers)}, got {value!r}; {REDO}')
    return servers.index(value)


def _parse_stage(steps: list, model: ModelSpec, servers: tuple[str, ...], where: str) -> Stage:
    """One stage's steps, each checked against the file's model (layer, expert, bytes) and servers."""
    ev, cp, tmp = [], [], []
    for i, step in enumerate(steps, 1):
        at = f"{where}, step {i}"
        op = _get(step, "op", at)
        if op not in ("evict", "copy"):
            raise MigrationError(f'{at}: "op" must be "evict" or "copy", got {op!r}; {REDO}')
        layer = _get(step, "layer", at)
        if not is_integer(layer) or layer not in model.layers:
            raise MigrationError(f'{at}: "layer" must be one of the model\'s MoE layers {list(model.layers)}, got '
                                 f"{layer!r}; {REDO}")
        l = model.layers.index(layer)
        e = _int(step, "expert", at, 0, model.num_experts - 1)
        size = int(model.layer_bytes[l])
        if _int(step, "bytes", at, 0) != size:
            raise MigrationError(f'{at}: "bytes" is {step["bytes"]} but an expert of layer {layer} of model '
                                 f"{model.name!r} has {size}; {REDO}")
        if op == "evict":
            ev.append((l, e, _name(step, "server", servers, at)))
            continue
        cp.append((l, e, _name(step, "src", servers, at), _name(step, "dst", servers, at)))
        temporary = _get(step, "temporary", at)
        if not isinstance(temporary, bool):
            raise MigrationError(f'{at}: "temporary" must be true or false, got {temporary!r}; {REDO}')
        tmp.append(temporary)
    return Stage.make(ev, cp, tmp)


def needed_copy_bytes(old: np.ndarray, new: np.ndarray, layer_bytes: np.ndarray) -> int:
    """Bytes no migration from `old` to `new` can avoid copying: every expert the new placement puts where
    the old one has none. old, new: [servers, layers, experts] bool."""
    return int(((new & ~old).sum(axis=(0, 2)) * layer_bytes).sum())


def _cheapest_sources(state: np.ndarray, copies: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[m] the holder in `state` cheapest to send each copy (layer, expert, -, dst) from."""
    l, e, dst = copies[:, 0], copies[:, 1], copies[:, 3]
    c = np.where(state[:, l, e], cost[:, dst, l], np.inf)  # [servers, m]
    return np.argmin(c, axis=0)


class _Planner:
    """Greedy stage builder: each stage evicts everything it safely can, then copies everything that fits."""

    def __init__(self, old: np.ndarray, new: np.ndarray, cluster: ClusterSpec, model: ModelSpec, min_replicas: int):
        self.state = old.copy()
        self.want_copy = new & ~old
        self.want_evict = old & ~new
        self.put_back = np.zeros_like(old)  # spare replicas set aside to make room, to be copied back
        self.temporary = np.zeros_like(old)  # copies parked in free space, to be evicted again
        self.size = model.layer_bytes
        self.budget = cluster.budgets
        self.cost = expert_seconds(cluster, self.size)
        self.r = min_replicas
        self.names = cluster.names

    def free(self) -> np.ndarray:
        return self.budget - memory_used(self.state, self.size)

    def incoming(self) -> np.ndarray:
        """bytes: [servers] of copies still to land on each server."""
        return (self.want_copy.sum(axis=2) * self.size[None, :]).sum(axis=1)

    def safe_evicts(self, everywhere: bool) -> np.ndarray:
        """[n, 3] pending evictions that keep every expert at min_replicas: on servers waiting for a copy, or
        `everywhere`. Servers short of room go first, temporary copies last (they stay until the copy they
        stand in for has landed). Evictions elsewhere wait: the room is not needed yet, and the replica may be
        the spare that a later swap needs. A temporary copy goes only once nothing else is pending for its
        expert."""
        incoming = self.incoming()
        pressure = incoming - self.free()
        rank = np.argsort(np.argsort(-pressure, kind="stable"))
        priority = rank[:, None, None] + len(rank) * self.temporary  # [servers, layers, experts]
        settled = ~self.want_copy.any(axis=0) & ~(self.want_evict & ~self.temporary).any(axis=0)
        allowed = self.want_evict & ((incoming > 0) | everywhere)[:, None, None] & (~self.temporary | settled[None])
        order = np.argsort(np.where(allowed, priority, 2 * len(rank) + 1), axis=0, kind="stable")
        pending = np.take_along_axis(allowed, order, axis=0)
        spare = self.state.sum(axis=0) - self.r
        take = pending & (np.cumsum(pending, axis=0) <= spare[None])
        i, l, e = np.nonzero(take)
        s = order[i, l, e]
        self.temporary[s, l, e] = False
        return np.stack([l, e, s], axis=1)

    def fitting_copies(self) -> np.ndarray:
        """[m, 4] pending copies that fit their destination; copies that unblock an eviction go first, copies
        putting back a replica set aside go last."""
        s, l, e = np.nonzero(self.want_copy)
        if not len(s):
            return np.zeros((0, 4), np.int64)
        waiting = (self.incoming() > 0)[:, None, None]
        blocked = ((self.want_evict & waiting).any(axis=0) & (self.state.sum(axis=0) <= self.r))[l, e]
        order = np.lexsort((self.size[l], ~blocked, self.put_back[s, l, e], s))
        s, l, e = s[order], l[order], e[order]
        b, free = self.size[l], self.free()
        if np.all(self.size == self.size[0]):  # equal sizes: first fit is the prefix that fits
            first = np.searchsorted(s, s)  # start of each destination's run
            csum = np.cumsum(b)
            fits = csum - (csum[first] - b[first]) <= free[s]
        else:
            fits = np.zeros(len(s), bool)
            for i in range(len(s)):
                if b[i] <= free[s[i]]:
                    fits[i] = True
                    free[s[i]] -= b[i]
        cp = np.stack([l[fits], e[fits], np.zeros(int(fits.sum()), np.int64), s[fits]], axis=1)
        cp[:, 2] = _cheapest_sources(self.state, cp, self.cost)
        return cp

    def step(self) -> Stage:
        ev = self._evict(self.safe_evicts(everywhere=not self.want_copy.any()))
        cp = self.fitting_copies()
        if not len(ev) and not len(cp):
            return self.break_cycle()
        return Stage.make(ev, cp, self._land(cp))

    def _evict(self, ev: np.ndarray) -> np.ndarray:
        self.state[ev[:, 2], ev[:, 0], ev[:, 1]] = False
        self.want_evict[ev[:, 2], ev[:, 0], ev[:, 1]] = False
        return ev

    def _land(self, cp: np.ndarray) -> np.ndarray:
        """Apply copies; returns which of them put back a replica set aside."""
        at = (cp[:, 3], cp[:, 0], cp[:, 1])
        back = self.put_back[at]
        self.state[at] = True
        self.want_copy[at] = False
        self.put_back[at] = False
        return back

    def _park(self, at: np.ndarray) -> Stage:
        """Copy expert (layer, expert) to server t, at = (t, layer, expert), as a temporary copy unless the new
        placement wants it there anyway."""
        t, l, e = at
        cp = np.array([[l, e, 0, t]])
        cp[:, 2] = _cheapest_sources(self.state, cp, self.cost)
        parked = not self.want_copy[t, l, e]
        self._land(cp)
        self.want_evict[t, l, e] = self.temporary[t, l, e] = parked
        return Stage.make((), cp, [parked])

    def break_cycle(self) -> Stage:
        """Every server waiting for room holds only experts that have no other copy to spare. Park one of those
        in free space elsewhere (evicted again once its real copy lands), or else set aside a spare replica on a
        waiting server (copied back later); either way prefer an expert whose room lets a waiting copy land.
        Failing both, make the evictions held back on other servers, which gives room to park in."""
        free = self.free()
        incoming = np.where(self.want_copy, self.size[None, :, None], np.inf).min(axis=(1, 2))  # smallest, [servers]
        count = self.state.sum(axis=0)
        helps = (free[:, None] + self.size[None, :] >= incoming[:, None])[:, :, None]  # [servers, layers, 1]
        stuck = self.want_evict & np.isfinite(incoming)[:, None, None] & (count <= self.r)[None]
        for blocked in ((stuck & helps).any(axis=0), stuck.any(axis=0)):
            room = (free[:, None] >= self.size[None, :])[:, :, None] & ~self.state & blocked[None]
            if room.any():
                return self._park(np.argwhere(room)[np.argmin(self.size[np.nonzero(room)[1]])])
        spare = self.state & ~self.want_evict & np.isfinite(incoming)[:, None, None] & (count > self.r)[None]
        if (spare & helps).any():  # an unhelpful one would only be put straight back
            s, l, e = np.argwhere(spare & helps)[0]
            self.state[s, l, e] = False
            self.want_copy[s, l, e] = self.put_back[s, l, e] = True
            return Stage.make([(l, e, s)])
        ev = self._evict(self.safe_evicts(everywhere=True))  # evictions held back make room to park in
        if len(ev):
            return Stage.make(ev)
        # Park an expert a waiting server keeps: it becomes a spare there, to be set aside next.
        keep = self.state & ~self.want_evict & np.isfinite(incoming)[:, None, None]
        room = (free[:, None] >= self.size[None, :])[:, :, None] & ~self.state & keep.any(axis=0)[None]
        if room.any():
            return self._park(np.argwhere(room)[np.argmin(self.size[np.nonzero(room)[1]])])
        waiting = ", ".join(n for n, w in zip(self.names, np.isfinite(incoming)) if w)
        room = ", ".join(f"{n} {human_bytes(f)}" for n, f in zip(self.names, free))
        raise MigrationError(
            f"cannot order the moves: the servers waiting for an expert ({waiting}) lack room for it, every expert they "
            f"must give up has no copy to spare (min_replicas={self.r}), and no server lacking one has room to park "
            f"it (free: {room}); give a server room for one more expert or lower `min_replicas`",
            parameters=("min_replicas",))


def plan_migration(old: np.ndarray, new: np.ndarray, cluster: ClusterSpec, model: ModelSpec,
                   min_replicas: int = 1) -> MigrationPlan:
    """Order the copies and evictions from placement `old` to `new` ([servers, layers, experts] bool) into
    stages that keep every invariant, and verify the result. Raises MigrationError when no order exists."""
    if old.shape != new.shape:
        raise MigrationError(f"placements have shapes {list(old.shape)} and {list(new.shape)}")
    short = np.argwhere(new.sum(axis=0) < min_replicas)
    if len(short):
        l, e = short[0]
        raise MigrationError(f"the new placement hosts expert {e} of layer {model.layers[l]} fewer than "
                             f"min_replicas={min_replicas} times")
    planner = _Planner(old, new, cluster, model, min_replicas)
    stages = []
    limit = 3 * int((old ^ new).sum()) + 10  # each stage moves something; cycle breaks add a bounded few
    while planner.want_copy.any() or planner.want_evict.any():
        if len(stages) >= limit:
            raise MigrationError(f"could not order the moves in {limit} stages: the placements differ in "
                                 f"{int((old ^ new).sum())} experts and memory is too tight to stage them; give a "
                                 f"server room for one more expert or migrate in smaller steps (`budget_bytes`)",
                                 parameters=("budget_bytes",))
        stages.append(planner.step())
    plan = MigrationPlan(model, tuple(cluster.names), stages, min_replicas,
                         needed_copy_bytes(old, new, model.layer_bytes),
                         [stage_seconds(st.copies, cluster, model.layer_bytes) for st in stages],
                         from_placement_sha256=placement_sha256(old), to_placement_sha256=placement_sha256(new))
    verify_migration(plan, old, new, cluster)
    return plan


def _where(model: ModelSpec, names, k: int, l: int, e: int, s: int | None = None) -> str:
    at = f" on {names[s]!r}" if s is not None else ""
    return f"stage {k}: expert {e} of layer {model.layers[l]}{at}"


def _check_steps(plan: MigrationPlan, shape: tuple[int, ...]) -> None:
    """Raise MigrationError when a step names a layer, expert or server outside `shape` (servers, layers,
    experts); numpy would wrap a negative index around."""
    limit = np.array([shape[1], shape[2], shape[0]])  # (layer, expert, server)
    for k, st in enumerate(plan.stages, 1):
        for arr, cols in ((st.evicts, [0, 1, 2]), (st.copies, [0, 1, 2]), (st.copies, [0, 1, 3])):
            if len(arr) and ((arr[:, cols] < 0).any() or (arr[:, cols] >= limit).any()):
                raise MigrationError(f"stage {k}: a step names a layer, expert or server out of range")


def verify_migration(plan: MigrationPlan, old: np.ndarray, new: np.ndarray, cluster: ClusterSpec) -> None:
    """Raise MigrationError naming the first stage and step that breaks an invariant (module docstring) when
    `plan` is applied to `old` on `cluster`; return None when it is sound and ends exactly at `new`."""
    model, names = plan.model, cluster.names
    if tuple(plan.servers) != tuple(names):
        raise MigrationError(f"the moves are for servers {list(plan.servers)} but the cluster has {names}")
    shape = (len(names), model.num_layers, model.num_experts)
    if old.shape != shape or new.shape != shape:
        raise MigrationError(f"placements must have shape {list(shape)} for these moves")
    _check_steps(plan, shape)
    size, budget, r = model.layer_bytes, cluster.budgets, plan.min_replicas
    cost = expert_seconds(cluster, size)
    state = old.copy()
    for k, st in enumerate(plan.stages, 1):
        ev, cp = st.evicts, st.copies
        l, e, s = ev.T
        not_held = ~state[s, l, e]
        if not_held.any():
            i = int(np.argmax(not_held))
            raise MigrationError(f"{_where(model, names, k, l[i], e[i], s[i])}: evicted but not held there")
        if len(np.unique(ev, axis=0)) != len(ev):
            raise MigrationError(f"stage {k}: the same expert is evicted twice from one server")
        state[s, l, e] = False
        count = state.sum(axis=0)
        if len(ev) and count[l, e].min() < r:
            i = int(np.argmin(count[l, e]))
            raise MigrationError(f"{_where(model, names, k, l[i], e[i])}: evicting it leaves {int(count[l[i], e[i]])} "
                                 f"cop{'y' if count[l[i], e[i]] == 1 else 'ies'}, fewer than min_replicas={r}")
        l, e, src, dst = cp.T
        if len(np.unique(cp[:, [0, 1, 3]], axis=0)) != len(cp):
            raise MigrationError(f"stage {k}: the same expert is copied twice to one server")
        held = state[dst, l, e]
        if held.any():
            i = int(np.argmax(held))
            raise MigrationError(f"{_where(model, names, k, l[i], e[i], dst[i])}: copied to a server that holds it")
        no_src = ~state[src, l, e]
        if no_src.any():
            i = int(np.argmax(no_src))
            raise MigrationError(f"{_where(model, names, k, l[i], e[i])}: copied from {names[src[i]]!r}, which does "
                                 f"not hold it once the stage's evictions are done")
        best = np.where(state[:, l, e], cost[:, dst, l], np.inf).min(axis=0)
        dearer = cost[src, dst, l] > best * (1 + 1e-9) + 1e-12
        if dearer.any():
            i = int(np.argmax(dearer))
            raise MigrationError(f"{_where(model, names, k, l[i], e[i], dst[i])}: copied from {names[src[i]]!r} "
                                 f"({cost[src[i], dst[i], l[i]]:.4g} s) but a holder sends it in {best[i]:.4g} s")
        landing = np.bincount(dst, weights=size[l], minlength=len(names))
        after = memory_used(state, size) + landing
        over = (landing > 0) & (after > budget)
        if over.any():
            i = int(np.argmax(over))
            raise MigrationError(f"stage {k}: copies land on {names[i]!r} without room: it would hold "
                                 f"{human_bytes(after[i])} of {human_bytes(budget[i])}")
        state[dst, l, e] = True
    diff = np.argwhere(state != new)
    if len(diff):
        s, l, e = diff[0]
        which = "keeps" if state[s, l, e] else "lacks"
        raise MigrationError(f"after all stages {names[s]!r} {which} expert {e} of layer {model.layers[l]}, unlike "
                             f"the new placement ({len(diff)} difference(s))")
