"""When the GPUs cannot hold the model: the offload tier on the bundled ESFT routing (DeepSeek-V2-Lite, 26.8 GiB of
routed experts). Plans come from one half of the requests and are judged on the other half, on a 4-server edge
cluster whose GPUs together hold 25%, 50%, 75% or 100% of one copy, with slow tiers of 16 or 32 GB/s.

Rows: every server alone swapping from its own slow tier with LRU (solver swap: the in-situ swapping Sirius
improves on), today's placement (where one copy fits, without slow tiers), the offload-aware plan (solver
exact), plus run-time scheduling, plus prefetch from the transition tables. Two held-out clusters (equal
servers; a slow LAN) check the ordering, and so does an independent additive cost model of the static rows.

    python bench/offload.py [--shares 0.25,0.5,0.75,1.0] [--load-gbps 128,256] [--prefetch 12]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from prism_plan.pipeline import solve_placement
from prism_plan.placement.cluster import ClusterSpec, parse_cluster
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import simulate
from prism_plan.placement.model import resolve_model
from prism_plan.studies.bundled import BUNDLED_MODEL, BUNDLED_TRACE
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import Trace, load_trace

GIB = 1 << 30
ORIGINS = ("intent", "law", "summary", "translation")
# name: (memory shares, compute_tflops, LAN bandwidth_gbps, latency_ms)
CLUSTERS = {
    "edge": ((6, 8, 10, 12), (30, 60, 90, 120), 10.0, 0.5),
    "equal (held out)": ((1, 1, 1, 1), (60, 60, 60, 60), 10.0, 0.5),
    "slow LAN (held out)": ((6, 8, 10, 12), (30, 60, 90, 120), 1.0, 2.0),
}
COLUMNS = ("ttft_mean_s", "ttft_p99_s", "GB loaded", "network GB", "hit_rate", "prefetch_precision",
           "prefetch_recall", "hidden_share", "solve_s", "gap", "additive_s")
HEADERS = ("mean TTFT", "p99 TTFT", "GB loaded", "net GB", "hit rate", "precision", "recall", "hidden",
           "solve s", "gap", "additive")


def edge_cluster(shape: str, copy_bytes: float, expert_bytes: float, share: float,
                 load_gbps: float | None) -> ClusterSpec:
    """The cluster `shape` whose GPUs hold `share` of one copy, each plus room for two experts (so that at 100%
    whole experts fill one copy); slow tiers of `load_gbps` (None: none)."""
    memory, tflops, lan, latency = CLUSTERS[shape]
    tier = {} if load_gbps is None else {"load_gbps": load_gbps, "load_latency_ms": 0.05}
    servers = [{"name": f"edge-{x}", "memory_gib": (m / sum(memory) * share * copy_bytes + 2 * expert_bytes) / GIB,
                "compute_tflops": t,
                "origins": [o], **tier} for x, m, t, o in zip("abcd", memory, tflops, ORIGINS)]
    return parse_cluster({"defaults": {"bandwidth_gbps": lan, "latency_ms": latency}, "server": servers},
                         f"{shape}.toml")


def additive_ttft(plan: Plan, trace: Trace, cluster: ClusterSpec) -> float:
    """Mean TTFT (s) by a model that shares no code with the simulator: per request and layer, every server
    loads each distinct expert it serves and does not pin (no cache reuse, no overlap), then computes its
    activations; the layer takes the slowest server plus one round trip where any token leaves home."""
    model = plan.model
    load_s = cluster.load_latency[:, None] + model.layer_bytes[None, :] / np.where(
        cluster.load_bandwidth > 0, cluster.load_bandwidth, np.nan)[:, None]  # [servers, layers]
    act_s = model.expert_flops / cluster.flops  # [servers]
    homes = cluster.homes(list(plan.origins))
    origin_of = {name: i for i, name in enumerate(plan.origins)}
    times = []
    for o in np.unique(trace.origin):
        oi = origin_of[trace.origins[o]]
        home = homes[oi]
        for r in np.unique(trace.request[trace.origin == o]):
            experts = trace.experts[(trace.origin == o) & (trace.request == r) & ~trace.decode]  # [tokens, layers, k]
            total = 0.0
            for l in range(experts.shape[1]):
                serve = plan.routing[oi, l][experts[:, l]]  # [tokens, k]
                slowest, away = 0.0, serve != home
                for s in np.unique(serve):
                    mine = experts[:, l][serve == s]
                    loads = np.count_nonzero(~plan.hosted[s, l, np.unique(mine)])
                    slowest = max(slowest, loads * np.nan_to_num(load_s[s, l]) + mine.size * act_s[s])
                trip = 0.0
                if away.any():
                    n = int(away.any(axis=1).sum())
                    far = np.unique(serve[away])
                    trip = max(2 * cluster.latency[home, d] + 2 * n * model.token_bytes / cluster.bandwidth[home, d]
                               for d in far)
                total += slowest + trip
            times.append(total)
    return float(np.mean(times))


def row(name: str, plan: Plan, held: Trace, cluster: ClusterSpec, static: bool, **options) -> dict:
    """One table row: the replay's summary, the plan's solve evidence and (static rows) the additive model."""
    s = simulate(plan, held, cluster, **options).summary()
    out = {"row": name, "ttft_mean_s": s["ttft_mean_s"], "ttft_p99_s": s["ttft_p99_s"],
           "GB loaded": s.get("bytes_loaded", 0) / 1e9,
           "network GB": s.get("network_bytes", s.get("remote_bytes", 0.0)) / 1e9,
           "hit_rate": s.get("hit_rate"), "prefetch_precision": s.get("prefetch_precision"),
           "prefetch_recall": s.get("prefetch_recall"), "hidden_share": s.get("hidden_share"),
           "solve_s": plan.timing.get("solve_seconds"), "gap": plan.solver.get("gap")}
    out["additive_s"] = additive_ttft(plan, held, cluster) if static else None
    return out


def rows_for(shape: str, share: float, load_gbps: float, tables, held: Trace, copy: float, expert: float,
             prefetch: int) -> list[dict]:
    cluster = edge_cluster(shape, copy, expert, share, load_gbps)
    swap = solve_placement(tables, cluster, solver="swap", objective="latency")
    exact = solve_placement(tables, cluster, solver="exact", objective="latency")
    rows = [row("swap alone (LRU)", swap, held, cluster, True)]
    if share >= 1.0:
        plain = edge_cluster(shape, copy, expert, share, None)
        rows.append(row("today's placement", solve_placement(tables, plain, objective="latency"), held, plain, True))
    if exact.offload is None:  # the GPUs hold a copy: the offload-aware plan is today's, nothing loads
        return rows + [row("offload-aware plan", exact, held, cluster, True)]
    return rows + [row("offload-aware plan", exact, held, cluster, True),
                   row("+ scheduling", exact, held, cluster, False, schedule=True),
                   row(f"+ prefetch {prefetch}", exact, held, cluster, False, schedule=True, prefetch=prefetch,
                       prefetch_tables=tables)]


def requests(trace: Trace) -> int:
    return len(np.unique(trace.origin.astype(np.int64) << 40 | trace.request))


def fmt(value) -> str:
    if value is None:
        return f"{'-':>10}"
    return f"{value:>10.3f}" if isinstance(value, float) else f"{value:>10}"


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'row':<22}" + "".join(f"{c:>10}" for c in HEADERS))
    for r in rows:
        print(f"{r['row']:<22}" + "".join(fmt(r[c]) for c in COLUMNS))


def acceptance(results: dict) -> None:
    """The issue's bars, each with its numbers."""
    print("\nacceptance")
    for (shape, share, gbps), rows in results.items():
        if shape != "edge":
            continue
        by = {r["row"].split(" (")[0].split(" 1")[0]: r for r in rows}
        swap, plan = by["swap alone"], by["offload-aware plan"]
        best = rows[-1]
        if share == 0.5:
            ratio = swap["ttft_mean_s"] / best["ttft_mean_s"]
            print(f"  50%, {gbps / 8:.0f} GB/s: swap {swap['ttft_mean_s']:.3f} s / {best['row']} "
                  f"{best['ttft_mean_s']:.3f} s = {ratio:.2f}x (bar 1.5x: {'met' if ratio >= 1.5 else 'NOT met'}); "
                  f"prefetch hides {best['hidden_share']:.1%} of load time (bar 30%: "
                  f"{'met' if best['hidden_share'] >= 0.3 else 'NOT met'})")
        if share >= 1.0:
            today = by["today's placement"]
            ok = plan["ttft_mean_s"] <= today["ttft_mean_s"] * (1 + 1e-9)
            print(f"  100%, {gbps / 8:.0f} GB/s: offload-aware plan {plan['ttft_mean_s']:.4f} s vs today's "
                  f"{today['ttft_mean_s']:.4f} s ({'no worse' if ok else 'WORSE'})")
    print("  ordering (mean TTFT falls row by row; the additive model agrees on swap > plan):")
    for (shape, share, gbps), rows in results.items():
        ranked = [r for r in rows if r["row"] != "today's placement"]
        rises = [f"{b['row']} above {a['row']} ({b['ttft_mean_s']:.3f} > {a['ttft_mean_s']:.3f} s)"
                 for a, b in zip(ranked, ranked[1:]) if b["ttft_mean_s"] > a["ttft_mean_s"] * (1 + 1e-9)]
        static = [r["additive_s"] for r in rows if r["additive_s"] is not None and r["row"] != "today's placement"]
        agrees = len(static) < 2 or static[0] > static[1]
        print(f"    {shape:<20} {share:>4.0%} {gbps / 8:>3.0f} GB/s: simulator {'NO: ' + '; '.join(rises) if rises else 'yes'}"
              f", additive model {'yes' if agrees else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0.25,0.5,0.75,1.0", help="GPU memory as shares of one copy")
    parser.add_argument("--load-gbps", default="128,256", help="slow-tier bandwidths, Gbit/s (128 = 16 GB/s)")
    parser.add_argument("--prefetch", type=int, default=12, help="experts each server prefetches per layer")
    args = parser.parse_args()
    shares = [float(x) for x in args.shares.split(",")]
    loads = [float(x) for x in args.load_gbps.split(",")]
    fit, held = load_trace(BUNDLED_TRACE).split_requests(0.5)
    tables = build_tables([fit])
    model = resolve_model(BUNDLED_MODEL)
    copy = float(model.layer_bytes.sum()) * model.num_experts
    print(f"plans from {requests(fit)} requests, judged on {requests(held)} others "
          f"({held.num_tokens} tokens); one copy of the routed experts: {copy / GIB:.1f} GiB")
    results, start = {}, time.perf_counter()
    configs = [("edge", s, g) for g in loads for s in shares]
    configs += [(shape, s, loads[0]) for shape in CLUSTERS if shape != "edge" for s in shares if s in (0.25, 0.5)]
    for shape, share, gbps in configs:
        rows = rows_for(shape, share, gbps, tables, held, copy, float(model.layer_bytes.max()), args.prefetch)
        results[shape, share, gbps] = rows
        print_rows(f"{shape}: GPUs hold {share:.0%} of one copy, slow tiers {gbps / 8:.0f} GB/s", rows)
    acceptance(results)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
