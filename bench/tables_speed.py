"""Time to read the bundled ESFT trace (33,279 tokens x 26 layers x top-6) and build its tables.

Run: python bench/tables_speed.py
"""

from __future__ import annotations

import time

from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    load_trace(BUNDLED_TRACE)  # warm up imports and the page cache
    trace = load_trace(BUNDLED_TRACE)
    rows = [("read Parquet trace", best_of(lambda: load_trace(BUNDLED_TRACE))),
            ("freq + tokens", best_of(lambda: build_tables([trace], pairs=False))),
            ("freq + coact + trans", best_of(lambda: build_tables([trace]))),
            ("read + all tables", best_of(lambda: build_tables([load_trace(BUNDLED_TRACE)])))]
    print(f"{'step':24} {'seconds':>8}   ({trace.num_tokens} tokens x {trace.experts.shape[1]} layers x top-"
          f"{trace.experts.shape[2]})")
    for name, sec in rows:
        print(f"{name:24} {sec:>8.3f}")


if __name__ == "__main__":
    main()
