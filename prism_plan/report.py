"""`prism-plan report`: one self-contained HTML page (figures embedded as PNG) that shows a plan and the traffic
it was made for: activation heatmaps per origin and layer, the co-activation of a layer, the placement map with
its replicas, memory per server, and, given a trace and a cluster, simulated latency and link traffic against
the vLLM (linear) and EPLB baselines. Plots with matplotlib (Agg), tables with pandas."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prism_plan.errors import PrismError
from prism_plan.fileio import atomic_path, loaded, transaction, write_text_atomic
from prism_plan.placement.cluster import GIB, ClusterSpec
from prism_plan.pipeline import solve_problem
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import simulate
from prism_plan.solvers import build_problem
from prism_plan.traces.tables import ActivationTables
from prism_plan.traces.trace import Trace

BASELINES = ("linear", "eplb")


@dataclass
class Figure:
    """One figure of the report: a file-friendly name, a title, a caption and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass
class Report:
    """Figures and tables (title, DataFrame) of one report."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)

    def html(self) -> str:
        """The page: every figure inline (base64 PNG), every table as HTML."""
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for title, df in self.tables:
            parts.append(f"<h2>{html.escape(title)}</h2>{df.to_html(float_format=lambda x: f'{x:,.4g}', border=0)}")
        for f in self.figures:
            data = base64.b64encode(f.png).decode()
            parts.append(f'<figure id="{f.name}"><h2>{html.escape(f.title)}</h2>'
                         f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}img{max-width:100%}"
                 "table{border-collapse:collapse;font-size:0.9em}td,th{padding:2px 8px;text-align:right}"
                 "tr:nth-child(even){background:#f4f4f4}figcaption{color:#555;font-size:0.9em}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")

    def save(self, path: str | Path, png_dir: str | Path | None = None) -> None:
        """Write the HTML; with png_dir, also every figure as <name>.png there: all or nothing."""
        with transaction():
            write_text_atomic(path, self.html())
            for f in self.figures if png_dir is not None else ():
                with atomic_path(Path(png_dir) / f"{f.name}.png") as tmp:
                    Path(tmp).write_bytes(f.png)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def activation_heatmaps(tables: ActivationTables) -> Figure:
    """Per origin: share of each layer's activations on each expert, [layers x experts]."""
    plt = _plt()
    o_n = len(tables.origins)
    cols = min(o_n, 4)
    rows = -(-o_n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    share = tables.freq / np.maximum(tables.freq.sum(axis=2, keepdims=True), 1e-300)
    top = float(share.max())
    for i, (ax, name, s) in enumerate(zip(axes.ravel(), tables.origins, share)):
        im = ax.imshow(s, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("expert")
        if i % cols == 0:
            ax.set_ylabel("MoE layer (index)")
    for ax in axes.ravel()[o_n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of the layer's activations")
    return Figure("activations", "Expert activations per origin and layer",
                  "Each row is a MoE layer; bright experts carry much of that origin's traffic. Different bright "
                  "spots per origin are the locality a placement can serve at home.", _png(fig))


def coactivation(tables: ActivationTables, layer_index: int) -> Figure | None:
    """Co-activation of one layer, normalised by the experts' counts (None without pair counts)."""
    if tables.coact is None:
        return None
    plt = _plt()
    c = tables.coact[layer_index].astype(float)
    d = np.sqrt(np.maximum(np.diag(c), 1e-300))
    norm = c / d[:, None] / d[None, :]
    np.fill_diagonal(norm, np.nan)
    order = np.argsort(-np.diag(c), kind="stable")
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm[np.ix_(order, order)], cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert (hottest first)")
    ax.set_ylabel("expert (hottest first)")
    fig.colorbar(im, ax=ax, label="tokens with both / sqrt(count x count)")
    return Figure("coactivation", f"Co-activation in MoE layer {tables.layers[layer_index]}",
                  "How often two experts fire for the same token, relative to how often each fires: bright pairs "
                  "gain from sitting on the same server.", _png(fig))


def placement_map(plan: Plan) -> Figure:
    """Per server: which (layer, expert) it hosts, coloured by how many servers host that expert."""
    plt = _plt()
    s_n = len(plan.servers)
    copies = plan.hosted.sum(axis=0)
    fig, axes = plt.subplots(1, s_n, figsize=(3.2 * s_n, 3.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("plasma", max(int(copies.max()), 1))
    for s, ax in enumerate(axes[0]):
        img = np.where(plan.hosted[s], copies, np.nan)
        im = ax.imshow(img, aspect="auto", cmap=cmap, vmin=0.5, vmax=copies.max() + 0.5, interpolation="nearest")
        ax.set_title(f"{plan.servers[s]} ({int(plan.hosted[s].sum())} experts)")
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("MoE layer (index)")
    fig.colorbar(im, ax=axes[0].tolist(), label="copies of the expert in the cluster",
                 ticks=range(1, int(copies.max()) + 1))
    return Figure("placement", "Placement map",
                  "A coloured cell is an expert the server hosts; the colour counts its copies across servers "
                  "(1 = its only copy).", _png(fig))


def memory_figure(plan: Plan, cluster: ClusterSpec | None) -> Figure:
    plt = _plt()
    used = plan.memory_bytes() / GIB
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(plan.servers))
    if cluster is not None:
        ax.bar(x, cluster.budgets / GIB, color="#ddd", label="budget")
    ax.bar(x, used, width=0.6, color="#3b7dd8", label="routed experts")
    ax.set_xticks(x, plan.servers)
    ax.set_ylabel("GiB")
    ax.legend()
    return Figure("memory", "Memory per server", "Routed-expert memory the plan uses on each server, against the "
                  "server's budget when a cluster is given.", _png(fig))


def latency_figures(results: dict, servers) -> list[Figure]:
    """TTFT distributions of every placement, and the plan's link traffic. results: label -> SimulationResult."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, r in results.items():
        t = np.sort(r.ttft) * 1e3
        ax.plot(t, np.arange(1, len(t) + 1) / len(t), label=f"{label} (mean {t.mean():.1f} ms)")
    ax.set_xlabel("simulated MoE time to first token (ms)")
    ax.set_ylabel("share of requests")
    ax.legend()
    cdf = Figure("latency", "Simulated latency: the plan against the baselines",
                 "Cumulative distribution of the requests' time to first token in the simulator (routed experts "
                 "only); further left is faster.", _png(fig))
    plan_result = next(iter(results.values()))
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(plan_result.link_bytes / 2**20, cmap="Blues")
    ax.set_xticks(range(len(servers)), servers, rotation=30)
    ax.set_yticks(range(len(servers)), servers)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    for i in range(len(servers)):
        for j in range(len(servers)):
            ax.text(j, i, f"{plan_result.link_bytes[i, j] / 2**20:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="MiB")
    links = Figure("links", "Link traffic of the plan", "Bytes each server sends to each other over the replayed "
                   "trace (hidden states out and results back).", _png(fig))
    return [cdf, links]


def build_report(plan: Plan, *, tables: ActivationTables | None = None, cluster: ClusterSpec | None = None,
                 trace: Trace | None = None, layer: int | None = None) -> Report:
    """Every figure the inputs allow. trace: replayed through the plan and the baselines (needs tables and
    cluster). layer: the model's layer number for the co-activation figure (default: the layer whose
    activations are most concentrated)."""
    if cluster is not None:
        plan.check_servers(cluster)
    if trace is not None and (tables is None or cluster is None):
        raise PrismError("a trace compares the plan with baselines: pass `tables` and `cluster` too",
                         parameters=("tables", "cluster"))
    if layer is not None and tables is None:
        raise PrismError("`layer` picks the co-activation figure, which needs `tables`", parameters=("layer", "tables"))
    if tables is not None:
        plan.model.check_same_shape(tables, "the tables", "pass `tables` of the plan's model", ("tables",))
    rep = Report(f"prism-plan report: {plan.model.name} on {', '.join(plan.servers)}")
    rep.tables.append(("Plan", pd.DataFrame({
        "value": [plan.objective, plan.solver.get("name"), plan.solver.get("status"), plan.solver.get("gap"),
                  plan.metrics.get("local_coverage"), int(plan.hosted.sum())]},
        index=["objective", "solver", "status", "gap", "local coverage", "experts hosted"])))
    rep.tables.append(("Servers", pd.DataFrame({
        "experts": plan.hosted.sum(axis=(1, 2)), "memory GiB": plan.memory_bytes() / GIB,
        **({"budget GiB": cluster.budgets / GIB} if cluster is not None else {})}, index=list(plan.servers))))
    if tables is not None:
        rep.figures.append(activation_heatmaps(tables))
        if layer is None:
            share = tables.freq.sum(axis=0) / np.maximum(tables.freq.sum(axis=(0, 2))[:, None], 1e-300)
            index = int(np.argmax((share**2).sum(axis=1)))
        else:
            if layer not in tables.layers:
                raise PrismError(f"`layer` {layer} is not a MoE layer of the tables ({tables.layers[0]}.."
                                 f"{tables.layers[-1]})", parameters=("layer",))
            index = tables.layers.index(layer)
        co = coactivation(tables, index)
        if co is not None:
            rep.figures.append(co)
    rep.figures.append(placement_map(plan))
    rep.figures.append(memory_figure(plan, cluster))
    if trace is not None:
        results = {"this plan": simulate(plan, trace, cluster)}
        problem = build_problem(tables, cluster, plan.model, min_replicas=plan.min_replicas)
        for name in BASELINES:
            results[name] = simulate(solve_problem(problem, name), trace, cluster)
        rep.figures += latency_figures(results, plan.servers)
        rep.tables.append(("Simulated on the trace", pd.DataFrame(
            [{k: r.summary()[k] for k in ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "remote_bytes_per_token",
                                          "local_coverage")} for r in results.values()], index=list(results))))
    return rep


def write_report(plan: Plan | str | Path, output: str | Path, *, tables: ActivationTables | str | Path | None = None,
                 cluster: ClusterSpec | str | Path | None = None, trace: Trace | str | Path | None = None,
                 layer: int | None = None, png_dir: str | Path | None = None) -> Report:
    """Build the report from the inputs (objects or their files, see `build_report`) and write the HTML to
    `output` (and every figure as PNG into `png_dir`); returns the Report."""
    rep = build_report(loaded(plan, Plan), tables=loaded(tables, ActivationTables),
                       cluster=loaded(cluster, ClusterSpec), trace=loaded(trace, Trace), layer=layer)
    rep.save(output, png_dir)
    return rep
