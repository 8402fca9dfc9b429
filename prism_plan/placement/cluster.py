"""ClusterSpec: the servers that serve a MoE model together, their memory, compute and links.

Read from the TOML file people write (see DESIGN.md, "Cluster file"). Links are given per pair, as a full
matrix, or as a sparse topology: pairs with no direct link use `[defaults]` when present, else the best path
through the listed links (latency adds up along a path, bandwidth is its narrowest link).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import networkx as nx
import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import bundled_or_given, read_user_text
from prism_plan.placement.checks import is_number, number, text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GIB = 2**30
_SERVER_KEYS = {"name", "memory_gib", "compute_tflops", "origins", "node"}
_LINK_KEYS = {"a", "b", "bandwidth_gbps", "latency_ms", "one_way"}
_DEFAULT_KEYS = {"bandwidth_gbps", "latency_ms"}
_TOP_KEYS = {"server", "link", "defaults", "matrix", "name"}


@dataclass(frozen=True)
class ServerSpec:
    """One server: memory for routed experts (bytes), expert-FFN throughput (TFLOP/s), origins it receives, and
    the node (machine) it is in ("": a node of its own)."""

    name: str
    memory_bytes: int
    compute_tflops: float
    origins: tuple[str, ...]
    node: str = ""


@dataclass(frozen=True)
class ClusterSpec:
    """Servers and pairwise link costs.

    bandwidth: [servers, servers] bytes per second from row server to column server (inf on the diagonal).
    latency: [servers, servers] seconds per message (0 on the diagonal).
    """

    servers: tuple[ServerSpec, ...]
    bandwidth: np.ndarray
    latency: np.ndarray
    name: str = "cluster"

    @classmethod
    def load(cls, path: str | Path) -> "ClusterSpec":
        """Read and validate a cluster TOML file (`load_cluster`)."""
        return load_cluster(path)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.servers]

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    @property
    def budgets(self) -> np.ndarray:
        """bytes: [servers] int64, memory for routed experts."""
        return np.array([s.memory_bytes for s in self.servers], dtype=np.int64)

    @property
    def flops(self) -> np.ndarray:
        """FLOP/s: [servers] float64, sustained expert-FFN throughput."""
        return np.array([s.compute_tflops for s in self.servers], dtype=float) * 1e12

    @property
    def node_index(self) -> np.ndarray:
        """[servers] int64, the node of each server, numbered in order of first appearance; a server without
        `node` is a node of its own (a separate machine, as serving systems count nodes)."""
        keys = [s.node or ("", i) for i, s in enumerate(self.servers)]
        first: dict = {}
        return np.array([first.setdefault(k, len(first)) for k in keys], dtype=np.int64)

    @property
    def origin_server(self) -> dict[str, int]:
        """Origin name -> index of the server its requests arrive at."""
        return {o: i for i, s in enumerate(self.servers) for o in s.origins}

    def hop_seconds(self, message_bytes: float) -> np.ndarray:
        """seconds: [servers, servers], time to send one message of `message_bytes` between two servers."""
        return self.latency + message_bytes / self.bandwidth

    def homes(self, origins: list[str]) -> np.ndarray:
        """[origins] int64, the server index each origin's requests arrive at; an error names unserved ones."""
        where = self.origin_server
        unserved = [o for o in origins if o not in where]
        if unserved:
            raise PrismError(f"origin(s) {unserved} have no server in cluster {self.name!r}; add them to a "
                             f"server's `origins` list (served now: {sorted(where)})")
        return np.array([where[o] for o in origins], dtype=np.int64)

    def to_dict(self) -> dict:
        """Plain data (used for hashing and for plan provenance)."""
        return {
            "name": self.name,
            "servers": [{"name": s.name, "memory_bytes": s.memory_bytes, "compute_tflops": s.compute_tflops,
                         "origins": list(s.origins), **({"node": s.node} if s.node else {})}
                        for s in self.servers],
            "bandwidth": np.where(np.isinf(self.bandwidth), -1, self.bandwidth).tolist(),
            "latency": self.latency.tolist(),
        }

    def sha256(self) -> str:
        """Hash of the cluster's meaning (not its file's formatting)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _fail(where: str, msg: str) -> None:
    raise PrismError(f"{where}: {msg}")


# Each number a cluster file holds: its range (sane values, so that no solver sees a NaN, an infinity or a
# magnitude its tolerances cannot handle) and what to write instead.
_NUMBERS = {
    "memory_gib": (0.0, 1e6, "give the server's memory for routed experts in GiB"),
    "compute_tflops": (1e-6, 1e6, "give the server's sustained expert-FFN throughput in TFLOP/s"),
    "bandwidth_gbps": (1e-6, 1e6, "give the bandwidth in gigabits per second"),
    "latency_ms": (0.0, 1e6, "give the latency in milliseconds"),
}


def _number(where: str, table: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """`table[key]` (or `default`) checked against its range in _NUMBERS."""
    value = table.get(key, default)
    if value is None:
        _fail(where, f"missing `{key}`; {_NUMBERS[key][2]}")
    low, high, fix = _NUMBERS[key]
    return number(value, f"{where}: `{key}`", low=low, high=high, fix=fix)


def _table(where: str, value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        _fail(where, f"must be a table ({what}), got {value!r}")
    return value


def _tables(where: str, value: Any, header: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        _fail(where, f"`{header}` must be written as [[{header}]] tables, got {value!r}")
    return value


def _check_keys(where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(table) - allowed
    if unknown:
        _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def parse_cluster(doc: Mapping[str, Any], source: str = "cluster") -> ClusterSpec:
    """Validate a parsed cluster document (the TOML's tables) and build a ClusterSpec. source: the file it came
    from, named in every error (its last part is the cluster's default name)."""
    _check_keys(source, doc, _TOP_KEYS)
    cluster_name = text(doc["name"], f"{source}: `name`", fix="name the cluster") if "name" in doc \
        else Path(source).name
    raw_servers = doc.get("server")
    if not raw_servers:
        _fail(source, "no servers: add at least one [[server]] table with name and memory_gib")
    servers: list[ServerSpec] = []
    owner: dict[str, str] = {}
    for i, raw in enumerate(_tables(source, raw_servers, "server")):
        where = f"{source}: server #{i + 1}"
        _check_keys(where, raw, _SERVER_KEYS)
        name = text(raw.get("name"), f"{where}: `name`", fix="give every server a name")
        where = f"{source}: server {name!r}"
        if name in (s.name for s in servers):
            _fail(where, "duplicate server name; every server needs its own name")
        memory = _number(where, raw, "memory_gib")
        compute = _number(where, raw, "compute_tflops", default=1.0)
        origins = raw.get("origins", [name])
        if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins):
            _fail(where, f"`origins` must be a list of names, got {origins!r}")
        for o in origins:
            if o in owner:
                again = "twice" if owner[o] == name else f"already served by server {owner[o]!r}"
                _fail(where, f"origin {o!r} is {again}; each origin arrives at exactly one server, list it once")
            owner[o] = name
        node = text(raw["node"], f"{where}: `node`", fix="name the node (machine) the server is in, or leave "
                                                         "`node` out") if "node" in raw else ""
        servers.append(ServerSpec(name, int(round(memory * GIB)), compute, tuple(origins), node))

    bandwidth, latency = _link_matrices(doc, [s.name for s in servers], source)
    return ClusterSpec(tuple(servers), bandwidth, latency, name=cluster_name)


def _link_matrices(doc: Mapping[str, Any], names: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise bandwidth (bytes/s) and latency (s) from [matrix], or [defaults] plus [[link]] tables."""
    n = len(names)
    if "matrix" in doc:
        if "link" in doc or "defaults" in doc:
            _fail(source, "[matrix] gives every pair already; drop the [[link]] and [defaults] tables or the "
                          "[matrix]")
        return _matrix_links(_table(f"{source}: [matrix]", doc["matrix"], "bandwidth_gbps and latency_ms"),
                             names, source)
    if "defaults" in doc:
        where = f"{source}: [defaults]"
        defaults = _table(where, doc["defaults"], "bandwidth_gbps and latency_ms")
        _check_keys(where, defaults, _DEFAULT_KEYS)
        bw = np.full((n, n), _number(where, defaults, "bandwidth_gbps", default=10.0))
        lat = np.full((n, n), _number(where, defaults, "latency_ms", default=0.5))
    else:
        bw, lat = np.full((n, n), np.nan), np.full((n, n), np.nan)
    given: dict[tuple[int, int], tuple[int, float, float]] = {}  # (from, to) -> (link number, gbps, ms)
    for i, raw in enumerate(_tables(source, doc.get("link", []), "link")):
        where = f"{source}: link #{i + 1}"
        _check_keys(where, raw, _LINK_KEYS)
        for end in ("a", "b"):
            if raw.get(end) not in names:
                _fail(where, f"`{end}` must name a server, got {raw.get(end)!r}; servers are {names}")
        a, b = raw["a"], raw["b"]
        if a == b:
            _fail(where, f"a link needs two different servers, got {a!r} twice")
        one_way = raw.get("one_way", False)
        if not isinstance(one_way, bool):
            _fail(where, f"`one_way` must be true or false, got {one_way!r}")
        where = f"{source}: link #{i + 1} ({a!r}-{b!r})"
        ia, ib = names.index(a), names.index(b)
        gbps = _number(where, raw, "bandwidth_gbps")
        ms = _number(where, raw, "latency_ms", default=0.0)
        for x, y in [(ia, ib)] if one_way else [(ia, ib), (ib, ia)]:
            if (x, y) in given:
                j, old_gbps, old_ms = given[(x, y)]
                same = "with the same values" if (old_gbps, old_ms) == (gbps, ms) else "with other values"
                _fail(where, f"link #{j} already sets {names[x]!r} -> {names[y]!r} ({same}); list each pair once")
            given[(x, y)] = (i + 1, gbps, ms)
            bw[x, y], lat[x, y] = gbps, ms
    np.fill_diagonal(bw, np.inf)
    np.fill_diagonal(lat, 0.0)
    if np.isnan(bw).any():
        bw, lat = _route_through_topology(bw, lat, names, source)
    return bw * 1e9 / 8, lat / 1e3


def _route_through_topology(bw: np.ndarray, lat: np.ndarray, names: list[str],
                            source: str) -> tuple[np.ndarray, np.ndarray]:
    """Fill pairs with no direct link by the lowest-latency path through the listed links."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(names)))
    for x, y in zip(*np.nonzero(~np.isnan(bw) & ~np.eye(len(names), dtype=bool))):
        g.add_edge(int(x), int(y), latency=lat[x, y], bandwidth=bw[x, y])
    paths = dict(nx.all_pairs_dijkstra_path(g, weight="latency"))
    bw, lat = bw.copy(), lat.copy()
    for x, y in zip(*np.nonzero(np.isnan(bw))):
        path = paths[int(x)].get(int(y))
        if path is None:
            _fail(source, f"no link or path from {names[x]!r} to {names[y]!r}; add a [[link]] or a "
                          f"[defaults] table for unlisted pairs")
        hops = list(zip(path[:-1], path[1:]))
        lat[x, y] = sum(g.edges[h]["latency"] for h in hops)
        bw[x, y] = min(g.edges[h]["bandwidth"] for h in hops)
    return bw, lat


def _matrix_fast(rows: list[list], low: float, high: float) -> np.ndarray | None:
    """`rows` as an array when every cell is an int or float, off-diagonal ones within [low, high] and none NaN;
    None otherwise. One array pass: a cell-by-cell check of 4,000 servers took 53 s."""
    if not all(type(v) in (int, float) for row in rows for v in row):  # TOML has no other number types
        return None
    m = np.array(rows, float)
    off = ~np.eye(len(rows), dtype=bool)
    with np.errstate(invalid="ignore"):
        fine = np.where(off, (m >= low) & (m <= high), ~np.isnan(m))
    return m if fine.all() else None


def _matrix_links(raw: Mapping[str, Any], names: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    where = f"{source}: [matrix]"
    _check_keys(where, raw, _DEFAULT_KEYS)
    n = len(names)
    out = []
    for key in ("bandwidth_gbps", "latency_ms"):
        shape = f"a {n} x {n} list of lists of numbers, servers in file order ({', '.join(names)})"
        if key not in raw:
            _fail(where, f"missing `{key}`: {shape}")
        rows = raw[key]
        if not isinstance(rows, list) or len(rows) != n or \
                not all(isinstance(row, list) and len(row) == n for row in rows):
            _fail(where, f"`{key}` must be {shape}")
        low, high, fix = _NUMBERS[key]
        m = _matrix_fast(rows, low, high)
        if m is not None:
            out.append(m)
            continue
        m = np.zeros((n, n))  # a bad cell somewhere: find the first, cell by cell, and say which
        for x, row in enumerate(rows):
            for y, value in enumerate(row):
                cell = f"`{key}` row {x + 1} column {y + 1} ({names[x]!r} -> {names[y]!r})"
                if x != y:
                    m[x, y] = number(value, f"{where}: {cell}", low=low, high=high, fix=fix)
                elif not is_number(value) or np.isnan(value):  # unused: any number, inf included, means "local"
                    _fail(where, f"{cell} must be a number, got {value!r}")
        out.append(m)
    bw, lat = out
    np.fill_diagonal(bw, np.inf)
    np.fill_diagonal(lat, 0.0)
    return bw * 1e9 / 8, lat / 1e3


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster TOML file; a bare name such as "edge-4" finds the bundled cluster."""
    path = bundled_or_given(path, ".toml")
    text = read_user_text(path, "cluster file")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PrismError(f"{path} is not valid TOML: {e}")
    return parse_cluster(doc, source=str(path))
