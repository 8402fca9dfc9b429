"""The offload tier of a plan: what each server's GPU keeps as an on-demand expert cache, what its slow tier
holds, and the cache that loads experts on a miss.

A plan for a cluster whose GPUs hold less than one copy of the model pins some experts (its placement) and
loads the others on demand from a slow tier (host RAM or local storage) into a per-server cache. Routing then
means: the server the plan names serves the activation from its pinned copy when it pins the expert, otherwise
it loads the expert from its own slow tier into its cache (once per batch and layer, unless the cache still
holds it). The simulator and the executor share `ExpertCache`, and with it the order in which a server looks
up the experts one batch of one layer needs (`lookup_order`), so that both count the same loads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from prism_plan.errors import PrismError

# How a server's cache picks what to evict; the plan names it.
CACHE_POLICIES = ("lru",)


@dataclass
class Offload:
    """cache_bytes: [servers] int64, GPU memory each server keeps for experts loaded on demand (beside its
    pinned experts); stored: [servers, layers, experts] bool, what each server's slow tier holds; policy: the
    cache's eviction rule (CACHE_POLICIES)."""

    cache_bytes: np.ndarray
    stored: np.ndarray
    policy: str = "lru"

    def __post_init__(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise PrismError(f"cache policy must be one of {', '.join(CACHE_POLICIES)}, got {self.policy!r}",
                             parameters=("policy",))
        self.cache_bytes = np.asarray(self.cache_bytes, dtype=np.int64)
        self.stored = np.asarray(self.stored, dtype=bool)

    def loads(self, hosted: np.ndarray, routing: np.ndarray) -> np.ndarray:
        """[origins, layers, experts] bool, which routed activations the serving server must load because it
        does not pin the expert. hosted: [servers, layers, experts]; routing: [origins, layers, experts]."""
        l_n, e_n = hosted.shape[1:]
        return ~hosted[routing, np.arange(l_n)[None, :, None], np.arange(e_n)[None, None, :]]


def lookup_order(experts: np.ndarray, cache: "ExpertCache", layer: int) -> np.ndarray:
    """The order in which a server looks up the distinct experts one batch of MoE layer index `layer` needs
    from its `cache`: those it holds first, then the others, each in ascending id, so that no load evicts an
    expert the same batch is about to find there (a prefetch, or a cached expert). experts: [n] int, may repeat."""
    distinct = np.unique(np.asarray(experts, dtype=np.int64))
    held = np.array([(layer, int(e)) in cache for e in distinct], bool)
    return np.concatenate([distinct[held], distinct[~held]])


class ExpertCache:
    """One server's on-demand expert cache: `capacity` bytes, least recently used evicted first.

    Keys are (layer index, expert). Counts what it did: hits, misses (each a load), bytes_loaded.
    """

    def __init__(self, capacity: int, policy: str = "lru") -> None:
        if policy not in CACHE_POLICIES:
            raise PrismError(f"cache policy must be one of {', '.join(CACHE_POLICIES)}, got {policy!r}",
                             parameters=("policy",))
        self.capacity = int(capacity)
        self.used = 0
        self._held: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.hits = self.misses = self.bytes_loaded = 0

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._held

    def keys(self) -> list[tuple[int, int]]:
        """What the cache holds, least recently used first."""
        return list(self._held)

    def get(self, key: tuple[int, int], size: int) -> tuple[bool, list[tuple[int, int]]]:
        """Use expert `key` of `size` bytes: (whether it had to be loaded, the keys evicted to make room). A
        hit makes it the most recently used; a miss loads it, evicting least recently used experts first."""
        if key in self._held:
            self._held.move_to_end(key)
            self.hits += 1
            return False, []
        self.misses += 1
        return True, self._load(key, size)

    def prefetch(self, key: tuple[int, int], size: int) -> tuple[bool, list[tuple[int, int]]]:
        """Load `key` ahead of use unless the cache holds it (then nothing changes: a prefetch is no use);
        (whether it was loaded, the keys evicted). Neither a hit nor a miss: those count uses."""
        if key in self._held:
            return False, []
        return True, self._load(key, size)

    def _load(self, key: tuple[int, int], size: int) -> list[tuple[int, int]]:
        """Put `key` in as the most recently used, counting its bytes and evicting as needed; the keys evicted.
        An expert larger than the whole cache is an error: the plan must give room for one."""
        size = int(size)
        if size > self.capacity:
            raise PrismError(f"an expert of {size} bytes does not fit a cache of {self.capacity} bytes; give the "
                             f"server's cache room for its largest expert", parameters=("cache_bytes",))
        evicted = []
        while self.used + size > self.capacity:
            old, old_size = self._held.popitem(last=False)
            self.used -= old_size
            evicted.append(old)
        self._held[key] = size
        self.used += size
        self.bytes_loaded += size
        return evicted
