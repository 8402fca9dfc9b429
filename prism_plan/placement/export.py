"""Take a plan into serving systems: SGLang's `--init-expert-location`, vLLM-Ascend's `expert_map_path`, DeepSeek
EPLB arrays, TensorRT-LLM's MoE load-balancer YAML.

All four give every GPU the same number of expert slots. Server i of the plan is EP rank i (GPU i holds slots
[i*P/ep, (i+1)*P/ep) of P physical slots). A server's slots hold the experts the plan gives it, in id order; a
server with fewer than the most loaded one fills its spare slots with second copies of its own hottest experts
(the activations the plan routes to it, from tables when given, else the origins it serves), so the distinct experts
on every GPU are exactly the plan's (a server given no expert of some layer gets its most used ones there).
vLLM-Ascend numbers its slots by the distinct experts of a device, so its exports fill spare slots with other
experts the device's traffic uses most (replicas of experts hosted elsewhere) instead. Every export is checked the
way the reader checks it before it is written, each can be read back into a placement (`read_*`), and each summary
holds the flags its server needs.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import atomic_path, loaded, write_text_atomic
from prism_plan.placement.checks import is_integer
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.plan import Plan
from prism_plan.traces.tables import ActivationTables
from prism_plan.units import human_bytes

FORMATS = ("sglang", "vllm-ascend", "eplb", "trtllm")
SYSTEMS = {"sglang": "SGLang", "vllm-ascend": "vLLM-Ascend", "eplb": "DeepSeek EPLB", "trtllm": "TensorRT-LLM"}
# SGLang reads an --init-expert-location `.json` as JSON, a `.pt` with torch and any other name as inline JSON;
# vLLM-Ascend's EplbConfig refuses an expert_map_path not ending in .json
JSON_READERS = ("sglang", "vllm-ascend")
# model_type of models whose SGLang 0.5.23 code defines get_model_config_for_expert_location (checked in the wheel);
# SGLang ignores --init-expert-location for any other model
SGLANG_EXPERT_LOCATION = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "qwen3_next", "gpt_oss", "glm4_moe")
TRTLLM_KEYS = ("num_slots", "layer_updates_per_iter", "initial_global_assignments")


class ExportError(PrismError):
    """An export that a serving system would reject."""


@dataclass
class PhysicalLayout:
    """slots: [layers, servers, slots per server] logical expert ids (MoE layers only); padding: [servers] slots
    per layer, summed over layers, beyond the experts the plan gives the server."""

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


def traffic_demand(plan: Plan, freq: np.ndarray | None = None) -> np.ndarray:
    """[servers, layers, experts] activations of every expert by the traffic each server handles: each origin's
    activations weighted, per layer, by the share of them the plan routes to the server. Unlike served_load it
    also counts experts the server does not host. freq: as served_load."""
    f = np.ones(plan.routing.shape) if freq is None else freq
    onehot = plan.routing[..., None] == np.arange(len(plan.servers))  # [origins, layers, experts, servers]
    served = np.einsum("ole,oles->osl", f, onehot)
    share = served / np.maximum(f.sum(axis=2), 1e-300)[:, None, :]  # [origins, servers, layers]
    return np.einsum("osl,ole->sle", share, f)


def physical_layout(plan: Plan, freq: np.ndarray | None = None, *, distinct: bool = False) -> PhysicalLayout:
    """Equal slots per server from a plan. Spare slots repeat the server's hottest experts by served_load(freq),
    or, when `distinct`, hold the experts it does not host that its traffic uses most (traffic_demand), so that
    no server holds an expert twice."""
    s_n, l_n, e_n = plan.hosted.shape
    usage = traffic_demand(plan, freq) if distinct else served_load(plan, freq)
    per = int(plan.hosted.sum(axis=2).max())
    slots = np.zeros((l_n, s_n, per), np.int64)
    padding = np.zeros(s_n, np.int64)
    for s in range(s_n):
        for l in range(l_n):
            mine = np.flatnonzero(plan.hosted[s, l])
            spare = per - len(mine)
            if distinct:
                pool = np.flatnonzero(~plan.hosted[s, l])
            else:  # a server holding no expert of a layer must still fill its slots: with the experts it uses most
                pool = mine if len(mine) else np.arange(e_n)
            hot = pool[np.argsort(-usage[s, l, pool], kind="stable")]
            slots[l, s] = np.concatenate([mine, hot[:spare] if distinct else np.resize(hot, spare)])
            padding[s] += spare
    return PhysicalLayout(slots, padding)


def check_fits(plan: Plan, layout: PhysicalLayout, cluster: ClusterSpec, fmt: str) -> None:
    """Raise ExportError when the padded layout puts more expert bytes on a server than its memory."""
    plan.check_servers(cluster)
    m, per = plan.model, layout.slots.shape[2]
    layer_bytes = int(m.layer_bytes.sum())  # one slot in every MoE layer
    over = per * layer_bytes - cluster.budgets
    if (over <= 0).all():
        return
    s = int(np.argmax(over))
    name, budget = cluster.names[s], int(cluster.budgets[s])
    others = int((over > 0).sum()) - 1
    fit, least = budget // layer_bytes, math.ceil(m.num_experts / len(plan.servers))
    if fit >= least:
        fix = (f"export a plan with at most {fit} experts of any layer on every server (this one has {per}), or give "
               f"{name!r} more memory")
    else:  # even the fewest slots an equal layout can have do not fit
        fix = (f"no equal-slot layout fits it: {len(plan.servers)} GPUs need at least {least} slots each "
               f"({human_bytes(least * layer_bytes)}); give {name!r} that much memory or serve on more GPUs")
    raise ExportError(f"the {SYSTEMS[fmt]} layout gives every GPU {per} slots per MoE layer "
                      f"({human_bytes(per * layer_bytes)}), but server {name!r} has {human_bytes(budget)}: "
                      f"{human_bytes(over[s])} over{f' (and {others} more servers over)' if others else ''}; {fix}",
                      parameters=("cluster",))


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
    """vLLM-Ascend's expert map: MoE layers numbered from 0, one device list per layer (list order = EP rank)."""
    doc = {"moe_layer_count": plan.model.num_layers,
           "layer_list": [{"layer_id": l, "device_count": len(plan.servers),
                           "device_list": [{"device_id": s, "device_expert": layout.slots[l, s].tolist()}
                                           for s in range(len(plan.servers))]}
                          for l in range(plan.model.num_layers)]}
    read_vllm_ascend(doc, plan)
    return doc


def read_vllm_ascend(doc: dict, plan: Plan) -> np.ndarray:
    """Check a vLLM-Ascend expert map (devices in rank order, each holding the same number of experts and none
    twice, ids in range, every expert in every layer); return the placement (device i = server i)."""
    m = plan.model
    try:
        if doc["moe_layer_count"] != m.num_layers or len(doc["layer_list"]) != m.num_layers:
            raise ExportError(f"expert map has {doc['moe_layer_count']} MoE layers, model {m.name!r} has "
                              f"{m.num_layers}")
        rows = []
        for l, layer in enumerate(doc["layer_list"]):
            devices = layer["device_list"]
            if layer["layer_id"] != l or layer["device_count"] != len(devices) or len(devices) != len(plan.servers):
                raise ExportError(f"expert map layer {l}: layer_id or device_count do not match the plan")
            # the loader takes the list order as the rank
            if [d["device_id"] for d in devices] != list(range(len(devices))):
                raise ExportError(f"expert map layer {l}: devices must be listed in rank order 0..{len(devices) - 1}")
            per = {len(d["device_expert"]) for d in devices}
            if len(per) != 1:
                raise ExportError(f"expert map layer {l}: devices hold different numbers of experts {sorted(per)}")
            rows.append([d["device_expert"] for d in devices])
    except (KeyError, TypeError) as e:
        raise ExportError(f"expert map is malformed ({type(e).__name__}: {e})")
    slots = np.asarray(rows, dtype=np.int64)  # [layers, devices, per device]
    _check_map(slots.reshape(m.num_layers, -1), m.num_experts, len(plan.servers), range(m.num_layers),
               "vLLM-Ascend export")
    # vLLM-Ascend numbers slots `local + rank * (distinct experts on rank 0)` and keeps one slot per expert and
    # device: a second copy on a device would shift every later device's slots onto other experts
    repeated = (np.diff(np.sort(slots, axis=2), axis=2) == 0).any(axis=2)
    if repeated.any():
        l, d = np.argwhere(repeated)[0]
        raise ExportError(f"vLLM-Ascend export: device {d} of layer {l} holds an expert twice; vLLM-Ascend needs "
                          f"distinct experts on every device")
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


# TensorRT-LLM

def to_trtllm(plan: Plan, layout: PhysicalLayout) -> dict:
    """TensorRT-LLM's MoeLoadBalancerConfig: num_slots P, initial_global_assignments {hidden-layer index: [P]
    expert ids} for every MoE layer (slot j on EP rank j // (P / ep)), layer_updates_per_iter 0 (static)."""
    m = plan.model
    slots = layout.slots.reshape(m.num_layers, -1)
    doc = {"num_slots": layout.physical, "layer_updates_per_iter": 0,
           "initial_global_assignments": {layer: slots[l].tolist() for l, layer in enumerate(m.layers)}}
    read_trtllm(doc, plan)
    return doc


def read_trtllm(doc: dict, plan: Plan) -> np.ndarray:
    """Check a TensorRT-LLM load-balancer config (the parsed YAML) the way TensorRT-LLM does: only its keys,
    num_slots divisible by the EP size, a list of num_slots ids in 0..E-1 for every MoE layer, keyed by
    hidden-layer index; plus static (layer_updates_per_iter 0) and every expert placed. Return the placement."""
    m, ep = plan.model, len(plan.servers)
    if not isinstance(doc, dict) or set(doc) - set(TRTLLM_KEYS):
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ExportError(f"TensorRT-LLM's load-balancer config holds only {', '.join(TRTLLM_KEYS)}; got {keys}")
    num_slots, updates = doc.get("num_slots"), doc.get("layer_updates_per_iter", 0)
    if not is_integer(num_slots) or num_slots < 1 or num_slots % ep:
        raise ExportError(f"TensorRT-LLM export: num_slots must be a positive integer divisible by ep_size {ep}, "
                          f"got {num_slots!r}")
    if updates != 0:
        raise ExportError(f"TensorRT-LLM export: layer_updates_per_iter is {updates!r}; a static placement needs 0 "
                          f"(else TensorRT-LLM moves experts while serving)")
    table = doc.get("initial_global_assignments")
    if not isinstance(table, dict) or not all(is_integer(k) for k in table):
        raise ExportError("TensorRT-LLM export: initial_global_assignments must map hidden-layer indices to lists")
    rows = []
    for layer in m.layers:
        ids = table.get(layer)
        if not isinstance(ids, list) or len(ids) != num_slots or not all(is_integer(i) for i in ids):
            got = "nothing" if ids is None else f"{len(ids)} values" if isinstance(ids, list) else type(ids).__name__
            raise ExportError(f"TensorRT-LLM export: layer {layer} needs a list of {num_slots} integer expert ids "
                              f"(num_slots), got {got}")
        rows.append(ids)
    p2l = np.asarray(rows, dtype=np.int64)
    _check_map(p2l, m.num_experts, ep, range(m.num_layers), "TensorRT-LLM export")
    return _hosted_from_slots(p2l.reshape(m.num_layers, ep, -1), m.num_experts)


def trtllm_yaml(doc: dict) -> str:
    """The YAML text of a load-balancer config (flat keys, one flow list per layer)."""
    lines = [f"{k}: {doc[k]}" for k in TRTLLM_KEYS[:2]] + ["initial_global_assignments:"]
    lines += [f"  {layer}: [{', '.join(map(str, ids))}]" for layer, ids in doc["initial_global_assignments"].items()]
    return "\n".join(lines) + "\n"


# What each server needs

def server_flags(fmt: str, out: str | Path, ep: int, per: int, redundant: int) -> tuple[str | None, list[str]]:
    """The command-line arguments the serving system needs to load `out` (None for EPLB arrays, which no server
    takes by flag), and notes on using them."""
    path = shlex.quote(str(out))
    if fmt == "sglang":
        return (f"--tp-size {ep} --ep-size {ep} --ep-num-redundant-experts {redundant} --init-expert-location {path}",
                ["leave out --enable-eplb: EPLB would re-balance the experts away from this placement"])
    if fmt == "vllm-ascend":
        config = {"eplb_config": {"expert_map_path": str(out), "num_redundant_experts": redundant}}
        return (f"--tensor-parallel-size {ep} --enable-expert-parallel --additional-config "
                f"{shlex.quote(json.dumps(config))}",
                ["EP size = tensor-parallel x data-parallel size; vLLM-Ascend picks among an expert's replicas by "
                 "rank and expert id, not by the plan's routing"])
    if fmt == "trtllm":
        return (f"--tp_size {ep} --ep_size {ep} --extra_llm_api_options OPTIONS.yaml",
                [f"OPTIONS.yaml holds: moe_config: {{backend: WIDEEP, load_balancer: {json.dumps(str(out))}}}"])
    return None, [f"phy2log [MoE layers, {ep * per}] (slot j on EP rank j // {per}), log2phy [MoE layers, E, most "
                  f"copies] (-1 padded) and logcnt [MoE layers, E] are DeepSeek EPLB's rebalance_experts outputs: give "
                  f"them to a loader that takes those arrays"]


def export_plan(plan: Plan | str | Path, fmt: str, out: str | Path, *, tables=None, cluster=None) -> dict:
    """Write `plan` (a Plan or its file) in format `fmt` to `out` (checked first, written atomically).
    tables: ActivationTables (or their file) whose activations pick the experts that fill spare slots (default:
    the plan's routing). cluster: a ClusterSpec (or its file) whose servers' memory must hold the padded layout.
    Returns a summary: slots per GPU and their bytes, physical and redundant experts per layer, padding slots and
    their extra bytes per server, the server's flags and notes."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}", parameters=("fmt",))
    if fmt in JSON_READERS and Path(out).suffix != ".json":
        raise ExportError(f"`out` {str(out)!r}: {SYSTEMS[fmt]} reads the map as a JSON file only when its name ends in "
                          f".json; name it {Path(out).stem or 'map'}.json", parameters=("out",))
    plan, tables, cluster = loaded(plan, Plan), loaded(tables, ActivationTables), loaded(cluster, ClusterSpec)
    freq = None if tables is None else origin_activations(plan, tables)
    layout = physical_layout(plan, freq, distinct=fmt == "vllm-ascend")
    if cluster is not None:
        check_fits(plan, layout, cluster, fmt)
    if fmt == "eplb":
        arrays = to_eplb(plan, layout)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    elif fmt == "trtllm":
        write_text_atomic(out, trtllm_yaml(to_trtllm(plan, layout)))
    else:
        doc = to_sglang(plan, layout) if fmt == "sglang" else to_vllm_ascend(plan, layout)
        write_text_atomic(out, json.dumps(doc))
    ep, per = len(plan.servers), layout.slots.shape[2]
    redundant = layout.physical - plan.model.num_experts
    flags, notes = server_flags(fmt, out, ep, per, redundant)
    if fmt == "sglang" and plan.model.family not in SGLANG_EXPERT_LOCATION:
        notes.append(f"SGLang takes an expert location only for models whose code defines "
                     f"get_model_config_for_expert_location (in 0.5.23: {', '.join(SGLANG_EXPERT_LOCATION)}); for "
                     f"model type {plan.model.family or 'unknown'!r} check it does, else it ignores "
                     f"--init-expert-location for this model")
    extra = layout.padding * int(plan.model.layer_bytes.max())
    return {"path": str(out), "format": fmt, "system": SYSTEMS[fmt], "ep_size": ep, "servers": list(plan.servers),
            "slots_per_gpu": per, "bytes_per_gpu": per * int(plan.model.layer_bytes.sum()),
            "physical_experts": layout.physical, "redundant_experts": redundant,
            "padding_slots": dict(zip(plan.servers, layout.padding.tolist())),
            "padding_bytes": dict(zip(plan.servers, extra.tolist())), "flags": flags, "notes": notes}
