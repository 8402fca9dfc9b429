"""Reading users' files with clear errors, and writing outputs so that nothing is ever half written or lost.

Every output goes to a temporary name in its target's folder. Outside a transaction the temporary is renamed
over the target as soon as it is complete; inside one (`transaction()`, which the CLI opens around each verb)
every rename waits until the whole run succeeded, and a failure or an interrupt removes every temporary and every
folder the run created, leaving existing files as they were.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from prism_plan.errors import MissingInputError, PrismError

# Files that ship with the package (the quickstart's trace and cluster, the tiny executor example).
DATA_DIR = Path(__file__).resolve().parent / "data"
# A folder of outputs written as one (a window set) holds this file naming them, so that a later run knows the
# folder is its own to replace.
MANIFEST = "manifest.json"


def _same(a: Path, b: Path) -> bool:
    """True when `a` and `b` name the same file (through links, `..` or a second name of the same inode)."""
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _inside(path: Path, folder: Path) -> bool:
    """True when `path` lies somewhere under `folder`."""
    return folder.resolve() in path.resolve().parents


def _write_error(target: Path, e: OSError) -> PrismError:
    """The one-line error for an output that cannot be written."""
    fix = {errno.ENAMETOOLONG: "use a shorter name", errno.EACCES: "choose a folder you can write",
           errno.EPERM: "choose a folder you can write", errno.EROFS: "choose a writable file system",
           errno.ENOSPC: "free some space or write elsewhere", errno.ENOTDIR: "a part of the path is a file"}
    return PrismError(f"cannot write {target}: {e.strerror or e}; {fix.get(e.errno, 'choose another output path')}")


def _exists(path: Path) -> bool:
    """Path.exists, False also for a name the file system refuses (too long, say)."""
    try:
        return path.exists()
    except OSError:
        return False


def _writable_ancestor(target: Path) -> Path:
    """The nearest existing folder above `target`; a PrismError when a file stands in the way."""
    parent = target.parent
    while not _exists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise PrismError(f"cannot write {target}: {parent} is a file, not a folder; choose another output path")
    return parent


def check_output(target: str | os.PathLike, *, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file is wanted (or the
    reverse), a name too long, a folder without write permission."""
    target = Path(target)
    ancestor = _writable_ancestor(target)
    name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    for part in target.relative_to(ancestor).parts if target.is_relative_to(ancestor) else target.parts:
        if len(os.fsencode(part)) + 16 > name_max:  # the names to create, with room for a temporary's affixes
            raise PrismError(f"cannot write {target}: the name {part[:24]}... is too long; use a shorter name")
    if not folder and target.is_dir():
        raise PrismError(f"{target} is a folder; name a file to write")
    if folder and target.exists() and not target.is_dir():
        raise PrismError(f"{target} is a file; name a folder to write into")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PrismError(f"cannot write {target}: {ancestor} is not writable; choose a folder you can write")


def check_distinct(inputs: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike]) -> None:
    """Refuse, before any work, an output that is one of the inputs, an existing file inside an input folder, or
    another output."""
    inputs = [Path(p) for p in inputs if p is not None]
    outputs = [Path(p) for p in outputs if p is not None]
    for i, out in enumerate(outputs):
        for other in outputs[:i]:
            if _same(out, other):
                raise PrismError(f"{out} is named as two outputs; give each output its own path")
        for src in inputs:
            if _same(out, src):
                raise PrismError(f"the output {out} is also an input; write to another path (inputs are never "
                                 f"overwritten)")
            if _exists(out) and src.is_dir() and _inside(out, src):
                raise PrismError(f"the output {out} is a file of the input folder {src}; write to another path "
                                 f"(inputs are never overwritten)")


@dataclass
class Transaction:
    """The outputs of one run: (temporary, target) pairs renamed together by `commit`, and the folders the run
    created, removed with every temporary by `rollback`."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)
    committed: bool = False

    def make_parents(self, target: Path, *, folder: bool = False) -> None:
        """Create the missing folders above `target` (and `target` itself when `folder`), remembering them for a
        rollback."""
        needed = target if folder else target.parent
        missing = [p for p in [*reversed(needed.parents), needed] if not _exists(p)]
        try:
            needed.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(target, e)
        self.created.extend(missing)

    def probe(self, target: Path, *, folder: bool = False) -> None:
        """Prove before the work starts that `target` (a file, or a folder of files when `folder`) can be
        written: make the folders it needs (a rollback removes them) and a file where it will go."""
        self.make_parents(target, folder=folder)
        where = target if folder else target.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=".prism-plan-probe.", dir=where)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise _write_error(target, e)

    def commit(self) -> None:
        """Rename every temporary over its target (later ones first, so files written into a temporary folder
        land before the folder does); SIGINT and SIGTERM wait until all are in place."""
        with _signals_held():
            for tmp, target in reversed(self.renames):
                try:
                    _replace(tmp, target)
                except OSError as e:
                    self.rollback()
                    raise _write_error(target, e)
            self.committed = True

    def rollback(self) -> None:
        """Remove every temporary and the folders the run created (if nothing else was put there); a second
        Ctrl-C waits until that is done."""
        with _signals_held():
            for tmp, _ in self.renames:
                _remove(tmp)
            for folder in reversed(self.created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM recorded instead of handled, then handle the first one that came.
    (Blocking them with pthread_sigmask holds them only for this thread; Python runs its handlers in the main
    thread whichever thread the kernel picks, and pyarrow and BLAS start threads.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: came.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if came:
        signal.raise_signal(came[0])


def _our_folder(folder: Path) -> bool:
    """True when `folder` holds exactly what a window set of prism-plan's holds: its manifest (format
    prism-plan/windows) and the files that manifest lists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = set(manifest["windows"]) | {MANIFEST}
        return manifest.get("format") == "prism-plan/windows" and {p.name for p in folder.iterdir()} == listed
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _replace(tmp: Path, target: Path) -> None:
    """Put `tmp` (a file or a folder) where `target` is; an old folder at `target` goes only once the new one
    is in place."""
    if not tmp.is_dir() or not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(tmp, target)
    shutil.rmtree(old)


def _remove(path: Path) -> None:
    """Delete a file or folder that may already be gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_OPEN: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("prism_plan_transaction", default=None)


@contextlib.contextmanager
def transaction(*, own: bool = False) -> Iterator[Transaction]:
    """Hold back every output written in the block until it ends without error, then rename them all; on any
    error or interrupt remove them, leaving existing files untouched. Inside an open transaction, join it,
    unless `own`."""
    if _OPEN.get() is not None and not own:
        yield _OPEN.get()
        return
    tx = Transaction()
    token = _OPEN.set(tx)
    try:
        yield tx
        tx.commit()
    except BaseException:
        if not tx.committed:
            tx.rollback()
        raise
    finally:
        _OPEN.reset(token)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, folder: bool = False,
                inputs: Iterable[str | os.PathLike] | None = None, now: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a folder when `folder`) next to `target`; once the block succeeds it replaces
    `target` (at the end of the open transaction, if there is one, unless `now`: state that must outlive an
    interrupted run, like a journal); on error it is deleted. A folder replaces `target` whole: it must not
    hold any of `inputs`, nor files some other program put there."""
    target = Path(target)
    check_output(target, folder=folder)
    if folder and target.is_dir() and any(target.iterdir()) and not _our_folder(target):
        raise PrismError(f"{target} holds files prism-plan did not write there; name a new or empty folder")
    if folder and inputs is not None:
        for src in inputs:
            if target.is_dir() and _inside(Path(src), target):
                raise PrismError(f"the output folder {target} holds the input {src}; write to another folder")
    with transaction(own=now) as tx:
        tx.make_parents(target)
        with _signals_held():  # so that no temporary exists unregistered
            try:
                if folder:
                    tmp_path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
                else:
                    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                    os.close(fd)
                    tmp_path = Path(tmp)
            except OSError as e:
                raise _write_error(target, e)
            tx.renames.append((tmp_path, target))
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp and mkdtemp make 0600 and 0700; give the output the permissions open() and mkdir() would
        os.chmod(tmp_path, (0o777 if folder else 0o666) & ~umask)
        try:
            yield tmp_path
        except BaseException:
            _remove(tmp_path)
            tx.renames.remove((tmp_path, target))
            raise


def write_text_atomic(target: str | os.PathLike, text: str, *, now: bool = False) -> None:
    """Write `text` (UTF-8) to `target` atomically (see `atomic_path` for `now`)."""
    with atomic_path(target, now=now) as tmp:
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


class DuplicateKeyError(PrismError):
    """A JSON object that gives one key twice (json keeps the last silently); the message reads after a path."""


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """An `object_pairs_hook` for json.loads: the object's dict, or a DuplicateKeyError."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKeyError(f"gives the key {key!r} twice in one object; keep one")
    return d


def read_user_json(path: str | os.PathLike, what: str, error: type[PrismError] = PrismError) -> object:
    """The parsed JSON of a file the user named; `error` (one line) when it is missing, not JSON, or gives a key
    twice."""
    text = read_user_text(path, what)
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
    except DuplicateKeyError as e:
        raise error(f"{path} {e}")
    except RecursionError:
        raise error(f"{path} nests too deeply; it is not a {what}")


def check_header(d: object, fmt: str, version: int, what: str, where: str, error: type[PrismError],
                 redo: str) -> None:
    """Raise `error` unless `d` is a dict with "format": fmt and "version": version; `what` names the kind of
    document, `redo` how to make a current one."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise error(f"{where} is not a prism-plan {what} (no \"format\": \"{fmt}\")")
    if d.get("version") != version or isinstance(d.get("version"), bool):
        raise error(f"{where} has {what} version {d.get('version')!r}; this prism-plan reads version {version}: "
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
