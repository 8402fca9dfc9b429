"""A placement-aware distributed MoE layer: real forward passes across ranks, one rank per server.

Tokens start on the rank their origin arrives at. Each activation goes to the server the plan's routing names
for (origin, layer, expert): local ones are computed where the token is; for every other server the token
needs, its hidden state travels there once (however many of its experts sit there), that server sums its
experts' weighted outputs and sends one hidden state back. That is the simulator's traffic model, so the
payload bytes counted here (hidden states out and back) must equal its link bytes on the same tokens; the
routing metadata sent along (expert ids and gate weights of the travelling tokens, and token counts) is counted
apart as control bytes.

With an offload tier a server serves experts it does not pin from its OffloadCache. Per forward of one layer it
looks up the distinct experts it serves there without pinning them (its own tokens' and those that arrived) in
the simulator's order (prism_plan.placement.offload.lookup_order: held ones first, then ascending id), so that
both count the same loads. Each expert is computed right after its lookup: a cache smaller than one layer's experts then never needs
an evicted expert back, and the lookups happen in exactly that order all the same.
"""

from __future__ import annotations

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.executor import require_torch
from prism_plan.executor.group import Group
from prism_plan.executor.store import ExpertStore, OffloadCache, expert_list
from prism_plan.placement.offload import lookup_order


class DistributedMoE:
    """One rank's part. routing: [origins, layers, experts] serving server (Plan.routing); layers: the model's
    layer numbers in routing order; group: the ranks (rank = server index). store: the experts this rank pins;
    with an offload tier, hosted: [servers, layers, experts] bool, the plan's pinned placement (the store must
    hold this rank's), and cache: this rank's OffloadCache, which serves the experts routed here that it does not
    pin. payload_bytes / control_bytes: [servers, servers] sent from row to column."""

    def __init__(self, store: ExpertStore, routing: np.ndarray, layers, group: Group, *,
                 hosted: np.ndarray | None = None, cache: OffloadCache | None = None) -> None:
        self.store = store
        self.routing = np.asarray(routing)
        self.layers = tuple(layers)
        self.group = group
        self.rank, self.world = group.rank, group.world
        self.cache = cache
        self.pinned = None if hosted is None else np.asarray(hosted, dtype=bool)[self.rank]  # [layers, experts]
        if cache is not None and self.pinned is None:
            raise PrismError("an offload cache needs the pinned placement to know which experts to load; pass "
                             "`hosted` (Plan.hosted)", parameters=("hosted",))
        if self.pinned is not None and store.experts() != expert_list(np.asarray(hosted), self.rank, self.layers):
            raise PrismError(f"rank {self.rank}'s store holds other experts than `hosted` pins there; load the "
                             f"plan's experts into it", parameters=("store", "hosted"))
        self.payload_bytes = np.zeros((self.world, self.world))
        self.control_bytes = np.zeros((self.world, self.world))

    @property
    def offload_counters(self) -> dict[str, int]:
        """This rank's cache: hits, misses, bytes_loaded (at the model's expert sizes, the simulator's count) and
        bytes_copied (tensor bytes really copied); all 0 without a cache."""
        c = self.cache
        return {"hits": c.hits if c else 0, "misses": c.misses if c else 0,
                "bytes_loaded": c.bytes_loaded if c else 0, "bytes_copied": c.bytes_copied if c else 0}

    def _holder(self, layer_index: int, expert: int) -> ExpertStore:
        """The store to compute `expert` from: the pinned one, else the cache's, once it is looked up there."""
        if self.cache is None or self.pinned[layer_index, expert]:
            return self.store
        self.cache.get(layer_index, expert)
        return self.cache.resident

    def _experts_sum(self, layer_index: int, x, ids: np.ndarray, w):
        """sum_j w[:, j] * expert(ids[:, j])(x) over the activations this rank serves (ids >= 0; -1 marks one
        another server serves), pinned experts first, then the cache's in `lookup_order` (the simulator's).
        x: [tokens, hidden]; ids, w: [tokens, k]."""
        torch = require_torch()
        out = torch.zeros_like(x)
        for e in self._order(layer_index, ids[ids >= 0]):
            rows, slots = np.nonzero(ids == e)
            r = torch.as_tensor(rows, device=x.device)
            y = self._holder(layer_index, int(e)).forward((self.layers[layer_index], int(e)), x[r]).to(x.dtype)
            out.index_add_(0, r, y * w[r, torch.as_tensor(slots, device=x.device)].unsqueeze(-1).to(x.dtype))
        return out

    def _order(self, layer_index: int, experts: np.ndarray) -> np.ndarray:
        """The distinct `experts` of one batch of layer `layer_index`, in the order this rank computes them."""
        distinct = np.unique(experts)
        if self.cache is None:
            return distinct
        pinned = self.pinned[layer_index, distinct]
        return np.concatenate([distinct[pinned], lookup_order(distinct[~pinned], self.cache.cache, layer_index)])

    def forward(self, layer_index: int, hidden, origin: np.ndarray, ids: np.ndarray, weights):
        """Outputs [tokens, hidden] of this rank's tokens at MoE layer `layer_index` (index into layers).

        hidden: [tokens, hidden] tensor; origin: [tokens] origin index (into the routing's origins);
        ids: [tokens, k] expert ids; weights: [tokens, k] tensor of gate weights. Every rank must call this for
        the same layer together (it exchanges counts and tokens with all ranks), once per batch step: the cache's
        lookups are those of one batch of one layer.
        """
        torch = require_torch()
        import torch.distributed as dist

        ids = np.asarray(ids)
        serve = self.routing[np.asarray(origin)[:, None], layer_index, ids] if len(ids) else ids  # [tokens, k]
        need = [(serve == d).any(axis=1) if d != self.rank else np.zeros(len(ids), bool) for d in range(self.world)]
        dev = hidden.device  # every tensor sent or gathered lives there: NCCL carries CUDA tensors only
        counts = torch.tensor([int(n.sum()) for n in need], dtype=torch.int64, device=dev)
        table = [torch.zeros(self.world, dtype=torch.int64, device=dev) for _ in range(self.world)]
        self.group.all_gather(table, counts)
        table = torch.stack(table).cpu().numpy()  # [src, dst] tokens travelling
        self.control_bytes[self.rank] += np.where(np.arange(self.world) == self.rank, 0, counts.numel() * 8)
        k, h = ids.shape[1] if ids.ndim == 2 else 0, hidden.shape[1]
        # Phase 1: hidden states, expert ids (-1 where another server serves) and weights out; tags keep the
        # messages between two ranks apart (gloo need not deliver them in order).
        ops, received = [], {}
        for d in range(self.world):
            if d != self.rank and table[self.rank, d]:
                rows = torch.as_tensor(np.nonzero(need[d])[0], device=dev)
                sel = serve[need[d]] == d
                out_msgs = (hidden[rows], torch.as_tensor(np.where(sel, ids[need[d]], -1), device=dev),
                            weights[rows] * torch.as_tensor(sel, device=dev))
                ops += [dist.P2POp(dist.isend, m.contiguous(), d, tag=i) for i, m in enumerate(out_msgs)]
                self._count(self.rank, d, hidden[rows], weights[rows], k)
            if d != self.rank and table[d, self.rank]:
                n = int(table[d, self.rank])
                bufs = (torch.empty((n, h), dtype=hidden.dtype, device=dev),
                        torch.empty((n, k), dtype=torch.int64, device=dev),
                        torch.empty((n, k), dtype=weights.dtype, device=dev))
                ops += [dist.P2POp(dist.irecv, b, d, tag=i) for i, b in enumerate(bufs)]
                received[d] = bufs
        self.group.exchange(ops)
        # Phase 2: this rank's experts on its own activations and on what arrived, as one batch (one lookup per
        # expert and layer); one summed hidden state back per travelling token.
        sources = list(received)
        x = torch.cat([hidden] + [received[s][0] for s in sources])
        mine = np.concatenate([np.where(serve == self.rank, ids, -1).reshape(len(ids), k)] +
                              [received[s][1].cpu().numpy() for s in sources])
        y = self._experts_sum(layer_index, x, mine, torch.cat([weights] + [received[s][2] for s in sources]))
        out, ends = y[:len(ids)], np.cumsum([len(ids)] + [len(received[s][0]) for s in sources])
        ops, back = [], {}
        for s, a, b in zip(sources, ends[:-1], ends[1:]):
            ops.append(dist.P2POp(dist.isend, y[a:b].contiguous(), s, tag=3))
            self.payload_bytes[self.rank, s] += (b - a) * h * y.element_size()
        for d in range(self.world):
            if d != self.rank and table[self.rank, d]:
                back[d] = torch.empty((int(table[self.rank, d]), h), dtype=hidden.dtype, device=dev)
                ops.append(dist.P2POp(dist.irecv, back[d], d, tag=3))
        self.group.exchange(ops)
        for d, yb in back.items():
            out.index_add_(0, torch.as_tensor(np.nonzero(need[d])[0], device=dev), yb)
        return out

    def _count(self, src: int, dst: int, x, w, k: int) -> None:
        self.payload_bytes[src, dst] += x.numel() * x.element_size()
        self.control_bytes[src, dst] += len(x) * k * (8 + w.element_size())
