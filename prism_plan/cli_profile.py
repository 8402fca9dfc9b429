"""`prism-plan profile`: record routing from a model, import it from other tools, build tables and drifting
workloads. Parses, makes one library call, prints, like the rest of the CLI."""

from __future__ import annotations

import click

from prism_plan.cli_options import CLUSTER, Counts, FILE, Finite, Group, MODEL, NO_WEIGHTS, outputs, say
from prism_plan.messages import describe_drift, describe_tables, describe_trace
from prism_plan.studies.convergence import DEFAULT_STEPS, convergence, format_convergence, settled_step
from prism_plan.traces.drift import write_drifting_workload
from prism_plan.traces.importing import FORMATS, import_trace
from prism_plan.traces.profiler import DEVICE_MAPS, DEVICES, DTYPES, MAX_BATCH_TOKENS, profile_model
from prism_plan.traces.parallel import ENGINES, write_tables_of_files
from prism_plan.traces.windows import UNITS


@click.group(cls=Group)
def profile() -> None:
    """Record or import routing traces and build activation tables."""


@profile.command("run")
@click.argument("model_name", metavar="MODEL", type=MODEL)
@click.option("--prompts", type=FILE, required=True, help="JSONL: per line an origin and `text` or `input_ids`.")
@outputs("Trace to write (.parquet).")
@click.option("--origin-field", default="origin", show_default=True, help="JSONL key naming each prompt's origin.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Greedy decode steps (tokens) to record after each prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per batch; batches fix the trace's row order.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=MAX_BATCH_TOKENS, show_default=True,
              help="Most tokens per forward pass, prompts x (longest prompt + --max-new-tokens); larger batches run "
              "in several passes, and a pass that runs out of GPU memory is halved (the trace stays the same).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where the model runs; auto takes the GPU when torch sees one.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Precision of weights and activations [default: float32 on "
              "cpu; bfloat16 on cuda, float16 on GPUs without bfloat16].")
@click.option("--device-map", type=click.Choice(DEVICE_MAPS), help="auto: spread the model over every GPU, then CPU "
              "memory (needs accelerate) [default: one device; auto when the weights do not fit the GPU].")
@click.option("--trust-remote-code", is_flag=True, help="Run the Python code the model brings (the auto_map of its "
              "config.json); read it first.")
@click.option("--chat-template", is_flag=True, help="Wrap `text` prompts in the tokenizer's chat template.")
@NO_WEIGHTS
def profile_run(model_name, prompts, output, quiet, as_json, origin_field, max_new_tokens, batch_size,
                max_batch_tokens, device, dtype, device_map, trust_remote_code, chat_template, no_weights) -> None:
    """Run a Hugging Face MoE model (a local folder or hub id) over prompts and record every token's routing."""
    s = profile_model(model_name, prompts, output, origin_field=origin_field, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, max_batch_tokens=max_batch_tokens, device=device, dtype=dtype,
                      device_map=device_map, trust_remote_code=trust_remote_code, chat_template=chat_template,
                      weights=not no_weights, quiet=quiet)
    say(as_json, s, describe_trace(s))


@profile.command("import")
@click.argument("src", type=FILE)
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Source format.")
@click.option("--model", type=MODEL, help="Preset, config.json or model folder [default for esft: deepseek-v2-lite].")
@outputs("Trace to write (.parquet); for SGLang stat dumps and TensorRT-LLM statistics (counts only), tables "
         "(.npz).")
@click.option("--origin", help="Origin of every token [default: the file's name, the rank for megatron, the "
              "dump folder for trtllm].")
@click.option("--rank", type=click.IntRange(min=0), help="sglang: keep only this rank's records (when every EP rank "
              "recorded the same tokens) [default: every rank].")
@click.option("--counted-by", type=click.IntRange(min=1), help="sglang stat: ranks that each counted every token "
              "(the TP size with --moe-a2a-backend none; 1 with an all-to-all backend such as DeepEP) [default: counts "
              "as summed].")
@click.option("--prompt-tokens", type=click.IntRange(min=0), help="vllm: prompt tokens of each request whose source "
              "does not list its prompt_token_ids; later tokens are decode [default: unknown, all prefill].")
@click.option("--pipeline-stages", type=click.IntRange(min=1), help="megatron: pipeline stages, layers split evenly; "
              "needed only when the records leave the split open.")
@click.option("--stage-layers", type=Counts(), help="megatron: hidden layers per pipeline stage, in order, for "
              "uneven splits (e.g. 13,14).")
@NO_WEIGHTS
def profile_import(src, fmt, model, output, quiet, as_json, origin, rank, counted_by, prompt_tokens,
                   pipeline_stages, stage_layers, no_weights) -> None:
    """Convert routing recorded elsewhere (ESFT, SGLang, vLLM, Megatron-Core, TensorRT-LLM, generic JSONL) to a
    Parquet trace (or counts-only tables)."""
    s = import_trace(fmt, src, output, model=model, weights=not no_weights, quiet=quiet, origin=origin, rank=rank,
                     counted_by=counted_by, prompt_tokens=prompt_tokens, pipeline_stages=pipeline_stages,
                     stage_layers=stage_layers)
    say(as_json, s, describe_trace(s))


@profile.command("tables")
@click.argument("trace", nargs=-1, required=True, metavar="TRACE...")
@outputs("Tables to write (.npz); with --window, a folder for window-0000.npz, window-0001.npz, ... and "
         "manifest.json (replaced whole).", kind=None)
@click.option("--window", type=click.IntRange(min=1), help="Cut the trace, in row order, into windows of this many "
              "tokens (or requests, see --window-unit) and write tables per window [default: one table]. With "
              "several files, window i sums window i of each (files recorded side by side, one per rank).")
@click.option("--window-unit", type=click.Choice(UNITS), default="tokens", show_default=True, help="What --window counts.")
@click.option("--no-pairs", is_flag=True, help="Skip co-activation and transition counts.")
@click.option("--workers", type=click.IntRange(min=1), help="Processes building tables, one file each "
              "[default: the core count].")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="Where the per-file builds run: local processes, or a Dask cluster (pip install "
              "'prism-plan[dask]').")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://host:8786) for --engine dask "
              "[default: a local cluster of --workers processes].")
@click.option("--sample", type=Finite(min=0, max=1, min_open=True), help="Keep this fraction of each file's "
              "requests [default: all].")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Keep at most this many tokens in all, split evenly "
              "over the files [default: all].")
def profile_tables(trace, output, quiet, as_json, window, window_unit, no_pairs, workers, engine, scheduler, sample,
                   max_tokens) -> None:
    """Count activations per origin, layer and expert (and expert pairs) in one or more traces (files, folders
    of .parquet files or quoted glob patterns), whole or per window; several files are counted in parallel and
    summed."""
    written = write_tables_of_files(list(trace), output, window=window, unit=window_unit, pairs=not no_pairs,
                                    workers=workers, engine=engine, scheduler=scheduler, fraction=sample,
                                    max_tokens=max_tokens, quiet=quiet)
    summary = [{"path": str(path), **t.summary()} for path, t in written]
    say(as_json, summary if window is not None else summary[0], describe_tables(written))


@profile.command("drift")
@click.argument("trace", type=FILE)
@outputs("Trace to write (.parquet).")
@click.option("--windows", type=click.IntRange(min=1), default=8, show_default=True, help="Windows to build.")
@click.option("--window-tokens", type=click.IntRange(min=1), default=2000, show_default=True, help="Tokens per stream.")
@click.option("--shift", type=int, default=1, show_default=True,
              help="Stream i drifts from origin i to origin i + shift over the windows.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the request draws.")
def profile_drift(trace, output, quiet, as_json, windows, window_tokens, shift, seed) -> None:
    """Build a drifting workload from a trace's origins (e.g. the ESFT domains): each stream's mix of domains
    rotates to the next domain over the windows."""
    s = write_drifting_workload(trace, output, windows=windows, window_tokens=window_tokens, shift=shift, seed=seed,
                                quiet=quiet)
    say(as_json, s, describe_drift(s))


@profile.command("convergence")
@click.argument("trace", type=FILE)
@CLUSTER
@click.option("--steps", default=",".join(f"{s:g}" for s in DEFAULT_STEPS), show_default=True,
              help="Growing shares of the requests, comma-separated, ending at 1.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the request draws.")
@click.option("--time-limit", type=Finite(min=0.001), help="Seconds per coverage solve [default: no limit].")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def profile_convergence(trace, cluster, steps, seed, time_limit, as_json) -> None:
    """How much the top-k experts and the coverage plan still move as more of the trace's requests are counted:
    when more routing stops changing the plan."""
    try:
        shares = tuple(float(x) for x in steps.split(","))
    except ValueError:
        raise click.BadParameter(f"{steps!r} is not a comma-separated list of numbers", param_hint="--steps")
    rows = convergence(trace, cluster, steps=shares, seed=seed, time_limit=time_limit)
    settled = settled_step(rows)
    if settled is not None and settled["step"] >= 1:
        settled = None  # the whole trace matches itself: that is no sign of having enough
    say(as_json, {"rows": rows, "settled": settled}, [format_convergence(rows), (
        "the top-k experts (overlap >= 0.9) and the plan (>= 0.95 of its cells) settle from step "
        f"{settled['step']:g} ({settled['tokens']:,} tokens)" if settled else
        "the top-k experts and the plan still move before all the data: more routing may change the plan "
        "(compare `cov. on full` with `best on full` for what that costs)")])
