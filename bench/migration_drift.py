"""Migration under a drifting ESFT workload: never migrate, re-solve from scratch, or migrate incrementally.

The drifting workload (prism_plan.traces.drift) gives each of the four edge-4 streams a mix of ESFT domains
that rotates from its own domain to the next one over the windows (2,000 tokens per stream and window, real
requests dealt from shuffled decks). Every strategy starts from the exact plan of window 0; before window w it
re-plans on window w - 1's tables and the simulator serves window w with the result. Benefit: mean TTFT saved
against never migrating, as a share of the from-scratch re-solve's; bytes and experts: what the moves copy.
Run: python bench/migration_drift.py [--windows N] [--window-tokens T] [--objective latency|coverage]
"""

from __future__ import annotations

import argparse
import time

from prism_plan.studies.drift import Strategy, replay_drift, with_benefit
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_MODEL, BUNDLED_TRACE
from prism_plan.placement.cluster import GIB, load_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.traces.drift import drifting_workload
from prism_plan.traces.trace import load_trace


def strategies(objective: str) -> list[Strategy]:
    out = [Strategy("never", "never", objective=objective),
           Strategy("from scratch", "scratch", objective=objective),
           Strategy("incremental, no cost", "incremental", objective=objective)]
    out += [Strategy(f"incremental, cost {c}", "incremental", move_cost=c, objective=objective)
            for c in (0.01, 0.02, 0.05)]
    out += [Strategy(f"incremental, {g} GiB/window", "incremental", budget_bytes=int(g * GIB),
                     objective=objective) for g in (2, 1, 0)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-tokens", type=int, default=2000, help="tokens per stream and window")
    ap.add_argument("--objective", choices=["latency", "coverage"], default="latency")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    began = time.perf_counter()
    windows = drifting_workload(load_trace(BUNDLED_TRACE), args.windows, args.window_tokens, seed=args.seed)
    rows = with_benefit(replay_drift(windows, load_cluster(BUNDLED_CLUSTER), resolve_model(BUNDLED_MODEL),
                                     strategies(args.objective), args.time_limit, quiet=False))
    print(f"drifting ESFT workload: {args.windows} windows x 4 streams x {args.window_tokens} tokens on "
          f"edge-4, objective {args.objective}; windows 1..{args.windows - 1} served\n")
    print(f"{'strategy':28s} {'mean TTFT':>10s} {'local cov':>9s} {'benefit':>9s} {'of scratch':>10s} "
          f"{'GiB moved':>10s} {'of scratch':>10s} {'experts':>8s} {'max stages':>10s}")
    for r in rows:
        share = "" if r["benefit_share"] is None else f"{100 * r['benefit_share']:.1f}%"
        bshare = "" if r["bytes_share"] is None else f"{100 * r['bytes_share']:.1f}%"
        print(f"{r['label']:28s} {1e3 * r['mean_ttft_s']:8.2f}ms {100 * r['mean_local_coverage']:8.2f}% "
              f"{1e3 * r['benefit_s']:7.2f}ms {share:>10s} "
              f"{r['total_bytes'] / GIB:10.2f} {bshare:>10s} {r['total_copies']:8d} {max(r['stages']):10d}")
    good = [r for r in rows if r["label"].startswith("incremental") and r["benefit_share"] is not None
            and r["benefit_share"] >= 0.95 and r["bytes_share"] is not None and r["bytes_share"] <= 1 / 3]
    zero = next(r for r in rows if r["label"].endswith(" 0 GiB/window"))
    print(f"\nincremental settings keeping >= 95% of the from-scratch benefit with <= 1/3 of its bytes: "
          f"{', '.join(r['label'] for r in good) or 'none'}")
    print(f"zero budget moves {zero['total_bytes']} bytes; {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
