"""Take a plan into serving systems: SGLang's `--init-expert-location`, vLLM-Ascend's `expert_map_path`, DeepSeek
EPLB arrays.

All three give every GPU the same number of expert slots. Server i of the plan is EP rank i (GPU i holds slots
[i*P/ep, (i+1)*P/ep) of P physical slots). A server's slots hold the experts the plan gives it, in id order; a
server with fewer than the most loaded one fills its spare slots with second copies of its own hottest experts
(the activations the plan routes to it, from tables when given, else the origins it serves), so the distinct experts on every GPU
are exactly the plan's (a server given no expert of some layer gets its most used ones there). Every export is checked the way the reader checks it before it is written, and each can
be read back into a placement (`read_*`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import atomic_path, loaded, write_text_atomic
from prism_plan.placement.plan import Plan
from prism_plan.traces.tables import ActivationTables

FORMATS = ("sglang", "vllm-ascend", "eplb")


class ExportError(PrismError):
    """An export that a serving system would reject."""


@dataclass
class PhysicalLayout:
    """slots: [layers, servers, slots per server] logical expert ids (MoE layers only); padding: [servers] slots
    per layer, summed over layers, that repeat an expert the server already holds."""

    slots: np.ndarray
    padding: np.ndarray

    @property
    def physical(self) -> int:
        """P: physical experts per layer over all servers."""
        return self.slots.shape[1] * self.slots.shape[2]


def origin_activations(plan: Plan, tables) -> np.ndarray:
    """[plan origins, layers, experts] activations of `tables` (ActivationTables of the same model) aligned to the
    plan's origins; origins the tables lack count zero."""
    plan.model.check_same_shape(tables, "the tables", "pass `tables` of the plan's model", ("tables",))
    index = {o: i for i, o in enumerate(tables.origins)}
    return np.stack([tables.freq[index[o]] if o in index else np.zeros(tables.freq.shape[1:])
                     for o in plan.origins])


def served_load(plan: Plan, freq: np.ndarray | None = None) -> np.ndarray:
    """[servers, layers, experts] activations the plan's routing sends to each server. freq: [plan origins,
    layers, experts] activations (default: one per origin, so it counts the origins served)."""
    s_n, l_n, e_n = plan.hosted.shape
    load = np.zeros(plan.hosted.shape)
    for o in range(len(plan.origins)):
        np.add.at(load, (plan.routing[o], np.arange(l_n)[:, None], np.arange(e_n)[None, :]),
                  1.0 if freq is None else freq[o])
    return load


def physical_layout(plan: Plan, freq: np.ndarray | None = None) -> PhysicalLayout:
    """Equal slots per server from a plan; spare slots repeat the server's hottest experts by served_load(freq)."""
    s_n, l_n, e_n = plan.hosted.shape
    usage = served_load(plan, freq)
    per = int(plan.hosted.sum(axis=2).max())
    slots = np.zeros((l_n, s_n, per), np.int64)
    padding = np.zeros(s_n, np.int64)
    for s in range(s_n):
        for l in range(l_n):
            mine = np.flatnonzero(plan.hosted[s, l])
            spare = per - len(mine)
            # A server holding no expert of a layer must still fill its slots: with the experts it uses most.
            pool = mine if len(mine) else np.arange(e_n)
            hot = pool[np.argsort(-usage[s, l, pool], kind="stable")]
            slots[l, s] = np.concatenate([mine, np.resize(hot, spare)]) if spare else mine
            padding[s] += spare
    return PhysicalLayout(slots, padding)


def _check_map(p2l: np.ndarray, num_experts: int, ep_size: int, rows, where: str) -> None:
    """The checks a reader of a physical-to-logical map applies: slots divisible by EP size, ids in range, every
    logical expert present in every MoE row."""
    if p2l.ndim != 2:
        raise ExportError(f"{where}: physical_to_logical_map must be 2-D, got shape {list(p2l.shape)}")
    if p2l.shape[1] % ep_size:
        raise ExportError(f"{where}: {p2l.shape[1]} physical slots do not divide among {ep_size} EP ranks")
    if p2l.shape[1] < num_experts:
        raise ExportError(f"{where}: {p2l.shape[1]} physical slots cannot hold {num_experts} experts")
    if p2l.min() < 0 or p2l.max() >= num_experts:
        raise ExportError(f"{where}: logical expert ids must lie in 0..{num_experts - 1}")
    for r in rows:
        missing = np.setdiff1d(np.arange(num_experts), p2l[r])
        if len(missing):
            raise ExportError(f"{where}: layer {r} has no slot for expert {int(missing[0])}")


def _hosted_from_slots(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[servers, layers, experts] bool from [layers, servers, slots]."""
    l_n, s_n, _ = slots.shape
    hosted = np.zeros((s_n, l_n, num_experts), bool)
    for l in range(l_n):
        for s in range(s_n):
            hosted[s, l, slots[l, s]] = True
    return hosted


# SGLang

def to_sglang(plan: Plan, layout: PhysicalLayout) -> dict:
    """{"physical_to_logical_map": [num_hidden_layers, P]}; dense layers get the trivial layout (slot p holds
    expert p mod E), since SGLang numbers every hidden layer."""
    m = plan.model
    p = layout.physical
    p2l = np.tile(np.arange(p) % m.num_experts, (m.num_hidden_layers, 1))
    p2l[list(m.layers)] = layout.slots.reshape(m.num_layers, p)
    doc = {"physical_to_logical_map": p2l.tolist()}
    read_sglang(doc, plan)
    return doc


def read_sglang(doc: dict, plan: Plan) -> np.ndarray:
    """Check an SGLang init-expert-location document the way SGLang's loader does; return the placement it
    gives the plan's servers (EP rank i = server i)."""
    m = plan.model
    if set(doc) != {"physical_to_logical_map"}:
        raise ExportError(f"SGLang accepts only the key physical_to_logical_map, got {sorted(doc)}")
    p2l = np.asarray(doc["physical_to_logical_map"], dtype=np.int64)
    if p2l.ndim != 2 or p2l.shape[0] != m.num_hidden_layers:
        raise ExportError(f"physical_to_logical_map has shape {list(p2l.shape)}, SGLang needs "
                          f"[{m.num_hidden_layers} hidden layers, physical slots]")
    ep = len(plan.servers)
    _check_map(p2l, m.num_experts, ep, list(m.layers), "SGLang export")
    return _hosted_from_slots(p2l[list(m.layers)].reshape(m.num_layers, ep, -1), m.num_experts)


# vLLM-Ascend

def to_vllm_ascend(plan: Plan, layout: PhysicalLayout) -> dict:
    """vLLM-Ascend's expert map: MoE layers numbered from 0, one device list per layer."""
    doc = {"moe_layer_count": plan.model.num_layers,
           "layer_list": [{"layer_id": l, "device_count": len(plan.servers),
                           "device_list": [{"device_id": s, "device_expert": layout.slots[l, s].tolist()}
                                           for s in range(len(plan.servers))]}
                          for l in range(plan.model.num_layers)]}
    read_vllm_ascend(doc, plan)
    return doc


def read_vllm_ascend(doc: dict, plan: Plan) -> np.ndarray:
    """Check a vLLM-Ascend expert map (equal experts per device, ids in range, every expert in every layer);
    return the placement (device i = server i)."""
    m = plan.model
    try:
        if doc["moe_layer_count"] != m.num_layers or len(doc["layer_list"]) != m.num_layers:
            raise ExportError(f"expert map has {doc['moe_layer_count']} MoE layers, model {m.name!r} has "
                              f"{m.num_layers}")
        rows = []
        for l, layer in enumerate(doc["layer_list"]):
            devices = sorted(layer["device_list"], key=lambda d: d["device_id"])
            if layer["layer_id"] != l or layer["device_count"] != len(devices) or len(devices) != len(plan.servers):
                raise ExportError(f"expert map layer {l}: layer_id or device_count do not match the plan")
            per = {len(d["device_expert"]) for d in devices}
            if len(per) != 1:
                raise ExportError(f"expert map layer {l}: devices hold different numbers of experts {sorted(per)}")
            rows.append([d["device_expert"] for d in devices])
    except (KeyError, TypeError) as e:
        raise ExportError(f"expert map is malformed ({type(e).__name__}: {e})")
    slots = np.asarray(rows, dtype=np.int64)  # [layers, devices, per device]
    _check_map(slots.reshape(m.num_layers, -1), m.num_experts, len(plan.servers), range(m.num_layers),
               "vLLM-Ascend export")
    return _hosted_from_slots(slots, m.num_experts)


# DeepSeek EPLB

def to_eplb(plan: Plan, layout: PhysicalLayout) -> dict:
    """EPLB's arrays over MoE layers: phy2log [layers, P]; logcnt [layers, E] copies of each expert;
    log2phy [layers, E, most copies] the physical slots of each expert, -1 padded."""
    m = plan.model
    phy2log = layout.slots.reshape(m.num_layers, -1)
    logcnt = np.stack([np.bincount(row, minlength=m.num_experts) for row in phy2log])
    log2phy = np.full((m.num_layers, m.num_experts, int(logcnt.max())), -1, np.int64)
    for l, row in enumerate(phy2log):
        order = np.argsort(row, kind="stable")
        rank = np.arange(len(row)) - np.searchsorted(row[order], row[order])
        log2phy[l, row[order], rank] = order
    arrays = {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}
    read_eplb(arrays, plan)
    return arrays


def read_eplb(arrays: dict, plan: Plan) -> np.ndarray:
    """Check EPLB arrays for consistency (log2phy inverts phy2log, logcnt counts it); return the placement."""
    m = plan.model
    phy2log, log2phy, logcnt = (np.asarray(arrays[k]) for k in ("phy2log", "log2phy", "logcnt"))
    _check_map(phy2log, m.num_experts, len(plan.servers), range(m.num_layers), "EPLB export")
    if not np.array_equal(logcnt, np.stack([np.bincount(r, minlength=m.num_experts) for r in phy2log])):
        raise ExportError("EPLB export: logcnt does not count phy2log")
    for l in range(m.num_layers):
        for e in range(m.num_experts):
            phys = log2phy[l, e][log2phy[l, e] >= 0]
            if len(phys) != logcnt[l, e] or (phy2log[l, phys] != e).any():
                raise ExportError(f"EPLB export: log2phy of layer {l} expert {e} does not invert phy2log")
    return _hosted_from_slots(phy2log.reshape(m.num_layers, len(plan.servers), -1), m.num_experts)


def export_plan(plan: Plan | str | Path, fmt: str, out: str | Path, *, tables=None) -> dict:
    """Write `plan` (a Plan or its file) in format `fmt` to `out` (checked first, written atomically).
    tables: ActivationTables (or their file) whose activations pick the experts repeated in spare slots
    (default: the plan's routing). Returns a summary: slots per GPU, physical and redundant experts per layer,
    padding slots and their extra bytes per server."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}", parameters=("fmt",))
    plan, tables = loaded(plan, Plan), loaded(tables, ActivationTables)
    layout = physical_layout(plan, None if tables is None else origin_activations(plan, tables))
    if fmt == "eplb":
        arrays = to_eplb(plan, layout)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    else:
        doc = to_sglang(plan, layout) if fmt == "sglang" else to_vllm_ascend(plan, layout)
        write_text_atomic(out, json.dumps(doc))
    per = layout.slots.shape[2]
    extra = layout.padding * int(plan.model.layer_bytes.max())
    return {"path": str(out), "format": fmt, "ep_size": len(plan.servers), "servers": list(plan.servers),
            "slots_per_gpu": per,
            "physical_experts": layout.physical, "redundant_experts": layout.physical - plan.model.num_experts,
            "padding_slots": dict(zip(plan.servers, layout.padding.tolist())),
            "padding_bytes": dict(zip(plan.servers, extra.tolist()))}
