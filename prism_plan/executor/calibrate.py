"""Measure this machine for the cluster file: expert-FFN throughput at the model's expert shape and dtype
(`compute_tflops`), slow tier -> device copies of expert-sized tensors (`load_gbps`, `load_latency_ms`), and,
with several ranks (torchrun or `--nproc`), bandwidth and latency between every pair of ranks (`[[link]]`).

Every figure comes with how it was measured, written beside it as a TOML comment, so that a person can paste
the snippet into a cluster file and know what each number means.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.executor import require_torch
from prism_plan.executor.store import ExpertStore, synthetic_layout
from prism_plan.placement.checks import integer, text
from prism_plan.placement.cluster import GIB
from prism_plan.placement.model import ModelSpec
from prism_plan.progress import track
from prism_plan.solvers.deadline import Deadline
from prism_plan.units import human_bytes

BATCHES = (1, 16, 128, 1024)  # tokens per expert call: decode, small and large prefill shares
DTYPES = ("float32", "bfloat16", "float16")
MIN_SECONDS = 0.05  # each point runs at least this long (and at least MIN_REPEATS times) for a stable median
MIN_REPEATS = 3
COPY_SHARES = (1 / 16, 1 / 4, 1.0)  # of one expert's bytes: a line through them gives bandwidth and latency
MEMORY_SHARE = 0.9  # of the device memory free now, written as memory_gib
MIN_COPY_BYTES = 16 << 20  # copies and messages at least this big: smaller ones time the call, not the link
LINK_ROUNDS = 7


@dataclass
class ComputePoint:
    """One point of the throughput curve: `tokens` through one expert took `seconds` (median), `tflops`."""

    tokens: int
    seconds: float
    tflops: float


@dataclass
class LinkFigure:
    """Measured between ranks a and b: one-way latency (s) of a hidden-state message, bandwidth (bytes/s) of
    expert-sized messages."""

    a: int
    b: int
    latency: float
    bandwidth: float
    message_bytes: int


@dataclass
class Calibration:
    """What `calibrate` measured on every rank (one entry per rank; one rank without torch.distributed).

    curve: per rank, the compute points; compute_tflops: [ranks] the sustained figure (the curve's best);
    load_bandwidth: [ranks] bytes/s; load_latency: [ranks] s; memory_bytes: [ranks] written as memory_gib;
    links: between every pair of ranks; rank: the rank that holds this copy (None: calibrate ran alone);
    origins: per rank, the request sources written for it (default its name)."""

    model: str
    device: str
    dtype: str
    names: tuple[str, ...]
    hosts: tuple[str, ...]
    devices: tuple[str, ...]
    expert_bytes: int
    curve: list[list[ComputePoint]]
    compute_tflops: np.ndarray
    load_bandwidth: np.ndarray
    load_latency: np.ndarray
    memory_bytes: np.ndarray
    links: list[LinkFigure] = field(default_factory=list)
    seconds: float = 0.0
    rank: int | None = None
    origins: tuple[tuple[str, ...], ...] = ()

    def summary(self) -> dict:
        """Plain data for JSON; rates in the cluster file's units."""
        return {
            "rank": self.rank, "model": self.model, "device": self.device, "dtype": self.dtype,
            "expert_bytes": self.expert_bytes, "seconds": self.seconds,
            "servers": [{"name": n, "origins": list(self.origins_of(i)), "host": h, "device": d,
                         "compute_tflops": float(c),
                         "curve": [{"tokens": p.tokens, "seconds": p.seconds, "tflops": p.tflops} for p in curve],
                         "load_gbps": float(bw * 8 / 1e9), "load_latency_ms": float(lat * 1e3),
                         "memory_gib": float(m / GIB)}
                        for i, (n, h, d, c, curve, bw, lat, m) in enumerate(zip(self.names, self.hosts, self.devices,
                                                                 self.compute_tflops, self.curve,
                                                                 self.load_bandwidth, self.load_latency,
                                                                 self.memory_bytes))],
            "links": [{"a": self.names[k.a], "b": self.names[k.b], "bandwidth_gbps": k.bandwidth * 8 / 1e9,
                       "latency_ms": k.latency * 1e3, "message_bytes": k.message_bytes} for k in self.links],
        }

    def origins_of(self, rank: int) -> tuple[str, ...]:
        """The request sources written for `rank`'s server."""
        return self.origins[rank] if self.origins else (self.names[rank],)

    @classmethod
    def from_summary(cls, s: dict) -> "Calibration":
        """The Calibration whose summary() is `s` (a rank's JSON line)."""
        servers = s["servers"]
        names = tuple(x["name"] for x in servers)
        index = {n: i for i, n in enumerate(names)}
        return cls(s["model"], s["device"], s["dtype"], names, tuple(x["host"] for x in servers),
                   tuple(x["device"] for x in servers), int(s["expert_bytes"]),
                   [[ComputePoint(int(p["tokens"]), float(p["seconds"]), float(p["tflops"])) for p in x["curve"]]
                    for x in servers],
                   np.array([x["compute_tflops"] for x in servers], np.float64),
                   np.array([x["load_gbps"] * 1e9 / 8 for x in servers], np.float64),
                   np.array([x["load_latency_ms"] / 1e3 for x in servers], np.float64),
                   np.array([round(x["memory_gib"] * GIB) for x in servers], np.int64),
                   [LinkFigure(index[k["a"]], index[k["b"]], k["latency_ms"] / 1e3, k["bandwidth_gbps"] * 1e9 / 8,
                               int(k["message_bytes"])) for k in s["links"]], float(s["seconds"]), s.get("rank"),
                   tuple(tuple(x["origins"]) for x in servers))

    def to_toml(self) -> str:
        """The cluster-file snippet: one [[server]] per rank, one [[link]] per pair, each number commented."""
        out = [f"# prism-plan calibrate: {self.model} experts ({human_bytes(self.expert_bytes)}, {self.dtype}) "
               f"on {self.device}, {time.strftime('%Y-%m-%d')}, {self.seconds:.1f} s",
               "# memory_gib is a starting point: leave room for the KV cache", ""]
        for r, name in enumerate(self.names):
            curve = ", ".join(f"{p.tokens}: {p.tflops:.3g}" for p in self.curve[r])
            out += ["[[server]]", f"name = {_quoted(name)}",
                    f"memory_gib = {self.memory_bytes[r] / GIB:.2f}  # {MEMORY_SHARE:.0%} of the memory {self.devices[r]}"
                    f" had free on {self.hosts[r]}",
                    f"compute_tflops = {self.compute_tflops[r]:.4g}  # one expert's SwiGLU FFN, the best of "
                    f"TFLOP/s by tokens per call (median of repeats): {curve}",
                    f"origins = [{', '.join(map(_quoted, self.origins_of(r)))}]",
                    f"load_gbps = {self.load_bandwidth[r] * 8 / 1e9:.4g}  # host -> {self.devices[r]} copies of "
                    f"{', '.join(f'{s:g}' for s in COPY_SHARES)} x {human_bytes(max(self.expert_bytes, MIN_COPY_BYTES))}"
                    f", least-squares slope",
                    f"load_latency_ms = {self.load_latency[r] * 1e3:.4g}  # the same line's intercept", ""]
        for k in self.links:
            out += ["[[link]]", f"a = {_quoted(self.names[k.a])}", f"b = {_quoted(self.names[k.b])}",
                    f"bandwidth_gbps = {k.bandwidth * 8 / 1e9:.4g}  # ping-pong of {human_bytes(k.message_bytes)} "
                    f"messages, one way, less the latency",
                    f"latency_ms = {k.latency * 1e3:.4g}  # half the round trip of one hidden state", ""]
        return "\n".join(out).rstrip() + "\n"


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_options(device: str, dtype: str | None) -> None:
    """PrismErrors for a device or dtype this machine cannot measure, before any work."""
    torch = require_torch()
    if device not in ("cpu", "cuda"):
        raise PrismError(f"`device` must be cpu or cuda, got {device!r}", parameters=("device",))
    if device == "cuda" and not torch.cuda.is_available():
        raise PrismError("`device` cuda: this machine has no CUDA GPU that torch can use; calibrate with device "
                         "cpu, or run on the GPU machine", parameters=("device",))
    if dtype is not None and dtype not in DTYPES:
        raise PrismError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}", parameters=("dtype",))


def _timed(run, sync, deadline: Deadline) -> float:
    """Median seconds of `run()` over at least MIN_REPEATS calls and MIN_SECONDS (after one warm-up call)."""
    run()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS:
        if deadline.expired():
            if times:
                break
            raise PrismError("calibrate ran out of time before it measured a point; give it more `time_limit`",
                             parameters=("time_limit",))
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_compute(model: ModelSpec, device: str, dtype: str, batches=BATCHES, *, deadline: Deadline,
                    quiet: bool = True) -> list[ComputePoint]:
    """Throughput of one expert's SwiGLU FFN (the executor's ExpertStore.forward) on `device` in `dtype` at each
    of `batches` tokens per call; FLOPs are 2 per weight per token."""
    torch = require_torch()
    store = _one_expert(model, device, dtype)
    key = store.experts()[0]
    weights = sum(t.numel() for t in store.tensors[key].values())
    sync = _synchronizer(device)
    points = []
    for tokens in track(list(batches), "measuring expert compute", quiet=quiet):
        x = torch.randn(tokens, model.hidden_size, device=device).to(getattr(torch, dtype))
        seconds = _timed(lambda: store.forward(key, x), sync, deadline)
        points.append(ComputePoint(int(tokens), seconds, 2.0 * weights * tokens / seconds / 1e12))
    return points


def measure_load(model: ModelSpec, device: str, dtype: str, *, deadline: Deadline) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of copies from host memory to `device` (pinned memory where CUDA is; on
    CPU, into a second tensor, as OffloadCache loads there) of COPY_SHARES of one expert (at least
    MIN_COPY_BYTES), each into a buffer allocated beforehand: the least-squares line seconds = latency +
    bytes / bandwidth."""
    torch = require_torch()
    size = max(expert_bytes(model, dtype), MIN_COPY_BYTES)
    sync = _synchronizer(device)
    sizes, seconds = [], []
    for share in COPY_SHARES:
        n = max(1, int(size * share))
        src = torch.empty(n, dtype=torch.uint8)
        if device == "cuda":
            src = src.pin_memory()
        src.random_(0, 255)
        dst = torch.empty(n, dtype=torch.uint8, device=device)  # a cache slot: the allocator's work left out
        seconds.append(_timed(lambda: dst.copy_(src, non_blocking=device != "cpu"), sync, deadline))
        sizes.append(n)
    slope, intercept = np.polyfit(np.asarray(sizes, np.float64), np.asarray(seconds), 1)
    if slope <= 0:  # copies too fast to tell apart: the largest alone
        slope, intercept = seconds[-1] / sizes[-1], 0.0
    return 1.0 / slope, max(float(intercept), 0.0)


def free_memory(device: str) -> int:
    """Bytes of device memory free now: CUDA's mem_get_info, or the host's available memory on CPU."""
    torch = require_torch()
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _one_expert(model: ModelSpec, device: str, dtype: str) -> ExpertStore:
    """A store holding one synthetic expert of the model's shape, in `dtype` on `device`."""
    torch = require_torch()
    store = ExpertStore(device).fill_synthetic(model, [(model.layers[0], 0)])
    key = store.experts()[0]
    store.tensors[key] = {k: t.to(getattr(torch, dtype)) for k, t in store.tensors[key].items()}
    return store


def expert_bytes(model: ModelSpec, dtype: str) -> int:
    """Bytes of one expert of the model's shape in `dtype`."""
    torch = require_torch()
    per = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return int(sum(math.prod(shape) for shape, _ in synthetic_layout(model).values()) * per)


def _synchronizer(device: str):
    torch = require_torch()
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def default_dtype(model: ModelSpec) -> str:
    """The dtype the model's experts are stored in (synthetic_layout's)."""
    return next(iter(synthetic_layout(model).values()))[1]


def measure_links(group, model: ModelSpec, *, deadline: Deadline, quiet: bool = True) -> list[LinkFigure]:
    """Latency and bandwidth between every pair of ranks of `group` (a joined executor Group): pair by pair, a
    ping-pong of one hidden state (latency: half the round trip) and of one expert's bytes, at least
    MIN_COPY_BYTES (bandwidth: its bytes over half the round trip less the latency); the other ranks wait."""
    torch = require_torch()
    import torch.distributed as dist

    expert = max(int(model.layer_bytes.max()), MIN_COPY_BYTES)
    small = max(1, model.token_bytes)
    links = []
    pairs = [(a, b) for a in range(group.world) for b in range(a + 1, group.world)]
    for a, b in track(pairs, "measuring links", quiet=quiet or group.rank != 0):
        figure = torch.zeros(2, dtype=torch.float64)
        if group.rank in (a, b):
            peer = b if group.rank == a else a
            sync = _synchronizer("cuda" if group.device.startswith("cuda") else "cpu")
            rtt = [_ping_pong(torch, dist, group, peer, group.rank == a, n, sync, deadline) for n in (small, expert)]
            latency = rtt[0] / 2
            one_way = max(rtt[1] / 2 - latency, 1e-12)
            figure[:] = torch.tensor([latency, expert / one_way], dtype=torch.float64)
        out = [torch.zeros(2, dtype=torch.float64) for _ in range(group.world)]
        group.all_gather(out, figure.to(group.device) if group.device != "cpu" else figure)
        latency, bandwidth = out[a].cpu().tolist()
        links.append(LinkFigure(a, b, latency, bandwidth, expert))
    return links


def _ping_pong(torch, dist, group, peer: int, first: bool, nbytes: int, sync, deadline: Deadline) -> float:
    """Median round trip (s) of an `nbytes` message to `peer` and back; `first` sends first. The first round
    goes through the group's watched waits (a lost peer fails it there); the timed ones wait in torch itself,
    so that the figures measure the transport, not the watchdog."""
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=group.device)
    order = (dist.isend, dist.irecv) if first else (dist.irecv, dist.isend)
    for op in order:
        group.exchange([dist.P2POp(op, buf, peer)])
    sync()
    rounds = []
    for _ in range(LINK_ROUNDS):  # both sides run the same count: a clock each reads differently could not agree
        t0 = time.perf_counter()
        for op in order:
            op(buf, peer).wait()
        sync()
        rounds.append(time.perf_counter() - t0)
    return float(np.median(rounds))


def checked_origins(origins, ranks: int | None) -> tuple[str, ...] | None:
    """`origins` as names; with `ranks`, exactly one per rank (a PrismError otherwise)."""
    if origins is None:
        return None
    origins = tuple(text(o, "every name in `origins`") for o in origins)
    if ranks is not None and len(origins) != ranks:
        raise PrismError(f"`origins` names {len(origins)} request source(s) for {ranks} ranks; give one per rank, "
                         f"in rank order", parameters=("origins",))
    return origins


def calibrate(model: ModelSpec, *, device: str = "cpu", dtype: str | None = None, name: str | None = None,
              origins=None, batches=BATCHES, group=None, time_limit: float | None = None,
              quiet: bool = True) -> Calibration:
    """Measure this rank (and, with a joined `group`, every pair of ranks) and gather the figures on every rank.

    model: whose expert shape to measure; device: cpu or cuda; dtype: default the model's; name: the server's
    name (default the host name; with a group, name-rank); origins: the request sources arriving at it (one
    list; with a group, one name per rank, in rank order; default each server's name); batches: tokens per expert call on the curve, the
    best giving compute_tflops; time_limit: seconds for the whole measurement (None: no limit)."""
    start = time.perf_counter()
    check_options(device, dtype)
    dtype = dtype or default_dtype(model)
    batches = tuple(int(b) for b in batches)
    if not batches or min(batches) < 1:
        raise PrismError(f"`batches` must be positive token counts, got {list(batches)}", parameters=("batches",))
    world = 1 if group is None else group.world
    origins = checked_origins(origins, None if group is None else world)
    host = platform.node() or "localhost"
    base = text(name, "`name`") if name is not None else host
    deadline = Deadline(time_limit)
    if group is not None and group.device.startswith("cuda"):
        device = group.device
    elif device == "cuda":
        device = f"cuda:{require_torch().cuda.current_device()}"
    # Ranks take turns: ranks sharing a host would otherwise measure each other's load.
    for turn in range(world):
        if turn == (0 if group is None else group.rank):
            curve = measure_compute(model, device, dtype, batches, deadline=deadline, quiet=quiet)
            bandwidth, latency = measure_load(model, device, dtype, deadline=deadline)
        if group is not None:
            group.barrier()
    free = free_memory("cpu" if device == "cpu" else "cuda")
    mine = [max(p.tflops for p in curve), bandwidth, latency, MEMORY_SHARE * free]
    if group is None:
        ranks = [(base, host, device, curve, mine)]
        links: list[LinkFigure] = []
    else:
        ranks = _gather(group, (f"{base}-{group.rank}", host, device, curve, mine))
        links = measure_links(group, model, deadline=deadline, quiet=quiet)
    names = tuple(r[0] for r in ranks)
    if len(set(names)) != len(names):
        raise PrismError(f"two ranks measured under one name ({', '.join(names)}); pass distinct `name`s",
                         parameters=("name",))
    figures = np.array([r[4] for r in ranks], np.float64)
    for what, column in (("compute", 0), ("load bandwidth", 1)):
        if not np.all(np.isfinite(figures[:, column])) or np.any(figures[:, column] <= 0):
            raise PrismError(f"the {what} measured is not a positive number ({figures[:, column].tolist()}); the "
                             f"machine was too busy or the timer too coarse: run calibrate again")
    return Calibration(model.name, device.split(":")[0], dtype, names, tuple(r[1] for r in ranks),
                       tuple(r[2] for r in ranks), expert_bytes(model, dtype), [r[3] for r in ranks],
                       figures[:, 0], figures[:, 1], figures[:, 2], figures[:, 3].astype(np.int64), links,
                       time.perf_counter() - start, None if group is None else group.rank,
                       () if origins is None else (origins,) if group is None else tuple((o,) for o in origins))


def _gather(group, item) -> list:
    """Every rank's `item` (picklable), in rank order, through the group's store."""
    import pickle

    group.store.set(f"prism/calibrate/{group.rank}", pickle.dumps(item))
    group.barrier()
    return [pickle.loads(group.store.get(f"prism/calibrate/{r}")) for r in range(group.world)]


def calibrate_ranks(model: str, *, nproc: int | None = None, device: str = "cpu", dtype: str | None = None,
                    name: str | None = None, origins=None, time_limit: float | None = None,
                    timeout_s: float = 300.0, quiet: bool = True) -> Calibration:
    """`prism-plan calibrate` here: alone; as a rank under torchrun (every rank measures, and every rank gets
    the figures of all; rank 0 writes them); or with `nproc`, as that many local ranks started here (their
    links measured over gloo, or NCCL on GPUs), rank 0's figures back. model: a preset, config.json or model
    folder."""
    from prism_plan.placement.model import resolve_model

    spec = resolve_model(model)
    check_options(device, dtype)
    if nproc is not None:
        return _launched(model, nproc, device, dtype, name, origins, time_limit, timeout_s)
    if "RANK" not in os.environ:
        return calibrate(spec, device=device, dtype=dtype, name=name, origins=origins, time_limit=time_limit,
                         quiet=quiet)
    from prism_plan.executor.group import init_distributed

    group = init_distributed(timeout_s)
    try:
        result = calibrate(spec, device=device, dtype=dtype, name=name, origins=origins, group=group,
                           time_limit=time_limit, quiet=quiet)
        group.close()
    except BaseException as e:
        group.fail(e)
        raise
    return result


def _launched(model: str, nproc: int, device: str, dtype: str | None, name: str | None, origins,
              time_limit: float | None, timeout_s: float) -> Calibration:
    """Run calibrate as `nproc` local ranks; rank 0's figures (all ranks' and the links)."""
    import tempfile

    from prism_plan.executor.launch import run_ranks, summarize

    integer(nproc, "`nproc`", low=2, fix="give 2 or more ranks (without `nproc`, calibrate measures one "
            "server)", parameters=("nproc",))
    checked_origins(origins, nproc)
    with tempfile.TemporaryDirectory(prefix="prism-calibrate-") as tmp:
        argv = ["calibrate", "--model", str(model), "--device", device, "--timeout", repr(float(timeout_s)),
                "--json", "--quiet", "-o", str(Path(tmp) / "rank0.toml")]
        for flag, value in (("--dtype", dtype), ("--name", name), ("--time-limit", time_limit),
                            ("--origins", None if origins is None else ",".join(origins))):
            if value is not None:
                argv += [flag, str(value)]
        return Calibration.from_summary(summarize(*run_ranks(argv, nproc, timeout_s))[0])
