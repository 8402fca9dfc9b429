"""The ranks of `prism-plan apply` as one group whose every wait can end in one clear line.

torch.distributed blocks in C++ while a collective or a transfer waits, where Python signal handlers cannot run,
and a peer that dies or stalls surfaces as a gloo traceback (or, before the group exists, a store timeout). So
here every operation is started asynchronously and waited on by a helper thread that the main thread polls:
Ctrl-C and SIGTERM are handled within a poll, a deadline (`timeout_s`) bounds every wait, and a failure becomes
one PrismError per rank. A rank that stops leaves the group without tearing it down (which would wait for the
operations its peers never finish).

The ranks share a key-value store besides the process group. A rank that fails posts why under its rank
(`fail`); the others look there while they wait, so they stop within a fraction of a second and name the rank
that stopped the run. A rank whose peer vanished posts that it noticed, waits a moment for the others' posts,
and names the ranks that posted nothing: those are the ones lost. Joining uses the same store: each rank posts
that it started (or why it could not), so a rank that never starts is named after `timeout_s`, and an error one
rank meets while starting (an unreadable journal) reaches every rank as one line.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from prism_plan.errors import Interrupted, PrismError
from prism_plan.executor import require_torch

POLL_S = 0.02  # between two looks of the main thread at a wait (or at the store)
WATCH_S = 0.2  # how often a waiting rank looks for another rank's failure
GRACE_S = 1.5  # how long a rank that saw a peer vanish waits for the other survivors to say they are there
STOP_S = 0.3  # how long an interrupted rank serving the store stays for the others to read why it left
BACKSTOP_S = 10.0
KEY = "prism-plan/apply/"
RESUME = "run the same command again to resume from the journal"


class PeerError(PrismError):
    """Another rank was lost, stopped the run, or did not answer in time; this rank stopped too."""


def _names(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _seconds(s: float) -> str:
    return f"{s:g} s"


@dataclass
class Group:
    """This rank's view of the group: rank, world size, device, the shared store and the deadline of every wait.
    stage: the stage being run (1-based; 0 outside the moves), named in messages. host: the rank whose process
    serves the store when it is one of the ranks (losing it loses the store), else None."""

    rank: int
    world: int
    device: str
    store: object
    timeout_s: float
    host: int | None = None
    stage: int = 0
    _failed: bool = field(default=False, repr=False)

    def _where(self) -> str:
        return f"stage {self.stage}: " if self.stage else ""

    def _others(self) -> list[int]:
        return [r for r in range(self.world) if r != self.rank]

    # Waiting ---------------------------------------------------------------------------------------------------

    def wait(self, works: list, peers: list[int | None] | None = None) -> None:
        """Wait for `works` (async torch.distributed works; peers[i]: the rank works[i] exchanges with, if one)
        while interrupts are handled: another rank's failure or `timeout_s` ends the wait with a PeerError.
        A helper thread sits in the C++ waits (gloo's point-to-point works are only ever completed by one)."""
        peers = peers or [None] * len(works)
        state: dict = {"at": 0}

        def run() -> None:
            try:
                for i, work in enumerate(works):
                    state["at"] = i
                    work.wait()
            except RuntimeError as e:  # the peer's connection closed (or gloo's own timeout, a backstop)
                state["error"] = e

        waiter = threading.Thread(target=run, name="prism-plan-wait", daemon=True)
        waiter.start()
        deadline = time.monotonic() + self.timeout_s
        watch = time.monotonic() + WATCH_S
        try:
            while waiter.is_alive():
                waiter.join(POLL_S)
                now = time.monotonic()
                if waiter.is_alive() and now >= deadline:
                    raise self._stopped(peers[state["at"]], timed_out=True, pending=works)
                if waiter.is_alive() and now >= watch:
                    self._watch(works)
                    watch = now + WATCH_S
        except PeerError:
            raise
        except BaseException:  # an interrupt: the process must still be able to exit
            self._abandon(works)
            raise
        if "error" in state:
            raise self._stopped(peers[state["at"]], timed_out="timed out" in str(state["error"]).lower(),
                                cause=state["error"], pending=works)

    def _watch(self, pending: list) -> None:
        """Raise a PeerError when another rank has posted a failure (or the store is gone)."""
        try:
            failures = self.store.add(KEY + "failures", 0)
        except RuntimeError as e:
            raise self._stopped(self.host, cause=e, pending=pending) from None
        if failures:
            raise self._stopped(None, pending=pending)

    def _reports(self, wait_s: float) -> dict[int, str] | None:
        """rank -> what it posted (its error, or "" for a rank that saw a failure elsewhere), for the other
        ranks that post within `wait_s`; None when the store is gone."""
        got: dict[int, str] = {}
        end = time.monotonic() + wait_s
        try:
            while True:
                for r in self._others():
                    if r not in got and self.store.check([f"{KEY}failed/{r}"]):
                        got[r] = self.store.get(f"{KEY}failed/{r}").decode(errors="replace")
                if len(got) == self.world - 1 or time.monotonic() >= end:
                    return got
                time.sleep(POLL_S)
        except RuntimeError:
            return None

    def _post(self, message: str) -> None:
        """Post this rank's failure (message; "" when it only saw another's), once; a store that is gone can
        take no post, and then the others find this rank gone too."""
        if self._failed:
            return
        self._failed = True
        try:
            self.store.set(f"{KEY}failed/{self.rank}", message)
            self.store.add(KEY + "failures", 1)
        except RuntimeError:
            pass

    def _stopped(self, peer: int | None, *, timed_out: bool = False, cause: BaseException | None = None,
                 pending: list = ()) -> PeerError:
        """The PeerError for a wait that ended because of another rank, naming that rank when it can be told."""
        self._abandon(pending)
        self._post("")
        reports = self._reports(GRACE_S)
        own = {r: m for r, m in (reports or {}).items() if m}
        if own:
            r = min(own)
            return PeerError(f"rank {r} stopped the run: {own[r]}")
        if reports is None:
            silent = [peer] if peer is not None else [] if self.host is None else [self.host]
        else:
            silent = [r for r in self._others() if r not in reports]
        if timed_out:
            who = _names(silent) if silent else "another rank"
            return PeerError(f"{self._where()}{who} did not answer within {_seconds(self.timeout_s)} "
                             f"(`timeout_s`); check that every rank runs, then {RESUME}", parameters=("timeout_s",))
        if silent:
            return PeerError(f"{self._where()}{_names(silent)} {'was' if len(silent) == 1 else 'were'} lost; "
                             f"{RESUME}")
        reason = str(cause).splitlines()[0] if cause is not None else "another rank failed"
        return PeerError(f"{self._where()}a transfer failed ({reason}); {RESUME}")

    # Operations ------------------------------------------------------------------------------------------------

    def all_reduce_min(self, value: int) -> int:
        """The least of every rank's `value`."""
        torch = require_torch()
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.wait([dist.all_reduce(t, op=dist.ReduceOp.MIN, async_op=True)])
        return int(t.item())

    def all_gather(self, out: list, tensor) -> None:
        """torch.distributed.all_gather, waited on here."""
        import torch.distributed as dist

        self.wait([dist.all_gather(out, tensor, async_op=True)])

    def exchange(self, ops: list) -> None:
        """Run point-to-point ops (torch.distributed.P2POp) together and wait for all of them."""
        import torch.distributed as dist

        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        self.wait(works, [op.peer for op in ops] if len(works) == len(ops) else None)

    def barrier(self) -> None:
        import torch.distributed as dist

        self.wait([dist.barrier(async_op=True)])

    # Ending ----------------------------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks why this rank stops (unless it stops because of them), and let the process
        exit without waiting on the group."""
        self._post("" if isinstance(error, PeerError) else _why(error))
        if self.host == self.rank:  # the store goes with this process: let the others read it first (briefly
            self._reports(STOP_S if _interrupt(error) else GRACE_S)  # when interrupted, which must stop soon)
        self._abandon()

    def close(self) -> None:
        """Leave the group together with the other ranks (gloo aborts a process whose peers vanish while it
        tears down)."""
        import torch.distributed as dist

        self.barrier()
        dist.destroy_process_group()

    def _abandon(self, pending: list = ()) -> None:
        """Keep the process group and `pending` works alive until the process ends: destroying them waits for
        every unfinished operation, for up to `timeout_s`, at interpreter exit. The C++ objects are simply never
        freed; the operating system reclaims their sockets."""
        import torch.distributed as dist

        group = dist.group.WORLD if dist.is_initialized() else None
        for obj in [group, *pending]:
            if obj is not None:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _interrupt(error: BaseException) -> bool:
    return isinstance(error, (KeyboardInterrupt, Interrupted))


def _why(error: BaseException) -> str:
    """What another rank should be told when this one stops with `error`."""
    if isinstance(error, PrismError):
        return str(error)
    if _interrupt(error):
        return f"it was interrupted; {RESUME}"
    return f"{type(error).__name__}: {error}"


# Joining ---------------------------------------------------------------------------------------------------------

def _from_env(start: str) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (RANK, WORLD_SIZE); a PrismError that says how to `start`
    apply when they are not there."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PrismError(f"apply runs one process per server: {start}")
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise PrismError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} in the "
                         f"environment must be whole numbers; {start}")


def identity(servers: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else from torchrun's environment; a PrismError that says how to start
    `apply` when neither is there or the world does not have one rank per server."""
    how = (f"`prism-plan apply --nproc {servers} ...` or `torchrun --nproc-per-node {servers} -m prism_plan.cli "
           f"apply ...`")
    if rank is None:
        rank, world = _from_env(f"start them with {how}")
    if world != servers:
        raise PrismError(f"the plan has {servers} servers but {world} processes run; start one per server with {how}")
    if not 0 <= rank < world:
        raise PrismError(f"rank {rank} is outside 0..{world - 1}; start one process per server with {how}")
    return rank, world


def _env_store(rank: int, world: int, timeout_s: float, deadline: float):
    """The store of torchrun's environment (MASTER_ADDR, MASTER_PORT): the launcher's when it serves one
    (TORCHELASTIC_USE_AGENT_STORE), else one rank 0 serves. Returns (store, the rank serving it or None). A rank
    waits for rank 0's store in Python, where an interrupt can reach it, before connecting."""
    import torch.distributed as dist

    try:
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise PrismError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} in the environment must be a port number")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host = None if agent else 0
    if rank == host:
        try:
            return dist.TCPStore(addr, port, world, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                                 multi_tenant=True), host
        except RuntimeError as e:
            raise PrismError(f"rank 0 cannot serve the rendezvous at {addr}:{port} ({str(e).splitlines()[0]}); "
                             f"set MASTER_PORT to a free port")
    while True:
        try:
            socket.create_connection((addr, port), timeout=1.0).close()
            break
        except OSError:
            if time.monotonic() >= deadline:
                who = "the launcher's rendezvous" if agent else "rank 0"
                raise PrismError(f"{who} did not start within {_seconds(timeout_s)} (`timeout_s`): nothing answers "
                                 f"at {addr}:{port}; start every rank with the same command",
                                 parameters=("timeout_s",))
            time.sleep(0.1)
    try:
        store = dist.TCPStore(addr, port, world, False, timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise PrismError(f"cannot join the rendezvous at {addr}:{port} ({str(e).splitlines()[0]}); {RESUME}")
    return attempt_store(store) if agent else store, host


def attempt_store(store):
    """`store` seen under this restart's prefix: torchrun's store outlives a restart, whose ranks must not read
    the keys (joined, failed) of the attempt before."""
    import torch.distributed as dist

    return dist.PrefixStore(f"{KEY}attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def init_distributed(timeout_s: float = 300.0, init_method: str | None = None, rank: int | None = None,
                     world: int | None = None, *, setup_error: PrismError | None = None) -> Group:
    """Join the ranks: NCCL when CUDA is there, else gloo. Without `init_method`, rank and world, from
    torchrun's environment. setup_error: why this rank cannot take part; every rank is told and raises.
    Returns the Group; a PrismError when a rank does not start within `timeout_s` or some rank could not."""
    torch = require_torch()
    import torch.distributed as dist

    if rank is None:
        rank, world = _from_env("start them with `prism-plan apply --nproc N ...` or torchrun")
    deadline = time.monotonic() + timeout_s
    if init_method is None:
        store, host = _env_store(rank, world, timeout_s, deadline)
    else:
        store, host = next(dist.rendezvous(init_method, rank, world, timeout=timedelta(seconds=timeout_s)))[0], None
    cuda = torch.cuda.is_available()
    device = "cpu"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    group = Group(rank, world, device, store, timeout_s, host)
    if setup_error is not None:
        group._post(str(setup_error))
    store.set(f"{KEY}joined/{rank}", "")
    _wait_for_all(group, deadline)
    failed = {r: m for r, m in (group._reports(0.0) or {}).items() if m}
    if setup_error is not None or failed:
        group.fail(setup_error or PeerError(""))
        if setup_error is not None:
            raise setup_error
        r = min(failed)
        raise PrismError(f"rank {r} could not start: {failed[r]}")
    try:
        # the group's own timeout only backs up the waits here, which end first with a clearer message
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("group/", store), rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s + BACKSTOP_S))
    except RuntimeError as e:
        raise PrismError(f"rank {rank} could not connect to the other ranks ({str(e).splitlines()[0]}); check that "
                         f"they run on reachable hosts, then {RESUME}")
    return group


def _wait_for_all(group: Group, deadline: float) -> None:
    """Wait, polling the store, until every rank has joined; a PrismError naming the ranks that did not."""
    keys = [f"{KEY}joined/{r}" for r in range(group.world)]
    while True:
        try:
            missing = [r for r, k in enumerate(keys) if not group.store.check([k])]
        except RuntimeError:
            raise PrismError(f"rank {group.host} was lost while the ranks joined; {RESUME}")
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise PrismError(f"{_names(missing)} did not start within "
                             f"{_seconds(group.timeout_s)} (`timeout_s`); start one process per server, all with "
                             f"the same command", parameters=("timeout_s",))
        time.sleep(POLL_S * 5)
