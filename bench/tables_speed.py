"""How fast activation tables build, against the time to read the Parquet alone: the bundled ESFT trace
(DeepSeek-V2-Lite: 26 MoE layers x top-6 of 64) and a DeepSeek-V3-shaped trace (58 layers x top-8 of 256) made
here, with the numba kernels (when installed) and with numpy alone.

Rows: reading the Parquet alone (every batch decoded to arrays, ids checked for range only); counting batches already in
memory, activations alone and with co-activation and transitions; `tables_from_trace` (read and count, the
reading overlapped with the counting); and the whole `prism-plan profile tables` process (start-up, imports,
read, count, write), with its peak resident memory.

    python bench/tables_speed.py [--v3-tokens 1000000] [--no-numpy]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from prism_plan.placement.model import resolve_model
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces import counting
from prism_plan.traces.tables import build_tables, tables_from_trace
from prism_plan.traces.trace import Trace, TraceMeta, iter_trace

REQUEST_TOKENS = 128


def v3_trace(tokens: int, seed: int = 0) -> Trace:
    """A DeepSeek-V3-shaped prefill trace of `tokens` tokens from 4 origins, made fast: per (origin, layer) a
    Zipf popularity over the experts picks each token's first expert, and the other seven follow at an odd
    stride (mod 256: always distinct). The speed of counting does not depend on more realism than that."""
    model = resolve_model("deepseek-v3")
    rng = np.random.default_rng(seed)
    layers, e, k, origins = len(model.layers), model.num_experts, model.top_k, 4
    origin = (np.arange(tokens) // REQUEST_TOKENS % origins).astype(np.int32)
    zipf = 1.0 / np.arange(1, e + 1)
    cdf = np.cumsum(zipf) / zipf.sum()
    order = np.argsort(rng.random((origins, layers, e)), axis=2)  # each origin and layer its own hot experts
    first = order[origin[:, None], np.arange(layers)[None, :], np.searchsorted(cdf, rng.random((tokens, layers)))]
    stride = 2 * rng.integers(0, e // 2, (tokens, layers)) + 1
    experts = ((first[:, :, None] + stride[:, :, None] * np.arange(k)) % e).astype(np.int16)
    return Trace(TraceMeta.for_model(model, "bench/tables_speed.py"), tuple("abcd"), origin,
                 (np.arange(tokens) // REQUEST_TOKENS).astype(np.int64), (np.arange(tokens) % REQUEST_TOKENS)
                 .astype(np.int32), np.zeros(tokens, bool), experts)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def counted(batches: list[Trace], pairs: bool, use_numba: bool) -> None:
    meta = batches[0].meta
    l, e = len(meta.layers), meta.num_experts
    freq = np.zeros((4, l, e), np.int64)
    coact, trans = (np.zeros((l, e, e), np.int64), np.zeros((l - 1, e, e), np.int64)) if pairs else (None, None)
    for b in batches:
        counting.count_batch(b.origin, b.experts, e, freq, coact, trans, use_numba=use_numba)


def whole_process(path: Path, out: Path, pairs: bool) -> tuple[float, float]:
    """(seconds, peak resident GiB) of `prism-plan profile tables` in a fresh process."""
    cmd = [sys.executable, "-m", "prism_plan.cli", "profile", "tables", str(path), "-o", str(out), "--quiet"]
    cmd += [] if pairs else ["--no-pairs"]
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], "
            "check=True, stdout=subprocess.DEVNULL); print(time.perf_counter() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    seconds, kib = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True,
                                  text=True).stdout.split()
    return float(seconds), int(kib) / 2**20


def rows_for(name: str, path: Path, numpy_too: bool, repeat: int) -> None:
    batches = list(iter_trace(path, distinct=False))
    n = sum(b.num_tokens for b in batches)
    meta = batches[0].meta
    print(f"\n{name}: {n:,} tokens x {len(meta.layers)} layers x top-{meta.top_k} of {meta.num_experts}")
    print(f"{'step':44} {'seconds':>8} {'tokens/s':>12}")

    def show(step: str, seconds: float, extra: str = "") -> None:
        print(f"{step:44} {seconds:>8.3f} {n / seconds:>12,.0f}{extra}")

    show("read Parquet alone", best_of(lambda: sum(1 for _ in iter_trace(path, distinct=False)), repeat))
    paths = [True] if counting.numba is not None else []
    paths += [False] if numpy_too or counting.numba is None else []
    for fast in paths:
        how = "numba" if fast else "numpy"
        counted(batches[:1], True, fast)  # compiled (or cached) before the clock starts
        counted(batches[:1], False, fast)
        show(f"count activations ({how})", best_of(lambda: counted(batches, False, fast), repeat))
        show(f"count all tables ({how})", best_of(lambda: counted(batches, True, fast), repeat))
    show("tables_from_trace (read + count, all tables)", best_of(lambda: tables_from_trace(path), repeat))
    with tempfile.TemporaryDirectory() as tmp:
        for pairs in (False, True):
            seconds, gib = whole_process(path, Path(tmp) / "t.npz", pairs)
            show(f"prism-plan profile tables{'' if pairs else ' --no-pairs'}", seconds,
                 f"   peak {gib:.2f} GiB resident")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v3-tokens", type=int, default=1_000_000)
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy rows")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"numba {'%s' % counting.numba.__version__ if counting.numba else 'not installed'}; "
          f"{resource.getpagesize()} B pages")
    build_tables(iter_trace(BUNDLED_TRACE))  # warm the kernels' cache and the page cache
    rows_for("ESFT (bundled)", BUNDLED_TRACE, not args.no_numpy, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v3.parquet"
        t = time.perf_counter()
        v3_trace(args.v3_tokens).save(path)
        print(f"\n(made and wrote the V3-shaped trace in {time.perf_counter() - t:.1f} s, "
              f"{path.stat().st_size / 2**20:.0f} MiB)")
        rows_for("DeepSeek-V3 shape", path, not args.no_numpy, max(1, args.repeat - 1))


if __name__ == "__main__":
    main()
