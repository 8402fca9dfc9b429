"""Reading users' files with clear errors, and atomic writes: a temp file in the target's folder, then a
rename, so readers never see half a file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from prism_plan.errors import MissingInputError, PrismError

# Files that ship with the package (the quickstart's trace and cluster, the tiny executor example).
DATA_DIR = Path(__file__).resolve().parent / "data"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it over `target`, on error delete it."""
    target = Path(target)
    if target.is_dir():
        raise PrismError(f"{target} is a folder; name a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named; a PrismError that names `what` it should be otherwise."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingInputError(f"no {what} at {path}")
    except (OSError, UnicodeDecodeError) as e:
        raise PrismError(f"cannot read {what} {path}: {e}")


def read_user_json(path: str | os.PathLike, what: str, error: type[PrismError] = PrismError) -> object:
    """The parsed JSON of a file the user named; `error` (one line) when it is missing or not JSON."""
    text = read_user_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")


def check_header(d: object, fmt: str, version: int, what: str, where: str, error: type[PrismError],
                 redo: str) -> None:
    """Raise `error` unless `d` is a dict with "format": fmt and "version": version; `what` names the kind of
    document, `redo` how to make a current one."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise error(f"{where} is not a prism-plan {what} (no \"format\": \"{fmt}\")")
    if d.get("version") != version:
        raise error(f"{where} has {what} version {d.get('version')}; this prism-plan reads version {version}: "
                    f"upgrade prism-plan or {redo}")


def bundled_or_given(path: str | os.PathLike, suffix: str) -> Path:
    """`path` itself when it exists or names a folder, else the bundled file it names (`edge-4` is
    DATA_DIR/edge-4.toml for suffix ".toml"), else `path` (whose reader then says it is missing)."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    bundled = DATA_DIR / (path.name if path.suffix == suffix else path.name + suffix)
    return bundled if bundled.is_file() else path


def loaded(value, cls):
    """`value` itself when it is a `cls` (or None), else `cls.load(value)`: what a function does with an argument
    that may be an object or the path of its file."""
    return value if value is None or isinstance(value, cls) else cls.load(value)
