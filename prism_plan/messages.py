"""What each step tells people: short accounts of traces, tables, plans, moves, replays and exports, in the
units of prism_plan.units (ms, %, GiB, MB/token). The CLI prints them; notebooks may too."""

from __future__ import annotations

import numpy as np

from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.migration import MigrationPlan
from prism_plan.placement.plan import Plan
from prism_plan.placement.offload_replay import OffloadReplay
from prism_plan.placement.simulator import SimulationResult
from prism_plan.units import count, human_bytes, milliseconds, per_token, percent

# How each objective's value reads (solver results carry seconds and bytes).
_OBJECTIVE_UNITS = {"coverage": lambda v: f"{count(v)} activations",
                    "latency": lambda v: f"{milliseconds(v, 3)}/token",
                    "balance": lambda v: f"{milliseconds(v, 5)}/token",
                    "traffic": per_token,
                    "simulated_ttft": lambda v: f"{milliseconds(v)}/request"}


def objective_value(objective: str, value: float | None) -> str:
    """An objective's value (or bound) in its units: activations, ms/token, MB/token, ms/request."""
    return "n/a" if value is None else _OBJECTIVE_UNITS[objective](value)


def describe_trace(s: dict) -> list[str]:
    """A written trace or counts-only tables (the summary of profile_model or import_trace), then its notes."""
    if s.get("tables"):
        what = f"activation tables of {count(s['tokens'])} tokens (counts only, no co-activation)"
    else:
        what = f"{count(s['tokens'])} tokens, {count(s['requests'])} requests"
    origins = f", origins {', '.join(s['origins'])}" if "origins" in s else ""
    layers = s["layers"] if isinstance(s["layers"], int) else len(s["layers"])
    return ([f"wrote {s['path']}: {what}{origins}, {layers} MoE layers, top-{s['top_k']}"] +
            [f"note: {n}" for n in s.get("notes", ())])


def describe_tables(written) -> list[str]:
    """One line per (path, ActivationTables) written."""
    return [f"wrote {path}: {count(t.tokens.sum())} tokens from {len(t.origins)} origins, {len(t.layers)} layers x "
            f"{t.num_experts} experts" for path, t in written]


def describe_drift(s: dict) -> str:
    return (f"wrote {s['path']}: {s['windows']} windows x {len(s['streams'])} streams x {s['window_tokens']} tokens; "
            f"tables per window: prism-plan profile tables {s['path']} --window {s['window']} -o WINDOWS_DIR")


def describe_plan(plan: Plan, path) -> list[str]:
    """The solver's evidence (a weak bound said so), the plan's local coverage, and how a baseline was adapted."""
    s, seconds = plan.solver, plan.timing.get("solve_seconds")
    took = "" if seconds is None else f" in {seconds:.2f} s"
    per_request = plan.offload is not None and plan.objective == "latency"  # the offload model counts requests

    def shown(objective: str, v: float | None) -> str:
        if per_request and v is not None:
            return f"{milliseconds(v)}/request of loads and trips"
        return objective_value(objective, v)
    return ([f"wrote {path}: {s['name']} {s['status']}{took}; {plan.objective} "
             f"{shown(plan.objective, s['objective'])}, "
             f"{'bound (weak)' if s.get('weak_bound') else 'bound'} {shown(plan.objective, s['bound'])}, "
             f"gap {percent(s['gap'], 3)}; local coverage {percent(plan.metrics['local_coverage'])}"] +
            _serving_line(plan.metrics) + _offload_line(plan) + ([f"note: {s['note']}"] if s.get("note") else []))


def _offload_line(plan: Plan) -> list[str]:
    """Pins, caches and loads of a plan whose GPUs cannot hold the model, else nothing."""
    if plan.offload is None:
        return []
    m = plan.metrics
    caches = ", ".join(f"{name} {human_bytes(b)}" for name, b in zip(plan.servers, plan.offload.cache_bytes))
    return [f"offload: {count(int(plan.hosted.sum()))} experts pinned, "
            f"{percent(m['loaded_share'])} of activations loaded from slow tiers "
            f"({m['loads_per_request']:.0f} loads per request), {percent(m['pinned_remote_share'])} served from a "
            f"pinned copy on another server; caches {caches}"]


def _serving_line(m: dict) -> list[str]:
    """Balance and cross-node traffic of a plan for a cluster with nodes or a slot layout, else nothing."""
    if "overload" not in m:
        return []
    counted = "counted per token" if m["cross_node_counted"].startswith("per token") else \
        "counted per activation: pass --trace to count shared trips"
    return [f"serving: overload {percent(m['overload'])}, balancedness {percent(m['balancedness'])} "
            f"({m['dispatch']} dispatch), cross-node {per_token(m['cross_node_bytes_per_token'])} ({counted}), "
            f"{percent(m['cross_node_dispatch_share'])} of activations served on another node"]


def describe_migration(new: Plan, moves: MigrationPlan, plan_path, moves_path) -> list[str]:
    """Whether the placement moved, by how much it gains, and what the moves copy."""
    s = new.solver
    if not s["migrated"]:
        return [f"kept the current placement: the best new one improves {new.objective} by "
                f"{percent(s['predicted_gain'], 3)}, below the minimum gain {percent(s['min_gain'], 3)}; wrote "
                f"{plan_path} and empty {moves_path}"]
    return [f"wrote {plan_path}: {s['status']} (gap {percent(s['gap'], 4)}), {new.objective} "
            f"{100 * s['predicted_gain']:+.3f}% better than the current plan on these tables; local coverage "
            f"{percent(new.metrics['local_coverage'])}",
            f"wrote {moves_path}: {len(moves.stages)} stage(s), {moves.num_copies} copies ({human_bytes(moves.bytes)}, "
            f"at least {human_bytes(moves.lower_bound_bytes)} needed), {moves.num_evicts} evictions, about "
            f"{moves.seconds:.2f} s of copying"]


def migration_summary(new: Plan, moves: MigrationPlan, plan_path, moves_path) -> dict:
    """The re-plan as plain data: files written, whether it moved, the gain, the evidence and the moves."""
    s = new.solver
    return {"plan": str(plan_path), "moves": str(moves_path), "migrated": s["migrated"],
            "predicted_gain": s["predicted_gain"], "status": s["status"], "gap": s["gap"],
            "local_coverage": new.metrics["local_coverage"], **moves.summary()}


def describe_rank(s: dict) -> str:
    """What one rank of `apply` holds (its summary)."""
    return f"rank {s['rank']} ({s['server']}): holds {len(s['experts'])} experts, sha256 {s['sha256'][:16]}..."


def describe_ranks(ranks: list[dict]) -> str:
    """One line for a launched `apply`: the stages run and what each server holds."""
    s = ranks[0]
    stages = f"{s['stages']} stage(s)" + (f", resumed after stage {s['resumed_from']}" if s["resumed_from"] else "")
    held = ", ".join(f"{r['server']} {len(r['experts'])} experts (sha256 {r['sha256'][:12]}...)" for r in ranks)
    return f"applied on {len(ranks)} ranks: {stages}; {held}"


def describe_simulation(result: SimulationResult, cluster: ClusterSpec, path=None, links: int = 3) -> list[str]:
    """Latency and traffic of a replay, each server's load, and the `links` busiest links: bytes, and the time
    their transfers take at the link's bandwidth (latency apart); `path`, when given, is the file written."""
    s = result.summary()
    tpot = "" if s["tpot_mean_s"] is None else f", TPOT mean {milliseconds(s['tpot_mean_s'], 3)}"
    head = (f"{count(s['requests'])} requests, {count(s['tokens'])} tokens: TTFT mean {milliseconds(s['ttft_mean_s'])}, p50 "
            f"{milliseconds(s['ttft_p50_s'])}, p99 {milliseconds(s['ttft_p99_s'])}{tpot}; remote "
            f"{per_token(s['remote_bytes_per_token'])}; local coverage {percent(s['local_coverage'])}")
    lines = ([f"wrote {path}"] if path is not None else []) + [head]
    lines += [f"  {name}: {count(acts)} activations, {milliseconds(busy, 1)} computing"
              for name, busy, acts in zip(result.servers, result.server_busy, result.server_activations)]
    busy = result.sending_seconds(cluster)
    order = [k for k in np.argsort(-busy, axis=None)[:links] if busy.flat[k] > 0]
    names = result.servers
    for k in order:
        a, b = divmod(int(k), len(names))
        lines.append(f"  link {names[a]} -> {names[b]}: {human_bytes(result.link_bytes[a, b])}, "
                     f"{busy[a, b]:.2f} s of sending at {8 * cluster.bandwidth[a, b] / 1e9:g} Gbit/s")
    return lines


def describe_offload_replay(result: OffloadReplay, path=None) -> list[str]:
    """Latency, loads and prefetch of an offload replay, then each server's loads and hit rate."""
    s = result.summary()
    tpot = "" if s["tpot_mean_s"] is None else f", TPOT mean {milliseconds(s['tpot_mean_s'], 3)}"
    shown = {k: "n/a" if s[k] is None else percent(s[k]) for k in ("hit_rate", "prefetch_precision",
                                                                   "prefetch_recall")}
    prefetch = "no prefetch" if s["prefetch_precision"] is None else (
        f"prefetch precision {shown['prefetch_precision']}, recall {shown['prefetch_recall']}, "
        f"{percent(s['hidden_share'])} of load time hidden")
    lines = ([f"wrote {path}"] if path is not None else []) + [
        f"{count(s['requests'])} requests, {count(s['tokens'])} tokens: TTFT mean {milliseconds(s['ttft_mean_s'])}, "
        f"p99 {milliseconds(s['ttft_p99_s'])}{tpot}; loaded {human_bytes(s['bytes_loaded'])} "
        f"({human_bytes(s['prefetch_bytes'])} prefetched), network {human_bytes(s['network_bytes'])}; cache hit "
        f"rate {shown['hit_rate']}; {prefetch}"]
    lines += [f"  {name}: loaded {human_bytes(v['bytes_loaded'])}, hit rate "
              f"{'n/a' if v['hit_rate'] is None else percent(v['hit_rate'])}, {milliseconds(v['load_seconds'], 1)} "
              f"loading" for name, v in s["server"].items()]
    return lines


def describe_export(s: dict) -> list[str]:
    """The layout written, the flags the serving system needs, and what equal slots cost."""
    lines = [f"wrote {s['path']}: {s['ep_size']} EP ranks (rank i = server {', '.join(s['servers'])} in order), "
             f"{s['slots_per_gpu']} slots per GPU ({human_bytes(s['bytes_per_gpu'])}), {s['physical_experts']} "
             f"physical experts per layer ({s['redundant_experts']} redundant)"]
    if s["flags"]:
        lines.append(f"start {s['system']} with {s['flags']}")
    lines += [f"note: {n}" for n in s["notes"]]
    padded = {srv: n for srv, n in s["padding_bytes"].items() if n}
    if padded:
        # vLLM-Ascend's spare slots hold other experts (it cannot take two copies on one device)
        kind = "replicas of experts hosted elsewhere" if s["format"] == "vllm-ascend" else "second copies"
        lines.append(f"equal slots per GPU add {kind}: " + ", ".join(f"{srv} +{human_bytes(n)}"
                                                                for srv, n in padded.items()))
    return lines


def describe_calibration(s: dict, path) -> list[str]:
    """What calibrate measured (a Calibration.summary()), server by server and link by link."""
    where = f"wrote {path}" if s["rank"] in (None, 0) else f"rank {s['rank']}: measured (rank 0 writes {path})"
    lines = [f"{where}: {len(s['servers'])} server(s), {s['model']} experts ({human_bytes(s['expert_bytes'])}, "
             f"{s['dtype']}) on {s['device']} in {s['seconds']:.1f} s"]
    for v in s["servers"]:
        curve = ", ".join(f"{p['tflops']:.3g}" for p in v["curve"])
        tokens = "/".join(str(p["tokens"]) for p in v["curve"])
        lines.append(f"  {v['name']} ({v['host']}, {v['device']}): compute {v['compute_tflops']:.4g} TFLOP/s "
                     f"(at {tokens} tokens per call: {curve}); loads {v['load_gbps'] / 8:.4g} GB/s after "
                     f"{v['load_latency_ms']:.3g} ms; {v['memory_gib']:.2f} GiB free for experts")
    lines += [f"  link {k['a']} - {k['b']}: {k['bandwidth_gbps']:.4g} Gbit/s, {k['latency_ms']:.3g} ms"
              for k in s["links"]]
    return lines
