"""A placement-aware distributed MoE layer: real forward passes across ranks, one rank per server.

Tokens start on the rank their origin arrives at. Each activation goes to the server the plan's routing names
for (origin, layer, expert): local ones are computed where the token is; for every other server the token
needs, its hidden state travels there once (however many of its experts sit there), that server sums its
experts' weighted outputs and sends one hidden state back. That is the simulator's traffic model, so the
payload bytes counted here (hidden states out and back) must equal its link bytes on the same tokens; the
routing metadata sent along (expert ids and gate weights of the travelling tokens, and token counts) is counted
apart as control bytes.
"""

from __future__ import annotations

import numpy as np

from prism_plan.executor import require_torch
from prism_plan.executor.group import Group
from prism_plan.executor.store import ExpertStore


class DistributedMoE:
    """One rank's part. routing: [origins, layers, experts] serving server (Plan.routing); layers: the model's
    layer numbers in routing order; group: the ranks (rank = server index). payload_bytes / control_bytes:
    [servers, servers] sent from row to column."""

    def __init__(self, store: ExpertStore, routing: np.ndarray, layers, group: Group) -> None:
        self.store = store
        self.routing = np.asarray(routing)
        self.layers = tuple(layers)
        self.group = group
        self.rank, self.world = group.rank, group.world
        self.payload_bytes = np.zeros((self.world, self.world))
        self.control_bytes = np.zeros((self.world, self.world))

    def _experts_sum(self, layer: int, x, ids: np.ndarray, w, mine: np.ndarray):
        """sum_j w[:, j] * expert(ids[:, j])(x) over the activations where mine [tokens, k] holds."""
        torch = require_torch()
        out = torch.zeros_like(x)
        for e in np.unique(ids[mine]):
            rows, slots = np.nonzero(mine & (ids == e))
            r = torch.as_tensor(rows)
            y = self.store.forward((layer, int(e)), x[r]).to(x.dtype)
            out.index_add_(0, r, y * w[r, torch.as_tensor(slots)].unsqueeze(-1).to(x.dtype))
        return out

    def forward(self, layer_index: int, hidden, origin: np.ndarray, ids: np.ndarray, weights):
        """Outputs [tokens, hidden] of this rank's tokens at MoE layer `layer_index` (index into layers).

        hidden: [tokens, hidden] tensor; origin: [tokens] origin index (into the routing's origins);
        ids: [tokens, k] expert ids; weights: [tokens, k] tensor of gate weights. Every rank must call this for
        the same layer together (it exchanges counts and tokens with all ranks).
        """
        torch = require_torch()
        import torch.distributed as dist

        layer = self.layers[layer_index]
        ids = np.asarray(ids)
        serve = self.routing[np.asarray(origin)[:, None], layer_index, ids] if len(ids) else ids  # [tokens, k]
        out = self._experts_sum(layer, hidden, ids, weights, serve == self.rank)
        need = [(serve == d).any(axis=1) if d != self.rank else np.zeros(len(ids), bool) for d in range(self.world)]
        counts = torch.tensor([int(n.sum()) for n in need], dtype=torch.int64)
        table = [torch.zeros(self.world, dtype=torch.int64) for _ in range(self.world)]
        self.group.all_gather(table, counts)
        table = torch.stack(table).numpy()  # [src, dst] tokens travelling
        self.control_bytes[self.rank] += np.where(np.arange(self.world) == self.rank, 0, counts.numel() * 8)
        k, h = ids.shape[1] if ids.ndim == 2 else 0, hidden.shape[1]
        # Phase 1: hidden states, expert ids and weights out (weights zeroed where another server serves); tags
        # keep the messages between two ranks apart (gloo need not deliver them in order).
        ops, received = [], {}
        for d in range(self.world):
            if d != self.rank and table[self.rank, d]:
                rows = torch.as_tensor(np.nonzero(need[d])[0])
                sel = torch.as_tensor(serve[need[d]] == d)
                out_msgs = (hidden[rows], torch.as_tensor(ids[need[d]]), weights[rows] * sel)
                ops += [dist.P2POp(dist.isend, m.contiguous(), d, tag=i) for i, m in enumerate(out_msgs)]
                self._count(self.rank, d, hidden[rows], weights[rows], k)
            if d != self.rank and table[d, self.rank]:
                n = int(table[d, self.rank])
                bufs = (torch.empty((n, h), dtype=hidden.dtype), torch.empty((n, k), dtype=torch.int64),
                        torch.empty((n, k), dtype=weights.dtype))
                ops += [dist.P2POp(dist.irecv, b, d, tag=i) for i, b in enumerate(bufs)]
                received[d] = bufs
        self.group.exchange(ops)
        # Phase 2: this rank's experts on what arrived, one summed hidden state back per token.
        ops, back = [], {}
        for s, (x, rid, rw) in received.items():
            y = self._experts_sum(layer, x, rid.numpy(), rw, rw.numpy() != 0)
            ops.append(dist.P2POp(dist.isend, y.contiguous(), s, tag=3))
            self.payload_bytes[self.rank, s] += y.numel() * y.element_size()
        for d in range(self.world):
            if d != self.rank and table[self.rank, d]:
                back[d] = torch.empty((int(table[self.rank, d]), h), dtype=hidden.dtype)
                ops.append(dist.P2POp(dist.irecv, back[d], d, tag=3))
        self.group.exchange(ops)
        for d, y in back.items():
            out.index_add_(0, torch.as_tensor(np.nonzero(need[d])[0]), y)
        return out

    def _count(self, src: int, dst: int, x, w, k: int) -> None:
        self.payload_bytes[src, dst] += x.numel() * x.element_size()
        self.control_bytes[src, dst] += len(x) * k * (8 + w.element_size())
