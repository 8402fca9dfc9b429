"""SGLang 0.5.23's own expert-distribution recorder (sglang/srt/eplb/expert_distribution.py), run on a CPU, read
back by `profile import --format sglang`.

The real recorder (ExpertDistributionRecorder with its per_token gatherer and _DetailAccumulator, or its stat
gatherer and _StatAccumulator) is driven as SGLang's model runner and MoE layers drive it: one `with_forward_pass`
per forward batch, one `with_current_layer` per hidden layer, `on_select_experts` with the physical slot ids of
each MoE layer (dense layer 0 records nothing), then `dump_record`, which writes its dumps with torch.save.
SGLang's own ForwardMode and Withable classes are run from the wheel's files (their modules import a whole
server); the runtime context, environment and metrics modules get small stand-ins. Stat dumps are all-reduced
over two real gloo ranks. The import must return exactly the logical ids, phases, positions, requests and
origins of the batches, and the stat counts that every rank counted.
"""

from __future__ import annotations

import __future__
import ast
import contextlib
import multiprocessing
from dataclasses import dataclass
from enum import IntEnum, auto
from pathlib import Path
from types import SimpleNamespace
from typing import Generic, Optional, TypeVar

import numpy as np
import pytest
import torch
import torch.distributed

from interop.wheels import real_modules, require_or_skip, stand_in
from prism_plan.errors import PrismError
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.importing import import_trace
from prism_plan.traces.sglang import sglang_tables
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import load_trace

RECORDER = "sglang.srt.eplb.expert_distribution"
# DeepSeek-V3 in small: hidden layer 0 dense, layers 1..3 MoE, 8 experts, top-2; SGLang numbers all 4 layers
MODEL = ModelSpec("dsv3-tiny", (1, 2, 3), num_experts=8, top_k=2, expert_bytes=64, hidden_size=16,
                  num_hidden_layers=4)
EP = 2
# physical slot -> logical expert per hidden layer: 10 slots, 5 per EP rank; slots 8 and 9 copy two experts
P2L = np.array([np.concatenate([np.roll(np.arange(8), 3 * layer), [(2 * layer + 1) % 8, (5 * layer) % 8]])
                for layer in range(4)])


@dataclass
class Batch:
    """One forward batch of one rank and what the import must make of it.

    mode: a ForwardMode name; extend_seq_lens: as SGLang's ForwardBatch holds it (None outside extend passes);
    routed: whether its MoE layers are recorded (a speculative draft model's are not); decode, requests: the
    phase and the request (counted from 0 within the batch) of each token."""

    mode: str
    positions: list[int]
    extend_seq_lens: list[int] | None
    decode: list[bool]
    requests: list[int]
    routed: bool = True


# rank 0: three prompts (the second after 4 cached tokens), their decode step, a draft model's pass, a MIXED pass
# (a new prompt, a one-token prompt, the three running requests' next tokens), an IDLE pass and a speculative
# verification of two draft tokens for two requests
BATCHES = [
    Batch("EXTEND", [0, 1, 2, 3, 4, 4, 5, 0, 1, 2], [5, 2, 3], [False] * 10, [0] * 5 + [1] * 2 + [2] * 3),
    Batch("DECODE", [5, 6, 3], None, [True] * 3, [0, 1, 2]),
    Batch("DECODE", [6, 7, 4], None, [], [], routed=False),
    Batch("MIXED", [0, 1, 2, 0, 6, 7, 4], [3, 1, 1, 1, 1], [False] * 4 + [True] * 3, [0, 0, 0, 1, 2, 3, 4]),
    Batch("IDLE", [], None, [], []),
    Batch("TARGET_VERIFY", [8, 9, 5, 6], None, [True] * 4, [0, 1, 2, 3]),
]
# rank 1 under DP attention: requests of its own
OTHER = [
    Batch("EXTEND", [0, 1, 2, 0, 1], [3, 2], [False] * 5, [0, 0, 0, 1, 1]),
    Batch("DECODE", [3, 2], None, [True] * 2, [0, 1]),
]


def routing(batches: list[Batch], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per batch: (input ids [tokens], logical experts [tokens, MoE layers, top_k]), distinct per token."""
    rng = np.random.default_rng(seed)
    out = []
    for b in batches:
        n = len(b.positions)
        experts = np.array([rng.choice(8, 2, replace=False) for _ in range(n * 3)], np.int64).reshape(n, 3, 2)
        out.append((rng.integers(0, 1000, n), experts))
    return out


def physical(experts: np.ndarray, layer: int, rng: np.random.Generator) -> torch.Tensor:
    """The physical slots [tokens, top_k] int32 SGLang's dispatch picks for logical ids [tokens, top_k] in hidden
    layer `layer`: one copy of each expert, at random."""
    slots = [[rng.choice(np.flatnonzero(P2L[layer] == e)) for e in row] for row in experts]
    return torch.tensor(np.array(slots, np.int64).reshape(experts.shape), dtype=torch.int32)


def wheel_class(root: Path, path: str, name: str, **names) -> type:
    """Class `name` of the wheel's file `path`, defined by running its own source with `names` as its module
    globals (the file's other imports pull in a whole server)."""
    tree = ast.parse((root / path).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    namespace = dict(names)
    exec(compile(ast.Module([node], []), str(root / path), "exec", flags=__future__.annotations.compiler_flag),
         namespace)
    return namespace[name]


@pytest.fixture(scope="module")
def wheel_classes():
    root = require_or_skip("sglang")
    mode = wheel_class(root, "sglang/srt/model_executor/forward_batch_info.py", "ForwardMode", IntEnum=IntEnum,
                       auto=auto)
    withable = wheel_class(root, "sglang/srt/utils/common.py", "Withable", Generic=Generic, T=TypeVar("T"),
                           Optional=Optional, contextmanager=contextlib.contextmanager)
    return mode, withable


@contextlib.contextmanager
def recorder(wheel_classes, out: Path, mode: str, a2a: str = "none", deepep_mode: str = "auto", buffer: int = 8):
    """SGLang's expert_distribution module, recording in `mode` with MoE all-to-all backend `a2a` into `out`."""
    forward_mode, withable = wheel_classes
    moe = SimpleNamespace(expert_distribution_recorder_mode=mode, moe_a2a_backend=a2a, deepep_mode=deepep_mode,
                          expert_distribution_recorder_buffer_size=buffer, elastic_ep_backend=None,
                          eplb_min_rebalancing_utilization_threshold=1.0)
    exec_ = SimpleNamespace(moe=moe, overlap=SimpleNamespace(enable_two_batch_overlap=False))
    never = None  # names the module imports for balancedness reports, which stay off
    stand_ins = (
        stand_in("sglang.srt.environ",
                 envs=SimpleNamespace(SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR=SimpleNamespace(get=lambda: str(out)))),
        stand_in("sglang.srt.model_executor.forward_batch_info", ForwardBatch=SimpleNamespace,
                 ForwardMode=forward_mode),
        stand_in("sglang.srt.observability.metrics_collector", STAT_LOGGER_ROLE_EXPERT_DISPATCH=never,
                 ExpertDispatchCollector=never, resolve_collector_class=never),
        stand_in("sglang.srt.runtime_context", get_device=lambda: SimpleNamespace(device="cpu"),
                 get_exec=lambda: exec_, get_platform=lambda: SimpleNamespace(is_hip=False),
                 get_schedule=lambda: SimpleNamespace(chunked_prefill_size=16),
                 logs_expert_balancedness_to_server_log=never, reports_expert_balancedness=lambda: False),
        stand_in("sglang.srt.utils", Withable=withable, get_device=lambda: "cpu", get_int_env_var=never),
        # imported by the ROCm MegaMoE check before it finds the platform is not ROCm
        stand_in("sglang.srt.layers.moe", get_moe_a2a_backend=never),
    )
    with real_modules("sglang", RECORDER, stand_ins=stand_ins) as mods:
        yield mods[RECORDER], forward_mode


def record(module, forward_mode, rank: int, batches: list[Batch], routed: list[tuple[np.ndarray, np.ndarray]],
           gathered: list[np.ndarray] | None = None, seed: int = 0) -> None:
    """Run rank `rank`'s recorder over `batches` and dump it. gathered: per batch, the logical experts of the
    batch its MoE routes when that is not its own (DP attention with --moe-a2a-backend none gathers all ranks')."""
    location = SimpleNamespace(num_layers=4, num_physical_experts=10, num_local_physical_experts=10 // EP,
                               num_logical_experts=8, physical_to_logical_map=torch.tensor(P2L), ep_size=EP)
    rec = module.ExpertDistributionRecorder.init_new(location, rank)
    rec.start_record()
    rng = np.random.default_rng(seed)
    for i, (b, (ids, experts)) in enumerate(zip(batches, routed)):
        batch = SimpleNamespace(input_ids=torch.tensor(ids), positions=torch.tensor(b.positions),
                                extend_seq_lens_cpu=b.extend_seq_lens, forward_mode=forward_mode[b.mode])
        moe_input = experts if gathered is None else gathered[i]
        with rec.with_forward_pass(i + 1, batch):
            for layer in range(MODEL.num_hidden_layers):
                with rec.with_current_layer(layer):
                    if b.routed and layer in MODEL.layers:
                        rec.on_select_experts(topk_ids=physical(moe_input[:, MODEL.layers.index(layer)], layer, rng))
    rec.dump_record()


def dump_of(out: Path, rank: int) -> Path:
    (path,) = out.glob(f"expert_distribution_recorder_*_{rank}.pt")
    return path


def expected(batches: list[Batch], routed) -> tuple[np.ndarray, ...]:
    """(experts, positions, decode, requests) one origin's trace must hold for `batches`."""
    experts, positions, decode, requests, first = [], [], [], [], 0
    for b, (_, e) in zip(batches, routed):
        if not b.routed or not b.positions:
            continue
        experts.append(e)
        positions += b.positions
        decode += b.decode
        requests += [first + r for r in b.requests]
        first += max(b.requests) + 1
    return np.concatenate(experts), np.array(positions), np.array(decode), np.array(requests)


def assert_origin(trace, origin: str, want: tuple[np.ndarray, ...]) -> None:
    rows = trace.origin == trace.origins.index(origin)
    experts, positions, decode, requests = want
    assert np.array_equal(trace.experts[rows], experts)
    assert trace.position[rows].tolist() == positions.tolist()
    assert trace.decode[rows].tolist() == decode.tolist()
    assert trace.request[rows].tolist() == requests.tolist()


def test_one_ranks_per_token_dump_imports_its_ids_phases_positions_and_requests(wheel_classes, tmp_path):
    out = tmp_path / "dumps"
    routed = routing(BATCHES, seed=1)
    with recorder(wheel_classes, out, "per_token") as (module, forward_mode):
        record(module, forward_mode, 0, BATCHES, routed)
    summary = import_trace("sglang", out, tmp_path / "t.parquet", model=MODEL)
    trace = load_trace(tmp_path / "t.parquet")
    stem = dump_of(out, 0).stem
    assert trace.meta.layers == (1, 2, 3) and trace.origins == (stem,)
    assert_origin(trace, stem, expected(BATCHES, routed))
    assert summary["tokens"] == 24 and summary["requests"] == 15  # the draft model's and the IDLE pass skipped


def test_ranks_that_recorded_the_same_batch_are_refused_and_rank_keeps_one(wheel_classes, tmp_path):
    out = tmp_path / "dumps"
    routed = routing(BATCHES, seed=2)
    with recorder(wheel_classes, out, "per_token") as (module, forward_mode):  # --moe-a2a-backend none, TP attention
        for rank in range(EP):
            record(module, forward_mode, rank, BATCHES, routed, seed=rank)  # each rank its own dispatch copies
    with pytest.raises(PrismError, match=r"ranks 0 and 1 recorded the same tokens and expert ids in forward pass 1 "
                                         r".*import one rank with `rank` 0") as e:
        import_trace("sglang", out, tmp_path / "t.parquet", model=MODEL)
    assert e.value.parameters == ("rank",) and "\n" not in str(e.value)
    import_trace("sglang", out, tmp_path / "t.parquet", model=MODEL, rank=1)
    trace = load_trace(tmp_path / "t.parquet")
    assert trace.origins == (dump_of(out, 1).stem,)
    assert_origin(trace, dump_of(out, 1).stem, expected(BATCHES, routed))
    with pytest.raises(PrismError, match=r"no record of rank 2; the dumps hold ranks \[0, 1\]"):
        import_trace("sglang", out, tmp_path / "t2.parquet", model=MODEL, rank=2)


def test_ranks_that_routed_their_own_tokens_stay_separate_origins(wheel_classes, tmp_path):
    out = tmp_path / "dumps"
    mine, theirs = routing(BATCHES[:2], seed=3), routing(OTHER, seed=4)
    with recorder(wheel_classes, out, "per_token", a2a="deepep", deepep_mode="low_latency") as (module, forward_mode):
        record(module, forward_mode, 0, BATCHES[:2], mine)  # DP attention with DeepEP: each rank its own batch
        record(module, forward_mode, 1, OTHER, theirs)
    import_trace("sglang", out, tmp_path / "t.parquet", model=MODEL)
    trace = load_trace(tmp_path / "t.parquet")
    assert set(trace.origins) == {dump_of(out, 0).stem, dump_of(out, 1).stem}
    assert_origin(trace, dump_of(out, 0).stem, expected(BATCHES[:2], mine))
    assert_origin(trace, dump_of(out, 1).stem, expected(OTHER, theirs))


def test_dp_attention_without_all_to_all_records_other_ranks_rows_and_is_refused(wheel_classes, tmp_path):
    out = tmp_path / "dumps"
    mine, theirs = routing(BATCHES[:2], seed=5), routing(OTHER, seed=6)
    # the MoE of every rank routes the batch gathered from both ranks, rank 0's tokens first
    gathered = [np.concatenate([a[1], b[1]]) for a, b in zip(mine, theirs)]
    with recorder(wheel_classes, out, "per_token") as (module, forward_mode):
        record(module, forward_mode, 0, BATCHES[:2], mine, gathered)
        record(module, forward_mode, 1, OTHER, theirs, gathered)
    with pytest.raises(PrismError, match=r"ranks 0 and 1 hold the same expert ids for different tokens in forward "
                                         r"pass 1: with DP attention and --moe-a2a-backend none"):
        import_trace("sglang", out, tmp_path / "t.parquet", model=MODEL)
    import_trace("sglang", out, tmp_path / "t.parquet", model=MODEL, rank=0)
    assert_origin(load_trace(tmp_path / "t.parquet"), dump_of(out, 0).stem, expected(BATCHES[:2], mine))


def stat_rank(wheel_classes, out: Path, store: Path, rank: int, a2a: str, buffer: int,
              batches: list[tuple[Batch, np.ndarray]]) -> None:
    """One gloo rank of a stat recording: its recorder over `batches`, then SGLang's all-reducing dump."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=EP)
    try:
        with recorder(wheel_classes, out, "stat", a2a=a2a, deepep_mode="normal", buffer=buffer) as (module, fm):
            record(module, fm, rank, [b for b, _ in batches], [(np.zeros(len(b.positions)), e) for b, e in batches])
    finally:
        torch.distributed.destroy_process_group()


def stat_dump(wheel_classes, tmp_path: Path, a2a: str, per_rank: list[list[tuple[Batch, np.ndarray]]],
              buffer: int = 8) -> Path:
    """The stat dump two gloo ranks (forked processes) write; per_rank[r]: rank r's batches and experts."""
    out = tmp_path / f"stat-{a2a}-{buffer}"
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=stat_rank, args=(wheel_classes, out, tmp_path / f"store-{a2a}-{buffer}", r, a2a,
                                                  buffer, per_rank[r])) for r in range(EP)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    assert [p.exitcode for p in ranks] == [0, 0]
    (path,) = out.glob("*.pt")  # rank 0 writes the sum
    return path


def counts(*routed: np.ndarray) -> np.ndarray:
    """Activations [MoE layers, experts] of logical experts [tokens, MoE layers, k] arrays."""
    experts = np.concatenate(routed)
    return np.stack([np.bincount(experts[:, i].ravel(), minlength=8) for i in range(3)]).astype(float)


@pytest.fixture
def no_cuda_cache(monkeypatch):
    # SGLang's first stat dump empties the accelerator's cache; a CPU has none
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)


def test_stat_counts_of_ranks_that_each_route_the_whole_batch_divide_by_counted_by(wheel_classes, tmp_path,
                                                                                 no_cuda_cache):
    batches = [(b, e) for b, (_, e) in zip(BATCHES, routing(BATCHES, seed=7)) if b.routed]
    path = stat_dump(wheel_classes, tmp_path, "none", [batches, batches])  # TP attention: the same batch
    once = counts(*(e for _, e in batches))
    tokens = sum(len(e) for _, e in batches)
    import_trace("sglang", path, tmp_path / "t.npz", model=MODEL)
    summed = ActivationTables.load(tmp_path / "t.npz")
    assert summed.origins == (path.stem,) and summed.layers == (1, 2, 3) and summed.coact is None
    assert np.array_equal(summed.freq[0], EP * once) and summed.tokens.tolist() == [EP * tokens]
    note = summed.meta["note"]
    assert "--moe-a2a-backend none" in note and "counted_by=N" in note and "overwritten" not in note
    divided = sglang_tables(path, MODEL, counted_by=EP)
    assert np.array_equal(divided.freq[0], once) and divided.tokens.tolist() == [tokens]
    assert f"divided by counted_by={EP}" in divided.meta["note"]
    with pytest.raises(PrismError, match=r"is not a multiple of `counted_by` 3") as e:
        sglang_tables(path, MODEL, counted_by=3)
    assert e.value.parameters == ("counted_by",)
    with pytest.raises(PrismError, match=r"summed over all ranks .* so `rank` selects nothing"):
        import_trace("sglang", path, tmp_path / "x.npz", model=MODEL, rank=0)


def test_stat_counts_of_ranks_that_route_their_own_tokens_count_each_token_once(wheel_classes, tmp_path,
                                                                              no_cuda_cache):
    mine = [(b, e) for b, (_, e) in zip(BATCHES, routing(BATCHES, seed=8)) if b.routed]
    theirs = [(b, e) for b, (_, e) in zip(OTHER, routing(OTHER, seed=9))]
    path = stat_dump(wheel_classes, tmp_path, "deepep", [mine, theirs])  # DP attention, DeepEP normal
    import_trace("sglang", path, tmp_path / "t.npz", model=MODEL)
    tables = ActivationTables.load(tmp_path / "t.npz")
    assert np.array_equal(tables.freq[0], counts(*(e for _, e in mine + theirs)))
    assert tables.tokens.tolist() == [sum(len(e) for _, e in mine + theirs)]


def test_stat_dump_of_a_full_circular_buffer_holds_the_last_passes_and_says_so(wheel_classes, tmp_path,
                                                                             no_cuda_cache):
    batches = [(b, e) for b, (_, e) in zip(BATCHES, routing(BATCHES, seed=10)) if b.routed and b.positions]
    path = stat_dump(wheel_classes, tmp_path, "deepep", [batches, batches[:0]], buffer=2)  # rank 1 idle
    import_trace("sglang", path, tmp_path / "t.npz", model=MODEL)
    tables = ActivationTables.load(tmp_path / "t.npz")
    assert np.array_equal(tables.freq[0], counts(*(e for _, e in batches[-2:])))  # the buffer kept 2 passes
    assert "every buffer row of" in tables.meta["note"] and "overwritten" in tables.meta["note"]
