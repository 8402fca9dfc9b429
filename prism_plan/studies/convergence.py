"""When does more routing stop changing the plan? Tables and coverage plans from growing random subsets of a
trace's requests, each compared with those of the whole trace and of the step before."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import loaded
from prism_plan.pipeline import solve_problem
from prism_plan.placement.checks import integer, is_number
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.progress import track
from prism_plan.solvers import build_problem
from prism_plan.solvers.objectives import coverage_value
from prism_plan.traces.sampling import check_sampling, request_draws
from prism_plan.traces.tables import build_tables
from prism_plan.traces.trace import Trace

DEFAULT_STEPS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)


def _check_steps(steps) -> tuple[float, ...]:
    """`steps` as a tuple of floats, once they are increasing fractions in (0, 1]."""
    steps = tuple(steps)
    if not steps or not all(is_number(s) and 0 < s <= 1 for s in steps) or any(
            b <= a for a, b in zip(steps, steps[1:])):
        raise PrismError(f"`steps` must be increasing fractions of the requests above 0 and at most 1, got "
                         f"{list(steps)}; e.g. (0.25, 0.5, 1)", parameters=("steps",))
    return tuple(float(s) for s in steps)


def top_sets(freq: np.ndarray, k: int) -> np.ndarray:
    """[origins, layers, experts] bool: each (origin, layer)'s k most activated experts (ties to the lower id),
    leaving out experts it never activated, so an origin without tokens has empty sets. freq: the tables'
    [origins, layers, experts] activation counts."""
    order = np.argsort(-freq, axis=2, kind="stable")[..., :k]
    top = np.zeros(freq.shape, bool)
    np.put_along_axis(top, order, True, axis=2)
    return top & (freq > 0)


def mean_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over (origin, layer) of |a & b| / |a | b| of two [origins, layers, experts] bool sets (1 where both
    are empty)."""
    inter, union = (a & b).sum(axis=2), (a | b).sum(axis=2)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def _aligned(freq: np.ndarray, origins: tuple[str, ...], like: tuple[str, ...]) -> np.ndarray:
    """freq [origins, layers, experts] reordered onto the origins `like`, zeros for those it lacks."""
    out = np.zeros((len(like),) + freq.shape[1:])
    for i, o in enumerate(origins):
        out[like.index(o)] = freq[i]
    return out


def convergence(trace: Trace | str | Path, cluster: ClusterSpec | str | Path, *, steps=DEFAULT_STEPS,
                top_k: int | None = None, seed: int = 0, time_limit: float | None = None,
                quiet: bool = True) -> list[dict]:
    """One row per step s of `steps` (increasing fractions of the requests): the tables of the requests whose
    `request_draws(seed)` lie below s (nested: a step holds every request of the steps before it), their exact
    coverage plan on `cluster`, and how both compare with the whole trace's.

    Each row: `step` (s), `requests` and `tokens` kept; `topk_full`: the mean over (origin, layer) of the
    Jaccard overlap between the step's `top_k` most activated experts (default the model's top-k) and the
    whole trace's, `topk_prev` the same against the step before (None for the first); `coverage`: the step
    plan's objective as a share of the step's own activations (what the step's data promise); `coverage_full`:
    that plan's coverage of the whole trace's activations (what it delivers on all the data), and
    `coverage_best` the whole trace's own optimum as that share (the most any plan delivers); `plan_full`: the
    share of the whole-data plan's hosted (server, layer, expert) cells that the step's plan also hosts;
    `status`: the step's solve status. time_limit: seconds per solve.
    """
    steps = _check_steps(steps)
    check_sampling(None, None, seed)
    trace, cluster = loaded(trace, Trace), loaded(cluster, ClusterSpec)
    if not trace.num_tokens:
        raise PrismError("the trace holds no tokens; convergence needs at least one")
    k = trace.meta.top_k if top_k is None else integer(
        top_k, "`top_k`", low=1, high=trace.meta.num_experts, fix="count that many of each layer's experts",
        parameters=("top_k",))
    draws = request_draws(trace, seed)
    # one id per (origin, request): any int64 request ids, no arithmetic that could overflow
    _, requests = np.unique(np.stack([trace.origin.astype(np.int64), trace.request], axis=1), axis=0,
                            return_inverse=True)
    requests = requests.ravel()
    full_tables = build_tables([trace], pairs=False)
    full_problem = build_problem(full_tables, cluster)
    full_plan = solve_problem(full_problem, "exact", objective="coverage", time_limit=time_limit, seed=seed)
    full_top = top_sets(full_tables.freq, k)
    total = full_problem.weight.sum()
    rows: list[dict] = []
    prev_top = None
    for s in track(steps, "planning on growing subsets", quiet=quiet, name=lambda s: f"{s:g}"):
        keep = draws < s
        if not keep.any():
            raise PrismError(f"step {s:g} keeps none of the trace's {len(np.unique(requests))} requests; start "
                             f"`steps` at a larger fraction", parameters=("steps",))
        tables = full_tables if keep.all() else build_tables([trace.select(keep)], pairs=False)
        problem = full_problem if keep.all() else build_problem(tables, cluster)
        plan = full_plan if keep.all() else solve_problem(problem, "exact", objective="coverage",
                                                          time_limit=time_limit, seed=seed)
        top = top_sets(_aligned(tables.freq, tables.origins, full_tables.origins), k)
        rows.append({"step": s, "requests": int(len(np.unique(requests[keep]))), "tokens": int(keep.sum()),
                     "topk_full": mean_jaccard(top, full_top),
                     "topk_prev": None if prev_top is None else mean_jaccard(top, prev_top),
                     "coverage": float(plan.solver["objective"] / problem.weight.sum()),
                     "coverage_full": float(coverage_value(full_problem, plan.hosted) / total),
                     "coverage_best": float(full_plan.solver["objective"] / total),
                     "plan_full": float((plan.hosted & full_plan.hosted).sum() / full_plan.hosted.sum()),
                     "status": plan.solver["status"]})
        prev_top = top
    return rows


def settled_step(rows: list[dict], *, topk: float = 0.9, plan: float = 0.95) -> dict | None:
    """The first row from which on every row has `topk_full` >= topk and `plan_full` >= plan (None: none)."""
    found = None
    for r in reversed(rows):
        if r["topk_full"] < topk or r["plan_full"] < plan:
            break
        found = r
    return found


def format_convergence(rows: list[dict]) -> str:
    """The rows of `convergence` as a plain text table."""
    head = (f"{'step':>7} {'requests':>8} {'tokens':>7} {'top-k/full':>10} {'top-k/prev':>10} {'coverage':>8} "
            f"{'cov. on full':>12} {'best on full':>12} {'plan/full':>9}  status")
    lines = [head]
    for r in rows:
        prev = "-" if r["topk_prev"] is None else f"{r['topk_prev']:.3f}"
        lines.append(f"{r['step']:>7.4g} {r['requests']:>8} {r['tokens']:>7} {r['topk_full']:>10.3f} {prev:>10} "
                     f"{r['coverage']:>8.2%} {r['coverage_full']:>12.2%} {r['coverage_best']:>12.2%} "
                     f"{r['plan_full']:>9.3f}  {r['status']}")
    return "\n".join(lines)
