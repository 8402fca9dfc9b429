"""Running `prism-plan apply`: every input checked before any rank joins, this rank's work, and `launch`, which
starts and watches one process per server itself and ends with one line.

Inputs are checked the same way on every rank (and in `launch`, before any process starts), so a bad file is
one line from each rank at once, never a rank that waits for peers that already gave up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from prism_plan.errors import Interrupted, PrismError
from prism_plan.executor import require_torch
from prism_plan.executor.group import attempt_store, GRACE_S, KEY, RESUME, Group, identity, init_distributed
from prism_plan.executor.store import CheckpointIndex, ExpertStore, expert_list, index_checkpoint, synthetic_layout
from prism_plan.executor.transfer import apply_moves, read_journal
from prism_plan.fileio import check_output, loaded
from prism_plan.placement.checks import integer, number
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.placement.migration import MigrationPlan
from prism_plan.placement.plan import Plan

# Once one rank has failed, how long the others get to notice, say so and exit before they are killed.
LINGER_S = GRACE_S + 8.0
# After an interrupt is passed on, how long the ranks get to stop before they are killed.
STOP_S = 1.5


@dataclass
class Job:
    """The checked inputs of `apply`. start: the placement before the moves (the plan's without moves);
    index: the checkpoint's, or None for synthetic weights."""

    plan: Plan
    cluster: ClusterSpec
    moves: MigrationPlan | None
    start: np.ndarray
    index: CheckpointIndex | None


def prepare(plan: Plan | str | Path, cluster, moves: MigrationPlan | str | Path | None = None,
            checkpoint: str | Path | None = None) -> Job:
    """Read and check everything `apply` needs before any rank joins: the plan fits the cluster, the moves
    belong to the plan (MigrationPlan.starting_placement) and the checkpoint holds the model's experts."""
    plan_where = str(plan) if isinstance(plan, (str, os.PathLike)) else "the plan"
    moves_where = f"the moves in {moves}" if isinstance(moves, (str, os.PathLike)) else "the moves"
    plan, cluster, moves = loaded(plan, Plan), loaded(cluster, ClusterSpec), loaded(moves, MigrationPlan)
    plan.check_cluster(cluster)
    start = plan.hosted if moves is None else moves.starting_placement(plan, cluster, moves_where, plan_where)
    index = None if checkpoint is None else index_checkpoint(checkpoint, plan.model)
    return Job(plan, cluster, moves, start, index)


def _journal(journal_dir: str | Path | None, rank: int, moves: MigrationPlan | None) -> tuple[Path | None, int]:
    """(this rank's journal, stages it records as committed); a PrismError for one that cannot be used."""
    if moves is None or journal_dir is None:
        return None, 0
    path = Path(journal_dir) / f"journal-rank{rank}.json"
    try:  # the folder itself appears with the first stage committed: a run that fails before leaves nothing
        check_output(path)
    except PrismError as e:
        raise PrismError(f"{e}; or pass another `journal_dir`", parameters=("journal_dir",))
    return path, read_journal(path, moves)


def apply_on_rank(job: Job, group: Group, journal: Path | None = None, first: int = 0) -> dict:
    """This rank's part of `prism-plan apply`: load the experts it holds after the first `first` stages (all
    ranks agreed on it), run the rest of the moves, and return its summary."""
    plan, moves, rank = job.plan, job.moves, group.rank
    layers = plan.model.layers
    start = job.start if moves is None else moves.apply(job.start, first)
    store = ExpertStore(group.device)
    if job.index is not None:
        store.load(job.index, expert_list(start, rank, layers))
        layout = job.index.layout
    else:
        store.fill_synthetic(plan.model, expert_list(start, rank, layers))
        layout = lambda layer: synthetic_layout(plan.model)  # noqa: E731
    applied = 0 if moves is None else apply_moves(store, moves, group, layout, journal, first)
    if store.experts() != expert_list(plan.hosted, rank, layers):
        raise PrismError(f"rank {rank} ended with experts that differ from the plan's")
    return {"rank": rank, "server": plan.servers[rank], "experts": [list(k) for k in store.experts()],
            "sha256": store.sha256(), "stages": applied, "resumed_from": first}


def apply_plan(plan: Plan | str | Path, cluster, *, moves: MigrationPlan | str | Path | None = None,
               checkpoint: str | Path | None = None, journal_dir: str | Path | None = "prism-journal",
               timeout_s: float = 300.0, init_method: str | None = None, rank: int | None = None,
               world: int | None = None) -> dict:
    """`prism-plan apply` on this rank: check every input, join the other ranks (torchrun's environment, or
    init_method, rank and world), load this rank's experts, run the moves from where the journals say, leave
    the group. Returns this rank's summary (rank, server, experts, sha256, stages, resumed_from). A rank that is
    lost, stalls past `timeout_s` or fails ends the run on every rank with one PrismError."""
    number(timeout_s, "`timeout_s`", low=0, low_open=True, parameters=("timeout_s",))
    try:
        job = prepare(plan, cluster, moves, checkpoint)
    except PrismError as e:
        if rank is None and "RANK" not in os.environ:  # not started as a rank: no one else to tell
            raise
        # an input only this rank lacks (a checkpoint missing on its node): the others hear why, not a timeout
        init_distributed(timeout_s, init_method, rank, world, setup_error=e)
        raise
    rank, world = identity(len(job.plan.servers), rank, world)
    journal, done, setup_error = None, 0, None
    try:
        journal, done = _journal(journal_dir, rank, job.moves)
    except PrismError as e:
        setup_error = e
    group = init_distributed(timeout_s, init_method, rank, world, setup_error=setup_error)
    try:
        first = 0 if job.moves is None else group.all_reduce_min(done)
        summary = apply_on_rank(job, group, journal, first)
        group.close()
    except BaseException as e:
        group.fail(e)
        raise
    return summary


# One command for every rank ----------------------------------------------------------------------------------

@dataclass
class RankRun:
    """How one launched rank ended: its exit code (negative: the signal that killed it) and its output."""

    rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str | None:
        """Its `error:` line, without the prefix."""
        lines = [x for x in self.stderr.splitlines() if x.startswith("error: ")]
        return lines[-1][len("error: "):] if lines else None


def run_ranks(argv: list[str], nproc: int, timeout_s: float, ranks: list[int] | None = None,
              env: dict[str, str] | None = None) -> tuple[list[RankRun], dict[int, str]]:
    """Run `prism-plan <argv>` as ranks `ranks` (default all) of a world of `nproc` local processes, with
    torchrun's environment and their store served here. Returns how each ended, and what each posted in the
    store when it stopped (its error, or "" when it stopped because of another rank). An interrupt is passed on
    to the ranks, which get STOP_S to stop before they are killed, and then raised again."""
    require_torch()
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, nproc, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    ranks = list(range(nproc)) if ranks is None else ranks
    base = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="prism-apply-") as tmp:
        procs, outs = [], []
        for r in ranks:
            out, err = open(Path(tmp) / f"{r}.out", "w+"), open(Path(tmp) / f"{r}.err", "w+")
            outs.append((out, err))
            # a session of its own: an interrupt reaches the ranks once, from here
            procs.append(subprocess.Popen([sys.executable, "-m", "prism_plan.cli", *argv], stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}))
        try:
            _watch(procs)
        except (Interrupted, KeyboardInterrupt) as e:
            _stop(procs, getattr(e, "signum", signal.SIGINT))
            raise
        runs = []
        for r, p, (out, err) in zip(ranks, procs, outs):
            out.seek(0)
            err.seek(0)
            runs.append(RankRun(r, p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    seen = attempt_store(store)  # the ranks' view of it (their environment says restart 0)
    posts = {r: seen.get(f"{KEY}failed/{r}").decode(errors="replace") for r in ranks
             if seen.check([f"{KEY}failed/{r}"])}
    return runs, posts


def _watch(procs: list[subprocess.Popen]) -> None:
    """Wait for every process; once one has failed, the others get LINGER_S before they are killed."""
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > LINGER_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], signum: int) -> None:
    """Pass `signum` on to the running ranks; kill those still running after STOP_S."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    end = time.monotonic() + STOP_S
    while any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.02)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _how(run: RankRun) -> str:
    if run.returncode < 0:
        return f"was killed by {signal.Signals(-run.returncode).name}"
    last = run.stderr.strip().splitlines()[-1:] or ["no message"]
    return f"exited with code {run.returncode} ({last[0][:200]})"


def summarize(runs: list[RankRun], posts: dict[int, str]) -> list[dict]:
    """The ranks' summaries when all succeeded; else a PrismError with the one line that explains the failure:
    that of the lowest rank that stopped the run itself, else a survivor's (which names the ranks lost), else
    how the first failed rank ended."""
    if all(r.returncode == 0 for r in runs):
        out = []
        for r in runs:
            try:
                out.append(json.loads(r.stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                raise PrismError(f"rank {r.rank} succeeded but printed no summary; run it alone to see its output")
        return sorted(out, key=lambda s: s["rank"])
    by_rank = {r.rank: r for r in runs}
    own = sorted(r for r, m in posts.items() if m)
    if own:
        r = own[0]
        line = by_rank[r].error if r in by_rank else None  # its own line, with the flags named as the CLI does
        raise PrismError(f"rank {r}: {line or posts[r]}")
    for r in runs:
        if r.error is not None:
            raise PrismError(r.error)
    failed = next(r for r in runs if r.returncode != 0)
    raise PrismError(f"rank {failed.rank} {_how(failed)}; {RESUME}")


def launch(nproc: int, plan: str | Path, cluster: str | Path, *, moves: str | Path | None = None,
           checkpoint: str | Path | None = None, journal_dir: str | Path = "prism-journal",
           timeout_s: float = 300.0) -> list[dict]:
    """`prism-plan apply` on `nproc` local processes, one per server, started here (no torchrun needed): the
    inputs are checked in this process first; each rank runs `python -m prism_plan.cli apply ... --json`.
    Returns the ranks' summaries in rank order; a PrismError with one line when any rank fails."""
    integer(nproc, "`nproc`", low=1, parameters=("nproc",))
    number(timeout_s, "`timeout_s`", low=0, low_open=True, parameters=("timeout_s",))
    for name, value in (("plan", plan), ("cluster", cluster), ("moves", moves), ("checkpoint", checkpoint),
                        ("journal_dir", journal_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise PrismError(f"`{name}` must be a path: every rank reads it itself; got a {type(value).__name__}",
                             parameters=(name,))
    job = prepare(plan, cluster, moves, checkpoint)
    identity(len(job.plan.servers), 0, nproc)
    argv = ["apply", "--plan", str(plan), "--cluster", str(cluster), "--journal", str(journal_dir), "--timeout",
            repr(float(timeout_s)), "--json"]
    for flag, value in (("--moves", moves), ("--checkpoint", checkpoint)):
        if value is not None:
            argv += [flag, str(value)]
    return summarize(*run_ranks(argv, nproc, timeout_s))
