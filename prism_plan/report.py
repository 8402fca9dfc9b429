"""`prism-plan report`: one self-contained HTML page (figures embedded as PNG) that answers what people ask of a
plan. Given a trace and a cluster, its headline says in sentences how much faster the plan is than linear (vLLM's
default) and the faithful EPLB, whether the replayed requests are held-out, which link is the bottleneck and which
server is full; below come the comparison, the links' time and utilisation against their bandwidth, memory per
server, and the traffic the plan was made for (activations per origin and MoE layer, co-activation of a layer)
with the placement map. Every number goes through prism_plan.units; every axis of layers shows the model's own
MoE layer numbers. Plots with matplotlib (Agg); the `plot_*` functions return matplotlib figures for notebooks.
"""

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
from prism_plan.placement.cluster import ClusterSpec
from prism_plan.pipeline import solve_problem
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import CostModel, SimulationResult, prepare_workload, replay, simulate
from prism_plan.solvers import build_problem
from prism_plan.traces.tables import ActivationTables, build_tables
from prism_plan.traces.trace import Trace
from prism_plan.units import change, count, human_bytes, milliseconds, per_token, percent

BASELINES = ("linear", "eplb")
PLAN = "this plan"
LABELS = {PLAN: "this plan", "linear": "linear (vLLM's default)", "eplb": "EPLB"}
SHORT = {PLAN: "this plan", "linear": "linear", "eplb": "EPLB"}
COLOURS = {PLAN: "#2b6cb0", "linear": "#a0aec0", "eplb": "#dd6b20"}
LINK_ROWS = 12  # the busiest links listed in the links table; the figure shows every pair
SAMPLE_RULE = ("How held-out is decided: a trace whose tokens and activations per origin equal the tables' counts "
               "exactly is the tables' own sample (in-sample); request ids the tables record (meta `requests`) "
               "decide held-out, partly or fully in-sample; without them, counts cannot show that two samples "
               "share no request, and the trace is called not known to be held-out.")
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "figure.titlesize": 12,
          "figure.titleweight": "bold", "axes.spines.top": False, "axes.spines.right": False,
          "axes.edgecolor": "#666", "axes.labelcolor": "#222", "xtick.color": "#333", "ytick.color": "#333"}


@dataclass
class Figure:
    """One figure of the report: a file-friendly name, a title, a caption and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass
class Table:
    """A table of formatted cells (a DataFrame of strings, its index the first column); rows at the positions
    in `marked` are highlighted; `note` is printed under it."""

    title: str
    frame: pd.DataFrame
    marked: tuple[int, ...] = ()
    note: str = ""

    def html(self) -> str:
        """The table as HTML, every cell escaped."""
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [self.frame.index.name or "", *self.frame.columns])
        rows = "".join(
            f"<tr{' class=mark' if i in self.marked else ''}><th>{html.escape(str(name))}</th>"
            + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
            for i, (name, row) in enumerate(zip(self.frame.index, self.frame.itertuples(index=False))))
        note = f"<p class=note>{html.escape(self.note)}</p>" if self.note else ""
        return (f"<h3>{html.escape(self.title)}</h3><div class=wide><table><thead><tr>{head}</tr></thead><tbody>"
                f"{rows}</tbody></table></div>{note}")


@dataclass
class Section:
    """A part of the page: a heading, sentences, tables and figures, in that order."""

    title: str
    sentences: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    def html(self) -> str:
        parts = [f"<section><h2>{html.escape(self.title)}</h2>"]
        parts += [f"<p>{html.escape(s)}</p>" for s in self.sentences]
        parts += [t.html() for t in self.tables]
        for f in self.figures:
            data = base64.b64encode(f.png).decode()
            parts.append(f'<figure id="{f.name}"><img alt="{html.escape(f.title)}" src="data:image/png;base64,'
                         f'{data}"><figcaption>{html.escape(f.caption)}</figcaption></figure>')
        return "".join(parts) + "</section>"


@dataclass
class Report:
    """The page: a title, the headline sentences (the answers, first) and the sections under them."""

    title: str
    headline: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]

    @property
    def tables(self) -> list[Table]:
        return [t for s in self.sections for t in s.tables]

    def html(self) -> str:
        """The page: every figure inline (base64 PNG), every table as HTML, no script and no link out."""
        top = "".join(f"<li>{html.escape(s)}</li>" for s in self.headline)
        body = f"<h1>{html.escape(self.title)}</h1>" + (f"<ul class=headline>{top}</ul>" if top else "")
        body += "".join(s.html() for s in self.sections)
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body>{body}</body></html>")

    def save(self, path: str | Path, png_dir: str | Path | None = None) -> None:
        """Write the HTML; with png_dir, also every figure as <name>.png there: all or nothing."""
        with transaction():
            write_text_atomic(path, self.html())
            for f in self.figures if png_dir is not None else ():
                with atomic_path(Path(png_dir) / f"{f.name}.png") as tmp:
                    Path(tmp).write_bytes(f.png)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#1a202c;"
        "line-height:1.45}h1{font-size:1.6em}h2{border-bottom:2px solid #e2e8f0;padding-bottom:.2em;margin-top:1.6em}"
        "h3{font-size:1em;margin:1.2em 0 .4em}ul.headline{background:#ebf4ff;border-left:5px solid #2b6cb0;"
        "padding:.8em 1em .8em 2.2em;font-size:1.05em}ul.headline li{margin:.3em 0}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:.92em;margin:.3em 0}td,th{padding:4px 10px;text-align:right;"
        "border-bottom:1px solid #e2e8f0}td,tbody th{white-space:nowrap}"
        "thead th{background:#f7fafc;border-bottom:2px solid #cbd5e0;"
        "text-align:center}tbody th{text-align:left;font-weight:600}tr.mark td,tr.mark th{background:#fefcbf}"
        "div.wide{overflow-x:auto}figure{margin:1.2em 0}figcaption,p.note{color:#4a5568;font-size:.9em;max-width:60em}")


# ---------------------------------------------------------------------------------------------- what the numbers say


@dataclass(frozen=True)
class Sample:
    """How a replayed trace relates to the tokens its tables were counted from.

    kind: "in-sample", "held-out", "partly in-sample" or "not known to be held-out"; sentence: that verdict and
    its evidence, for people.
    """

    kind: str
    sentence: str


def sample_relation(tables: ActivationTables, trace: Trace) -> Sample:
    """Whether `trace` is the sample `tables` were counted from, by the rule in SAMPLE_RULE."""
    seen = build_tables([trace], pairs=False)
    where = {o: i for i, o in enumerate(tables.origins)}
    freq, tokens = np.zeros_like(tables.freq), np.zeros_like(tables.tokens)
    outside = 0.0  # activations of origins the tables do not know
    for o, f, n in zip(seen.origins, seen.freq, seen.tokens):
        if o in where:
            freq[where[o]], tokens[where[o]] = f, n
        else:
            outside += float(f.sum())
    if not outside and np.array_equal(tokens, tables.tokens) and np.array_equal(freq, tables.freq):
        return Sample("in-sample", "In-sample: the tables the plan and the baselines were made from count exactly "
                      "the replayed tokens (the same tokens and activations per origin), so these numbers show how "
                      "each placement fits the traffic it was made for, not how it does on new requests.")
    source, theirs = trace.meta.source, tables.meta.get("source")
    recorded = tables.meta.get("requests")
    recorded = recorded if isinstance(recorded, dict) else None
    if recorded is not None and source == theirs:
        profiled = _profiled(recorded, trace)
        total, inside = len(profiled), int(sum(profiled.values()))
        if inside == 0:
            return Sample("held-out", f"Held-out: none of the {count(total)} replayed requests is among those "
                          f"the tables were counted from (request ids per origin, same source {source!r}), so "
                          f"the plan and the baselines are judged on requests they did not see.")
        if inside == total:
            return Sample("in-sample", f"In-sample: all {count(total)} replayed requests are among those the "
                          f"tables were counted from, so these numbers flatter every placement made from them.")
        return Sample("partly in-sample", f"Partly in-sample: {count(inside)} of the {count(total)} replayed "
                      f"requests are among those the tables were counted from.")
    unseen = float(np.maximum(freq - tables.freq, 0).sum()) + outside
    share = unseen / max(float(seen.freq.sum()), 1.0)
    why = ("the tables record no request ids" if recorded is None else
           f"the trace comes from {source!r} and the tables from {theirs!r}")
    if unseen:
        return Sample("not known to be held-out", f"Not known to be held-out: at least {percent(share)} of the "
                      f"replayed activations were not counted in the tables, so this is not the tables' own sample, "
                      f"but {why}, so some requests may be in both.")
    return Sample("not known to be held-out", f"Not known to be held-out: every replayed activation fits within the "
                  f"tables' counts, so the trace may be part of the tokens they were counted from ({why}).")


def _profiled(recorded: dict, trace: Trace) -> dict[tuple[str, int], bool]:
    """(origin, request id) of every request of `trace` -> whether `recorded` ({origin: [[first, last], ...]},
    inclusive ranges of the request ids the tables counted) holds it."""
    out: dict[tuple[str, int], bool] = {}
    for o, name in enumerate(trace.origins):
        ids = np.unique(trace.request[trace.origin == o])
        ranges = np.asarray(recorded.get(name, []), dtype=np.int64).reshape(-1, 2)
        ranges = ranges[np.argsort(ranges[:, 0])]
        at = np.searchsorted(ranges[:, 0], ids, side="right") - 1
        inside = (at >= 0) & (ids <= ranges[np.maximum(at, 0), 1]) if len(ranges) else np.zeros(len(ids), bool)
        out.update({(name, int(i)): bool(x) for i, x in zip(ids, inside)})
    return out


def replay_span(plan: Plan, trace: Trace, cluster: ClusterSpec) -> float:
    """seconds: how long the replay takes from its first step to its last, each batch step as long as its slowest
    origin (the simulator starts every origin's step together)."""
    # SimulationResult keeps times per request, not per step; the span needs the steps.
    w = prepare_workload(trace, plan.origins, cluster.homes(list(plan.origins)))
    step_time = replay(w, plan.routing, CostModel.of(cluster, plan.model))[0]
    return float(step_time.max(axis=1).sum())


@dataclass(frozen=True)
class LinkLoad:
    """What the replay asked of each link (row server sends to column server).

    sent: [servers, servers] bytes; seconds: [servers, servers] time spent sending (bytes / bandwidth, the
    per-message latency left out: it delays messages but does not occupy the link); utilisation: [servers,
    servers] seconds over the replay's span; bottleneck: (row, column) of the link with the most sending time,
    None when nothing crossed the network.
    """

    servers: tuple[str, ...]
    sent: np.ndarray
    seconds: np.ndarray
    utilisation: np.ndarray
    span: float
    bottleneck: tuple[int, int] | None

    def name(self, i: int, j: int) -> str:
        """The link from server i to server j, in words; both ways when the other way is just as busy."""
        both = np.isclose(self.seconds[j, i], self.seconds[i, j], rtol=1e-9, atol=0)
        return f"{self.servers[i]} {'↔' if both else '→'} {self.servers[j]}"


def link_load(result: SimulationResult, cluster: ClusterSpec, span: float) -> LinkLoad:
    """Sending time and utilisation of every link in `result`; span: the replay's length in seconds."""
    seconds = result.sending_seconds(cluster)
    best = np.unravel_index(int(np.argmax(seconds)), seconds.shape)
    return LinkLoad(result.servers, result.link_bytes, seconds, seconds / span if span > 0 else seconds * 0,
                    span, (int(best[0]), int(best[1])) if seconds[best] > 0 else None)


def full_servers(plan: Plan, cluster: ClusterSpec) -> list[int]:
    """Indices of the servers without room for one more expert (free memory below the model's smallest expert)."""
    free = cluster.budgets - plan.memory_bytes()
    return [int(s) for s in np.flatnonzero(free < int(plan.model.layer_bytes.min()))]


def _gbps(bytes_per_s: float) -> str:
    """A bandwidth in bytes/s as people write link speeds: "2.5 Gbit/s", "1,200 Gbit/s", "50 Mbit/s"."""
    gbit = 8 * bytes_per_s / 1e9
    if gbit >= 100:
        return f"{gbit:,.0f} Gbit/s"
    return f"{gbit:.3g} Gbit/s" if gbit >= 0.1 else f"{gbit * 1e3:,.3f}".rstrip("0").rstrip(".") + " Mbit/s"


def _seconds(s: float) -> str:
    return f"{s:,.2f} s"


def _than(value: float, reference: float, what: str) -> str:
    """`value` against `reference` in words: "43.1% less than EPLB"."""
    if not reference:
        return f"the same as {what}"
    word = "less" if value < reference else "more"
    return f"{percent(abs(1 - value / reference), 1)} {word} than {what}"


def _points(value: float, reference: float) -> str:
    """A difference of two shares, in percentage points: "+28.14 pts"."""
    d = value - reference
    return f"{'+' if d >= 0 else '-'}{percent(abs(d)).removesuffix('%')} pts"


# --------------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(name: str, caption: str, fig) -> Figure:
    """The report's Figure of a matplotlib figure (its suptitle is the title), which is closed."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, facecolor="white")
    title = fig.get_suptitle() or name
    plt.close(fig)
    return Figure(name, title, caption, buf.getvalue())


def _ticks(n: int, most: int, steps: tuple[int, ...]) -> list[int]:
    """Positions 0, step, 2 step... of n cells, the step the smallest of `steps` giving at most `most` ticks."""
    step = next((s for s in steps if n / s <= most), steps[-1])
    return list(range(0, n, step))


def layer_ticks(ax, layers: tuple[int, ...], axis: str = "y", most: int = 14) -> None:
    """Label the layer axis of an image whose rows (axis "y") or columns ("x") are MoE layers with the model's
    own layer numbers."""
    at = _ticks(len(layers), most, (1, 2, 5, 10, 20, 50))
    (ax.set_yticks if axis == "y" else ax.set_xticks)(at, [str(layers[i]) for i in at])


def expert_ticks(ax, num_experts: int, axes: str = "x", most: int = 16) -> None:
    """Label expert axes (each of "x", "y" in `axes`) with expert ids (0-based, the model's own)."""
    at = _ticks(num_experts, most, (1, 2, 4, 8, 16, 32, 64, 128))
    for a in axes:
        (ax.set_xticks if a == "x" else ax.set_yticks)(at, [str(i) for i in at])


def text_colour(rgba) -> str:
    """Dark text or white, whichever contrasts more with the cell colour `rgba` (WCAG contrast ratio of the
    colours' relative luminance, sRGB)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    cell = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    dark = 0.0143  # the relative luminance of #1a202c
    return "#1a202c" if (cell + 0.05) / (dark + 0.05) >= 1.05 / (cell + 0.05) else "white"


def plot_latency(results: dict[str, SimulationResult]):
    """Mean and p99 simulated TTFT of each placement (bars) and the distribution over requests (CDF).
    results: label (PLAN or a baseline name) -> SimulationResult."""
    plt = _plt()
    with plt.rc_context(_STYLE):
        fig, (bars, cdf) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[1, 1.3], layout="constrained")
        labels = list(results)
        x = np.arange(2)
        width = 0.8 / len(labels)
        top = max(float(np.percentile(r.ttft, 99)) for r in results.values()) * 1e3
        for k, label in enumerate(labels):
            r = results[label]
            values = [float(r.ttft.mean()), float(np.percentile(r.ttft, 99))]
            pos = x + (k - (len(labels) - 1) / 2) * width
            bars.bar(pos, np.array(values) * 1e3, width * 0.92, color=COLOURS.get(label),
                     label=LABELS.get(label, label))
            for p, v in zip(pos, values):
                bars.text(p, v * 1e3 + top * 0.01, milliseconds(v, 0), ha="center", va="bottom", fontsize=7.5)
            t = np.sort(r.ttft) * 1e3
            cdf.plot(t, np.arange(1, len(t) + 1) / len(t), color=COLOURS.get(label), lw=2 if label == PLAN else 1.5,
                     label=f"{LABELS.get(label, label)}: mean {milliseconds(float(r.ttft.mean()))}")
        bars.set_xticks(x, ["mean", "p99 (99% of requests faster)"])
        bars.set_ylabel("simulated time to first token (ms)")
        bars.set_ylim(0, top * 1.12)
        bars.legend(frameon=False, fontsize=8)
        bars.set_title("Mean and p99")
        cdf.set_xlabel("simulated time to first token (ms)")
        cdf.set_ylabel("share of requests at most this fast")
        cdf.yaxis.set_major_formatter(lambda v, _: percent(v, 0))
        cdf.grid(alpha=0.3)
        cdf.legend(frameon=False, fontsize=8, loc="lower right")
        cdf.set_title("Every request (further left is faster)")
        fig.suptitle("Simulated time to first token: this plan against linear and EPLB")
    return fig


def plot_links(load: LinkLoad, cluster: ClusterSpec):
    """Each link's sending time and share of the replay (row sends to column), the bottleneck outlined."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    s_n = len(load.servers)
    annotate = s_n <= 8  # past that the cells get too small for text: the links table has the numbers
    cell = 1.6 if annotate else max(0.3, 9.0 / s_n)  # inches
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(cell * s_n + 2.4, 0.8 * cell * s_n + 1.4), layout="constrained")
        # the light part of YlOrRd only: the busiest link is orange, never a dark red under black text
        cmap = ListedColormap(plt.get_cmap("YlOrRd")(np.linspace(0.0, 0.6, 256))).with_extremes(bad="#edf2f7")
        off = ~np.eye(s_n, dtype=bool)
        shown = np.where(off, load.utilisation, np.nan)
        top = max(float(np.nanmax(shown)) if off.any() else 0.0, 1e-12)
        im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
        ax.set_xticks(range(s_n), load.servers, rotation=30, ha="right")
        ax.set_yticks(range(s_n), load.servers)
        ax.set_xlabel("receiving server")
        ax.set_ylabel("sending server")
        ax.spines[:].set_visible(False)
        if annotate:
            for i in range(s_n):
                for j in range(s_n):
                    if i == j:
                        ax.text(j, i, "same\nserver", ha="center", va="center", fontsize=7, color="#718096")
                        continue
                    colour = text_colour(cmap(im.norm(shown[i, j])))
                    ax.text(j, i, f"{_seconds(load.seconds[i, j])}\n{percent(load.utilisation[i, j], 1)}\n"
                                  f"{_gbps(cluster.bandwidth[i, j])}", ha="center", va="center", fontsize=7.5,
                            color=colour, fontweight="bold" if (i, j) == load.bottleneck else "normal")
        if load.bottleneck is not None:
            i, j = load.bottleneck
            ax.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, edgecolor="#2b6cb0", lw=3))
        bar = fig.colorbar(im, ax=ax, shrink=0.85)
        bar.set_label("share of the replay spent sending")
        bar.ax.yaxis.set_major_formatter(lambda v, _: percent(v, 0))
        where = f"bottleneck {load.name(*load.bottleneck)}" if load.bottleneck is not None else "no remote traffic"
        fig.suptitle(f"Link load of this plan ({where})")
    return fig


def plot_memory(plan: Plan, cluster: ClusterSpec | None):
    """Routed-expert memory per server, against its budget when a cluster is given; full servers in orange."""
    plt = _plt()
    used = plan.memory_bytes()
    full = set(full_servers(plan, cluster)) if cluster is not None else set()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(plan.servers) + 1.5), 3.8), layout="constrained")
        x = np.arange(len(plan.servers))
        gib = 2**30
        if cluster is not None:
            ax.bar(x, cluster.budgets / gib, 0.7, color="#edf2f7", edgecolor="#a0aec0", label="budget")
        ax.bar(x, used / gib, 0.5, color=["#dd6b20" if s in full else "#2b6cb0" for s in range(len(x))],
               label="routed experts of the plan")
        top = float(max(used.max(), cluster.budgets.max() if cluster is not None else 0)) / gib
        for s in x:
            text = human_bytes(used[s])
            if cluster is not None:
                text += f"\nof {human_bytes(cluster.budgets[s])}"
            if s in full:
                text += "\nfull"
            height = max(used[s], cluster.budgets[s] if cluster is not None else 0) / gib
            ax.text(s, height + top * 0.02, text, ha="center", va="bottom", fontsize=8,
                    fontweight="bold" if s in full else "normal")
        ax.set_xticks(x, plan.servers)
        ax.set_ylabel("GiB")
        ax.set_ylim(0, top * 1.35)
        ax.legend(frameon=False, loc="upper left", fontsize=8)
        fig.suptitle("Memory per server: routed experts against the budget" if cluster is not None
                     else "Memory per server: routed experts")
    return fig


def plot_activations(tables: ActivationTables, cluster: ClusterSpec | None = None):
    """Per origin: share of each MoE layer's activations on each expert ([layers x experts] each)."""
    plt = _plt()
    o_n = len(tables.origins)
    cols = min(o_n, 4)
    rows = -(-o_n // cols)
    home = cluster.origin_server if cluster is not None else {}
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 1.2, 3.2 * rows + 0.6), squeeze=False,
                                 layout="constrained")
        share = tables.freq / np.maximum(tables.freq.sum(axis=2, keepdims=True), 1e-300)
        top = float(share.max())
        for i, (ax, name, s) in enumerate(zip(axes.ravel(), tables.origins, share)):
            im = ax.imshow(s, aspect="auto", cmap="YlGnBu", vmin=0, vmax=top, interpolation="nearest")
            at = f" (at {cluster.servers[home[name]].name})" if name in home else ""
            ax.set_title(f"{name}{at}")
            ax.set_xlabel("expert id")
            expert_ticks(ax, tables.num_experts, "x", most=5)
            layer_ticks(ax, tables.layers)
            if i % cols == 0:
                ax.set_ylabel("MoE layer")
        for ax in axes.ravel()[o_n:]:
            ax.axis("off")
        bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85)
        bar.set_label("share of the layer's activations")
        bar.ax.yaxis.set_major_formatter(lambda v, _: percent(v, 0))
        fig.suptitle("Expert activations per origin and MoE layer")
    return fig


def coactivation_strength(tables: ActivationTables, layer_index: int) -> np.ndarray | None:
    """[experts, experts] tokens in which both experts fired, over sqrt(count x count) (1 = always together);
    nan on the diagonal; None for tables without pair counts."""
    if tables.coact is None:
        return None
    c = tables.coact[layer_index].astype(float)
    d = np.sqrt(np.maximum(np.diag(c), 1e-300))
    norm = c / d[:, None] / d[None, :]
    np.fill_diagonal(norm, np.nan)
    return norm


def plot_coactivation(tables: ActivationTables, layer_index: int):
    """Co-activation strength of one layer (index into tables.layers), experts by id; None without pairs."""
    norm = coactivation_strength(tables, layer_index)
    if norm is None:
        return None
    plt = _plt()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(6.6, 5.6), layout="constrained")
        cmap = plt.get_cmap("YlOrRd").with_extremes(bad="#edf2f7")
        im = ax.imshow(norm, cmap=cmap, vmin=0, interpolation="nearest")
        expert_ticks(ax, tables.num_experts, "xy")
        ax.set_xlabel("expert id")
        ax.set_ylabel("expert id")
        ax.spines[:].set_visible(False)
        fig.colorbar(im, ax=ax, shrink=0.85, label="tokens with both / sqrt(count x count)")
        fig.suptitle(f"Co-activation in MoE layer {tables.layers[layer_index]}")
    return fig


def strongest_pairs(norm: np.ndarray, n: int = 5) -> list[tuple[int, int, float]]:
    """The n expert pairs (a < b) of highest co-activation strength, strongest first."""
    upper = np.triu(np.nan_to_num(norm, nan=-1.0), 1) - np.tril(np.ones_like(norm))
    flat = np.argsort(-upper, axis=None, kind="stable")[:n]
    return [(int(a), int(b), float(norm[a, b])) for a, b in zip(*np.unravel_index(flat, norm.shape))]


def plot_placement(plan: Plan):
    """Per server: which (layer, expert) it hosts, coloured by how many servers host that expert."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    s_n = len(plan.servers)
    copies = plan.hosted.sum(axis=0)
    most = max(int(copies.max()), 1)
    palette = ["#63b3ed", "#f6ad55", "#e53e3e", "#805ad5", "#2f855a", "#975a16"]
    cmap = ListedColormap([palette[k % len(palette)] for k in range(most)]).with_extremes(bad="white")
    used = plan.memory_bytes()
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, s_n, figsize=(min(2.3 * s_n, 16) + 1.2, 4.4), squeeze=False, sharey=True,
                                 layout="constrained")
        for s, ax in enumerate(axes[0]):
            img = np.where(plan.hosted[s], copies, np.nan)
            im = ax.imshow(img, aspect="auto", cmap=cmap, vmin=0.5, vmax=most + 0.5, interpolation="nearest")
            ax.set_title(f"{plan.servers[s]}\n{count(plan.hosted[s].sum())} experts, {human_bytes(used[s])}",
                         fontsize=9)
            ax.set_xlabel("expert id")
            expert_ticks(ax, plan.model.num_experts, "x", most=5)
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color("#cbd5e0")
        layer_ticks(axes[0][0], plan.model.layers)
        axes[0][0].set_ylabel("MoE layer")
        bar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85, ticks=range(1, most + 1))
        bar.set_label("copies of the expert in the cluster")
        fig.suptitle("Placement map: the experts each server hosts")
    return fig


# --------------------------------------------------------------------------------------------------------- sections


def _comparison(results: dict[str, SimulationResult], loads: dict[str, LinkLoad], notes: dict[str, str],
                title: str) -> Table:
    """Rows: what was measured; columns: each placement, then the plan's change against each baseline."""
    s = {k: r.summary() for k, r in results.items()}
    p = s[PLAN]
    rows = [
        ("simulated TTFT, mean", "ttft_mean_s", milliseconds, change),
        ("simulated TTFT, p50", "ttft_p50_s", milliseconds, change),
        ("simulated TTFT, p99", "ttft_p99_s", milliseconds, change),
        ("remote traffic", "remote_bytes_per_token", per_token, change),
        ("activations served locally", "local_coverage", percent, _points)]
    if p["tpot_mean_s"] is not None:
        rows.insert(3, ("simulated time per output token", "tpot_mean_s", milliseconds, change))
    data = {}
    for measured, key, fmt, diff in rows:
        data[measured] = [fmt(s[k][key]) for k in results] + [diff(p[key], s[b][key]) for b in results if b != PLAN]
    busiest = [loads[k].name(*loads[k].bottleneck) + f", {_seconds(loads[k].seconds[loads[k].bottleneck])}"
               if loads[k].bottleneck is not None else "none" for k in results]
    data["busiest link (time sending)"] = busiest + ["" for b in results if b != PLAN]
    columns = [LABELS[k] for k in results] + [f"vs {SHORT[b]}" for b in results if b != PLAN]
    frame = pd.DataFrame.from_dict(data, orient="index", columns=columns)
    frame.index.name = "measured"
    return Table(title, frame, (), " ".join(n for n in notes.values() if n))


def _headline(plan: Plan, results: dict[str, SimulationResult], sample: Sample, load: LinkLoad,
              cluster: ClusterSpec, trace_name: str) -> list[str]:
    p, lin, ep = (results[k].summary() for k in (PLAN, "linear", "eplb"))
    linear = "linear, vLLM's default"
    return [f"Replaying {trace_name} ({count(p['requests'])} requests, {count(p['tokens'])} tokens) on "
            f"{cluster.name}: this plan ({plan.solver.get('name')}, objective {plan.objective}) has a mean "
            f"simulated time to first token of {milliseconds(p['ttft_mean_s'])}, "
            f"{_than(p['ttft_mean_s'], ep['ttft_mean_s'], 'EPLB')} ({milliseconds(ep['ttft_mean_s'])}) and "
            f"{_than(p['ttft_mean_s'], lin['ttft_mean_s'], linear)} "
            f"({milliseconds(lin['ttft_mean_s'])}).",
            f"At p99 it takes {milliseconds(p['ttft_p99_s'])}, {_than(p['ttft_p99_s'], ep['ttft_p99_s'], 'EPLB')} "
            f"({milliseconds(ep['ttft_p99_s'])}); it sends {per_token(p['remote_bytes_per_token'])} over the "
            f"network, {_than(p['remote_bytes_per_token'], ep['remote_bytes_per_token'], 'EPLB')}, and serves "
            f"{percent(p['local_coverage'])} of activations where they arrive (EPLB: {percent(ep['local_coverage'])}).",
            sample.sentence, _bottleneck_sentence(load, cluster), memory_summary(plan, cluster)]


def _bottleneck_sentence(load: LinkLoad, cluster: ClusterSpec) -> str:
    if load.bottleneck is None:
        return "No traffic crosses the network: every activation is served where it arrives."
    i, j = load.bottleneck
    name = load.name(i, j)
    return (f"Bottleneck link: {name} ({_gbps(cluster.bandwidth[i, j])}, {milliseconds(cluster.latency[i, j])} "
            f"latency) carries {human_bytes(load.sent[i, j])}{' each way' if '↔' in name else ''}: "
            f"{_seconds(load.seconds[i, j])} of sending, {percent(load.utilisation[i, j])} of the "
            f"{_seconds(load.span)} the replay takes.")


def memory_summary(plan: Plan, cluster: ClusterSpec) -> str:
    """The headline's sentence on memory: which servers are full (no room for one more expert), else the fullest."""
    used, budget = plan.memory_bytes(), cluster.budgets
    full = full_servers(plan, cluster)
    smallest = human_bytes(int(plan.model.layer_bytes.min()))
    if len(full) == len(plan.servers) > 1:
        each = "; ".join(f"{plan.servers[s]} {human_bytes(used[s])} of {human_bytes(budget[s])}" for s in full) \
            if len(full) <= 4 else f"together {human_bytes(used.sum())} of {human_bytes(budget.sum())}"
        return f"Every server is full: none has room for another expert ({smallest}); {each}."
    if full:
        names = ", ".join(f"{plan.servers[s]} ({human_bytes(used[s])} of {human_bytes(budget[s])}, "
                          f"{human_bytes(budget[s] - used[s])} free)" for s in full)
        return f"Full (no room for another expert of {smallest}): {names}."
    s = int(np.argmax(used / np.maximum(budget, 1)))
    return (f"No server is full; the fullest is {plan.servers[s]} at {percent(used[s] / budget[s])} "
            f"({human_bytes(used[s])} of {human_bytes(budget[s])}).")


def _links_table(loads: dict[str, LinkLoad], cluster: ClusterSpec) -> Table:
    """The busiest links first; a pair whose two ways carry the same load over the same link is one row."""
    load = loads[PLAN]
    s_n = len(load.servers)
    rows = []  # (row server, column server, both ways)
    for i in range(s_n):
        for j in range(i + 1, s_n):
            same = load.seconds[i, j] == load.seconds[j, i] and cluster.bandwidth[i, j] == cluster.bandwidth[j, i] \
                and cluster.latency[i, j] == cluster.latency[j, i]
            rows += [(i, j, True)] if same else [(i, j, False), (j, i, False)]
    rows.sort(key=lambda r: (-load.seconds[r[0], r[1]], r))
    shown = rows[:LINK_ROWS]
    each = " (each way)" if any(r[2] for r in shown) else ""
    frame = pd.DataFrame(
        [[_gbps(cluster.bandwidth[i, j]), milliseconds(cluster.latency[i, j]), human_bytes(load.sent[i, j]),
          _seconds(load.seconds[i, j]), percent(load.utilisation[i, j])]
         + [_seconds(loads[b].seconds[i, j]) for b in loads if b != PLAN] for i, j, _ in shown],
        index=[f"{load.servers[i]} {'↔' if both else '→'} {load.servers[j]}" for i, j, both in shown],
        columns=["bandwidth", "latency", f"sent{each}", f"time sending{each}", "share of the replay"]
        + [f"{SHORT[b]}: time sending" for b in loads if b != PLAN])
    frame.index.name = "link"
    bottleneck = load.bottleneck
    marked = tuple(k for k, (i, j, both) in enumerate(shown) if bottleneck == (i, j) or both and bottleneck == (j, i))
    more = f" The {len(rows) - LINK_ROWS} quieter links are left out." if len(rows) > LINK_ROWS else ""
    return Table("Links of this plan, busiest first (the bottleneck highlighted)", frame, marked,
                 f"Time sending is the bytes over the link's bandwidth; the share of the replay divides it by the "
                 f"{_seconds(load.span)} the replay takes. The simulator does not queue messages on a link, so a "
                 f"share near 100% means its times are optimistic.{more}")


def _servers_table(plan: Plan, cluster: ClusterSpec | None) -> Table:
    used = plan.memory_bytes()
    data: dict[str, list[str]] = {"experts hosted": [count(n) for n in plan.hosted.sum(axis=(1, 2))],
                                  "memory used": [human_bytes(b) for b in used]}
    full: list[int] = []
    if cluster is not None:
        budget = cluster.budgets
        full = full_servers(plan, cluster)
        data["origins arriving"] = [", ".join(s.origins) for s in cluster.servers]
        data["budget"] = [human_bytes(b) for b in budget]
        data["free"] = [human_bytes(b) for b in budget - used]
        data["used"] = [percent(u / b) if b else "n/a" for u, b in zip(used, budget)]
        data["full"] = ["full" if s in full else "" for s in range(len(plan.servers))]
    frame = pd.DataFrame(data, index=list(plan.servers))
    frame.index.name = "server"
    return Table("Servers", frame, tuple(full))


def _plan_table(plan: Plan) -> Table:
    s = plan.solver
    copies = int(plan.hosted.sum())
    weak = s.get("gap") is not None and s.get("weak_bound")
    loose = " (against a cheap bound, loose by construction)" if weak else ""
    frame = pd.DataFrame({"value": [
        str(s.get("name")), plan.objective, str(s.get("status")), percent(s.get("gap")) + loose,
        percent(plan.metrics.get("local_coverage")), count(copies),
        count(copies - plan.model.num_layers * plan.model.num_experts)]},
        index=["solver", "objective", "status", "gap to the proven bound", "local coverage on its tables",
               "expert copies hosted", "copies beyond one per expert"])
    frame.index.name = "plan"
    return Table("The plan", frame)


def build_report(plan: Plan, *, tables: ActivationTables | None = None, cluster: ClusterSpec | None = None,
                 trace: Trace | None = None, layer: int | None = None, trace_name: str = "the trace") -> Report:
    """Every answer and figure the inputs allow. trace: replayed through the plan and the baselines (needs tables
    and cluster); trace_name: how the headline names it. layer: the model's layer number for the co-activation
    figure (default: the layer whose activations are most concentrated)."""
    if cluster is not None:
        plan.check_servers(cluster)
    if trace is not None and (tables is None or cluster is None):
        raise PrismError("a trace compares the plan with baselines: pass `tables` and `cluster` too",
                         parameters=("tables", "cluster"))
    if layer is not None and tables is None:
        raise PrismError("`layer` picks the co-activation figure, which needs `tables`", parameters=("layer", "tables"))
    if tables is not None:
        plan.model.check_same_shape(tables, "the tables", "pass `tables` of the plan's model", ("tables",))
    if layer is not None and layer not in tables.layers:
        raise PrismError(f"`layer` {layer} is not a MoE layer of the tables ({tables.layers[0]}.."
                         f"{tables.layers[-1]})", parameters=("layer",))
    where = f" on {cluster.name}" if cluster is not None else ""
    servers = ", ".join(plan.servers) if len(plan.servers) <= 6 else f"{len(plan.servers)} servers"
    rep = Report(f"prism-plan report: {plan.model.name}{where} ({servers})")
    if trace is not None:
        problem = build_problem(tables, cluster, plan.model, min_replicas=plan.min_replicas)
        plans = {PLAN: plan, **{name: solve_problem(problem, name) for name in BASELINES}}
        results = {k: simulate(p, trace, cluster) for k, p in plans.items()}
        notes = {k: p.solver.get("note", "") for k, p in plans.items() if k != PLAN}
        loads = {k: link_load(r, cluster, replay_span(plans[k], trace, cluster)) for k, r in results.items()}
        sample = sample_relation(tables, trace)
        load = loads[PLAN]
        rep.headline = _headline(plan, results, sample, load, cluster, trace_name)
        rep.sections.append(Section(
            "Latency and traffic against the baselines", [SAMPLE_RULE],
            [_comparison(results, loads, notes, f"This plan against linear and EPLB on {trace_name} ({sample.kind}); "
                         f"negative changes: this plan is lower")],
            [_figure("latency", "Simulated time to first token per request (routed experts only: the simulator "
                     "leaves out attention and shared experts, which placement does not change).",
                     plot_latency(results))]))
        rep.sections.append(Section("Links", [_bottleneck_sentence(load, cluster)], [_links_table(loads, cluster)], [
            _figure("links", "Each cell: the time the row server spends sending to the column server over the "
                    "replay (hidden states out and results back), that time as a share of the replay, and the "
                    "link's bandwidth. The outlined cell is the bottleneck.", plot_links(load, cluster))]))
    caption = ("Routed-expert memory the plan uses on each server against the server's budget; orange bars are "
               "servers with no room for another expert." if cluster is not None else
               "Routed-expert memory the plan uses on each server (give the cluster to see the budgets).")
    memory = Section("Memory", [memory_summary(plan, cluster)] if cluster is not None else [],
                     [_servers_table(plan, cluster)], [_figure("memory", caption, plot_memory(plan, cluster))])
    if trace is None:
        rep.headline = ([memory_summary(plan, cluster)] if cluster is not None else
                        ["Give the cluster to see which server is full."])
        rep.headline.append("Give a trace, its tables and the cluster to compare this plan with linear and EPLB.")
    rep.sections.append(memory)
    made = Section("The plan and the traffic it was made for", tables=[_plan_table(plan)])
    if tables is not None:
        made.figures.append(_figure("activations", "Each row is a MoE layer (the model's numbering), each column "
                                    "an expert id; dark cells carry much of that origin's traffic. Different dark "
                                    "spots per origin are the locality a placement can serve at home.",
                                    plot_activations(tables, cluster)))
        if layer is None:
            share = tables.freq.sum(axis=0) / np.maximum(tables.freq.sum(axis=(0, 2))[:, None], 1e-300)
            index = int(np.argmax((share**2).sum(axis=1)))
        else:
            index = tables.layers.index(layer)
        norm = coactivation_strength(tables, index)
        if norm is not None:
            pairs = ", ".join(f"{a} and {b} ({v:.2f})" for a, b, v in strongest_pairs(norm))
            made.figures.append(_figure(
                "coactivation", f"How often two experts fire for the same token, relative to how often each fires "
                f"(1: always together); dark pairs gain from sitting on the same server. Strongest pairs: {pairs}.",
                plot_coactivation(tables, index)))
    made.figures.append(_figure("placement", "A coloured cell is an expert the server hosts; the colour counts its "
                                "copies across servers (1 = its only copy).", plot_placement(plan)))
    rep.sections.append(made)
    return rep


def write_report(plan: Plan | str | Path, output: str | Path, *, tables: ActivationTables | str | Path | None = None,
                 cluster: ClusterSpec | str | Path | None = None, trace: Trace | str | Path | None = None,
                 layer: int | None = None, png_dir: str | Path | None = None) -> Report:
    """Build the report from the inputs (objects or their files, see `build_report`) and write the HTML to
    `output` (and every figure as PNG into `png_dir`); returns the Report."""
    name = Path(trace).name if isinstance(trace, (str, Path)) else "the trace"
    rep = build_report(loaded(plan, Plan), tables=loaded(tables, ActivationTables),
                       cluster=loaded(cluster, ClusterSpec), trace=loaded(trace, Trace), layer=layer,
                       trace_name=name)
    rep.save(output, png_dir)
    return rep
