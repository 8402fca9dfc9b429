"""`prism-plan report`: the answers in its text (the plan against EPLB in %, the bottleneck link, the full server,
held-out or in-sample), the model's layer numbers and expert ids on the axes, every figure embedded, PNG files,
clear errors; and a look through headless Chromium."""

import base64
import dataclasses
import html as html_text
import re
import shutil
import subprocess

import matplotlib.pyplot as plt
import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.pipeline import solve_problem
from prism_plan.placement.cluster import load_cluster
from prism_plan.placement.plan import Plan
from prism_plan.placement.simulator import simulate
from prism_plan.report import (build_report, full_servers, memory_summary, plot_activations, plot_coactivation,
                               plot_placement, sample_relation, text_colour)
from prism_plan.solvers import build_problem
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
from prism_plan.traces.tables import ActivationTables, build_tables
from prism_plan.traces.trace import load_trace
from prism_plan.units import human_bytes, percent

FIGURES = ["latency", "links", "memory", "activations", "coactivation", "placement"]


@pytest.fixture(scope="module")
def halves():
    return load_trace(BUNDLED_TRACE).split_requests(0.5)


@pytest.fixture(scope="module")
def plan_and_tables(tmp_path_factory, halves):
    """Tables of the profiling half, a plan solved from them, and the held-out half as a file."""
    d = tmp_path_factory.mktemp("report")
    profile, holdout = halves
    build_tables([profile]).save(d / "t.npz")
    holdout.save(d / "holdout.parquet")
    assert main(["solve", "--tables", str(d / "t.npz"), "--cluster", str(BUNDLED_CLUSTER), "-o",
                 str(d / "p.json")]) == 0
    return d


@pytest.fixture(scope="module")
def full_report(plan_and_tables):
    d = plan_and_tables
    code = main(["report", "--plan", str(d / "p.json"), "--tables", str(d / "t.npz"), "--cluster",
                 str(BUNDLED_CLUSTER), "--trace", str(d / "holdout.parquet"), "-o", str(d / "r.html"), "--png",
                 str(d / "png"), "--layer", "5", "--quiet"])
    assert code == 0
    return d / "r.html"


def images(html: str) -> list[bytes]:
    return [base64.b64decode(x) for x in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def text_of(html: str) -> str:
    """The page's words: style and images dropped, tags turned into spaces."""
    words = re.sub(r'<style>.*?</style>|src="data:[^"]+"', "", html)
    return html_text.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", words)))


def test_full_report_embeds_every_figure(full_report):
    html = full_report.read_text()
    assert re.findall(r'<figure id="(\w+)"', html) == FIGURES
    assert all(png.startswith(b"\x89PNG") and len(png) > 5000 for png in images(html))
    assert "Co-activation in MoE layer 5" in html
    titles = re.findall(r'<img alt="([^"]+)"', html)  # each PNG's own title (its suptitle)
    assert len(titles) == len(FIGURES) and not set(titles) & set(FIGURES)
    assert html.index("class=headline") < html.index("<section>")  # the answers come first
    assert sorted(p.stem for p in (full_report.parent / "png").iterdir()) == sorted(FIGURES)
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")  # self-contained


def test_report_answers_in_words(full_report, plan_and_tables, edge4):
    """The % against EPLB and linear, the bottleneck link and the full servers, computed here independently."""
    d = plan_and_tables
    text = text_of(full_report.read_text())
    plan, tables, trace = Plan.load(d / "p.json"), ActivationTables.load(d / "t.npz"), load_trace(d / "holdout.parquet")
    problem = build_problem(tables, edge4, plan.model)
    mine = simulate(plan, trace, edge4)
    for name, label in (("eplb", "EPLB"), ("linear", "linear, vLLM's default")):
        theirs = simulate(solve_problem(problem, name), trace, edge4)
        faster = 1 - mine.ttft.mean() / theirs.ttft.mean()
        assert faster > 0.1 and f"{percent(faster, 1)} less than {label}" in text
    seconds = np.where(np.eye(4, dtype=bool), 0, mine.link_bytes / edge4.bandwidth)
    i, j = np.unravel_index(np.argmax(seconds), seconds.shape)
    a, b = sorted((edge4.names[i], edge4.names[j]))
    assert f"Bottleneck link: {a} ↔ {b}" in text  # both ways carry the same bytes on a symmetric link
    html = full_report.read_text()
    assert f"<tr class=mark><th>{a} ↔ {b}</th>" in html and f"Link load of this plan (bottleneck {a} ↔ {b})" in html
    assert "Every server is full" in text and "edge-a 5.99 GiB of 6.00 GiB" in text
    assert "Held-out: none of the 107 replayed requests is among those the tables were counted from" in text
    assert "ttft_mean_s" not in text and "remote_bytes" not in text
    assert not re.search(r"\d[eE][+-]?\d", text)  # no e-notation anywhere
    for words in ("vs EPLB", "simulated TTFT, p99", "MB/token", "time sending", "share of the replay", "Gbit/s"):
        assert words in text


def test_one_full_server_is_named(plan_and_tables):
    plan = Plan.load(plan_and_tables / "p.json")
    cluster = load_cluster(BUNDLED_CLUSTER)
    roomy = dataclasses.replace(cluster, servers=tuple(
        s if s.name == "edge-c" else dataclasses.replace(s, memory_bytes=s.memory_bytes + 2**30)
        for s in cluster.servers))
    rep = build_report(plan, cluster=roomy)
    used = plan.memory_bytes()[2]
    assert rep.headline[0] == (f"Full (no room for another expert of 16.50 MiB): edge-c ({human_bytes(used)} of "
                               f"10.00 GiB, {human_bytes(10 * 2**30 - used)} free).")
    servers = next(t for t in rep.tables if t.title == "Servers")
    assert servers.marked == (2,) and list(servers.frame["full"]) == ["", "", "full", ""]
    everyone = dataclasses.replace(cluster, servers=tuple(
        dataclasses.replace(s, memory_bytes=s.memory_bytes + 2**30) for s in cluster.servers))
    assert full_servers(plan, everyone) == [] and full_servers(plan, cluster) == [0, 1, 2, 3]
    assert memory_summary(plan, everyone).startswith("No server is full; the fullest is edge-")


def test_axes_carry_layer_numbers_and_expert_ids(plan_and_tables):
    tables = ActivationTables.load(plan_and_tables / "t.npz")
    assert tables.layers == tuple(range(1, 27))

    def labels(axis):
        return [t.get_text() for t in axis.get_ticklabels()]

    fig = plot_activations(tables)
    assert labels(fig.axes[0].yaxis) == [str(x) for x in range(1, 27, 2)]  # 1, 3, ... 25: not 0-based indices
    assert labels(fig.axes[0].xaxis) == ["0", "16", "32", "48"]
    fig = plot_placement(Plan.load(plan_and_tables / "p.json"))
    assert labels(fig.axes[0].yaxis)[0] == "1" and fig.get_suptitle()
    fig = plot_coactivation(tables, tables.layers.index(5))
    assert fig.get_suptitle() == "Co-activation in MoE layer 5"
    assert labels(fig.axes[0].xaxis) == labels(fig.axes[0].yaxis) == [str(e) for e in range(0, 64, 4)]
    sparse = ActivationTables(("a",), (3, 7, 11), np.ones((1, 3, 4)), np.array([2]), meta={"top_k": 2})
    fig = plot_activations(sparse)
    assert labels(fig.axes[0].yaxis) == ["3", "7", "11"]
    plt.close("all")


def test_held_out_or_in_sample(halves):
    profile, holdout = halves
    whole = load_trace(BUNDLED_TRACE)
    assert sample_relation(build_tables([whole]), whole).kind == "in-sample"
    recorded = build_tables([profile])
    # the tables record the request ids they counted (meta `requests`: inclusive runs per origin)
    ids = {name: sorted(set(profile.request[profile.origin == o].tolist())) for o, name in enumerate(profile.origins)}
    assert {o: [i for a, b in runs for i in range(a, b + 1)] for o, runs in recorded.meta["requests"].items()} == ids
    counted = dataclasses.replace(recorded, meta={k: v for k, v in recorded.meta.items() if k != "requests"})
    unknown = sample_relation(counted, holdout)  # counts alone (a dump's tables) cannot prove held-out
    assert unknown.kind == "not known to be held-out" and "no request ids" in unknown.sentence
    part = profile.select(profile.origin == 0)
    assert "fits within the tables' counts" in sample_relation(counted, part).sentence
    held = sample_relation(recorded, holdout)
    assert held.kind == "held-out" and held.sentence.startswith(f"Held-out: none of the {holdout_requests(holdout)}")
    assert sample_relation(recorded, whole).kind == "partly in-sample"
    assert sample_relation(recorded, part).kind == "in-sample"
    other = dataclasses.replace(recorded, meta={**recorded.meta, "source": "sglang:elsewhere"})
    assert "and the tables from 'sglang:elsewhere'" in sample_relation(other, holdout).sentence


def holdout_requests(trace) -> int:
    return len({(o, r) for o, r in zip(trace.origin.tolist(), trace.request.tolist())})


def test_text_colour_contrasts():
    assert text_colour((1.0, 1.0, 0.8, 1.0)) == text_colour((1.0, 0.6, 0.3, 1.0)) != text_colour((0.1, 0.1, 0.3, 1.0))
    assert text_colour((0.0, 0.0, 0.0)) == "white"


def test_plan_only_report_and_errors(plan_and_tables, tmp_path, capsys):
    d = plan_and_tables
    assert main(["report", "--plan", str(d / "p.json"), "-o", str(tmp_path / "r.html")]) == 0
    assert len(images((tmp_path / "r.html").read_text())) == 2  # memory and placement
    assert main(["report", "--plan", str(d / "p.json"), "--trace", str(BUNDLED_TRACE), "-o",
                 str(tmp_path / "x.html")]) == 2
    assert "pass --tables and --cluster" in capsys.readouterr().err
    assert main(["report", "--plan", str(d / "p.json"), "--tables", str(d / "t.npz"), "--layer", "0", "-o",
                 str(tmp_path / "x.html")]) == 2
    assert "not a MoE layer" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,3000", f"--screenshot={shot}",
                    full_report.as_uri()], capture_output=True, timeout=120)
    im = Image.open(shot).convert("RGB")
    assert im.size == (1300, 3000) and len(im.getcolors(2**24)) > 50  # figures drawn, not a blank page
