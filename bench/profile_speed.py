"""Profiling throughput on CPU: tokens recorded per second by `profile run`, and what the router hooks add to
a plain forward pass.

A random-weight Qwen3-MoE of 8 layers x 32 experts (top-4, hidden 256) built here, nothing downloaded; prompts of
128 tokens in batches of 8. Forward times are the median of repeated passes with and without the hooks.
Run: python bench/profile_speed.py [--layers N] [--experts E] [--hidden H] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from prism_plan.traces.profiler import RoutingRecorder, profile_model


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    config = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                         moe_intermediate_size=args.hidden, num_hidden_layers=args.layers,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                                         num_experts=args.experts, num_experts_per_tok=4)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    batch = torch.randint(0, 2048, (8, 128))
    forward = lambda: model(input_ids=batch, use_cache=False)  # noqa: E731
    with torch.inference_mode():
        forward()  # warm up
        plain = median_seconds(forward, args.repeats)
        recorder = RoutingRecorder(model, config.num_experts_per_tok)
        hooked = median_seconds(lambda: (forward(), recorder.take()), args.repeats)
        recorder.remove()
        plain_again = median_seconds(forward, args.repeats)
    base = min(plain, plain_again)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        prompts = Path(tmp) / "prompts.jsonl"
        rng = np.random.default_rng(0)
        prompts.write_text("".join(json.dumps({"origin": f"o{i % 4}", "input_ids": rng.integers(0, 2048, 128).tolist()})
                                   + "\n" for i in range(64)))
        start = time.perf_counter()
        summary = profile_model(folder, prompts, Path(tmp) / "t.parquet", max_new_tokens=8, batch_size=8, quiet=True)
        end_to_end = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"Qwen3-MoE random weights: {args.layers} layers x {args.experts} experts, top-4, hidden {args.hidden}, "
          f"{params / 1e6:.1f} M parameters, CPU {torch.get_num_threads()} threads\n")
    print(f"{'measure':44s} {'value':>12s}")
    print(f"{'forward, 8 x 128 tokens, no hooks':44s} {1e3 * base:10.1f}ms")
    print(f"{'forward with router hooks + take()':44s} {1e3 * hooked:10.1f}ms")
    print(f"{'hook overhead':44s} {100 * (hooked / base - 1):10.2f}%")
    print(f"{'profile run, 64 prompts + 8 decode steps':44s} {summary['tokens'] / end_to_end:8.0f} tok/s "
          f"({summary['tokens']} tokens in {end_to_end:.1f} s, incl. loading and Parquet)")


if __name__ == "__main__":
    main()
