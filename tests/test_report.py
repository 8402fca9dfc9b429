"""`prism-plan report`: every figure embedded, PNG files, clear errors; and a look through headless Chromium."""

import base64
import re
import shutil
import subprocess

import pytest

from prism_plan.cli import main
from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE

FIGURES = ["activations", "coactivation", "placement", "memory", "latency", "links"]


@pytest.fixture(scope="module")
def plan_and_tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    assert main(["profile", "tables", str(BUNDLED_TRACE), "-o", str(d / "t.npz"), "--quiet"]) == 0
    assert main(["solve", "--tables", str(d / "t.npz"), "--cluster", str(BUNDLED_CLUSTER), "-o", str(d / "p.json")]) == 0
    return d


def images(html: str) -> list[bytes]:
    return [base64.b64decode(x) for x in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_full_report_embeds_every_figure(plan_and_tables, tmp_path, capsys):
    d = plan_and_tables
    capsys.readouterr()
    code = main(["report", "--plan", str(d / "p.json"), "--tables", str(d / "t.npz"), "--cluster",
                 str(BUNDLED_CLUSTER), "--trace", str(BUNDLED_TRACE), "-o", str(tmp_path / "r.html"), "--png",
                 str(tmp_path / "png"), "--layer", "5"])
    assert code == 0
    html = (tmp_path / "r.html").read_text()
    assert [m for m in re.findall(r'<figure id="(\w+)"', html)] == FIGURES
    assert all(png.startswith(b"\x89PNG") and len(png) > 5000 for png in images(html))
    assert "Co-activation in MoE layer 5" in html and "eplb" in html and "linear" in html
    assert sorted(p.stem for p in (tmp_path / "png").iterdir()) == sorted(FIGURES)
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")  # self-contained


def test_plan_only_report_and_errors(plan_and_tables, tmp_path, capsys):
    d = plan_and_tables
    assert main(["report", "--plan", str(d / "p.json"), "-o", str(tmp_path / "r.html")]) == 0
    assert len(images((tmp_path / "r.html").read_text())) == 2  # placement and memory
    assert main(["report", "--plan", str(d / "p.json"), "--trace", str(BUNDLED_TRACE), "-o", str(tmp_path / "x.html")]) == 2
    assert "pass --tables and --cluster" in capsys.readouterr().err
    assert main(["report", "--plan", str(d / "p.json"), "--tables", str(d / "t.npz"), "--layer", "0", "-o",
                 str(tmp_path / "x.html")]) == 2
    assert "not a MoE layer" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(plan_and_tables, tmp_path):
    from PIL import Image

    d = plan_and_tables
    assert main(["report", "--plan", str(d / "p.json"), "--tables", str(d / "t.npz"), "--cluster",
                 str(BUNDLED_CLUSTER), "-o", str(tmp_path / "r.html")]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,3000", f"--screenshot={shot}",
                    (tmp_path / "r.html").as_uri()], capture_output=True, timeout=120)
    im = Image.open(shot).convert("L")
    colours = len(set(im.getdata()))
    assert im.size == (1300, 3000) and colours > 50  # figures drawn, not a blank page
