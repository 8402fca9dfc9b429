"""Activation tables of many trace files at once: one build per file in worker processes, summed exactly.

A production trace comes as many files (one per rank, or one per hour); each file's tables are built on its own,
in a process pool on this machine (engine "local") or on a Dask cluster (engine "dask"), and the results are
summed. Counts are float64 holding integers far below 2**53, so the sum is exact whatever order the files finish
in: the tables equal, bit for bit, those of one trace holding every file's rows.

Why Dask and not Ray for the cluster engine: dask.distributed is pure Python and a small install (no daemon, no
native wheels to match), its LocalCluster runs the same code in local processes (which is what the tests use),
and it runs wherever a scheduler address reaches, started by hand with `dask scheduler` / `dask worker` or by a
job system. The work here is coarse (one task per file), so nothing of Ray's actor model or object store is
needed. Dask is optional: `pip install 'prism-plan[dask]'`.

Windows across files (`window_tables_of_files`): each file is cut into windows in its own row order, and window
i of the result is the sum of window i of every file. Per-rank dump files record the same period at once, so
window i of each is the same slice of time; a file with fewer windows contributes nothing to the later ones.

Nothing here writes temporary files: the workers send their tables back to the calling process.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.fileio import check_distinct
from prism_plan.placement.checks import integer
from prism_plan.progress import track
from prism_plan.traces.tables import ActivationTables, build_tables, tables_from_trace
from prism_plan.traces.trace import Trace, iter_trace
from prism_plan.traces.windows import MAX_WINDOW, UNITS, save_windows, tables_of_windows, write_tables

ENGINES = ("local", "dask")
GLOB_CHARS = set("*?[")
DASK_CONNECT_S = 10  # how long to try reaching a Dask scheduler before saying it cannot be reached
STOP_WAIT_S = 1.0  # how long stopped worker processes get to exit before they are killed


def expand_inputs(spec: str | Path | Sequence[str | Path], pattern: str = "*.parquet") -> list[Path]:
    """The files that `spec` names: each entry a file, a folder (its files matching `pattern`) or a glob pattern
    (`traces/*.parquet`, `**` reaching into subfolders). A folder's or pattern's files come sorted by name; the
    entries keep the order given. A PrismError when an entry matches nothing or a file is named twice."""
    entries = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not entries:
        raise PrismError("no trace given; name a file, a folder or a glob pattern such as 'traces/*.parquet'")
    files: list[Path] = []
    for entry in entries:
        files += _expand_one(Path(entry), pattern)
    seen: set[Path] = set()
    for f in files:
        key = f.resolve()
        if key in seen:
            raise PrismError(f"{f} is named twice (its tables would count twice); give each file once")
        seen.add(key)
    return files


def _expand_one(path: Path, pattern: str) -> list[Path]:
    """The files of one entry of `expand_inputs`, sorted by name."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if not found:
            raise PrismError(f"the folder {path} holds no {pattern} files; name the files, or a glob pattern "
                             f"that matches them")
        return found
    if GLOB_CHARS & set(str(path)):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise PrismError(f"no file matches {path}; check the pattern (quote it, so that the shell leaves "
                             f"it to prism-plan)")
        return found
    raise MissingInputError(f"no trace file at {path}; check the path, or give a folder or a glob pattern")


def merge_tables(tables: Sequence[ActivationTables], names: Sequence[str] | None = None) -> ActivationTables:
    """The exact sum of `tables` of one model: origins united in first-seen order, freq [origins, layers,
    experts], tokens [origins], coact [layers, E, E] and trans [layers - 1, E, E] summed (pairs kept only when
    every table has them), the request id ranges of each origin united. names: what each table came from (a
    file), for the error when a table is of another model."""
    if not tables:
        raise PrismError("no activation tables to merge")
    names = [f"tables #{i}" for i in range(len(tables))] if names is None else list(names)
    first = tables[0]
    for t, name in zip(tables[1:], names[1:]):
        if _shape(t) != _shape(first):
            raise PrismError(f"{name} is of model {_describe(t)} but {names[0]} is of model {_describe(first)}; "
                             f"give only traces of one model")
    origins = list(dict.fromkeys(o for t in tables for o in t.origins))
    index = {o: i for i, o in enumerate(origins)}
    freq = np.zeros((len(origins),) + first.freq.shape[1:])
    tokens = np.zeros(len(origins), np.int64)
    for t in tables:
        rows = np.array([index[o] for o in t.origins], np.int64)
        freq[rows] += t.freq  # rows are distinct within one table, so fancy-index += adds each once
        tokens[rows] += t.tokens
    pairs = all(t.coact is not None for t in tables)
    coact = sum_exact([t.coact for t in tables]) if pairs else None
    trans = sum_exact([t.trans for t in tables]) if pairs and all(t.trans is not None for t in tables) else None
    meta = {k: v for k, v in first.meta.items() if k not in ("requests", "coactivation")}
    if not pairs:
        meta["coactivation"] = False
    if all("requests" in t.meta for t in tables):
        meta["requests"] = _merged_requests([t.meta["requests"] for t in tables], origins)
    return ActivationTables(tuple(origins), first.layers, freq, tokens, coact, trans, meta)


def sum_exact(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The element-wise sum of float64 count arrays of one shape (exact: they hold integers below 2**53)."""
    arrays = iter(arrays)
    total = np.array(next(arrays), dtype=np.float64, copy=True)
    for a in arrays:
        total += a
    return total


def _shape(t: ActivationTables) -> tuple:
    return t.meta.get("model"), t.layers, t.num_experts, t.top_k


def _describe(t: ActivationTables) -> str:
    return f"{t.meta.get('model')!r} ({len(t.layers)} MoE layers x {t.num_experts} experts, top-{t.top_k})"


def _merged_requests(parts: list[dict], origins: list[str]) -> dict:
    """{origin: inclusive [first, last] id runs} united over `parts`: overlapping or adjacent runs joined."""
    out = {}
    for o in origins:
        runs = sorted(r for p in parts for r in p.get(o, []))
        joined: list[list[int]] = []
        for lo, hi in runs:
            if joined and lo <= joined[-1][1] + 1:
                joined[-1][1] = max(joined[-1][1], hi)
            else:
                joined.append([lo, hi])
        if joined:
            out[o] = joined
    return out


def _batches(path: Path, fraction: float | None, max_tokens: int | None) -> Iterator[Trace]:
    """The trace file's batches, sampled when `fraction` or `max_tokens` is given."""
    batches = iter_trace(path)
    if fraction is None and max_tokens is None:
        return batches
    from prism_plan.traces.sampling import sampled  # only runs that sample need it

    return sampled(batches, fraction=fraction, max_tokens=max_tokens)


def _named(path: Path, e: PrismError) -> PrismError:
    """`e` with the file it is about in its message."""
    return e if str(path) in str(e) else PrismError(f"{path}: {e}", parameters=e.parameters)


def _file_tables(path: Path, pairs: bool, fraction: float | None, max_tokens: int | None) -> ActivationTables:
    """The tables of one trace file (a worker's task)."""
    try:
        if fraction is None and max_tokens is None:
            return tables_from_trace(path, pairs=pairs)
        return build_tables(_batches(path, fraction, max_tokens), pairs=pairs, where=str(path))
    except PrismError as e:
        raise _named(path, e)


def _file_windows(path: Path, size: int, unit: str, pairs: bool, fraction: float | None,
                  max_tokens: int | None) -> list[ActivationTables]:
    """The tables of each window of one trace file, in row order (a worker's task)."""
    try:
        out = list(tables_of_windows(_batches(path, fraction, max_tokens), size, unit, pairs, where=str(path)))
    except PrismError as e:
        raise _named(path, e)
    if not out:
        raise PrismError(f"{path} holds no tokens; tables need at least one")
    return out


def _worker_setup(threads: int) -> None:
    """Leave Ctrl-C to the parent, which stops the pool (the terminal sends SIGINT to the workers too), and
    give each worker its share of the cores for Arrow's decoding threads (the files are the parallel part)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pa.set_cpu_count(threads)


def _check_sampling(fraction: float | None, max_tokens: int | None) -> None:
    """Refuse bad sampling arguments here, once, rather than in every worker."""
    if fraction is not None or max_tokens is not None:
        from prism_plan.traces.sampling import check_sampling  # only runs that sample need it

        check_sampling(fraction, max_tokens, 0)


def _share(max_tokens: int | None, n: int) -> list[int | None]:
    """`max_tokens` split over n files as evenly as whole numbers allow (the first files get the remainder)."""
    if max_tokens is None:
        return [None] * n
    if max_tokens < n:
        raise PrismError(f"`max_tokens` {max_tokens} is less than one token for each of the {n} files; raise it",
                         parameters=("max_tokens",))
    return [max_tokens // n + (i < max_tokens % n) for i in range(n)]


def _run(task: Callable, calls: list[tuple], names: list[str], combine: Callable[..., object], *,
         workers: int | None, engine: str, scheduler: str | None, quiet: bool):
    """combine(...combine(task(*calls[0]), task(*calls[1]))...) in the order of `calls`, the tasks run on
    `workers` processes (engine local) or a Dask cluster; each result is combined as soon as those before it
    are, so only results that finished early wait in memory."""
    if engine not in ENGINES:
        raise PrismError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}", parameters=("engine",))
    if scheduler is not None and engine != "dask":
        raise PrismError("`scheduler` is the address of a Dask scheduler: give it with engine dask",
                         parameters=("scheduler",))
    if workers is None:
        workers = os.cpu_count() or 1
    integer(workers, "`workers`", low=1, fix="give a number of worker processes", parameters=("workers",))
    workers = min(workers, len(calls))
    description = f"counting activations in {len(calls)} files"
    if engine == "dask":
        results = _dask_results(task, calls, workers, scheduler)
    elif workers == 1:
        results = ((i, task(*c)) for i, c in enumerate(calls))
    else:
        results = _pool_results(task, calls, workers)
    done, pending, total = 0, {}, None
    try:
        for i, r in track(results, description, total=len(calls), quiet=quiet):
            pending[i] = r
            while done in pending:
                r = pending.pop(done)
                total = r if done == 0 else combine(total, r, names[:done], names[done])
                done += 1
    finally:  # a merge that fails stops the workers too
        if hasattr(results, "close"):
            results.close()
    return total


def _pool_results(task: Callable, calls: list[tuple], workers: int) -> Iterator[tuple[int, object]]:
    """(index, result) of each call as it finishes in a pool of `workers` processes; on any error or interrupt
    the pool stops at once: queued calls cancelled, running workers terminated."""
    # forkserver: forking a parent that runs Arrow's threads can deadlock the child; the server imports this
    # module once, so that each worker starts without importing it again
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_setup, initargs=(threads,))
    try:
        futures = {pool.submit(task, *c): i for i, c in enumerate(calls)}
        left = set(futures)
        while left:
            finished, left = wait(left, return_when=FIRST_COMPLETED)
            for f in finished:
                yield futures[f], f.result()
    except BrokenProcessPool:
        _stop_pool(pool)
        pool = None  # so that its queues are released now, not at exit (where the semaphores would leak)
        raise PrismError("a worker process died (out of memory, or killed) while building tables; use fewer "
                         "`workers` (1 builds in this process)", parameters=("workers",))
    except BaseException:
        _stop_pool(pool)
        pool = None
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the workers now (shutdown alone waits for the running calls to end)."""
    # the executor has no public way to end running calls; its worker processes are in _processes
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(STOP_WAIT_S)
        if p.is_alive():
            p.kill()
    pool.shutdown(wait=True)  # the workers are gone: this only lets the pool release its queues


def _dask_results(task: Callable, calls: list[tuple], workers: int,
                  scheduler: str | None) -> Iterator[tuple[int, object]]:
    """(index, result) of each call as it finishes on the Dask scheduler at `scheduler`, or on a LocalCluster
    of `workers` single-threaded processes when None; on any error or interrupt the calls are cancelled."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise PrismError("the dask engine needs dask.distributed: pip install 'prism-plan[dask]' (or use the local "
                         "engine)", parameters=("engine",))
    cluster = None
    try:
        if scheduler is None:
            with _ignored_by_children(signal.SIGINT):
                # a failed call reaches the caller as its own error: the workers' log of it is left out
                cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                       dashboard_address=None, silence_logs=logging.CRITICAL)
        try:
            client = Client(cluster if cluster is not None else scheduler, timeout=DASK_CONNECT_S)
        except (OSError, TimeoutError) as e:
            raise PrismError(f"cannot reach the Dask scheduler at {scheduler} ({e}); check the address, or leave "
                             f"`scheduler` out for a local cluster", parameters=("scheduler",))
        with client:
            futures = [client.submit(task, *c, pure=False) for c in calls]
            index = {f.key: i for i, f in enumerate(futures)}
            try:
                for f in as_completed(futures):
                    yield index[f.key], f.result()
            except BaseException:
                client.cancel(futures)
                raise
    finally:
        if cluster is not None:
            cluster.close()


@contextmanager
def _ignored_by_children(signum: int) -> Iterator[None]:
    """Ignore `signum` while the block starts processes, which keep ignoring it: a terminal's Ctrl-C reaches
    every process of the group, and Dask's workers would each print a traceback instead of leaving the stop to
    this process. (A Ctrl-C while the block runs is lost: it lasts as long as a local cluster takes to start.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _merge_into(total: ActivationTables, t: ActivationTables, before: list[str], name: str) -> ActivationTables:
    return merge_tables([total, t], [before[0] if len(before) == 1 else f"{before[0]} (and the files after it)",
                                     name])


def _merge_windows(total: list[ActivationTables], ws: list[ActivationTables], before: list[str],
                   name: str) -> list[ActivationTables]:
    """Window i of `total` plus window i of `ws`, for every i of either."""
    out = []
    for i in range(max(len(total), len(ws))):
        if i >= len(ws):
            out.append(total[i])
        elif i >= len(total):
            out.append(ws[i])
        else:
            merged = _merge_into(total[i], ws[i], before, name)
            a, b = total[i].meta["window"], ws[i].meta["window"]
            merged.meta["window"] = {**a, "first_token": a["first_token"] + b["first_token"],
                                     "tokens": a["tokens"] + b["tokens"]}
            out.append(merged)
    return out


def tables_of_files(paths: str | Path | Sequence[str | Path], *, pairs: bool = True, workers: int | None = None,
                    engine: str = "local", scheduler: str | None = None, fraction: float | None = None,
                    max_tokens: int | None = None, quiet: bool = True) -> ActivationTables:
    """The ActivationTables of every trace file `paths` names (see expand_inputs), built one per file on
    `workers` processes (default: the core count; 1: in this process) or on Dask (engine "dask", at the
    scheduler address `scheduler`, or a local cluster) and summed exactly (merge_tables). fraction, max_tokens:
    sample each file (prism_plan.traces.sampling; max_tokens is the total, split evenly over the files)."""
    files = expand_inputs(paths)
    _check_sampling(fraction, max_tokens)
    calls = [(f, pairs, fraction, m) for f, m in zip(files, _share(max_tokens, len(files)))]
    return _run(_file_tables, calls, [str(f) for f in files], _merge_into, workers=workers, engine=engine,
                scheduler=scheduler, quiet=quiet)


def window_tables_of_files(paths: str | Path | Sequence[str | Path], size: int, unit: str = "tokens",
                           pairs: bool = True, workers: int | None = None, *, engine: str = "local",
                           scheduler: str | None = None, fraction: float | None = None,
                           max_tokens: int | None = None, quiet: bool = True) -> list[ActivationTables]:
    """The tables of each window of `size` tokens or requests (`unit`) across the trace files `paths` names:
    window i is the sum of window i of every file (each cut in its own row order; a file with fewer windows
    adds nothing to the later ones). meta["window"] of window i: index, unit, size, tokens (summed over the
    files) and first_token (the files' first tokens summed: the tokens of every earlier window). Workers,
    engine and sampling as in tables_of_files."""
    if unit not in UNITS:
        raise PrismError(f"window unit must be one of {', '.join(UNITS)}, got {unit!r}", parameters=("unit",))
    integer(size, "`size`", low=1, high=MAX_WINDOW, fix=f"give a number of {unit} per window", parameters=("size",))
    files = expand_inputs(paths)
    _check_sampling(fraction, max_tokens)
    calls = [(f, size, unit, pairs, fraction, m) for f, m in zip(files, _share(max_tokens, len(files)))]
    return _run(_file_windows, calls, [str(f) for f in files], _merge_windows, workers=workers, engine=engine,
                scheduler=scheduler, quiet=quiet)


def write_tables_of_files(paths: str | Path | Sequence[str | Path], out: str | Path, *, window: int | None = None,
                          unit: str = "tokens", pairs: bool = True, workers: int | None = None,
                          engine: str = "local", scheduler: str | None = None, fraction: float | None = None,
                          max_tokens: int | None = None, quiet: bool = True) -> list[tuple[Path, ActivationTables]]:
    """Write the tables of the trace files `paths` names to `out` (.npz), or with `window`, the tables of each
    window across them (window_tables_of_files) to the folder `out` as window-0000.npz, ... beside
    manifest.json; returns (path, tables) of each file written. One file, unsampled, on the local engine is
    windows.write_tables itself."""
    files = expand_inputs(paths)
    check_distinct(files, [out])
    if len(files) == 1 and engine == "local" and fraction is None and max_tokens is None:
        return write_tables(files[0], out, window=window, unit=unit, pairs=pairs, quiet=quiet)
    options = {"pairs": pairs, "workers": workers, "engine": engine, "scheduler": scheduler, "fraction": fraction,
               "max_tokens": max_tokens, "quiet": quiet}
    if window is None:
        tables = tables_of_files(files, **options)
        tables.save(out)
        return [(Path(out), tables)]
    return save_windows(window_tables_of_files(files, window, unit, **options), out, unit=unit, size=window,
                        inputs=files, trace=[str(f) for f in files])
