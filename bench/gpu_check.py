"""GPU readiness check of the torch executor: calibrate, profile, the expert store, the distributed MoE forward,
`apply` over gloo and NCCL, and transfer bandwidth, each on CPU and (where torch sees one) on CUDA GPUs.

Every check runs on its own; one that raises is FAILED with its one-line reason and the rest still run; parts a
machine cannot run (no GPU, one GPU for NCCL) are skipped with the reason. Prints one table at the end
(check | device | result | seconds | detail); exits 0 only when nothing FAILED. Under 5 minutes on one or more
GPUs, under a minute on CPU.
Run: bash bench/gpu_check.sh [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from prism_plan.executor.group import Group
from prism_plan.executor.moe import DistributedMoE
from prism_plan.executor.store import ExpertStore, expert_list, index_checkpoint
from prism_plan.fileio import DATA_DIR
from prism_plan.pipeline import make_plan
from prism_plan.placement.cluster import load_cluster
from prism_plan.placement.model import from_hf_config
from prism_plan.placement.plan import Plan
from prism_plan.solvers import build_problem, get_solver
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace

REPO = Path(__file__).resolve().parents[1]
TINY = DATA_DIR / "tiny"
SAME_TOPK = 0.95  # share of (token, layer) top-k sets bf16 on CUDA must share with float32 on CPU
FORWARD_RTOL = 1e-4  # max |DistributedMoE - model experts| over max |model experts|, both in float32
CLI_TIMEOUT_S = 120.0  # one prism-plan command (or bench script): the whole check must end in 5 minutes
CPU_CALIBRATE_S = 20  # deepseek-v2-lite float32 calibrate on CPU: --time-limit (it takes ~3 s on 2 cores)


class Skipped(Exception):
    """A check this machine cannot run; the message is the reason."""


@dataclass
class Row:
    """One line of the table. seconds: wall time of the check."""

    check: str
    device: str
    result: str
    seconds: float
    detail: str


@dataclass
class Context:
    """What the checks share: a scratch folder, the GPUs torch sees, and figures one check leaves for another
    (calibrations[device] = the last `calibrate --json` output there)."""

    work: Path
    gpus: int
    calibrations: dict = field(default_factory=dict)

    def need_gpus(self, n: int = 1) -> None:
        """Skip the calling part unless at least `n` CUDA GPUs are there."""
        if self.gpus < n:
            raise Skipped("no CUDA GPU" if self.gpus == 0 else f"{self.gpus} GPU")


def measured(check: str, device: str, part) -> Row:
    """Run part() -> detail (str) and time it: ok, skipped (reason) on Skipped, else FAILED with one line."""
    start = time.perf_counter()
    try:
        detail, result = part(), "ok"
    except Skipped as s:
        detail, result = "", f"skipped ({s})"
    except Exception as e:  # noqa: BLE001 - every failure is a row, the other checks still run
        lines = str(e).strip().splitlines() or [""]
        detail, result = f"{type(e).__name__}: {lines[-1] if len(lines) > 1 else lines[0]}", "FAILED"
        if os.environ.get("GPU_CHECK_TRACEBACK"):
            traceback.print_exc()
    return Row(check, device, result, time.perf_counter() - start, detail)


def cli(args: list, env: dict | None = None, timeout: float = CLI_TIMEOUT_S) -> str:
    """Run `prism-plan ARGS` as this interpreter's module and return its stdout; a RuntimeError with the last
    line of stderr when it exits non-zero. env: variables set on top of this process's."""
    run = subprocess.run([sys.executable, "-m", "prism_plan.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
        raise RuntimeError(f"prism-plan {args[0]} exited {run.returncode}: {last}")
    return run.stdout


CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # hides every GPU: torch.distributed picks gloo


# 1. calibrate ----------------------------------------------------------------------------------------------------

def calibrate_once(ctx: Context, model: str, device: str, dtype: str | None = None,
                   time_limit: float | None = None) -> str:
    """`prism-plan calibrate` of `model` on `device`; its figures as the detail: compute TFLOP/s (the best of
    the expert-FFN curve), load Gbit/s (host -> device copies, as the cluster file's load_gbps) and latency ms."""
    out = ctx.work / f"calibrate-{device}-{Path(model).name}.toml"
    args = ["calibrate", "--model", model, "--device", device, "-o", out, "--json", "--quiet"]
    args += ["--dtype", dtype] if dtype else []
    args += ["--time-limit", time_limit] if time_limit else []
    s = json.loads(cli(args))
    if "[[server]]" not in out.read_text():
        raise RuntimeError(f"{out} holds no [[server]] entry")
    ctx.calibrations[device] = s  # the last: DeepSeek-V2-Lite's, where it ran
    server = s["servers"][0]
    return (f"{s['dtype']}: compute_tflops {server['compute_tflops']:.4g}, load_gbps {server['load_gbps']:.4g}, "
            f"load_latency_ms {server['load_latency_ms']:.3g}")


def check_calibrate(ctx: Context) -> list[Row]:
    """The tiny model on CPU and CUDA; DeepSeek-V2-Lite's expert shape in bfloat16 on CUDA and in float32 on
    CPU (a few seconds there, bounded by --time-limit)."""
    tiny = str(TINY / "model")

    def on_cuda(model, dtype=None):
        ctx.need_gpus()
        return calibrate_once(ctx, model, "cuda", dtype)

    return [measured("calibrate tiny", "cpu", lambda: calibrate_once(ctx, tiny, "cpu")),
            measured("calibrate tiny", "cuda", lambda: on_cuda(tiny)),
            measured("calibrate deepseek-v2-lite", "cuda", lambda: on_cuda("deepseek-v2-lite", "bfloat16")),
            measured("calibrate deepseek-v2-lite", "cpu",
                     lambda: calibrate_once(ctx, "deepseek-v2-lite", "cpu", "float32", CPU_CALIBRATE_S))]


# 2. profile ------------------------------------------------------------------------------------------------------

def profile_trace(ctx: Context, device: str, dtype: str) -> Path:
    """`prism-plan profile run` of the tiny model over its prompts on `device` in `dtype`; the trace's path."""
    out = ctx.work / f"trace-{device}-{dtype}.parquet"
    cli(["profile", "run", TINY / "model", "--prompts", TINY / "prompts.jsonl", "--device", device, "--dtype", dtype,
         "-o", out, "--quiet"])
    return out


def same_topk(a: Path, b: Path) -> tuple[float, int]:
    """(share, count) of (token, layer) pairs whose top-k expert sets are the same in traces a and b, which must
    hold the same tokens in the same order. Sets, not lists: near-tied gates may swap places in a top-k."""
    ta, tb = load_trace(a), load_trace(b)
    for name in ("origin", "request", "position"):
        if not np.array_equal(getattr(ta, name), getattr(tb, name)):
            raise RuntimeError(f"the traces hold other tokens ({name} differs); they cannot be compared")
    same = np.all(np.sort(ta.experts, axis=-1) == np.sort(tb.experts, axis=-1), axis=-1)  # [tokens, layers]
    return float(same.mean()), int(same.size)


def check_profile(ctx: Context) -> list[Row]:
    """The tiny model in float32 on CPU (the reference), then in bfloat16 on CUDA, compared to it."""
    reference: list[Path] = []

    def on_cpu():
        reference.append(profile_trace(ctx, "cpu", "float32"))
        t = load_trace(reference[0])
        return f"float32: {t.num_tokens} tokens x {len(t.meta.layers)} layers, top-{t.meta.top_k}"

    def on_cuda():
        ctx.need_gpus()
        if not reference:
            raise RuntimeError("the CPU trace to compare with was not made (see the cpu row)")
        share, n = same_topk(reference[0], profile_trace(ctx, "cuda", "bfloat16"))
        detail = (f"bfloat16 vs cpu float32: {share:.1%} of {n} (token, layer) top-k sets identical (ok at >= "
                  f"{SAME_TOPK:.0%}: bf16 may flip near-ties)")
        if share < SAME_TOPK:
            raise RuntimeError(detail)
        return detail

    return [measured("profile run tiny", "cpu", on_cpu), measured("profile bf16 vs cpu", "cuda", on_cuda)]


# 3. expert store -------------------------------------------------------------------------------------------------

def tiny_spec():
    """The tiny model's ModelSpec with float32 activations (the executor runs it in float32, as the tests do)."""
    return replace(from_hf_config(TINY / "model"), act_bytes=4)


def all_experts(spec) -> list[tuple[int, int]]:
    """[(model layer number, expert)] for every routed expert of `spec`."""
    return [(x, e) for x in spec.layers for e in range(spec.num_experts)]


def store_detail(device: str) -> str:
    """Load every expert of the tiny checkpoint onto `device` and compare with a CPU load: tensor values (after
    .cpu()) and ExpertStore.sha256 (which hashes the .cpu() bytes, so it must agree too)."""
    spec = tiny_spec()
    index = index_checkpoint(TINY / "model", spec)
    cpu = ExpertStore("cpu").load(index, all_experts(spec))
    if device == "cpu":
        return f"{len(cpu.experts())} experts, {len(cpu.reads)} tensor reads, sha256 {cpu.sha256()[:12]}"
    dev = ExpertStore(device).load(index, all_experts(spec))
    placed = {t.device.type for ts in dev.tensors.values() for t in ts.values()}
    if placed != {"cuda"}:
        raise RuntimeError(f"tensors landed on {sorted(placed)}, not cuda")
    differ = [(k, n) for k in cpu.experts() for n, t in cpu.tensors[k].items()
              if not torch.equal(dev.tensors[k][n].cpu(), t)]
    if differ:
        raise RuntimeError(f"{len(differ)} tensors differ from the CPU load, first {differ[0]}")
    if dev.sha256() != cpu.sha256():
        raise RuntimeError(f"sha256 {dev.sha256()[:12]} on cuda, {cpu.sha256()[:12]} on cpu")
    return f"{len(dev.experts())} experts equal to the CPU load, sha256 {dev.sha256()[:12]} on both"


def cpu_and_cuda(ctx: Context, name: str, detail: Callable[[str], str]) -> list[Row]:
    """The rows of check `name` run by detail(device) on CPU and, where the machine has a GPU, on CUDA."""
    def on_cuda():
        ctx.need_gpus()
        return detail("cuda")

    return [measured(name, "cpu", lambda: detail("cpu")), measured(name, "cuda", on_cuda)]


def check_store(ctx: Context) -> list[Row]:
    """ExpertStore.load of the tiny checkpoint on CPU, and on CUDA against the CPU load."""
    return cpu_and_cuda(ctx, "expert store load", store_detail)


# 4. distributed forward ------------------------------------------------------------------------------------------

@contextmanager
def gloo_of_one():
    """A gloo group of one rank in this process, as the executor's Group. Made here, not with init_distributed,
    which picks NCCL on a GPU machine; the forward's token counts are CPU tensors, which gloo carries, and one rank
    sends no hidden states, so the CUDA tensors stay on the device."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield Group(0, 1, "cpu", store, 60.0)
    finally:
        dist.destroy_process_group()


def forward_difference(device: str) -> tuple[float, float]:
    """(max abs difference, max abs reference) between DistributedMoE on one rank holding every expert, its
    tensors on `device`, and the model's own experts modules on CPU, in float32, over the bundled trace's
    tokens (their top-k ids and gate weights) with random hidden states [tokens, hidden]."""
    import transformers

    spec = tiny_spec()
    trace = load_trace(TINY / "trace.parquet")
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY / "model", dtype=torch.float32).eval()
    store = ExpertStore(device).load(index_checkpoint(TINY / "model", spec), all_experts(spec))
    routing = np.zeros((1, spec.num_layers, spec.num_experts), np.int64)  # one origin, every expert on rank 0
    hidden = torch.randn((trace.num_tokens, spec.num_layers, spec.hidden_size),
                         generator=torch.Generator().manual_seed(1))
    origin = np.zeros(trace.num_tokens, np.int64)
    worst = scale = 0.0
    with gloo_of_one() as group, torch.inference_mode():
        moe = DistributedMoE(store, routing, spec.layers, group)
        for i, layer in enumerate(spec.layers):
            ids, w = trace.experts[:, i].astype(np.int64), torch.as_tensor(trace.weights[:, i])
            got = moe.forward(i, hidden[:, i].to(device), origin, ids, w.to(device))
            if got.device.type != torch.device(device).type:
                raise RuntimeError(f"the forward returned a tensor on {got.device}, not {device}")
            ref = model.model.layers[layer].mlp.experts(hidden[:, i], torch.as_tensor(ids), w)
            worst = max(worst, float((got.cpu() - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst, scale


def forward_detail(device: str) -> str:
    worst, scale = forward_difference(device)
    detail = (f"max |moe - model experts| {worst:.3g}, outputs up to {scale:.3g} (ok at <= {FORWARD_RTOL:g} x "
              f"outputs)")
    if not worst <= FORWARD_RTOL * scale:
        raise RuntimeError(detail)
    return detail


def check_forward(ctx: Context) -> list[Row]:
    """DistributedMoE (a gloo group of one rank) against the tiny model's experts, on CPU and on CUDA tensors."""
    return cpu_and_cuda(ctx, "DistributedMoE forward", forward_detail)


# 5. apply --------------------------------------------------------------------------------------------------------

def tiny_plan(ctx: Context) -> Path:
    """A greedy plan of the bundled tiny trace on the bundled two-server cluster, saved; its path."""
    path = ctx.work / "plan.json"
    if not path.exists():
        cluster = load_cluster(TINY / "cluster.toml")
        problem = build_problem(build_tables([load_trace(TINY / "trace.parquet")]), cluster, tiny_spec())
        make_plan(problem, get_solver("greedy").solve(problem)).save(path, cluster)
    return path


def apply_detail(ctx: Context, backend: str, plan: Path, moves: Path | None = None) -> str:
    """`prism-plan apply --nproc 2` of `plan` (and `moves`) from the tiny checkpoint, over `backend` (gloo: every
    GPU hidden); every rank's sha256 must be that of its planned experts loaded from the checkpoint on CPU."""
    journal = ctx.work / f"journal-{backend}-{plan.stem}"
    args = ["apply", "--nproc", 2, "--plan", plan, "--cluster", TINY / "cluster.toml", "--checkpoint", TINY / "model",
            "--journal", journal, "--json", "--timeout", 60]
    args += ["--moves", moves] if moves else []
    ranks = json.loads(cli(args, env=CPU_ONLY if backend == "gloo" else None))["ranks"]
    p = Plan.load(plan)
    index = index_checkpoint(TINY / "model", p.model)
    sums = []
    for r, d in enumerate(ranks):
        want = ExpertStore().load(index, expert_list(p.hosted, r, p.model.layers)).sha256()
        if d["sha256"] != want:
            raise RuntimeError(f"rank {r} holds sha256 {d['sha256'][:12]}, the checkpoint's experts {want[:12]}")
        sums.append(f"{d['server']} {d['sha256'][:12]} ({len(d['experts'])} experts, {d['stages']} stages)")
    return "sha256 = checkpoint's: " + ", ".join(sums)


def apply_rows(ctx: Context, name: str, plan, moves: Path | None) -> list[Row]:
    """The gloo and NCCL rows of applying plan() (a function: the plan is made inside the timed part)."""
    def nccl():
        if ctx.gpus == 1:
            raise Skipped("1 GPU: two NCCL ranks need two; the cpu row ran gloo with CUDA_VISIBLE_DEVICES=''")
        ctx.need_gpus(2)
        return apply_detail(ctx, "nccl", plan(), moves)

    return [measured(f"{name} (gloo)", "cpu", lambda: apply_detail(ctx, "gloo", plan(), moves)),
            measured(f"{name} (nccl)", "cuda", nccl)]


def check_apply(ctx: Context) -> list[Row]:
    """A new tiny plan, and the bundled plan-1 with its moves (experts sent between ranks), applied by two local
    ranks over gloo (CPU) and NCCL (two GPUs or more; two NCCL ranks cannot share one GPU)."""
    return (apply_rows(ctx, "apply new plan", lambda: tiny_plan(ctx), None) +
            apply_rows(ctx, "apply bundled moves", lambda: TINY / "plan-1.json", TINY / "moves-1.json"))


# 6. transfer bandwidth -------------------------------------------------------------------------------------------

def transfer_detail() -> str:
    """bench/executor_transfer.py with 8 DeepSeek-V2-Lite experts (132 MiB) sent rank 0 -> 1 over gloo (it keeps
    experts in host memory, so every GPU is hidden from it): its GB/s (10^9 bytes/s, checksums included)."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "executor_transfer.py"), "--experts", "8"],
                         capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env={**os.environ, **CPU_ONLY},
                         cwd=REPO)
    if run.returncode != 0:
        raise RuntimeError(f"executor_transfer.py exited {run.returncode}: "
                           f"{(run.stderr.strip().splitlines() or [''])[-1]}")
    experts, mib, seconds, gbs = run.stdout.strip().splitlines()[-1].split()
    return f"apply_moves over gloo: {experts} experts, {mib} MiB in {seconds} s = {gbs} GB/s"


def host_to_device_detail(ctx: Context) -> str:
    """The host -> GPU copy bandwidth `calibrate --device cuda` measured (pinned memory), in GB/s (10^9 bytes/s)."""
    ctx.need_gpus()
    s = ctx.calibrations.get("cuda")
    if s is None:
        raise RuntimeError("calibrate on cuda gave no figures (see its row)")
    gbps = s["servers"][0]["load_gbps"]
    return f"{gbps / 8:.3g} GB/s pinned host -> GPU ({gbps:.4g} Gbit/s, calibrate's load_gbps, {s['model']} experts)"


def check_transfer(ctx: Context) -> list[Row]:
    """Expert transfer between ranks (bench/executor_transfer.py) and host -> device copies (calibrate's)."""
    return [measured("transfer rank->rank", "cpu", transfer_detail),
            measured("copy host->device", "cuda", lambda: host_to_device_detail(ctx))]


CHECKS = (check_calibrate, check_profile, check_store, check_forward, check_apply, check_transfer)


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table with a header."""
    cells = [("check", "device", "result", "seconds", "detail")] + [
        (r.check, r.device, r.result, f"{r.seconds:.1f}", r.detail) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [" | ".join(c[i].ljust(widths[i]) for i in range(4)) + " | " + c[4] for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 6)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="Folder for the files the checks write [default: a temporary one].")
    args = ap.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prism-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(work, gpus)
        rows = []
        for check in CHECKS:
            rows += check(ctx)
            print(f"{check.__name__} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) or "none"
    print(f"torch {torch.__version__}, CUDA GPUs: {gpus} ({names}), {time.perf_counter() - start:.0f} s in all")
    print(table(rows))
    failed = sum(r.result == "FAILED" for r in rows)
    print(f"{failed} FAILED" if failed else "nothing FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
