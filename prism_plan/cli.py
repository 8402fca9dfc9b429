"""The `prism-plan` command line: parses arguments, calls the library, prints. Exit code 2 on user errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from prism_plan import __version__
from prism_plan.errors import PrismError


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=float))


def _model(spec: str | None, tables_meta: dict | None = None):
    """The model: --model when given, else the one the tables were recorded from (their shape, or a preset)."""
    from prism_plan.placement.model import PRESETS, ModelSpec, resolve_model

    if spec is None:
        meta = tables_meta or {}
        if meta.get("spec"):
            return ModelSpec.from_dict(meta["spec"])
        if meta.get("model") not in PRESETS:
            raise PrismError("pass --model (a preset, a config.json or a model folder); the input does not "
                             "name a preset model")
        spec = meta["model"]
    return resolve_model(spec)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prism-plan")
def cli() -> None:
    """Plan where the experts of a Mixture-of-Experts model live across GPU servers."""


@cli.group()
def profile() -> None:
    """Record or import routing traces and build activation tables."""


@profile.command("import")
@click.option("--format", "fmt", type=click.Choice(["esft", "jsonl", "sglang", "vllm", "megatron"]), required=True,
              help="Source format (see the README, \"Importing routing\").")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", help="Preset, config.json or model folder (default for esft: "
              "deepseek-v2-lite).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Trace to write (.parquet); for SGLang stat dumps (counts only), tables (.npz).")
@click.option("--origin", help="Origin of every token (default: the file's name, or rank for megatron).")
@click.option("--no-weights", is_flag=True, help="Leave gate weights out (a much smaller file).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def profile_import(fmt, src, model_spec, output, origin, no_weights, quiet, as_json) -> None:
    """Convert routing recorded elsewhere (ESFT, SGLang, vLLM, Megatron-Core, generic JSONL) to a Parquet trace."""
    from prism_plan.traces.importing import import_trace

    if model_spec is None and fmt == "esft":
        model_spec = "deepseek-v2-lite"
    summary = import_trace(fmt, src, output, _model(model_spec), weights=not no_weights, quiet=quiet, origin=origin)
    if as_json:
        _echo_json(summary)
    elif summary.get("tables"):
        click.echo(f"wrote {output}: activation tables of {summary['tokens']} tokens (counts only, no co-activation), "
                   f"origins {', '.join(summary['origins'])}")
    else:
        click.echo(f"wrote {output}: {summary['tokens']} tokens, {summary['requests']} requests, origins "
                   f"{', '.join(summary['origins'])}")


@profile.command("run")
@click.argument("model_name", metavar="MODEL")
@click.option("--prompts", "prompts_path", type=click.Path(path_type=Path), required=True,
              help="JSONL: one prompt per line with an origin and `text` or `input_ids`.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Trace to write (.parquet).")
@click.option("--origin-field", default="origin", show_default=True, help="JSONL key naming each prompt's origin.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Greedy decode steps to record after each prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat-template", is_flag=True, help="Wrap `text` prompts in the tokenizer's chat template.")
@click.option("--no-weights", is_flag=True, help="Leave gate weights out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def profile_run(model_name, prompts_path, output, origin_field, max_new_tokens, batch_size, chat_template,
                no_weights, quiet, as_json) -> None:
    """Run a Hugging Face MoE model (a local folder or hub id) over prompts and record every token's routing."""
    from prism_plan.traces.profiler import profile_model

    summary = profile_model(model_name, prompts_path, output, origin_field, max_new_tokens, batch_size,
                            chat_template, not no_weights, quiet)
    if as_json:
        _echo_json(summary)
    else:
        click.echo(f"wrote {output}: {summary['tokens']} tokens of {summary['requests']} prompts, MoE layers "
                   f"{summary['layers'][0]}..{summary['layers'][-1]}, top-{summary['top_k']}")


@profile.command("tables")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Tables to write (.npz); with --window, a folder for window-0000.npz, window-0001.npz, ...")
@click.option("--window", type=click.IntRange(min=1), help="Cut the trace, in row order, into windows of this many "
              "tokens (or requests, see --window-unit) and write tables per window.")
@click.option("--window-unit", type=click.Choice(["tokens", "requests"]), default="tokens", show_default=True)
@click.option("--no-pairs", is_flag=True, help="Skip co-activation and transition counts.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def profile_tables(trace, output, window, window_unit, no_pairs, quiet, as_json) -> None:
    """Count activations per origin, layer and expert (and expert pairs) in a trace, whole or per window."""
    from prism_plan.traces.tables import tables_from_trace
    from prism_plan.traces.windows import window_tables

    if window is None:
        tables = tables_from_trace(trace, pairs=not no_pairs, quiet=quiet)
        tables.save(output)
        written = [(output, tables)]
    else:
        if output.exists() and not output.is_dir():
            raise PrismError(f"{output} is a file; with --window, -o names a folder for the window tables")
        output.mkdir(parents=True, exist_ok=True)
        written = []
        for tables in window_tables(trace, window, window_unit, pairs=not no_pairs, quiet=quiet):
            path = output / f"window-{tables.meta['window']['index']:04d}.npz"
            tables.save(path)
            written.append((path, tables))
    summary = [{"path": str(path), "origins": list(t.origins), "tokens": t.tokens.tolist(), "layers": len(t.layers),
                "experts": t.num_experts, "activations": float(t.freq.sum()), "window": t.meta.get("window")}
               for path, t in written]
    if as_json:
        _echo_json(summary if window is not None else summary[0])
        return
    for path, t in written:
        click.echo(f"wrote {path}: {int(t.tokens.sum())} tokens from {len(t.origins)} origins, "
                   f"{len(t.layers)} layers x {t.num_experts} experts")


@profile.command("drift")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Trace to write (.parquet).")
@click.option("--windows", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--window-tokens", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Tokens per stream and window.")
@click.option("--shift", type=int, default=1, show_default=True,
              help="Stream i drifts from origin i to origin i + shift over the windows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def profile_drift(trace, output, windows, window_tokens, shift, seed, as_json) -> None:
    """Build a drifting workload from a trace's origins (e.g. the ESFT domains): each stream's mix of domains
    rotates to the next domain over the windows."""
    from prism_plan.traces.drift import drifting_workload, rotation_mix
    from prism_plan.traces.trace import Trace, read_trace, write_trace

    source = read_trace(trace)
    parts = drifting_workload(source, windows, window_tokens, rotation_mix(windows, len(source.origins), shift),
                              seed)
    write_trace(output, Trace.concat(parts))
    size = window_tokens * len(source.origins)
    summary = {"path": str(output), "windows": windows, "streams": list(source.origins),
               "tokens": size * windows, "window": size}
    if as_json:
        _echo_json(summary)
    else:
        click.echo(f"wrote {output}: {windows} windows x {len(source.origins)} streams x {window_tokens} tokens; "
                   f"tables per window: prism-plan profile tables {output} --window {size} -o WINDOWS_DIR")


def _solver_names() -> list[str]:
    from prism_plan.solvers import SOLVERS

    return list(SOLVERS)


@cli.command()
@click.option("--tables", "tables_path", type=click.Path(path_type=Path), required=True, help="Tables (.npz).")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), required=True, help="Cluster TOML.")
@click.option("--model", "model_spec", help="Preset, config.json or model folder (default: the tables' model).")
@click.option("--objective", type=click.Choice(["coverage", "latency", "traffic"]), default="coverage",
              show_default=True, help="coverage: local activations; latency: expected MoE latency (MILP, or the "
              "simulator for local-search); traffic: network bytes (needs --trace).")
@click.option("--solver", default="exact", show_default=True, help="exact, greedy, local-search, or a baseline: "
              "linear, round-robin, popularity, eplb, random.")
@click.option("--trace", "trace_path", type=click.Path(path_type=Path),
              help="The trace the tables were built from; objectives judged by replay need it.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests per origin batched in one step when replaying --trace.")
@click.option("--start", "start_path", type=click.Path(path_type=Path), help="Plan local-search starts from.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="Seconds for searching solvers.")
@click.option("--min-replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomised solvers.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Plan to write (.json).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def solve(tables_path, cluster_path, model_spec, objective, solver, trace_path, concurrency, start_path, time_limit,
          min_replicas, seed, output, as_json) -> None:
    """Solve for a placement and write the plan."""
    from prism_plan.pipeline import solve_placement
    from prism_plan.placement.cluster import load_cluster
    from prism_plan.placement.plan import Plan
    from prism_plan.traces.tables import ActivationTables
    from prism_plan.traces.trace import read_trace

    tables = ActivationTables.load(tables_path)
    cluster = load_cluster(cluster_path)
    model = _model(model_spec, tables.meta)
    options = {}
    if start_path is not None:
        if solver != "local-search":
            raise PrismError("--start is for --solver local-search")
        start = Plan.load(start_path)
        start.check_cluster(cluster)
        model.check_same_shape(start.model, str(start_path))
        options["start"] = start.hosted
    trace = read_trace(trace_path) if trace_path is not None else None
    plan = solve_placement(tables, cluster, model, solver=solver, objective=objective, time_limit=time_limit,
                           min_replicas=min_replicas, seed=seed, trace=trace, concurrency=concurrency, **options)
    plan.save(output, cluster)
    m = plan.metrics
    summary = {"path": str(output), "solver": plan.solver, "local_coverage": m["local_coverage"],
               "remote_bytes_per_token": m["remote_bytes_per_token"], "memory_bytes": m["memory_bytes"]}
    if as_json:
        _echo_json(summary)
    else:
        s = plan.solver
        gap = "n/a" if s["gap"] is None else f"{100 * s['gap']:.3f}%"
        click.echo(f"wrote {output}: {s['name']} {s['status']} in {s['seconds']:.3f} s, {objective} "
                   f"{s['objective']:.6g} ({s['measure']}), gap {gap}; local coverage "
                   f"{100 * m['local_coverage']:.2f}%")


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="Current plan (.json); "
              "never modified.")
@click.option("--tables", "tables_path", type=click.Path(path_type=Path), required=True,
              help="Tables of the new traffic (.npz).")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), required=True, help="Cluster TOML.")
@click.option("--objective", type=click.Choice(["coverage", "latency"]), default="coverage", show_default=True,
              help="coverage: local activations (exact flow); latency: the latency model's MILP.")
@click.option("--budget-gib", type=click.FloatRange(min=0), help="Most GiB of experts to copy (default: no limit).")
@click.option("--move-cost", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of a byte copied against a byte of remote traffic saved over the new tables' tokens "
                   "(0: any gain pays; among equal placements the fewest moves).")
@click.option("--min-gain", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep the current placement unless the new one improves the objective by this fraction.")
@click.option("--min-replicas", type=click.IntRange(min=1), help="Copies every expert keeps (default: the plan's).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="Seconds for the MILP.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="New plan to write (.json).")
@click.option("--moves", "moves_path", type=click.Path(path_type=Path), required=True,
              help="Moves to write (.json): stages of copies and evictions.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def migrate(plan_path, tables_path, cluster_path, objective, budget_gib, move_cost, min_gain, min_replicas, time_limit,
            output, moves_path, as_json) -> None:
    """Re-plan for new traffic from the current plan, moving only what pays, and write the ordered moves."""
    from prism_plan.pipeline import migrate_placement
    from prism_plan.placement.cluster import GIB, load_cluster
    from prism_plan.units import human_bytes
    from prism_plan.placement.plan import Plan
    from prism_plan.traces.tables import ActivationTables

    old = Plan.load(plan_path)
    budget = None if budget_gib is None else int(budget_gib * GIB)
    new, moves = migrate_placement(old, ActivationTables.load(tables_path), load_cluster(cluster_path), move_cost,
                                   budget, min_gain, min_replicas, time_limit, objective)
    moves.save(moves_path)
    new.save(output)
    s = new.solver
    summary = {"plan": str(output), "moves": str(moves_path), "migrated": s["migrated"],
               "predicted_gain": s["predicted_gain"], "status": s["status"], "gap": s["gap"],
               "local_coverage": new.metrics["local_coverage"], **moves.summary()}
    if as_json:
        _echo_json(summary)
        return
    gap = "n/a" if s["gap"] is None else f"{100 * s['gap']:.4f}%"
    if not s["migrated"]:
        click.echo(f"kept the current placement: the best new one improves {objective} by "
                   f"{100 * s['predicted_gain']:.3f}%, below --min-gain {100 * min_gain:.3f}%; wrote {output} and "
                   f"empty {moves_path}")
        return
    click.echo(f"wrote {output}: {s['status']} (gap {gap}), {objective} {100 * s['predicted_gain']:+.3f}% better than "
               f"the current plan on these tables; local coverage {100 * new.metrics['local_coverage']:.2f}%")
    click.echo(f"wrote {moves_path}: {len(moves.stages)} stage(s), {moves.num_copies} copies "
               f"({human_bytes(moves.bytes)}, at least {human_bytes(moves.lower_bound_bytes)} needed), "
               f"{moves.num_evicts} evictions, about {moves.seconds:.2f} s")


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="Plan (.json).")
@click.option("--trace", "trace_path", type=click.Path(path_type=Path), required=True, help="Trace (.parquet).")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), required=True, help="Cluster TOML.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests per origin batched in one step.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write every number (per request, server "
              "and link) as JSON here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def simulate(plan_path, trace_path, cluster_path, concurrency, output, quiet, as_json) -> None:
    """Replay a trace through a plan: time to first token, time per output token, load and link traffic."""
    from prism_plan.fileio import write_text_atomic
    from prism_plan.placement.cluster import load_cluster
    from prism_plan.placement.plan import Plan
    from prism_plan.placement.simulator import simulate as run
    from prism_plan.traces.trace import read_trace

    result = run(Plan.load(plan_path), read_trace(trace_path), load_cluster(cluster_path), concurrency, quiet)
    if output is not None:
        write_text_atomic(output, json.dumps(result.to_dict(), indent=1))
    summary = result.summary()
    if as_json:
        _echo_json(summary)
        return
    tpot = "" if summary["tpot_mean_s"] is None else f", TPOT mean {1e3 * summary['tpot_mean_s']:.3f} ms"
    click.echo(f"{summary['requests']} requests, {summary['tokens']} tokens: TTFT mean "
               f"{1e3 * summary['ttft_mean_s']:.2f} ms, p50 {1e3 * summary['ttft_p50_s']:.2f} ms, p99 "
               f"{1e3 * summary['ttft_p99_s']:.2f} ms{tpot}; remote {summary['remote_bytes_per_token'] / 1e3:.1f} "
               f"kB/token; local coverage {100 * summary['local_coverage']:.2f}%")
    for name, busy, acts in zip(result.servers, result.server_busy, result.server_activations):
        click.echo(f"  {name}: {int(acts)} activations, {1e3 * busy:.1f} ms computing")


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="Plan (.json).")
@click.option("--format", "fmt", type=click.Choice(["sglang", "vllm-ascend", "eplb"]), required=True,
              help="sglang: --init-expert-location JSON; vllm-ascend: expert_map_path JSON; eplb: phy2log, log2phy, "
                   "logcnt (.npz).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="File to write.")
@click.option("--tables", "tables_path", type=click.Path(path_type=Path),
              help="Tables (.npz) whose activations pick the experts that fill spare slots (default: the routing).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export(plan_path, fmt, output, tables_path, as_json) -> None:
    """Write a plan in a serving system's format, checked the way that system reads it."""
    from prism_plan.placement.export import export_plan, origin_activations
    from prism_plan.placement.plan import Plan
    from prism_plan.traces.tables import ActivationTables
    from prism_plan.units import human_bytes

    plan = Plan.load(plan_path)
    freq = origin_activations(plan, ActivationTables.load(tables_path)) if tables_path is not None else None
    summary = export_plan(plan, fmt, output, freq)
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"wrote {output}: {summary['ep_size']} EP ranks (rank i = server {', '.join(plan.servers)} in order), "
               f"{summary['slots_per_gpu']} slots per GPU, {summary['physical_experts']} physical experts per layer")
    if fmt == "sglang":
        click.echo(f"start SGLang with --ep-size {summary['ep_size']} --ep-num-redundant-experts "
                   f"{summary['redundant_experts']} --init-expert-location {output}")
    padded = {s: n for s, n in summary["padding_bytes"].items() if n}
    if padded:
        click.echo("equal slots per GPU add second copies: " + ", ".join(f"{s} +{human_bytes(n)}"
                                                                       for s, n in padded.items()))


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True,
              help="The plan to end at (.json); with --moves, the new plan `migrate` wrote.")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), required=True, help="Cluster TOML.")
@click.option("--moves", "moves_path", type=click.Path(path_type=Path), help="Moves (.json) from `migrate`: start "
              "from their old placement and run them stage by stage.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Hugging Face safetensors folder to read this "
              "rank's experts from (default: deterministic random weights of the model's shape).")
@click.option("--journal", "journal_dir", type=click.Path(path_type=Path), default=Path("prism-journal"),
              show_default=True, help="Folder for the per-rank journals that let an interrupted run resume.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds before a stuck transfer fails.")
@click.option("--json", "as_json", is_flag=True, help="Each rank prints one JSON line with the experts it holds.")
def apply(plan_path, cluster_path, moves_path, checkpoint, journal_dir, timeout, as_json) -> None:
    """Apply a plan to real devices, one process per server (rank i = the plan's i-th server), under torchrun:
    load each rank's experts, run the moves over torch.distributed (NCCL on GPUs, gloo on CPUs)."""
    from prism_plan.executor.launch import apply_on_rank, init_distributed
    from prism_plan.placement.cluster import load_cluster
    from prism_plan.placement.migration import MigrationPlan
    from prism_plan.placement.plan import Plan

    plan, cluster = Plan.load(plan_path), load_cluster(cluster_path)
    moves = MigrationPlan.load(moves_path) if moves_path is not None else None
    rank, world, device = init_distributed(timeout)
    try:
        _, summary = apply_on_rank(plan, cluster, rank, world, device, moves, checkpoint, journal_dir)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"rank {rank} ({summary['server']}): holds {len(summary['experts'])} experts, sha256 "
                   f"{summary['sha256'][:16]}...")


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="Plan (.json).")
@click.option("--tables", "tables_path", type=click.Path(path_type=Path), help="Tables (.npz): activation and "
              "co-activation figures.")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), help="Cluster TOML: budgets, and with "
              "--trace the simulated comparison.")
@click.option("--trace", "trace_path", type=click.Path(path_type=Path), help="Trace (.parquet) to replay through "
              "the plan and the linear and EPLB baselines (needs --tables and --cluster).")
@click.option("--layer", type=int, help="MoE layer number for the co-activation figure (default: the most "
              "concentrated one).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="HTML file to write.")
@click.option("--png", "png_dir", type=click.Path(path_type=Path), help="Also write every figure as PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def report(plan_path, tables_path, cluster_path, trace_path, layer, output, png_dir, as_json) -> None:
    """Write one self-contained HTML report with plots of the plan and its traffic."""
    from prism_plan.placement.cluster import load_cluster
    from prism_plan.placement.plan import Plan
    from prism_plan.report import build_report
    from prism_plan.traces.tables import ActivationTables
    from prism_plan.traces.trace import read_trace

    plan = Plan.load(plan_path)
    tables = ActivationTables.load(tables_path) if tables_path is not None else None
    cluster = load_cluster(cluster_path) if cluster_path is not None else None
    if cluster is not None:
        plan.check_servers(cluster)
    if trace_path is not None and (tables is None or cluster is None):
        raise PrismError("--trace compares the plan with baselines: pass --tables and --cluster too")
    trace = read_trace(trace_path) if trace_path is not None else None
    rep = build_report(plan, tables, cluster, trace, layer)
    rep.save(output, png_dir)
    summary = {"path": str(output), "figures": [f.name for f in rep.figures], "png": str(png_dir) if png_dir else None}
    if as_json:
        _echo_json(summary)
    else:
        click.echo(f"wrote {output}: {len(rep.figures)} figures ({', '.join(summary['figures'])})")


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("prism-quickstart"),
              show_default=True, help="Folder for the tables and the optimal plan.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="Seconds per searching solver "
              "(default 10).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def quickstart(out_dir, time_limit, quiet, as_json) -> None:
    """Run the whole path on the bundled real ESFT traces and a 4-server edge cluster: plan from half of each
    domain's requests with every solver, replay the other half, compare simulated latency."""
    from prism_plan.comparison import format_rows
    from prism_plan.quickstart import run_quickstart

    rows = run_quickstart(out_dir, time_limit=time_limit, quiet=quiet)
    if as_json:
        _echo_json(rows)
    else:
        click.echo(format_rows(rows))
        click.echo(f"\ntables and the fastest plan are in {out_dir}/")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="prism-plan", standalone_mode=False)
    except PrismError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
