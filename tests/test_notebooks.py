"""The tutorials in notebooks/ run top to bottom against the installed package and the bundled data, show their
figures inline and their results as tables, and teach with the public API only."""

import ast
from pathlib import Path

import pytest

import prism_plan

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
INLINE = "module://matplotlib_inline.backend_inline"  # what Jupyter shows; set here, never inside a notebook
# prism_plan.units is public too: the number formatters every prism-plan output shares (ms, %, GiB, MB/token)
PUBLIC = set(prism_plan.__all__) | {"units"}


def code_problems(source: str, matplotlib_names: set[str]) -> list[str]:
    """What a tutorial's code cell must not do: import prism_plan internals (anything but the names the package
    exports and prism_plan.units), or choose a matplotlib backend (the runner does). matplotlib_names: the names
    the notebook binds to the matplotlib module."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prism_plan":
            if node.module == "prism_plan":
                problems += [f"from prism_plan import {a.name}: not exported" for a in node.names
                             if a.name not in PUBLIC]
            elif node.module != "prism_plan.units":
                problems.append(f"from {node.module} import ...: an internal module")
        elif isinstance(node, ast.Import):
            problems += [f"import {a.name}: an internal module" for a in node.names
                         if a.name.startswith("prism_plan.") and a.name != "prism_plan.units"]
        elif isinstance(node, ast.ImportFrom) and node.module == "matplotlib" and \
                any(a.name == "use" for a in node.names):
            problems.append("from matplotlib import use: chooses a backend")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "prism_plan" and node.attr not in PUBLIC:
                problems.append(f"prism_plan.{node.attr}: not exported")
            if (node.value.id in matplotlib_names and node.attr == "use") or node.attr == "switch_backend":
                problems.append(f"{node.value.id}.{node.attr}: chooses a backend")
    return problems


def matplotlib_aliases(sources: list[str]) -> set[str]:
    """The names bound to the matplotlib module anywhere in the notebook: `import matplotlib as x` binds x,
    `import matplotlib.pyplot` binds matplotlib."""
    names = set()
    for node in (n for s in sources for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Import)):
        for a in node.names:
            if a.name == "matplotlib" or (a.name.startswith("matplotlib.") and a.asname is None):
                names.add(a.asname or "matplotlib")
    return names


def tutorial_problems(nb) -> list[str]:
    """Why a committed notebook is not a tutorial: outputs or execution counts kept, a code cell without a
    markdown cell before it, or code that code_problems refuses."""
    problems = []
    cells = nb.cells
    code = [c.source for c in cells if c.cell_type == "code"]
    names = matplotlib_aliases(code)
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            problems.append(f"cell {i}: committed with outputs")
        if i == 0 or cells[i - 1].cell_type != "markdown":
            problems.append(f"cell {i}: no markdown cell before it says what it does")
        problems += [f"cell {i}: {p}" for p in code_problems(cell.source, names)]
    return problems


def output_problems(nb) -> list[str]:
    """Why an executed notebook's outputs do not read as a tutorial's: a cell's value shown as a bare repr (a
    float, a dict, matplotlib's `Text(...)`) instead of a table or a figure, or anything written to stderr."""
    problems = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "execute_result" and not {"text/html", "image/png"} & set(out.data):
                problems.append(f"cell {i}: shows a bare value {out.data.get('text/plain', '')[:60]!r}")
            if out.output_type == "stream" and out.name == "stderr":
                problems.append(f"cell {i}: writes to stderr: {out.text[:120]!r}")
    return problems


def test_there_are_four_tutorials():
    assert [p.stem for p in NOTEBOOKS] == ["01-quickstart", "02-locality", "03-migration", "04-serving-export"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_tutorial_committed_clean(path):
    assert tutorial_problems(nbformat.read(path, as_version=4)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_inline_figures_and_tables(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", INLINE)  # the kernel inherits it, whatever backend the caller had set
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the files a notebook writes land where pytest cleans up
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure came out"
    assert any("text/html" in o.get("data", {}) for o in outputs), "no table came out"
    assert output_problems(nb) == []


def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(s) if kind == "md" else nbformat.v4.new_code_cell(s)
                for kind, s in cells]
    return nb


def test_the_checks_refuse_what_the_old_notebooks_did():
    old = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
           "from prism_plan.traces.tables import build_tables\nfrom prism_plan import load_trace, get_objective\n"
           "import prism_plan.placement.simulator\nplt.switch_backend('agg')\n")
    problems = code_problems(old, matplotlib_aliases([old]))
    assert len(problems) == 5
    assert any("matplotlib.use" in p for p in problems) and any("switch_backend" in p for p in problems)
    assert any("prism_plan.traces.tables" in p for p in problems) and any("get_objective" in p for p in problems)
    for source in ("import matplotlib as mpl\nmpl.use('Agg')", "import matplotlib.pyplot\nmatplotlib.use('Agg')"):
        assert len(code_problems(source, matplotlib_aliases([source]))) == 1, source
    good = ("import prism_plan\nfrom prism_plan import DATA_DIR, load_trace\nfrom prism_plan.units import percent\n"
            "prism_plan.simulate\nplt.show()")
    assert code_problems(good, set()) == []

    nb = _notebook(("md", "# title"), ("code", "x = 1"), ("code", "x"))
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1")]
    assert tutorial_problems(nb) == ["cell 1: committed with outputs", "cell 2: no markdown cell before it says what "
                                     "it does"]
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "Text(0.5, 1.0, 'x')"}),
                           nbformat.v4.new_output("stream", name="stderr", text="FutureWarning")]
    assert len(output_problems(nb)) == 2
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "df", "text/html": "<table>"})]
    assert output_problems(nb) == []
