"""What each step tells people: short accounts of traces, tables, plans, moves, replays and exports, in the
units people read (ms, kB, GiB, %). The CLI prints them; notebooks may too."""

from __future__ import annotations

from prism_plan.placement.migration import MigrationPlan
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import SimulationResult
from prism_plan.units import human_bytes


def percent(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def describe_trace(s: dict) -> list[str]:
    """A written trace or counts-only tables (the summary of profile_model or import_trace), then its notes."""
    if s.get("tables"):
        what = f"activation tables of {s['tokens']} tokens (counts only, no co-activation)"
    else:
        what = f"{s['tokens']} tokens, {s['requests']} requests"
    origins = f", origins {', '.join(s['origins'])}" if "origins" in s else ""
    layers = s["layers"] if isinstance(s["layers"], int) else len(s["layers"])
    return ([f"wrote {s['path']}: {what}{origins}, {layers} MoE layers, top-{s['top_k']}"] +
            [f"note: {n}" for n in s.get("notes", ())])


def describe_tables(written) -> list[str]:
    """One line per (path, ActivationTables) written."""
    return [f"wrote {path}: {int(t.tokens.sum())} tokens from {len(t.origins)} origins, {len(t.layers)} layers x "
            f"{t.num_experts} experts" for path, t in written]


def describe_drift(s: dict) -> str:
    return (f"wrote {s['path']}: {s['windows']} windows x {len(s['streams'])} streams x {s['window_tokens']} tokens; "
            f"tables per window: prism-plan profile tables {s['path']} --window {s['window']} -o WINDOWS_DIR")


def describe_plan(plan: Plan, path) -> list[str]:
    """The solver's evidence (a weak bound said so), the plan's local coverage, and how a baseline was adapted."""
    s, seconds = plan.solver, plan.timing.get("solve_seconds")
    bound = "n/a" if s["bound"] is None else format(s["bound"], ".6g")
    took = "" if seconds is None else f" in {seconds:.3f} s"
    return ([f"wrote {path}: {s['name']} {s['status']}{took}; {plan.objective} "
             f"{s['objective']:.6g} ({s['measure']}), {'bound (weak)' if s.get('weak_bound') else 'bound'} {bound}, "
             f"gap {percent(s['gap'], 3)}; local coverage {percent(plan.metrics['local_coverage'])}"] +
            ([f"note: {s['note']}"] if s.get("note") else []))


def describe_migration(new: Plan, moves: MigrationPlan, plan_path, moves_path) -> list[str]:
    """Whether the placement moved, by how much it gains, and what the moves copy."""
    s = new.solver
    if not s["migrated"]:
        return [f"kept the current placement: the best new one improves {new.objective} by "
                f"{percent(s['predicted_gain'], 3)}, below the minimum gain {percent(s['min_gain'], 3)}; wrote "
                f"{plan_path} and empty {moves_path}"]
    return [f"wrote {plan_path}: {s['status']} (gap {percent(s['gap'], 4)}), {new.objective} "
            f"{100 * s['predicted_gain']:+.3f}% better than the current plan on these tables; local coverage "
            f"{percent(new.metrics['local_coverage'])}",
            f"wrote {moves_path}: {len(moves.stages)} stage(s), {moves.num_copies} copies ({human_bytes(moves.bytes)}, "
            f"at least {human_bytes(moves.lower_bound_bytes)} needed), {moves.num_evicts} evictions, about "
            f"{moves.seconds:.2f} s"]


def migration_summary(new: Plan, moves: MigrationPlan, plan_path, moves_path) -> dict:
    """The re-plan as plain data: files written, whether it moved, the gain, the evidence and the moves."""
    s = new.solver
    return {"plan": str(plan_path), "moves": str(moves_path), "migrated": s["migrated"],
            "predicted_gain": s["predicted_gain"], "status": s["status"], "gap": s["gap"],
            "local_coverage": new.metrics["local_coverage"], **moves.summary()}


def describe_rank(s: dict) -> str:
    """What one rank of `apply` holds (its summary)."""
    return f"rank {s['rank']} ({s['server']}): holds {len(s['experts'])} experts, sha256 {s['sha256'][:16]}..."


def describe_ranks(ranks: list[dict]) -> str:
    """One line for a launched `apply`: the stages run and what each server holds."""
    s = ranks[0]
    stages = f"{s['stages']} stage(s)" + (f", resumed after stage {s['resumed_from']}" if s["resumed_from"] else "")
    held = ", ".join(f"{r['server']} {len(r['experts'])} experts (sha256 {r['sha256'][:12]}...)" for r in ranks)
    return f"applied on {len(ranks)} ranks: {stages}; {held}"


def describe_simulation(result: SimulationResult) -> list[str]:
    """Latency and traffic of a replay, then each server's load."""
    s = result.summary()
    tpot = "" if s["tpot_mean_s"] is None else f", TPOT mean {1e3 * s['tpot_mean_s']:.3f} ms"
    head = (f"{s['requests']} requests, {s['tokens']} tokens: TTFT mean {1e3 * s['ttft_mean_s']:.2f} ms, p50 "
            f"{1e3 * s['ttft_p50_s']:.2f} ms, p99 {1e3 * s['ttft_p99_s']:.2f} ms{tpot}; remote "
            f"{s['remote_bytes_per_token'] / 1e3:.1f} kB/token; local coverage {percent(s['local_coverage'])}")
    return [head] + [f"  {name}: {int(acts)} activations, {1e3 * busy:.1f} ms computing"
                     for name, busy, acts in zip(result.servers, result.server_busy, result.server_activations)]


def describe_export(s: dict) -> list[str]:
    """The layout written, the flags the serving system needs, and what equal slots cost."""
    lines = [f"wrote {s['path']}: {s['ep_size']} EP ranks (rank i = server {', '.join(s['servers'])} in order), "
             f"{s['slots_per_gpu']} slots per GPU ({human_bytes(s['bytes_per_gpu'])}), {s['physical_experts']} "
             f"physical experts per layer ({s['redundant_experts']} redundant)"]
    if s["flags"]:
        lines.append(f"start {s['system']} with {s['flags']}")
    lines += [f"note: {n}" for n in s["notes"]]
    padded = {srv: n for srv, n in s["padding_bytes"].items() if n}
    if padded:
        # vLLM-Ascend's spare slots hold other experts (it cannot take two copies on one device)
        kind = "replicas of experts hosted elsewhere" if s["format"] == "vllm-ascend" else "second copies"
        lines.append(f"equal slots per GPU add {kind}: " + ", ".join(f"{srv} +{human_bytes(n)}"
                                                                for srv, n in padded.items()))
    return lines
