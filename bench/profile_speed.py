"""Profiling throughput: tokens recorded per second by `profile run` on the CPU in float32 and bfloat16 (and on
the GPU in bfloat16 when torch sees one), how often bfloat16 picks the same top-k experts as float32, and what the
router hooks add to a plain forward pass.

A random-weight Qwen3-MoE of 8 layers x 32 experts (top-4, hidden 256) built here, nothing downloaded; prompts of
128 tokens in batches of 8. Forward times are the median of repeated passes with and without the hooks.
Run: python bench/profile_speed.py [--layers N] [--experts E] [--hidden H] [--repeats R] [--threads T]
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
from prism_plan.traces.trace import load_trace
from prism_plan.units import count, milliseconds, percent


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
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CI runners have 2)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
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
    runtimes = [("cpu", "float32"), ("cpu", "bfloat16")] + ([("cuda", "bfloat16")] if torch.cuda.is_available() else [])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        prompts = Path(tmp) / "prompts.jsonl"
        rng = np.random.default_rng(0)
        prompts.write_text("".join(json.dumps({"origin": f"o{i % 4}", "input_ids": rng.integers(0, 2048, 128).tolist()})
                                   + "\n" for i in range(64)))
        for device, dtype in runtimes:
            out = Path(tmp) / f"{device}-{dtype}.parquet"
            start = time.perf_counter()
            summary = profile_model(folder, prompts, out, max_new_tokens=8, batch_size=8, device=device, dtype=dtype,
                                    quiet=True)
            runs[device, dtype] = (summary["tokens"] / (time.perf_counter() - start), load_trace(out).experts)
    reference = runs["cpu", "float32"][1]
    params = sum(p.numel() for p in model.parameters())
    print(f"Qwen3-MoE random weights: {args.layers} layers x {args.experts} experts, top-4, hidden {args.hidden}, "
          f"{params / 1e6:.1f} M parameters, CPU {torch.get_num_threads()} threads\n")
    print(f"{'measure':48s} {'value':>14s}")
    print(f"{'forward, 8 x 128 tokens, no hooks (float32)':48s} {milliseconds(base):>14s}")
    print(f"{'forward with router hooks + take()':48s} {milliseconds(hooked):>14s}")
    print(f"{'hook overhead':48s} {percent(hooked / base - 1):>14s}")
    for (device, dtype), (rate, experts) in runs.items():
        same = (np.sort(experts, -1) == np.sort(reference, -1)).all(-1).mean() if experts.shape == reference.shape \
            else float("nan")
        print(f"{f'profile run {device} {dtype}, 64 prompts + 8 decode':48s} {count(rate):>8s} tok/s   "
              f"same top-k as cpu float32: {percent(same)}")
    print("\n(tok/s include loading the model and writing Parquet)")


if __name__ == "__main__":
    main()
