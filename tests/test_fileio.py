"""Outputs as one transaction: temporaries renamed together only on success; an error removes every temporary
and every folder the run created, and leaves existing files as they were."""

from __future__ import annotations

import json

import pytest

from prism_plan.errors import PrismError
from prism_plan.fileio import atomic_path, check_distinct, check_output, MANIFEST, transaction, write_text_atomic


def test_outputs_appear_together_at_the_end(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with transaction():
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "sub" / "b.txt", "new b")
        assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "sub" / "b.txt").exists()
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "sub" / "b.txt").read_text() == "new b"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.txt", "sub"]


def test_a_failure_leaves_everything_as_it_was(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(KeyboardInterrupt):
        with transaction():
            write_text_atomic(tmp_path / "a.txt", "new a")
            write_text_atomic(tmp_path / "new" / "deeper" / "b.txt", "new b")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def test_a_folder_output_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "win"
    for names in (["w0", "w1", "w2"], ["w0"]):
        with atomic_path(out, folder=True) as tmp:
            for n in names:
                write_text_atomic(tmp / n, n)
            write_text_atomic(tmp / MANIFEST, json.dumps({"format": "prism-plan/windows", "windows": names}))
        assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["win"]


@pytest.mark.parametrize("manifest", [None, '{"name": "another program"}',
                                      '{"format": "prism-plan/windows", "windows": ["w0"]}'])
def test_a_folder_of_other_files_is_never_replaced(tmp_path, manifest):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    if manifest is not None:
        (tmp_path / "mine" / MANIFEST).write_text(manifest)
    with pytest.raises(PrismError, match="did not write"):
        with atomic_path(tmp_path / "mine", folder=True):
            pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_outputs_are_checked_before_any_work(tmp_path):
    (tmp_path / "in.json").write_text("{}")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PrismError, match="is also an input"):
        check_distinct([tmp_path / "in.json"], [tmp_path / "x" / ".." / "in.json"])
    with pytest.raises(PrismError, match="two outputs"):
        check_distinct([], [tmp_path / "o.json", tmp_path / "." / "o.json"])
    with pytest.raises(PrismError, match="is a folder"):
        check_output(tmp_path / "folder")
    with pytest.raises(PrismError, match="is a file"):
        check_output(tmp_path / "in.json", folder=True)
    with pytest.raises(PrismError, match="is a file"):
        check_output(tmp_path / "in.json" / "o.json")
    with pytest.raises(PrismError, match="too long"):
        check_output(tmp_path / ("x" * 300))
