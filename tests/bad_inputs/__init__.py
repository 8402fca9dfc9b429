"""The bad-input table: each case runs one `prism-plan` command over a folder holding copies of the bundled tiny
files (cluster.toml, plan-0.json, plan-1.json, moves-1.json, tables-0.npz, tables-1.npz, trace.parquet,
prompts.jsonl, model/) and whatever its `setup` writes there, and must end in exit 2 with one `error:` line,
no traceback, no numpy warning, and the folder exactly as it was (nothing written, nothing changed).

The cases live in one module per area (`traces`, `files`, `flags`, `outputs`); `tests/test_bad_input.py` runs
them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    """args: the command's arguments, where "{d}" stands for the case's folder; setup(d) writes the bad files;
    says: a piece the error line must hold (what is wrong, or how to fix it)."""

    name: str
    args: tuple[str, ...]
    says: str
    setup: Callable[[Path], None] | None = None


def writes(name: str, content: str | bytes) -> Callable[[Path], None]:
    """A setup that writes `content` (text as UTF-8) to the file `name` in the case's folder."""
    def setup(d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def edits(name: str, old: str, new: str) -> Callable[[Path], None]:
    """A setup that replaces `old` (which must be there) by `new` in the bundled text file `name`."""
    def setup(d: Path) -> None:
        path = d / name
        text = path.read_text()
        assert old in text, f"{old!r} is not in {name}"
        path.write_text(text.replace(old, new, 1))
    return setup
