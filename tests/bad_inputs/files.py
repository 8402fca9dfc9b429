"""Bad cluster files, plan files and model configs: numbers that are not finite or not sane, values of the wrong
type, contradictory duplicates, ids out of range, keys that do not match the model or the servers. `solve`,
`migrate`, `simulate` and `export` refuse each with one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from bad_inputs import Case, edits, writes

SOLVE = ("solve", "--tables", "tables-0.npz", "--cluster", "cluster.toml", "-o", "plan.json")
LATENCY = (*SOLVE, "--objective", "latency")
MODEL = (*SOLVE, "--model", "model")
MIGRATE = ("migrate", "--plan", "plan-0.json", "--tables", "tables-1.npz", "--cluster", "cluster.toml", "-o",
           "new.json", "--moves", "moves.json")
SIMULATE = ("simulate", "--plan", "plan-0.json", "--trace", "trace.parquet", "--cluster", "cluster.toml")
EXPORT = ("export", "--plan", "plan-0.json", "--format", "sglang", "-o", "out.json")

MEMORY = "memory_gib = 0.000018024445"  # the first server's (s0) line in the bundled cluster
DEFAULT_BW, DEFAULT_LAT = "bandwidth_gbps = 1.0", "latency_ms = 0.5"
S0 = '[[server]]\nname = "s0"\nmemory_gib = 0.000018024445\norigins = ["a"]\n'
S1 = '[[server]]\nname = "s1"\nmemory_gib = 0.000018024445\norigins = ["b"]\n'
LINK = '[[link]]\na = "s0"\nb = "s1"\nbandwidth_gbps = 2.0\nlatency_ms = 1.0\n'


def cluster(text: str) -> Callable[[Path], None]:
    """cluster.toml replaced by `text`."""
    return writes("cluster.toml", text)


def servers_and(text: str) -> Callable[[Path], None]:
    """cluster.toml: the two bundled servers, no [defaults], then `text`."""
    return cluster(S0 + S1 + text)


def matrix(bw: str, lat: str = "[[0, 1], [1, 0]]") -> Callable[[Path], None]:
    return servers_and(f"[matrix]\nbandwidth_gbps = {bw}\nlatency_ms = {lat}\n")


def plan_edit(change: Callable[[dict], Any], name: str = "plan-0.json") -> Callable[[Path], None]:
    """The bundled plan with `change` applied to its parsed JSON."""
    def setup(d: Path) -> None:
        doc = json.loads((d / name).read_text())
        change(doc)
        (d / name).write_text(json.dumps(doc))
    return setup


def config_edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """model/config.json with `change` applied to its parsed JSON."""
    return plan_edit(change, "model/config.json")


def placed(server: str, layer: str, ids: Any) -> Callable[[dict], None]:
    return lambda d: d["placement"][server].__setitem__(layer, ids)


def model_field(key: str, value: Any) -> Callable[[dict], None]:
    return lambda d: d["model"].__setitem__(key, value)


def number_cases(tag: str, args: tuple[str, ...], old: str, key: str, says: str) -> list[Case]:
    """One case per value that is not a finite, sane number for `key` (set by replacing `old` in the cluster)."""
    values = {"nan": "nan", "inf": "inf", "minusinf": "-inf", "huge": "1e30", "text": '"8"', "bool": "true"}
    return [Case(f"files-cluster-{tag}-{name}", args, says, edits("cluster.toml", old, f"{key} = {value}"))
            for name, value in values.items()]


CASES = [
    # Cluster numbers: finite, sane, numbers (not strings, not bools), at load, on every verb that reads one.
    *number_cases("memory", LATENCY, MEMORY, "memory_gib", "server 's0': `memory_gib` must be a finite number"),
    *number_cases("default-bandwidth", SOLVE, DEFAULT_BW, "bandwidth_gbps",
                  "[defaults]: `bandwidth_gbps` must be a finite number"),
    *number_cases("default-latency", LATENCY, DEFAULT_LAT, "latency_ms",
                  "[defaults]: `latency_ms` must be a finite number"),
    Case("files-cluster-memory-negative", SOLVE, "`memory_gib` must be a finite number from 0",
         edits("cluster.toml", MEMORY, "memory_gib = -1.0")),
    Case("files-cluster-compute-nan", LATENCY, "`compute_tflops` must be a finite number",
         edits("cluster.toml", MEMORY, MEMORY + "\ncompute_tflops = nan")),
    Case("files-cluster-compute-huge", LATENCY, "`compute_tflops` must be a finite number from 1e-06 to 1e+06",
         edits("cluster.toml", MEMORY, MEMORY + "\ncompute_tflops = 1e30")),
    Case("files-cluster-compute-zero", LATENCY, "got 0", edits("cluster.toml", MEMORY, MEMORY + "\ncompute_tflops = 0")),
    Case("files-cluster-link-latency-nan", LATENCY, "link #1 ('s0'-'s1'): `latency_ms` must be a finite number",
         servers_and(LINK.replace("latency_ms = 1.0", "latency_ms = nan"))),
    Case("files-cluster-link-bandwidth-huge", LATENCY, "`bandwidth_gbps` must be a finite number",
         servers_and(LINK.replace("bandwidth_gbps = 2.0", "bandwidth_gbps = 1e30"))),
    Case("files-cluster-link-bandwidth-missing", SOLVE, "missing `bandwidth_gbps`",
         servers_and(LINK.replace("bandwidth_gbps = 2.0\n", ""))),
    Case("files-cluster-matrix-nan", LATENCY, "`bandwidth_gbps` row 1 column 2 ('s0' -> 's1') must be a finite",
         matrix("[[0, nan], [1, 0]]")),
    Case("files-cluster-matrix-inf", LATENCY, "row 2 column 1 ('s1' -> 's0') must be a finite",
         matrix("[[0, 1], [inf, 0]]")),
    Case("files-cluster-matrix-latency-huge", LATENCY, "`latency_ms` row 1 column 2", matrix("[[0, 1], [1, 0]]",
                                                                                            "[[0, 1e30], [1, 0]]")),
    Case("files-cluster-matrix-text", LATENCY, "got '1'", matrix('[[0, "1"], [1, 0]]')),
    Case("files-cluster-matrix-bool", LATENCY, "got True", matrix("[[0, true], [1, 0]]")),
    Case("files-cluster-matrix-shape", LATENCY, "must be a 2 x 2 list of lists", matrix("[[0, 1]]")),
    Case("files-cluster-matrix-and-defaults", SOLVE, "drop the [[link]], [[node]] and [defaults] tables or the [matrix]",
         edits("cluster.toml", "[[server]]", "[matrix]\nbandwidth_gbps = [[0, 1], [1, 0]]\n"
                                             "latency_ms = [[0, 1], [1, 0]]\n\n[[server]]")),
    # Cluster types and duplicates.
    Case("files-cluster-one-way-text", SOLVE, "`one_way` must be true or false, got 'yes'",
         servers_and(LINK + 'one_way = "yes"\n')),
    Case("files-cluster-one-way-number", SOLVE, "`one_way` must be true or false, got 1",
         servers_and(LINK + "one_way = 1\n")),
    Case("files-cluster-link-contradicts", SOLVE, "link #1 already sets 's0' -> 's1' (with other values)",
         servers_and(LINK + "\n" + LINK.replace("2.0", "5.0"))),
    Case("files-cluster-link-repeated", SOLVE, "(with the same values); list each pair once",
         servers_and(LINK + "\n" + LINK)),
    Case("files-cluster-link-reversed-repeat", SOLVE, "already sets",
         servers_and(LINK + "\n" + LINK.replace('a = "s0"\nb = "s1"', 'a = "s1"\nb = "s0"'))),
    Case("files-cluster-link-unknown-server", SOLVE, "`b` must name a server or a node, got 's9'",
         servers_and(LINK.replace('b = "s1"', 'b = "s9"'))),
    Case("files-cluster-link-self", SOLVE, "two different servers", servers_and(LINK.replace('b = "s1"', 'b = "s0"'))),
    Case("files-cluster-link-not-tables", SOLVE, "must be written as [[link]] tables", cluster("link = 5\n" + S0 + S1)),
    Case("files-cluster-defaults-not-table", SOLVE, "[defaults]: must be a table",
         cluster("defaults = 5\n" + S0 + S1)),
    Case("files-cluster-server-not-tables", SOLVE, "must be written as [[server]] tables", cluster("server = [1, 2]\n")),
    Case("files-cluster-name-number", SOLVE, "`name` must be a non-empty string, got 4",
         cluster("name = 4\n" + S0 + S1 + LINK)),
    Case("files-cluster-server-name-missing", SOLVE, "server #3: `name` must be a non-empty string",
         servers_and("[[server]]\nmemory_gib = 1.0\n")),
    Case("files-cluster-server-twice", SOLVE, "duplicate server name", edits("cluster.toml", 'name = "s1"', 'name = "s0"')),
    Case("files-cluster-origins-text", SOLVE, "`origins` must be a list of names, got 'a'",
         edits("cluster.toml", 'origins = ["a"]', 'origins = "a"')),
    Case("files-cluster-origin-twice", SOLVE, "origin 'a' is twice", edits("cluster.toml", '["a"]', '["a", "a"]')),
    Case("files-cluster-origin-shared", SOLVE, "origin 'a' is already served by server 's0'",
         edits("cluster.toml", '["b"]', '["a"]')),
    Case("files-cluster-unknown-key", SOLVE, "unknown key(s) ['memroy_gib']",
         edits("cluster.toml", MEMORY, MEMORY + "\nmemroy_gib = 1.0")),
    Case("files-cluster-no-servers", SOLVE, "no servers", cluster("[defaults]\nbandwidth_gbps = 1.0\n")),
    Case("files-cluster-not-toml", SOLVE, "is not valid TOML", cluster("[[server]\nname = ")),
    Case("files-cluster-no-path", SOLVE, "no link or path from 's0' to 's1'", servers_and("")),
    Case("files-cluster-nan-simulate", SIMULATE, "[defaults]: `latency_ms` must be a finite number",
         edits("cluster.toml", DEFAULT_LAT, "latency_ms = nan")),
    Case("files-cluster-nan-migrate", (*MIGRATE, "--objective", "latency"), "`memory_gib` must be a finite number",
         edits("cluster.toml", MEMORY, "memory_gib = nan")),
    # Plan files: ids integral and in range, keys those of the model and the servers, exact types.
    Case("files-plan-expert-minus-one", SIMULATE, "expert id in `placement` of 's0' layer 0 must be an integer from "
                                                  "0 to 5, got -1", plan_edit(placed("s0", "0", [-1, 0, 1, 2, 4, 5]))),
    Case("files-plan-expert-text", SIMULATE, "got '3'", plan_edit(placed("s0", "0", [0, 1, 2, "3", 4, 5]))),
    Case("files-plan-expert-float", EXPORT, "got 3.0", plan_edit(placed("s0", "0", [0, 1, 2, 3.0, 4, 5]))),
    Case("files-plan-expert-bool", EXPORT, "got True", plan_edit(placed("s0", "0", [True, 2, 4, 5]))),
    Case("files-plan-expert-too-big", EXPORT, "got 6", plan_edit(placed("s0", "0", [0, 1, 2, 4, 5, 6]))),
    Case("files-plan-expert-twice", SIMULATE, "lists an expert twice", plan_edit(placed("s0", "0", [0, 0, 1, 2, 4, 5]))),
    Case("files-plan-ids-not-list", SIMULATE, "must be a list of expert ids", plan_edit(placed("s0", "0", "0,1"))),
    Case("files-plan-layer-unknown", SIMULATE, "`placement` of 's0' names ['7']", plan_edit(placed("s0", "7", [1]))),
    Case("files-plan-layer-missing", EXPORT, "`placement` of 's1' lacks ['2']",
         plan_edit(lambda d: d["placement"]["s1"].pop("2"))),
    Case("files-plan-server-unknown", SIMULATE, "`placement` names ['s9']",
         plan_edit(lambda d: d["placement"].__setitem__("s9", d["placement"].pop("s1")))),
    Case("files-plan-servers-twice", SIMULATE, "`servers` names a server twice",
         plan_edit(lambda d: d.__setitem__("servers", ["s0", "s0"]))),
    Case("files-plan-servers-text", SIMULATE, "`servers` must be a non-empty list",
         plan_edit(lambda d: d.__setitem__("servers", "s0,s1"))),
    Case("files-plan-routing-unknown-server", SIMULATE, "layer 0 expert 3 names 's9'",
         plan_edit(lambda d: d["routing"]["a"]["0"].__setitem__("3", "s9"))),
    Case("files-plan-routing-expert-missing", SIMULATE, "`routing` of origin 'b' layer 1 lacks ['5']",
         plan_edit(lambda d: d["routing"]["b"]["1"].pop("5"))),
    Case("files-plan-routing-not-hosted", SIMULATE, "which does not host it",
         plan_edit(lambda d: d["routing"]["a"]["0"].__setitem__("3", "s0"))),
    Case("files-plan-expert-lost", SIMULATE, "fewer than min_replicas=1",
         plan_edit(placed("s0", "2", [3]))),
    Case("files-plan-model-layers-number", SIMULATE, "`layers` must be a non-empty list",
         plan_edit(model_field("layers", 5))),
    Case("files-plan-model-top-k-text", EXPORT, "`top_k` (experts per token) must be an integer from 1 to 6, got '2'",
         plan_edit(model_field("top_k", "2"))),
    Case("files-plan-model-experts-zero", EXPORT, "`num_experts` must be an integer from 1",
         plan_edit(model_field("num_experts", 0))),
    Case("files-plan-model-bytes-negative", EXPORT, "`expert_bytes` must be an integer from 1",
         plan_edit(model_field("expert_bytes", -1536))),
    Case("files-plan-model-unknown-key", EXPORT, "unknown keys ['experts']", plan_edit(model_field("experts", 6))),
    Case("files-plan-model-missing-key", EXPORT, "model description lacks top_k",
         plan_edit(lambda d: d["model"].pop("top_k"))),
    Case("files-plan-min-replicas-text", SIMULATE, "`constraints.min_replicas` must be an integer from 1 to 2, got '1'",
         plan_edit(lambda d: d.__setitem__("constraints", {"min_replicas": "1"}))),
    Case("files-plan-solver-null", EXPORT, "`solver` must be a JSON object",
         plan_edit(lambda d: d.__setitem__("solver", None))),
    Case("files-plan-metrics-list", EXPORT, "`metrics` must be a JSON object",
         plan_edit(lambda d: d.__setitem__("metrics", []))),
    Case("files-plan-expert-minus-one-migrate", MIGRATE, "got -1", plan_edit(placed("s0", "0", [-1, 0, 1, 2, 4, 5]))),
    Case("files-plan-is-a-list", SIMULATE, "is not a prism-plan plan", writes("plan-0.json", "[]")),
    Case("files-plan-other-servers", SIMULATE, "plan is for servers ['s0', 's1'] but the cluster has ['s0', 's2']",
         edits("cluster.toml", 'name = "s1"', 'name = "s2"')),
    Case("files-plan-over-memory", SIMULATE, "too much", edits("cluster.toml", MEMORY, "memory_gib = 0.00001")),
    Case("files-plan-origin-unserved", SIMULATE, "have no server in cluster", edits("cluster.toml", '["a"]', '["c"]')),
    # Model configs (--model with a folder or config.json).
    Case("files-model-layers-text", MODEL, "model/config.json: `num_hidden_layers` must be an integer from 1",
         config_edit(lambda c: c.__setitem__("num_hidden_layers", "3"))),
    Case("files-model-layers-float", MODEL, "got 3.5", config_edit(lambda c: c.__setitem__("num_hidden_layers", 3.5))),
    Case("files-model-top-k-too-big", MODEL, "`num_experts_per_tok` must be an integer from 1 to 6, got 9",
         config_edit(lambda c: c.__setitem__("num_experts_per_tok", 9))),
    Case("files-model-hidden-negative", MODEL, "`hidden_size` must be an integer from 1",
         config_edit(lambda c: c.__setitem__("hidden_size", -16))),
    Case("files-model-experts-bool", MODEL, "`num_local_experts` must be an integer from 1 to 32768, got True",
         config_edit(lambda c: c.__setitem__("num_local_experts", True))),
    Case("files-model-width-zero", MODEL, "`moe_intermediate_size` must be an integer from 1",
         config_edit(lambda c: c.__setitem__("moe_intermediate_size", 0))),
    Case("files-model-dtype-unknown", MODEL, "unknown weight dtype 'float13'",
         config_edit(lambda c: c.__setitem__("dtype", "float13"))),
    Case("files-model-dtype-list", MODEL, "unknown weight dtype [5]", config_edit(lambda c: c.__setitem__("dtype", [5]))),
    Case("files-model-dense-list-number", MODEL, "`mlp_only_layers` must be a list of layer numbers, got 5",
         config_edit(lambda c: c.__setitem__("mlp_only_layers", 5))),
    Case("files-model-dense-layer-out-of-range", MODEL, "every `mlp_only_layers` value must be an integer from 0 to 2",
         config_edit(lambda c: c.__setitem__("mlp_only_layers", [7]))),
    Case("files-model-all-dense", MODEL, "none of its 3 layers is a MoE layer",
         config_edit(lambda c: c.__setitem__("mlp_only_layers", [0, 1, 2]))),
    Case("files-model-no-experts", MODEL, "missing number of routed experts",
         config_edit(lambda c: c.pop("num_local_experts"))),
    Case("files-model-text-config", MODEL, "`text_config` must be an object",
         config_edit(lambda c: c.__setitem__("text_config", 5))),
    Case("files-model-quantization-list", MODEL, "`quantization_config` must be an object",
         config_edit(lambda c: c.__setitem__("quantization_config", [1]))),
    Case("files-model-config-list", (*SOLVE, "--model", "cfg.json"), "cfg.json: a model config must be a JSON object",
         writes("cfg.json", "[1, 2]")),
    Case("files-model-config-not-json", (*SOLVE, "--model", "cfg.json"), "is not valid JSON", writes("cfg.json", "{")),
    Case("files-model-folder-without-config", (*SOLVE, "--model", "empty"), "no model config",
         writes("empty/readme.txt", "")),
    Case("files-model-missing", (*SOLVE, "--model", "./nowhere"), "unknown model './nowhere'"),
    Case("files-model-other-shape", (*SOLVE, "--model", "deepseek-v2-lite"), "tables are for layers 0..2 x 6 experts"),
    Case("files-model-config-key-twice", MODEL, "gives the key 'num_local_experts' twice",
         edits("model/config.json", '"num_local_experts": 6,', '"num_local_experts": 6, "num_local_experts": 4,')),
    Case("files-plan-of-bigger-experts", MIGRATE, "is the plan for this model?",
         plan_edit(lambda d: d["model"].update(expert_bytes=3072))),
    Case("files-plan-key-twice", SIMULATE, "gives the key 'min_replicas' twice",
         edits("plan-0.json", '"min_replicas": 1', '"min_replicas": 1, "min_replicas": 2')),
    Case("files-plan-nested-too-deep", SIMULATE, "nests too deeply", writes("plan-0.json", "[" * 100_000)),
]
