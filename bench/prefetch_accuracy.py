"""Precision and recall of next-layer expert prediction on the bundled ESFT routing (DeepSeek-V2-Lite): tables from
one half of the requests, judged on the other half; transitions against expert popularity alone.

    python bench/prefetch_accuracy.py [--batch-tokens N]
"""

from __future__ import annotations

import argparse

from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.prefetch import NextLayerPredictor, prefetch_accuracy
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import load_trace

BUDGETS = (6, 12, 18, 24)
COLUMNS = ("token_precision", "token_recall", "batch_precision", "batch_recall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-tokens", type=int, default=None, help="batch size in tokens (default: a request)")
    args = parser.parse_args()
    profile, held = load_trace(BUNDLED_TRACE).split_requests(0.5)
    predictor = NextLayerPredictor.from_tables(build_tables([profile]))
    print(f"held-out tokens {held.num_tokens}; batches: {args.batch_tokens or 'one per request'}")
    print(f"{'budget':>6} {'predictor':<12}" + "".join(f"{c:>16}" for c in COLUMNS))
    for m in BUDGETS:
        acc = prefetch_accuracy(predictor, held, budget=m, batch_tokens=args.batch_tokens)
        for name, row in (("transitions", acc), ("frequency", acc["frequency"])):
            print(f"{m:>6} {name:<12}" + "".join(f"{row[c]:>16.3f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
