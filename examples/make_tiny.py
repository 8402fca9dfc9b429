"""Make the bundled tiny example (prism_plan/data/tiny/): a random-weight Qwen3-MoE checkpoint of 3 MoE layers x 6
experts, prompts from two origins, the routing they produced also as JSONL (the generic import format), a 2-server cluster, the plan for that traffic, and the plan and moves after the
traffic of the two origins trades places. Deterministic; rerun after changing the model or the formats.
Run: python examples/make_tiny.py   (needs the `profile` extra)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from prism_plan.cli import main
from prism_plan.placement.model import from_hf_config
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import load_trace

OUT = Path(__file__).resolve().parents[1] / "prism_plan" / "data" / "tiny"
CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=6, num_experts_per_tok=2)


def run(*args) -> None:
    if main([str(a) for a in args]) != 0:
        raise SystemExit(f"prism-plan {' '.join(map(str, args))} failed")


def make() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**CONFIG))
    model.save_pretrained(OUT / "model")
    rng = np.random.default_rng(0)
    lines = [{"origin": "a" if i % 2 else "b", "input_ids": rng.integers(0, 64, rng.integers(4, 13)).tolist()}
             for i in range(12)]
    (OUT / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run("profile", "run", OUT / "model", "--prompts", OUT / "prompts.jsonl", "-o", OUT / "trace.parquet", "--quiet")
    write_routing_jsonl()
    run("profile", "tables", OUT / "trace.parquet", "-o", OUT / "tables-0.npz", "--quiet")
    t = ActivationTables.load(OUT / "tables-0.npz")
    ActivationTables(t.origins, t.layers, t.freq[::-1].copy(), t.tokens[::-1].copy(), None, None,
                     t.meta).save(OUT / "tables-1.npz")  # later: the two origins trade their traffic
    one = from_hf_config(OUT / "model").routed_bytes  # every routed expert once, bytes
    (OUT / "cluster.toml").write_text(
        "# Two servers with room for 70% of the tiny model's routed experts each.\n"
        "[defaults]\nbandwidth_gbps = 1.0\nlatency_ms = 0.5\n\n"
        f'[[server]]\nname = "s0"\nmemory_gib = {0.7 * one / 2**30:.12f}\norigins = ["a"]\n\n'
        f'[[server]]\nname = "s1"\nmemory_gib = {0.7 * one / 2**30:.12f}\norigins = ["b"]\n')
    run("solve", "--tables", OUT / "tables-0.npz", "--cluster", OUT / "cluster.toml", "-o", OUT / "plan-0.json")
    run("migrate", "--plan", OUT / "plan-0.json", "--tables", OUT / "tables-1.npz", "--cluster", OUT / "cluster.toml",
        "-o", OUT / "plan-1.json", "--moves", OUT / "moves-1.json")


def write_routing_jsonl() -> None:
    """routing.jsonl: trace.parquet token by token, as a serving system's own log would hold it."""
    t = load_trace(OUT / "trace.parquet")
    k, layers = t.meta.top_k, len(t.meta.layers)
    with open(OUT / "routing.jsonl", "w") as f:
        for i in range(t.num_tokens):
            f.write(json.dumps({"origin": t.origins[t.origin[i]], "request": int(t.request[i]),
                                "position": int(t.position[i]), "phase": "decode" if t.decode[i] else "prefill",
                                "experts": t.experts[i].reshape(layers, k).tolist(),
                                "weights": [[round(float(w), 6) for w in row]
                                            for row in t.weights[i].reshape(layers, k)]}) + "\n")


if __name__ == "__main__":
    make()
