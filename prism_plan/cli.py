"""The `prism-plan` command line: parses arguments, makes one library call, prints. Exit code 2 on user errors."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from prism_plan import __version__
from prism_plan.cli_options import (CLUSTER, CLUSTER_FILE, CONCURRENCY, FILE, Finite, Group, MODEL, OUT,
                                    Output, outputs, PLAN, POSITIVE_SECONDS, ResumableCommand, say)
from prism_plan.cli_profile import profile
from prism_plan.errors import Interrupted, PrismError
from prism_plan.executor.calibrate import DTYPES as CALIBRATION_DTYPES, calibrate_ranks
from prism_plan.executor.launch import apply_plan, launch
from prism_plan.fileio import write_text_atomic
from prism_plan.messages import (describe_calibration, describe_export, describe_migration, describe_offload_replay,
                                 describe_plan, describe_rank, describe_ranks, describe_simulation,
                                 migration_summary)
from prism_plan.pipeline import migrate_placement, solve_placement
from prism_plan.placement.cluster import GIB, load_cluster
from prism_plan.placement.export import export_plan, FORMATS as EXPORT_FORMATS
from prism_plan.placement.offload_replay import OffloadReplay
from prism_plan.placement.simulator import simulate as replay
from prism_plan.progress import spinner
from prism_plan.report import write_report
from prism_plan.solvers import BACKENDS, OBJECTIVES, SOLVERS
from prism_plan.studies.comparison import format_rows
from prism_plan.studies.bundled import BUNDLED_MODEL
from prism_plan.studies.quickstart import run_quickstart


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="prism-plan")
def cli() -> None:
    """Plan where the experts of a Mixture-of-Experts model live across GPU servers."""


cli.add_command(profile)


@cli.command()
@click.option("--tables", type=FILE, required=True, help="Activation tables (.npz).")
@CLUSTER
@click.option("--model", type=MODEL, help="Preset, config.json or model folder [default: the tables' model].")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default="coverage", show_default=True,
              help="coverage: local activations; latency: the latency model (seconds per token); traffic and "
              "simulated_ttft: replayed through --trace.")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="exact", show_default=True,
              help="exact and greedy plan; local-search improves simulated_ttft or traffic; the rest are baselines.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), help="MILP back end of --solver exact "
              "[default: highs].")
@click.option("--trace", type=FILE, help="The trace the tables were built from; replayed objectives need it.")
@CONCURRENCY
@click.option("--start", type=FILE, help="Plan (.json) local-search starts from [default: the best model answer].")
@click.option("--time-limit", type=POSITIVE_SECONDS, help="Seconds for the whole solve [default: no limit].")
@click.option("--min-replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Copies per expert.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of randomised solvers.")
@click.option("--max-iterations", type=click.IntRange(min=0), help="Neighbourhoods local-search examines: the plan "
              "then depends on --seed only, never on time [default: until --time-limit or no move helps].")
@outputs("Plan to write (.json).")
def solve(tables, cluster, model, objective, solver, backend, trace, concurrency, start, time_limit, min_replicas,
          seed, max_iterations, output, quiet, as_json) -> None:
    """Solve for a placement and write the plan."""
    with spinner(f"solving ({solver}, {objective}{_limit(time_limit)})", quiet) as step:
        plan = solve_placement(tables, cluster, model, solver=solver, objective=objective, time_limit=time_limit,
                               min_replicas=min_replicas, seed=seed, backend=backend, trace=trace,
                               concurrency=concurrency, start=start, max_iterations=max_iterations)
        step(f"writing {output}")
        plan.save(output)
    say(as_json, {"path": str(output), **plan.summary()}, describe_plan(plan, output))


@cli.command()
@click.option("--plan", type=FILE, required=True, help="Current plan (.json); never modified.")
@click.option("--tables", type=FILE, required=True, help="Tables of the new traffic (.npz).")
@CLUSTER
@click.option("--objective", type=click.Choice(["coverage", "latency", "balance"]), default="coverage",
              show_default=True, help="coverage: local activations (exact flow); latency: the latency model's MILP; "
                                      "balance: a slot layout's busiest GPUs (a copy staying on its GPU is free).")
@click.option("--budget-gib", type=Finite(min=0), help="Most GiB of experts to copy [default: no limit].")
@click.option("--move-cost", type=Finite(min=0), default=0.0, show_default=True,
              help="Weight of a byte copied against a byte of remote traffic saved over the new tables' tokens "
                   "(0: any gain pays; among equal placements the fewest moves).")
@click.option("--min-gain", type=Finite(min=0), default=0.0, show_default=True,
              help="Keep the current placement unless the new one improves the objective by this fraction.")
@click.option("--min-replicas", type=click.IntRange(min=1), help="Copies every expert keeps [default: the plan's].")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="highs", show_default=True, help="MILP back end.")
@click.option("--time-limit", type=POSITIVE_SECONDS, help="Seconds for the whole re-solve [default: no limit].")
@outputs("New plan to write (.json).")
@click.option("--moves", type=OUT, required=True, help="Moves to write (.json): stages of copies and evictions.")
def migrate(plan, tables, cluster, objective, budget_gib, move_cost, min_gain, min_replicas, backend, time_limit,
            output, quiet, as_json, moves) -> None:
    """Re-plan for new traffic from the current plan, moving only what pays, and write the ordered moves."""
    with spinner(f"re-solving and ordering the moves ({objective}{_limit(time_limit)})", quiet) as step:
        new, steps = migrate_placement(plan, tables, cluster, objective=objective, move_cost=move_cost,
                                       budget_bytes=None if budget_gib is None else int(budget_gib * GIB),
                                       min_gain=min_gain, min_replicas=min_replicas, time_limit=time_limit,
                                       backend=backend)
        step(f"writing {output} and {moves}")
        steps.save(moves)
        new.save(output)
    say(as_json, migration_summary(new, steps, output, moves), describe_migration(new, steps, output, moves))


def _limit(seconds: float | None) -> str:
    return "" if seconds is None else f", limit {seconds:g} s"


@cli.command()
@PLAN
@click.option("--trace", type=FILE, required=True, help="Trace (.parquet) to replay.")
@CLUSTER
@CONCURRENCY
@click.option("--schedule", is_flag=True, help="Offload plans: send each batch's tokens of an expert to a server "
              "that pins or caches it, or load it, whichever the cache state makes cheaper (Sirius' rule).")
@click.option("--prefetch", type=click.IntRange(min=0), default=0, show_default=True,
              help="Offload plans: experts each server loads ahead per layer, predicted from --prefetch-tables.")
@click.option("--prefetch-tables", type=FILE, help="Tables (.npz) whose cross-layer transitions predict the next "
              "layer's experts (the tables the plan was made from).")
@outputs("Write every number (per request, server and link) as JSON here [default: only print].", required=False)
def simulate(plan, trace, cluster, concurrency, schedule, prefetch, prefetch_tables, output, quiet, as_json) -> None:
    """Replay a trace through a plan: time to first token, time per output token, load and link traffic."""
    cluster = load_cluster(cluster)
    result = replay(plan, trace, cluster, concurrency=concurrency, schedule=schedule, prefetch=prefetch,
                    prefetch_tables=prefetch_tables, quiet=quiet)
    if output is not None:
        result.save(output)
    lines = describe_offload_replay(result, output) if isinstance(result, OffloadReplay) else \
        describe_simulation(result, cluster, output)
    say(as_json, result.summary(), lines)


@cli.command()
@PLAN
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="sglang: --init-expert-location JSON; vllm-ascend: expert_map_path JSON; eplb: phy2log, log2phy, "
                   "logcnt (.npz); trtllm: the MoE load balancer's YAML.")
@click.option("--tables", type=FILE, help="Tables (.npz) whose activations pick the experts that fill spare slots "
              "[default: the plan's routing].")
@click.option("--cluster", type=CLUSTER_FILE, help="Cluster (.toml) whose servers' memory must hold the layout "
              "with its equal slots (refused otherwise).")
@outputs("File to write.")
def export(plan, fmt, tables, cluster, output, quiet, as_json) -> None:
    """Write a plan in a serving system's format, checked the way that system reads it; prints its flags."""
    with spinner(f"exporting ({fmt})", quiet):
        s = export_plan(plan, fmt, output, tables=tables, cluster=cluster)
    say(as_json, s, describe_export(s))


@cli.command(cls=ResumableCommand)
@click.option("--plan", type=FILE, required=True, help="The plan to end at (.json); with --moves, the new plan "
              "`migrate` wrote.")
@CLUSTER
@click.option("--moves", type=FILE, help="Moves (.json) from `migrate`: start from their old placement and run them "
              "stage by stage [default: load the plan as it is].")
@click.option("--checkpoint", type=FILE, help="Hugging Face safetensors folder to read this rank's experts from "
              "[default: deterministic random weights of the model's shape].")
@click.option("--journal", type=click.Path(path_type=Path), default=Path("prism-journal"), show_default=True,
              help="Folder for the per-rank journals that let an interrupted run resume.")
@click.option("--timeout", type=Finite(min=1), default=300.0, show_default=True,
              help="Seconds before a stuck transfer fails.")
@click.option("--json", "as_json", is_flag=True, help="Each rank prints one JSON line with the experts it holds.")
@click.option("--nproc", type=click.IntRange(min=1), help="Start this many local processes, one per server, and wait "
              "for them (no torchrun needed); ends with one summary line.")
def apply(plan, cluster, moves, checkpoint, journal, timeout, as_json, nproc) -> None:
    """Apply a plan to real devices, one process per server (rank i = the plan's i-th server), with --nproc or under
    torchrun: load each rank's experts, run the moves over torch.distributed (NCCL on GPUs, gloo on CPUs)."""
    if nproc is not None:
        ranks = launch(nproc, plan, cluster, moves=moves, checkpoint=checkpoint, journal_dir=journal, timeout_s=timeout)
        click.echo(json.dumps({"ranks": ranks}) if as_json else describe_ranks(ranks))
        return
    s = apply_plan(plan, cluster, moves=moves, checkpoint=checkpoint, journal_dir=journal, timeout_s=timeout)
    click.echo(json.dumps(s) if as_json else describe_rank(s))


@cli.command()
@click.option("--model", type=MODEL, default=BUNDLED_MODEL, show_default=True,
              help="Preset, config.json or model folder whose expert shape to measure.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the experts compute and load to.")
@click.option("--dtype", type=click.Choice(CALIBRATION_DTYPES), help="[default: the model's]")
@click.option("--name", help="Server name [default: the host name; with several ranks, NAME-RANK].")
@click.option("--origins", help="Request sources arriving at the server, comma-separated (with several ranks, one "
              "per rank in rank order) [default: the server's name].")
@click.option("--nproc", type=click.IntRange(min=2), help="Start this many local ranks and measure the links "
              "between them too (under torchrun every rank runs calibrate itself).")
@click.option("--time-limit", type=POSITIVE_SECONDS, help="Seconds for the measurements [default: no limit].")
@click.option("--timeout", type=Finite(min=1), default=300.0, show_default=True,
              help="Seconds before a rank that does not answer fails the run.")
@outputs("Cluster snippet to write (.toml): [[server]] entries, and [[link]] entries between ranks.")
def calibrate(model, device, dtype, name, origins, nproc, time_limit, timeout, output, quiet, as_json) -> None:
    """Measure this machine (expert compute, slow tier -> device loads, links between ranks) for the cluster file."""
    with spinner(f"calibrating ({device})", quiet) as step:
        cal = calibrate_ranks(model, nproc=nproc, device=device, dtype=dtype, name=name, time_limit=time_limit,
                              origins=None if origins is None else origins.split(","), timeout_s=timeout)
        if cal.rank in (None, 0):
            step(f"writing {output}")
            write_text_atomic(output, cal.to_toml())
    s = cal.summary()
    if as_json and cal.rank is not None:  # one line per rank, as `apply` prints them
        click.echo(json.dumps({"path": str(output), **s}))
        return
    say(as_json, {"path": str(output), **s}, describe_calibration(s, output))


@cli.command()
@PLAN
@click.option("--tables", type=FILE, help="Tables (.npz): activation and co-activation figures.")
@click.option("--cluster", type=CLUSTER_FILE, help="Cluster TOML or bundled name: budgets, and with --trace the simulated comparison.")
@click.option("--trace", type=FILE, help="Trace (.parquet) to replay through the plan and the linear and EPLB "
              "baselines (needs --tables and --cluster).")
@click.option("--layer", type=int, help="MoE layer number (the model's) for the co-activation figure [default: the "
              "most concentrated one].")
@outputs("HTML file to write.")
@click.option("--png", type=Output("folder"), help="Also write every figure as PNG into this folder.")
def report(plan, tables, cluster, trace, layer, output, quiet, as_json, png) -> None:
    """Write one self-contained HTML report with plots of the plan and its traffic."""
    with spinner("simulating and drawing the report", quiet):
        rep = write_report(plan, output, tables=tables, cluster=cluster, trace=trace, layer=layer, png_dir=png)
    names = [f.name for f in rep.figures]
    say(as_json, {"path": str(output), "figures": names, "png": None if png is None else str(png),
                  "headline": rep.headline},
        [f"wrote {output}: {len(names)} figures ({', '.join(names)})"] + [f"  {s}" for s in rep.headline])


@cli.command()
@outputs("Folder for the tables, the fastest plan and the two halves of the trace.", required=False, default=Path("prism-quickstart"),
         kind="folder")
@click.option("--time-limit", type=POSITIVE_SECONDS, help="Seconds per solve [default: 10].")
def quickstart(output, quiet, as_json, time_limit) -> None:
    """Run the whole path on the bundled real ESFT traces and a 4-server edge cluster: plan from half of each
    domain's requests with every solver, replay the other half, compare simulated latency."""
    rows = run_quickstart(output, time_limit=time_limit, quiet=quiet)
    say(as_json, rows, [format_rows(rows), f"\ntables, the fastest plan and the two halves of the trace (profile.parquet, holdout.parquet) are in {output}/"])


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one `error:` line on stderr and exit code 2; SIGINT and SIGTERM
    stop the run, remove what it wrote and exit 130 or 143."""
    signals = (signal.SIGINT, signal.SIGTERM)
    here = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _raise_interrupted) for s in signals} if here else {}
    try:
        cli.main(args=argv, prog_name="prism-plan", standalone_mode=False)
    except Interrupted as e:
        click.echo(f"interrupted ({signal.Signals(e.signum).name}): {e.note}", err=True)
        return 128 + e.signum
    except PrismError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:  # click's name for a Ctrl-C it caught itself (while parsing, say)
        click.echo("interrupted (SIGINT): nothing was written and existing files are untouched", err=True)
        return 130
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "prism-plan"
        click.echo(f"error: {' '.join(e.format_message().split())} (see `{where} --help`)", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except OSError as e:  # one a reader did not foresee: still one line that names the file
        click.echo(f"error: {e.filename or 'a file'}: {e.strerror or e}; check the path and its permissions",
                   err=True)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
