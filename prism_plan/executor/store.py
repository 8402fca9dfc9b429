"""ExpertStore: the routed experts one rank holds, keyed by (layer, expert), read selectively from a Hugging Face
safetensors checkpoint; OffloadCache: the experts a rank does not pin, loaded on demand from its slow tier (host
memory, or the checkpoint itself) into a cache on its compute device.

Checkpoints name expert tensors `[model.]layers.<layer>.<block>.experts.<rest>`: per-expert modules
(`experts.<e>.w1.weight`, `experts.<e>.gate_proj.weight`, ...: transformers 4.x layouts and what 5.x writes for
them) or fused tensors with experts on the first axis (`experts.gate_up_proj [E, ...]`, `experts.down_proj`).
Only the headers of the checkpoint files are read to index it; loading reads only the tensors (or, for fused
tensors, the rows) of the experts asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.executor import require_torch
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.offload import ExpertCache, Offload

_EXPERT = re.compile(r"^(?:model\.)?layers\.(\d+)\.[^.]+\.experts\.(.+)$")
_DTYPES = {2: "bfloat16", 4: "float32"}
SIZE_TOLERANCE = 0.25  # how far an expert's tensors may be from the size the model gives it
# safetensors' dtype codes, as torch names
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class Source:
    """One tensor of one expert: the file, the tensor's name there, the row for fused tensors (else None)."""

    file: str
    name: str
    row: int | None


@dataclass
class CheckpointIndex:
    """Where each expert's tensors are: sources[(layer, expert)][key]; shapes[(layer, key)] = (shape, dtype name)
    of one expert's tensor. key: the tensor's name below the expert (`w1.weight`, `gate_up_proj`, ...)."""

    folder: Path
    sources: dict[tuple[int, int], dict[str, Source]] = field(default_factory=dict)
    shapes: dict[tuple[int, str], tuple[tuple[int, ...], str]] = field(default_factory=dict)

    def layout(self, layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """key -> (shape, dtype) of one expert of `layer`."""
        return {k: v for (lay, k), v in self.shapes.items() if lay == layer}


@contextlib.contextmanager
def _opened(path: Path, device: str = "cpu"):
    """safetensors' safe_open, its errors (a truncated or foreign file, one that cannot be read) one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt", device=device) as f:
            yield f
    except SafetensorError as e:
        raise PrismError(f"{path} is not a readable safetensors file ({e}); is it truncated? save or download the "
                         f"checkpoint again")
    except OSError as e:
        raise PrismError(f"cannot read {path}: {e.strerror or e}; check the file and its permissions")


def index_checkpoint(folder: str | Path, model: ModelSpec) -> CheckpointIndex:
    """Index the expert tensors of a safetensors checkpoint folder (headers only); a PrismError when they are not
    the model's (missing experts, other sizes)."""
    folder = Path(folder)
    if not folder.exists():
        raise MissingInputError(f"no checkpoint folder at {folder}; pass the folder `save_pretrained` wrote")
    if not folder.is_dir():
        raise PrismError(f"{folder} is a file; pass the checkpoint's folder (the one `save_pretrained` wrote)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PrismError(f"{folder} holds no .safetensors files; pass the folder `save_pretrained` wrote")
    index = CheckpointIndex(folder)
    layers = set(model.layers)
    for path in files:
        with _opened(path) as f:
            for name in f.keys():
                m = _EXPERT.match(name)
                if not m or int(m.group(1)) not in layers:
                    continue
                layer, rest = int(m.group(1)), m.group(2)
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(str(sl.get_dtype()), str(sl.get_dtype()))
                head, _, tail = rest.partition(".")
                if head.isdigit():  # one module per expert
                    index.sources.setdefault((layer, int(head)), {})[tail] = Source(path.name, name, None)
                    index.shapes[(layer, tail)] = (shape, dtype)
                elif shape and shape[0] == model.num_experts:  # experts fused on the first axis
                    for e in range(model.num_experts):
                        index.sources.setdefault((layer, e), {})[rest] = Source(path.name, name, e)
                    index.shapes[(layer, rest)] = (shape[1:], dtype)
    missing = [(x, e) for x in model.layers for e in range(model.num_experts) if (x, e) not in index.sources]
    if missing:
        raise PrismError(f"{folder}: no tensors for expert {missing[0][1]} of layer {missing[0][0]} (and "
                         f"{len(missing) - 1} more); is this checkpoint for model {model.name!r}?")
    torch = require_torch()
    for layer, expected in zip(model.layers, model.layer_bytes.tolist()):
        held = sum(int(np.prod(shape)) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
                   for shape, dtype in index.layout(layer).values())
        # biases and quantisation scales add a few percent to the weights the model's size counts; a checkpoint
        # of another shape differs by far more, and the plan's memory and moves would not be what is moved
        if abs(held - expected) > SIZE_TOLERANCE * expected:
            raise PrismError(f"{folder}: an expert of layer {layer} holds {held} bytes there but {expected} in model "
                             f"{model.name!r}; pass the checkpoint of the plan's model")
    return index


def synthetic_layout(model: ModelSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """A SwiGLU expert's tensors for a model without a checkpoint: gate/up [I, H], down [H, I], in the model's
    activation dtype, I from the expert's size."""
    h = model.hidden_size
    inter = max(1, int(model.layer_bytes.max()) // (3 * h * model.act_bytes))
    dtype = _DTYPES.get(model.act_bytes, "float32")
    return {"gate_proj.weight": ((inter, h), dtype), "up_proj.weight": ((inter, h), dtype),
            "down_proj.weight": ((h, inter), dtype)}


def tensor_digest(tensors: dict) -> bytes:
    """sha256 (32 bytes) of an expert's tensors, in key order: names, shapes, dtypes and raw bytes."""
    torch = require_torch()
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps([key, list(t.shape), str(t.dtype)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class ExpertStore:
    """The experts this rank holds: tensors[(layer, expert)] = {key: tensor on `device`}. `reads` logs every
    checkpoint read as (tensor name, row or None)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.tensors: dict[tuple[int, int], dict] = {}
        self.reads: list[tuple[str, int | None]] = []

    def load(self, index: CheckpointIndex, wanted) -> "ExpertStore":
        """Read the experts `wanted` ([(layer, expert)], model layer numbers) from the checkpoint."""
        by_file: dict[str, list[tuple[tuple[int, int], str, Source]]] = {}
        for key in sorted(set(wanted)):
            for name, src in index.sources[key].items():
                by_file.setdefault(src.file, []).append((key, name, src))
        for file, items in by_file.items():
            with _opened(index.folder / file, self.device) as f:
                for key, name, src in items:
                    t = f.get_tensor(src.name) if src.row is None else f.get_slice(src.name)[src.row]
                    self.tensors.setdefault(key, {})[name] = t.contiguous()
                    self.reads.append((src.name, src.row))
        return self

    def fill_synthetic(self, model: ModelSpec, wanted, seed: int = 0) -> "ExpertStore":
        """Deterministic random weights for `wanted` experts (the same on every rank), for runs without a
        checkpoint."""
        torch = require_torch()
        for layer, expert in sorted(set(wanted)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + expert)
            self.tensors[(layer, expert)] = {
                k: (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype)).to(self.device)
                for k, (shape, dtype) in synthetic_layout(model).items()}
        return self

    def experts(self) -> list[tuple[int, int]]:
        return sorted(self.tensors)

    def digest(self, key: tuple[int, int]) -> bytes:
        return tensor_digest(self.tensors[key])

    def sha256(self) -> str:
        """Hash of every expert held, in (layer, expert) order."""
        h = hashlib.sha256()
        for key in self.experts():
            h.update(json.dumps(list(key)).encode())
            h.update(self.digest(key))
        return h.hexdigest()

    def forward(self, key: tuple[int, int], x):
        """One SwiGLU expert on hidden states x [tokens, hidden]: down(act(gate x) * up x)."""
        import torch.nn.functional as F

        t = self.tensors.get(key)
        if t is None:
            raise PrismError(f"this rank does not hold expert {key[1]} of layer {key[0]}")
        x = x.to(next(iter(t.values())).dtype)
        if "gate_up_proj" in t:  # fused, [2I, H] and [H, I]
            gate, up = F.linear(x, t["gate_up_proj"]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, t["down_proj"])
        for gate_k, up_k, down_k in (("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
                                     ("w1.weight", "w3.weight", "w2.weight")):
            if gate_k in t:
                return F.linear(F.silu(F.linear(x, t[gate_k])) * F.linear(x, t[up_k]), t[down_k])
        raise PrismError(f"expert {key[1]} of layer {key[0]} has tensors {sorted(t)}; the distributed forward "
                         f"knows SwiGLU experts (gate/up/down projections) only")


def expert_list(hosted: np.ndarray, server: int, layers) -> list[tuple[int, int]]:
    """[(model layer number, expert)] hosted by `server`. hosted: [servers, layers, experts] bool."""
    ls, es = np.nonzero(hosted[server])
    return [(int(layers[l]), int(e)) for l, e in zip(ls, es)]


class OffloadCache:
    """One rank's on-demand expert cache: ExpertCache's bookkeeping (capacity, eviction order and bytes counted at
    the model's expert sizes, as the simulator counts them) paired with the real tensors, held in `resident`, an
    ExpertStore on the compute device.

    slow_tier: where a miss loads from: an ExpertStore on "cpu" holding the rank's slow-tier experts (host
    memory), or the checkpoint's CheckpointIndex, read on demand straight onto the device. stored: the (model
    layer number, expert) keys the slow tier holds; by default all the slow tier has (the whole checkpoint).
    capacity_bytes: the cache's size in bytes; model: its layers and expert sizes; device: the compute device
    (a CUDA device, or "cpu", where `resident` is a second store in host memory).
    bytes_copied: bytes of tensors really copied into `resident` (sum of their nbytes).
    """

    def __init__(self, model: ModelSpec, capacity_bytes: int, slow_tier: "ExpertStore | CheckpointIndex",
                 device: str = "cpu", policy: str = "lru", stored=None) -> None:
        self.layers = tuple(model.layers)
        self.layer_bytes = np.asarray(model.layer_bytes, dtype=np.int64)
        self.cache = ExpertCache(capacity_bytes, policy)
        self.slow_tier = slow_tier
        held = slow_tier.experts() if isinstance(slow_tier, ExpertStore) else slow_tier.sources
        self.stored = set(held if stored is None else stored)
        self.resident = ExpertStore(device)
        self.bytes_copied = 0

    @classmethod
    def for_rank(cls, offload: Offload, rank: int, model: ModelSpec, device: str = "cpu",
                 index: CheckpointIndex | None = None, on_demand: bool = False) -> "OffloadCache":
        """The cache of server `rank` under a plan's `offload` tier: its slow tier holds offload.stored[rank],
        read from the checkpoint `index` into host memory (synthetic weights without one, as
        ExpertStore.fill_synthetic makes them), or with `on_demand` left in the checkpoint and read on each miss."""
        keys = expert_list(offload.stored, rank, model.layers)
        capacity = int(offload.cache_bytes[rank])
        if on_demand:
            if index is None:
                raise PrismError("reading experts on demand needs the checkpoint; pass its `index` "
                                 "(index_checkpoint) or on_demand=False", parameters=("index", "on_demand"))
            return cls(model, capacity, index, device, offload.policy, keys)
        host = ExpertStore("cpu")
        if index is None:
            host.fill_synthetic(model, keys)
        else:
            host.load(index, keys)
        return cls(model, capacity, host, device, offload.policy)

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def misses(self) -> int:
        return self.cache.misses

    @property
    def bytes_loaded(self) -> int:
        """Bytes loaded at the model's expert sizes (the simulator's count)."""
        return self.cache.bytes_loaded

    def get(self, layer_index: int, expert: int) -> bool:
        """Make expert `expert` of MoE layer `layer_index` (index into the model's layers) resident, as
        ExpertCache.get decides: a hit leaves the tensors where they are; a miss first frees the experts it evicts,
        then copies the expert's tensors from the slow tier. Returns whether it was loaded."""
        key = (self.layers[layer_index], int(expert))
        if key not in self.stored:  # checked first: a refused lookup leaves the counters as they were
            raise PrismError(f"this rank's slow tier does not hold expert {key[1]} of layer {key[0]}, so it cannot "
                             f"load it; route its activations to a server that pins or stores it",
                             parameters=("slow_tier",))
        loaded, evicted = self.cache.get((layer_index, key[1]), int(self.layer_bytes[layer_index]))
        for layer, e in evicted:
            del self.resident.tensors[(self.layers[layer], e)]
        if loaded:
            self._copy(key)
        return loaded

    def _copy(self, key: tuple[int, int]) -> None:
        """Copy expert `key` (model layer number, expert) from the slow tier into `resident`, counting its bytes.
        copy=True: a real copy even where the compute device is the host's own ("cpu")."""
        if isinstance(self.slow_tier, ExpertStore):
            self.resident.tensors[key] = {k: t.to(self.resident.device, copy=True)
                                          for k, t in self.slow_tier.tensors[key].items()}
        else:
            self.resident.load(self.slow_tier, [key])
        self.bytes_copied += sum(t.nbytes for t in self.resident.tensors[key].values())
