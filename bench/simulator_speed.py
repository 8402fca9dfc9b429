"""Simulator throughput: token-layer events replayed per second on the bundled ESFT trace (and repeats of it).

Run: python bench/simulator_speed.py
"""

from __future__ import annotations

import time

from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_MODEL, BUNDLED_TRACE
from prism_plan.pipeline import solve_placement
from prism_plan.placement.cluster import load_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.placement.simulator import simulate
from prism_plan.traces.tables import tables_from_trace
from prism_plan.traces.trace import Trace, load_trace


def main() -> None:
    trace = load_trace(BUNDLED_TRACE)
    cluster = load_cluster(BUNDLED_CLUSTER)
    plan = solve_placement(tables_from_trace(BUNDLED_TRACE), cluster, resolve_model(BUNDLED_MODEL))
    print(f"{'tokens':>9} {'events':>11} {'seconds':>8} {'events/s':>12}")
    for copies in (1, 4, 16):
        # Repeats become new requests, so steps and queues grow with the trace.
        parts = [trace if i == 0 else Trace(trace.meta, trace.origins, trace.origin, trace.request + i * 10**6,
                                            trace.position, trace.decode, trace.experts) for i in range(copies)]
        big = Trace.concat(parts)
        best = min(_timed(plan, big, cluster) for _ in range(3))
        events = big.num_tokens * len(big.meta.layers)
        print(f"{big.num_tokens:>9} {events:>11} {best:>8.3f} {events / best:>12,.0f}")


def _timed(plan, trace, cluster) -> float:
    t = time.perf_counter()
    simulate(plan, trace, cluster)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
