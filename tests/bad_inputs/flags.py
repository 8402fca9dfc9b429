"""Flags out of range, not numbers, missing or unknown: one `error:` line from the command line itself."""

from __future__ import annotations

from bad_inputs import Case

SOLVE = ("solve", "--tables", "tables-0.npz", "--cluster", "cluster.toml", "-o", "plan.json")
MIGRATE = ("migrate", "--plan", "plan-0.json", "--tables", "tables-1.npz", "--cluster", "cluster.toml", "-o",
           "new.json", "--moves", "moves.json")
SIMULATE = ("simulate", "--plan", "plan-0.json", "--trace", "trace.parquet", "--cluster", "cluster.toml")
APPLY = ("apply", "--plan", "plan-0.json", "--cluster", "cluster.toml")


def flag(verb: tuple[str, ...], name: str, value: str, says: str) -> Case:
    tag = value.replace(".", "p").replace("-", "minus") or "empty"
    return Case(f"flags-{verb[1] if verb[0] == 'profile' else verb[0]}-{name.strip('-')}-{tag}",
                (*verb, name, value), says)


CASES = [
    *(flag(SOLVE, "--time-limit", v, says) for v, says in (
        ("inf", "not a finite number"), ("nan", "not a finite number"), ("-1", "range"), ("0", "range"),
        ("soon", "not a valid float"), ("", "not a valid float"))),
    *(flag(SOLVE, "--seed", v, says) for v, says in (("-1", "range"), ("1.5", "not a valid integer"),
                                                     ("x", "not a valid integer"))),
    *(flag(SOLVE, "--min-replicas", v, "range") for v in ("0", "-2")),
    *(flag(SOLVE, "--concurrency", v, "range") for v in ("0", "-1")),
    flag(SOLVE, "--solver", "magic", "is not one of"),
    flag(SOLVE, "--objective", "speed", "is not one of"),
    flag(SOLVE, "--backend", "gurobi", "is not one of"),
    *(flag(MIGRATE, "--budget-gib", v, says) for v, says in (
        ("nan", "not a finite number"), ("inf", "not a finite number"), ("-1", "range"), ("lots", "float"))),
    *(flag(MIGRATE, "--move-cost", v, says) for v, says in (
        ("nan", "not a finite number"), ("inf", "not a finite number"), ("-0.5", "range"))),
    *(flag(MIGRATE, "--min-gain", v, says) for v, says in (("nan", "not a finite number"), ("-0.1", "range"))),
    *(flag(MIGRATE, "--time-limit", v, "not a finite number") for v in ("inf", "nan")),
    flag(MIGRATE, "--objective", "simulated_ttft", "is not one of"),
    *(flag(SIMULATE, "--concurrency", v, says) for v, says in (("0", "range"), ("two", "integer"))),
    *(flag(APPLY, "--timeout", v, says) for v, says in (("nan", "not a finite number"), ("0.5", "range"))),
    *(flag(("profile", "tables", "trace.parquet", "-o", "t.npz"), "--window", v, "range") for v in ("0", "-3")),
    flag(("profile", "tables", "trace.parquet", "-o", "t.npz", "--window", "5"), "--window-unit", "bytes",
         "is not one of"),
    *(flag(("profile", "drift", "trace.parquet", "-o", "x.parquet"), name, v, says) for name, v, says in (
        ("--windows", "0", "range"), ("--window-tokens", "0", "range"), ("--seed", "-4", "range"))),
    flag(("profile", "import", "trace.parquet", "-o", "x.parquet"), "--format", "parquet", "is not one of"),
    flag(("quickstart", "-o", "qs"), "--time-limit", "inf", "not a finite number"),
    *(Case(f"flags-{name}-missing-output", args, "Missing option '-o'") for name, args in (
        ("solve", SOLVE[:-2]), ("tables", ("profile", "tables", "trace.parquet")),
        ("drift", ("profile", "drift", "trace.parquet")), ("migrate", MIGRATE[:7] + MIGRATE[9:]),
        ("export", ("export", "--plan", "plan-0.json", "--format", "sglang")),
        ("report", ("report", "--plan", "plan-0.json")),
        ("import", ("profile", "import", "--format", "jsonl", "prompts.jsonl", "--model", "model")),
        ("run", ("profile", "run", "model", "--prompts", "prompts.jsonl")))),
    flag(("profile", "tables", "trace.parquet", "-o", "t.npz"), "--window", str(2**70), "from 1 to"),
    Case("flags-drift-too-many-tokens", ("profile", "drift", "trace.parquet", "-o", "x.parquet", "--windows", "2",
                                         "--window-tokens", str(10**12)), "lower --windows or --window-tokens"),
    Case("flags-solve-missing-tables", ("solve", "--cluster", "cluster.toml", "-o", "p.json"), "Missing option"),
    Case("flags-solve-unknown-option", (*SOLVE, "--fast"), "No such option"),
    Case("flags-unknown-verb", ("sovle",), "No such command"),
    Case("flags-profile-unknown-verb", ("profile", "record"), "No such command"),
    Case("flags-migrate-missing-moves", MIGRATE[:-2], "Missing option"),
    Case("flags-tables-missing-second-trace", ("profile", "tables", "trace.parquet", "more.parquet", "-o", "t.npz"),
         "no trace file at more.parquet"),
]
