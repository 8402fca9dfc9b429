"""The torch executor on CPU: selective loading, MigrationPlans applied over gloo by 2-3 spawned ranks (bit-
identical experts, corrupt transfers refused, a killed rank named by the survivors and resumed from its journal),
the distributed MoE forward against the model's own experts and the simulator's byte count, `prism-plan apply`
under torchrun and launched with `launch` (one line for a lost peer, a peer that never starts, a garbage journal,
an interrupt), and an edited moves file refused before any rank starts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mp = pytest.importorskip("torch.multiprocessing")

from prism_plan.errors import PrismError  # noqa: E402
from prism_plan.executor.group import init_distributed  # noqa: E402
from prism_plan.executor.launch import launch, run_ranks, summarize  # noqa: E402
from prism_plan.messages import describe_ranks  # noqa: E402
from prism_plan.executor.moe import DistributedMoE  # noqa: E402
from prism_plan.executor.store import ExpertStore, expert_list, index_checkpoint  # noqa: E402
from prism_plan.executor import transfer  # noqa: E402
from prism_plan.fileio import DATA_DIR as DATA  # noqa: E402
from prism_plan.pipeline import make_plan  # noqa: E402
from prism_plan.placement.cluster import GIB, parse_cluster  # noqa: E402
from prism_plan.placement.migration import MigrationPlan, plan_migration  # noqa: E402
from prism_plan.placement.model import from_hf_config  # noqa: E402
from prism_plan.placement.plan import Plan  # noqa: E402
from prism_plan.placement.simulator import simulate  # noqa: E402
from prism_plan.solvers import build_problem, get_solver  # noqa: E402
from prism_plan.traces.profiler import profile_model  # noqa: E402
from prism_plan.traces.tables import build_tables  # noqa: E402
from prism_plan.traces.trace import load_trace  # noqa: E402

CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=6, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Qwen3-MoE checkpoint (3 MoE layers x 6 experts), its ModelSpec with float32 activations, and a
    profiled trace of three origins."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**CONFIG))
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "p.jsonl").write_text("".join(
        json.dumps({"origin": "abc"[i % 3], "input_ids": rng.integers(0, 64, rng.integers(3, 9)).tolist()}) + "\n"
        for i in range(9)))
    profile_model(root / "model", root / "p.jsonl", root / "t.parquet", quiet=True)
    spec = replace(from_hf_config(root / "model"), act_bytes=4)  # the executor runs in float32
    return root, model.eval(), spec, load_trace(root / "t.parquet")


def cluster(spec, slots, origins=("a", "b", "c")):
    size = int(spec.layer_bytes[0])
    return parse_cluster({"defaults": {"bandwidth_gbps": 1.0, "latency_ms": 0.5},
                          "server": [{"name": f"s{i}", "memory_gib": n * size / GIB, "origins": [o]}
                                     for i, (n, o) in enumerate(zip(slots, origins))]})


def spawn(fn, world, *args):
    """Run fn(rank, world, init_file, *args) on `world` processes; True when all finished cleanly."""
    init = args[0] / f"init-{os.getpid()}-{np.random.default_rng().integers(1 << 30)}"
    try:
        mp.spawn(fn, args=(world, f"file://{init}") + args, nprocs=world, join=True)
        return True
    except mp.ProcessRaisedException as e:
        (args[0] / "error.txt").write_text(str(e))
        return False
    except mp.ProcessExitedException as e:
        (args[0] / "error.txt").write_text(f"exited: {e}")
        return False


def test_selective_loading_reads_only_the_planned_experts(tiny):
    root, model, spec, _ = tiny
    index = index_checkpoint(root / "model", spec)
    store = ExpertStore().load(index, [(0, 1), (2, 5)])
    assert store.experts() == [(0, 1), (2, 5)]
    assert sorted(name for name, _ in store.reads) == sorted(
        f"model.layers.{x}.mlp.experts.{e}.{p}_proj.weight" for x, e in [(0, 1), (2, 5)] for p in ("gate", "up", "down"))
    fused = model.model.layers[2].mlp.experts  # transformers 5.x holds experts fused in memory
    gate, up = fused.gate_up_proj[5].chunk(2, dim=0)
    assert torch.equal(store.tensors[(2, 5)]["gate_proj.weight"], gate)
    assert torch.equal(store.tensors[(2, 5)]["up_proj.weight"], up)


def test_fused_checkpoints_are_read_row_by_row(tmp_path):
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    model = transformers.GptOssForCausalLM(config)
    model.save_pretrained(tmp_path)
    spec = from_hf_config(tmp_path)
    store = ExpertStore().load(index_checkpoint(tmp_path, spec), [(1, 3)])
    assert {(name.rsplit(".", 1)[-1], row) for name, row in store.reads} == {
        ("gate_up_proj", 3), ("gate_up_proj_bias", 3), ("down_proj", 3), ("down_proj_bias", 3)}
    assert torch.equal(store.tensors[(1, 3)]["down_proj"], model.model.layers[1].mlp.experts.down_proj[3])


def swap_case(spec):
    """Two full servers that swap experts with a third holding a free slot: several stages, a parked copy."""
    l, e = spec.num_layers, spec.num_experts
    old = np.zeros((3, l, e), bool)
    old[0, :, :3] = old[1, :, 3:] = True
    old[2, :, 0] = True
    new = old.copy()
    new[0, :, 2], new[0, :, 3] = False, True
    new[1, :, 3], new[1, :, 2] = False, True
    return old, new, cluster(spec, [3 * l, 3 * l, l + 1])


def _apply_worker(rank, world, init, root, moves_path, old, spec_dict, journal, corrupt_rank, die_after):
    from prism_plan.placement.model import ModelSpec

    group = init_distributed(20.0, init, rank, world)
    spec = ModelSpec.from_dict(spec_dict)
    moves = MigrationPlan.load(moves_path)
    index = index_checkpoint(root / "model", spec)
    journal_file = journal / f"rank{rank}.json" if journal else None
    first = group.all_reduce_min(transfer.read_journal(journal_file, moves))
    start = moves.apply(old, first)
    store = ExpertStore().load(index, expert_list(start, rank, spec.layers))
    if rank == corrupt_rank:  # this rank's sends carry a wrong checksum
        transfer.tensor_digest = lambda tensors: b"\0" * 32
    if rank == die_after[0]:
        write = transfer._write_journal

        def write_then_die(path, m, r, done, s):
            write(path, m, r, done, s)
            if done == die_after[1]:
                os._exit(0)  # gone without a word (exit 0, so that spawn leaves the survivors running)
        transfer._write_journal = write_then_die
    error = None
    try:
        transfer.apply_moves(store, moves, group, index.layout, journal_file, first)
    except PrismError as e:
        group.fail(e)
        error = str(e)
    digests = {f"{x},{e}": store.digest((x, e)).hex() for x, e in store.experts()}
    (root / f"rank{rank}.json").write_text(json.dumps({"experts": digests, "error": error}))
    if error is None:
        group.close()


def run_apply(root, tiny, journal=None, corrupt_rank=-1, die_after=(-1, 0)):
    _, _, spec, _ = tiny
    old, new, c = swap_case(spec)
    moves = plan_migration(old, new, c, spec)
    moves.save(root / "moves.json")
    ok = spawn(_apply_worker, 3, root, root / "moves.json", old, spec.to_dict(), journal, corrupt_rank, die_after)
    held = [json.loads((root / f"rank{r}.json").read_text()) if ok and (root / f"rank{r}.json").exists() else None
            for r in range(3)]
    return ok, moves, old, new, held


def checkpoint_digests(tiny, keys):
    root, _, spec, _ = tiny
    store = ExpertStore().load(index_checkpoint(root / "model", spec), keys)
    return {f"{x},{e}": store.digest((x, e)).hex() for x, e in keys}


def test_apply_moves_over_gloo_gives_every_rank_exactly_its_planned_experts(tiny, tmp_path):
    (tmp_path / "model").symlink_to(tiny[0] / "model")
    ok, moves, old, new, held = run_apply(tmp_path, tiny)
    assert ok and len(moves.stages) >= 2 and moves.temporary_copies >= 1
    for r in range(3):
        keys = expert_list(new, r, tiny[2].layers)
        assert held[r]["error"] is None
        assert held[r]["experts"] == checkpoint_digests(tiny, keys)  # exactly the planned experts, bit-identical


def test_corrupt_transfer_aborts_the_stage_everywhere(tiny, tmp_path):
    (tmp_path / "model").symlink_to(tiny[0] / "model")
    old, new, c = swap_case(tiny[2])
    sender = int(plan_migration(old, new, c, tiny[2]).stages[0].copies[0, 2])  # its stage-1 sends go bad
    ok, moves, old, new, held = run_apply(tmp_path, tiny, corrupt_rank=sender)
    assert ok
    for r in range(3):  # every rank refused the stage and kept what it had
        assert "corrupt" in held[r]["error"] and "not committed" in held[r]["error"]
        assert held[r]["experts"] == checkpoint_digests(tiny, expert_list(old, r, tiny[2].layers))


def test_a_rank_killed_mid_apply_leaves_a_journal_a_rerun_completes(tiny, tmp_path):
    (tmp_path / "model").symlink_to(tiny[0] / "model")
    journal = tmp_path / "journal"
    journal.mkdir()
    ok, moves, old, new, held = run_apply(tmp_path, tiny, journal=journal, die_after=(1, 1))
    assert ok
    assert json.loads((journal / "rank1.json").read_text())["completed_stages"] == 1
    for r in (0, 2):  # the survivors name the lost rank, in the barrier after stage 1
        assert held[r]["error"] == "stage 1: rank 1 was lost; run the same command again to resume from the journal"
    assert held[1] is None
    ok, _, _, _, held = run_apply(tmp_path, tiny, journal=journal)
    assert ok and all(json.loads((journal / f"rank{r}.json").read_text())["completed_stages"] == len(moves.stages)
                      for r in range(3))
    for r in range(3):
        assert held[r]["error"] is None
        assert held[r]["experts"] == checkpoint_digests(tiny, expert_list(new, r, tiny[2].layers))


def _forward_worker(rank, world, init, root, plan_path, spec_dict):
    from prism_plan.placement.model import ModelSpec

    group = init_distributed(20.0, init, rank, world)
    spec = ModelSpec.from_dict(spec_dict)
    plan = Plan.load(plan_path)
    trace = load_trace(root / "t.parquet")
    store = ExpertStore().load(index_checkpoint(root / "model", spec), expert_list(plan.hosted, rank, spec.layers))
    moe = DistributedMoE(store, plan.routing, spec.layers, group)
    origin = np.array([plan.origins.index(trace.origins[o]) for o in trace.origin])
    mine = np.nonzero(origin == rank)[0]  # origin i arrives at server i
    hidden = torch.randn((trace.num_tokens, spec.num_layers, spec.hidden_size), generator=torch.Generator().manual_seed(1))
    outs = [moe.forward(l, hidden[mine, l], origin[mine], trace.experts[mine, l].astype(np.int64),
                        torch.as_tensor(trace.weights[mine, l])).numpy() for l in range(spec.num_layers)]
    np.savez(root / f"out{rank}.npz", rows=mine, out=np.stack(outs, axis=1), payload=moe.payload_bytes,
             control=moe.control_bytes)
    group.close()


def test_distributed_forward_equals_the_model_and_its_bytes_the_simulator(tiny, tmp_path):
    root, model, spec, trace = tiny
    c = cluster(spec, [8, 8, 8])  # 24 slots for 18 experts: some local, some remote
    tables = build_tables([trace])
    problem = build_problem(tables, c, spec)
    plan = make_plan(problem, get_solver("greedy").solve(problem))
    plan.save(tmp_path / "plan.json", c)
    for name in ("model", "t.parquet"):
        (tmp_path / name).symlink_to(root / name)
    assert spawn(_forward_worker, 3, tmp_path, tmp_path / "plan.json", spec.to_dict())
    hidden = torch.randn((trace.num_tokens, spec.num_layers, spec.hidden_size), generator=torch.Generator().manual_seed(1))
    payload = np.zeros((3, 3))
    for r in range(3):
        got = np.load(tmp_path / f"out{r}.npz")
        payload += got["payload"]
        for l in range(spec.num_layers):
            experts = model.model.layers[l].mlp.experts
            with torch.inference_mode():
                ref = experts(hidden[got["rows"], l], torch.as_tensor(trace.experts[got["rows"], l]).long(),
                              torch.as_tensor(trace.weights[got["rows"], l]))
            np.testing.assert_allclose(got["out"][:, l], ref.numpy(), rtol=1e-5, atol=1e-6)
    sim = simulate(plan, trace, c).link_bytes
    assert payload.sum() > 0
    np.testing.assert_array_equal(payload, sim)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prism_plan_apply_under_torchrun_with_the_bundled_example(tmp_path):
    tiny = DATA / "tiny"
    plan = Plan.load(tiny / "plan-1.json")
    args = ["apply", "--plan", tiny / "plan-1.json", "--moves", tiny / "moves-1.json", "--cluster",
            tiny / "cluster.toml", "--checkpoint", tiny / "model", "--journal", tmp_path / "j", "--json"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "prism_plan.cli", *map(str, args)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = sorted((json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")), key=lambda d: d["rank"])
    assert [d["server"] for d in lines] == ["s0", "s1"]
    index = index_checkpoint(tiny / "model", plan.model)
    for r, d in enumerate(lines):
        keys = expert_list(plan.hosted, r, plan.model.layers)
        assert [tuple(x) for x in d["experts"]] == keys
        assert d["sha256"] == ExpertStore().load(index, keys).sha256()  # bit-identical to the checkpoint


def test_apply_outside_torchrun_says_how_to_start_it(capsys):
    from prism_plan.cli import main

    tiny = DATA / "tiny"
    code = main(["apply", "--plan", str(tiny / "plan-1.json"), "--cluster", str(tiny / "cluster.toml")])
    assert code == 2 and "torchrun --nproc-per-node" in capsys.readouterr().err


# One command for every rank, and the faults it reports in one line.

TINY = DATA / "tiny"
RESUME = "run the same command again to resume from the journal"
# Run in each launched rank (a sitecustomize on its PYTHONPATH): rank 1 is killed once it has committed stage 2.
KILL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    from prism_plan.executor import transfer
    write = transfer._write_journal

    def write_then_die(path, moves, rank, done, store):
        write(path, moves, rank, done, store)
        if done == 2:
            os.kill(os.getpid(), 9)
    transfer._write_journal = write_then_die
"""


def tiny_argv(tmp_path, timeout=20.0):
    return ["apply", "--plan", str(TINY / "plan-1.json"), "--moves", str(TINY / "moves-1.json"), "--cluster",
            str(TINY / "cluster.toml"), "--checkpoint", str(TINY / "model"), "--journal", str(tmp_path / "j"),
            "--timeout", str(timeout), "--json"]


def test_a_lost_peer_gives_the_survivor_one_line_and_the_rerun_resumes(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_RANK_1)
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    runs, posts = run_ranks(tiny_argv(tmp_path), 2, 20.0, env={"PYTHONPATH": path})
    lost = f"stage 2: rank 1 was lost; {RESUME}"
    assert runs[1].returncode == -signal.SIGKILL
    assert (runs[0].returncode, runs[0].stdout, runs[0].stderr) == (2, "", f"error: {lost}\n")
    with pytest.raises(PrismError, match=lost):
        summarize(runs, posts)
    ranks = launch(2, TINY / "plan-1.json", TINY / "cluster.toml", moves=TINY / "moves-1.json",
                   checkpoint=TINY / "model", journal_dir=tmp_path / "j", timeout_s=20.0)
    plan = Plan.load(TINY / "plan-1.json")
    index = index_checkpoint(TINY / "model", plan.model)
    assert [(r["server"], r["resumed_from"], r["stages"]) for r in ranks] == [("s0", 2, 9), ("s1", 2, 9)]
    for r, d in enumerate(ranks):
        keys = expert_list(plan.hosted, r, plan.model.layers)
        assert [tuple(x) for x in d["experts"]] == keys
        assert d["sha256"] == ExpertStore().load(index, keys).sha256()  # exactly the planned experts
    line = describe_ranks(ranks)
    assert "\n" not in line and "resumed after stage 2" in line


def test_a_peer_that_never_starts_is_named_after_the_timeout(tmp_path):
    runs, _ = run_ranks(tiny_argv(tmp_path, timeout=2.0), 2, 2.0, ranks=[0])
    assert runs[0].returncode == 2
    assert runs[0].stderr == ("error: rank 1 did not start within 2 s (--timeout); start one process per server, all "
                              "with the same command\n")


def test_a_garbage_journal_on_rank_0_is_one_line_on_every_rank(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "journal-rank0.json").write_text("garbage")
    runs, posts = run_ranks(tiny_argv(tmp_path), 2, 20.0)
    why = (f"journal {tmp_path / 'j' / 'journal-rank0.json'} is unreadable (JSONDecodeError); delete it to start the "
           f"moves from the beginning")
    assert [(r.returncode, r.stderr) for r in runs] == [(2, f"error: {why}\n"),
                                                        (2, f"error: rank 0 could not start: {why}\n")]
    with pytest.raises(PrismError, match=r"^rank 0: journal .* is unreadable"):
        summarize(runs, posts)


FAKE_RANK_1 = """
import sys, time
from pathlib import Path
from prism_plan.executor.group import init_distributed
init_distributed(30.0)
Path(sys.argv[1]).write_text("joined")
time.sleep(30)
"""


def test_an_interrupt_during_a_collective_ends_the_rank(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    fake = subprocess.Popen([sys.executable, "-c", FAKE_RANK_1, str(tmp_path / "joined")], env={**env, "RANK": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank0 = subprocess.Popen([sys.executable, "-m", "prism_plan.cli", *tiny_argv(tmp_path, timeout=30.0)],
                             env={**env, "RANK": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # rank 1 joined: rank 0 waits for it in the all-reduce that finds the resume stage
            if (tmp_path / "joined").exists():
                break
            time.sleep(0.1)
        time.sleep(1.0)
        rank0.send_signal(signal.SIGINT)
        line = rank0.stderr.readline()
        out, err = rank0.communicate(timeout=10)  # a guard against a hang; bench/interrupts.py measures
    finally:
        for p in (fake, rank0):
            p.kill()
            p.wait()
    assert rank0.returncode == 130 and out == "" and err == ""
    assert line == ("interrupted (SIGINT): the journals keep the stages done; run the same command again to "
                    "resume\n")


def test_an_edited_moves_file_is_refused_before_any_rank_starts(tmp_path, capsys):
    from prism_plan.cli import main

    doc = json.loads((TINY / "moves-1.json").read_text())
    copy = next(s for st in doc["stages"] for s in st["steps"] if s["op"] == "copy")
    copy["expert"] = (copy["expert"] + 1) % 6  # one copy's expert id changed
    (tmp_path / "moves.json").write_text(json.dumps(doc))
    args = ["apply", "--plan", str(TINY / "plan-1.json"), "--moves", str(tmp_path / "moves.json"), "--cluster",
            str(TINY / "cluster.toml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    edited = "was edited after `prism-plan migrate` wrote it"
    assert len(err.splitlines()) == 1 and edited in err and "torchrun" not in err
    with pytest.raises(PrismError, match=edited):  # refused here, before any rank starts
        launch(2, TINY / "plan-1.json", TINY / "cluster.toml", moves=tmp_path / "moves.json")
