"""Every case of the bad-input table (tests/bad_inputs/) exits 2 with one `error:` line and leaves its folder
exactly as it was: no traceback, no warning, no output written, no input or existing file changed, no temporary
left behind."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import shutil
import warnings
from pathlib import Path

import pytest

import bad_inputs
from prism_plan.cli import main
from prism_plan.fileio import DATA_DIR

TINY = DATA_DIR / "tiny"
CASES = [case for info in pkgutil.iter_modules(bad_inputs.__path__)
         for case in importlib.import_module(f"bad_inputs.{info.name}").CASES]


def snapshot(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `d` (folders as "dir")."""
    return {str(p.relative_to(d)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))}


def test_the_table_is_large_and_names_are_unique():
    assert len(CASES) >= 150
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    d = tmp_path / "case"
    shutil.copytree(TINY, d)
    if case.setup is not None:
        case.setup(d)
    monkeypatch.chdir(d)
    before = snapshot(d)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code = main([a.format(d=d) for a in case.args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.says.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err and out == ""
    assert snapshot(d) == before
