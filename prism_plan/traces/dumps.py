"""Reading the files other tools write: folders of dumps, torch files, JSON lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from prism_plan.errors import PrismError

TORCH_INSTALL = "pip install 'prism-plan[torch]'"


def dump_files(src: Path, patterns: tuple[str, ...], what: str = "dump") -> list[Path]:
    """`src` itself, or the files in folder `src` matching one of the glob `patterns`, sorted."""
    if src.is_dir():
        files = sorted({p for pattern in patterns for p in src.glob(pattern)})
        if not files:
            raise PrismError(f"{src} holds no {' or '.join(patterns)} {what} files")
        return files
    if not src.exists():
        raise PrismError(f"no {what} file at {src}")
    return [src]


def json_lines(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """(where, parsed object) for each non-empty line of a JSONL file; one clear error for a missing file or a
    line that is not JSON."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise PrismError(f"no {what} at {path}")
    with f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise PrismError(f"{where}: invalid JSON ({e.msg})")


def load_torch_file(path: Path) -> object:
    """A `.pt` file's content with tensors turned into numpy arrays (tensors only: no code is unpickled)."""
    try:
        import torch
    except ImportError:
        raise PrismError(f"{path} is a torch file; reading it needs torch: {TORCH_INSTALL}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PrismError(f"no dump file at {path}")
    except Exception as e:  # torch raises many kinds for a file that is not its own
        raise PrismError(f"{path} is not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0]})")

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.numpy()
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [to_numpy(v) for v in x]
        return x
    return to_numpy(obj)
