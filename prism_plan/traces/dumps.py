"""Reading the files other tools write: folders of dumps, torch files, numpy files, JSON lines, and the arrays of
exact JSON integers or finite numbers they hold (scalars are checked with prism_plan.placement.checks)."""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.fileio import DuplicateKeyError, no_duplicate_keys

TORCH_INSTALL = "pip install 'prism-plan[torch]'"
INT64_MAX = 2 ** 63 - 1


def dump_files(src: Path, patterns: tuple[str, ...], what: str = "dump") -> list[Path]:
    """`src` itself, or the files in folder `src` matching one of the glob `patterns`, sorted."""
    if src.is_dir():
        files = sorted({p for pattern in patterns for p in src.glob(pattern) if not p.is_dir()})
        if not files:
            raise PrismError(f"{src} holds no {' or '.join(patterns)} {what} files")
        return files
    if not src.exists():
        raise MissingInputError(f"no {what} file at {src}")
    return [src]


def reason(e: BaseException, empty: str = "") -> str:
    """The gist of a library's exception for a one-line message: its first sentence of its first line (`empty`,
    else the exception's type, when it says nothing)."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else empty or type(e).__name__


def read_error(path: Path, what: str, e: OSError) -> PrismError:
    """The one-line error for an input file that cannot be opened."""
    if isinstance(e, FileNotFoundError):
        return MissingInputError(f"no {what} at {path}")
    if isinstance(e, IsADirectoryError):
        return PrismError(f"{path} is a folder; give the {what} itself")
    return PrismError(f"cannot read {what} {path}: {e.strerror or e}; check the path and its permissions")


class JsonLine(NamedTuple):
    """One line of a JSONL file: where it is ("<path> line <n>"), its parsed value and its text."""

    where: str
    value: object
    text: str


def json_lines(path: Path, what: str) -> Iterator[JsonLine]:
    """Each non-empty line of a JSONL file; one clear error for a missing file, bytes that are not UTF-8 or a
    line that is not JSON."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise read_error(path, what, e)
    with f:
        for no, raw in enumerate(f, 1):
            where = f"{path} line {no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrismError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"save the {what} as UTF-8")
            if not line.strip():
                continue
            try:
                value = json.loads(line, object_pairs_hook=no_duplicate_keys)
            except json.JSONDecodeError as e:
                raise PrismError(f"{where}: invalid JSON ({e.msg}); write one JSON object per line")
            except DuplicateKeyError as e:
                raise PrismError(f"{where} {e}")
            yield JsonLine(where, value, line)


def _holds_bool(value: object) -> bool:
    return isinstance(value, bool) or isinstance(value, list) and any(_holds_bool(v) for v in value)


def json_ints(value: object, name: str, line: JsonLine) -> np.ndarray:
    """`value` (a number or nested lists, from `line`) as an integer array; floats, strings, bools, nulls,
    ragged lists and integers beyond int64 are refused."""
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        arr = None
    # numpy turns bools mixed with ints into ints: look for them only on lines whose text has one
    bools = arr is not None and ("true" in line.text or "false" in line.text) and _holds_bool(value)
    if arr is not None and not arr.size:
        return arr.astype(np.int64)  # an empty list: no values to be wrong
    if arr is None or arr.dtype.kind not in "iu" or bools:
        raise PrismError(f"{line.where}: `{name}` must hold integers only (no floats, strings, bools or nulls, "
                         f"nothing beyond int64), got {json.dumps(value)[:60]}")
    return arr


def json_numbers(value: object, name: str, line: JsonLine) -> np.ndarray:
    """`value` (nested lists, from `line`) as a float64 array of finite numbers."""
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        arr = None
    bools = arr is not None and ("true" in line.text or "false" in line.text) and _holds_bool(value)
    if arr is None or arr.dtype.kind not in "iuf" or bools:
        raise PrismError(f"{line.where}: `{name}` must hold numbers only, got {json.dumps(value)[:60]}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise PrismError(f"{line.where}: `{name}` holds {arr[~np.isfinite(arr)][0]}; every value must be finite")
    return arr


def _numpy_why(e: BaseException) -> str:
    """Why numpy could not read bytes as its file format, for a message."""
    if isinstance(e, EOFError):
        return "it is empty or cut short"
    if "allow_pickle" in str(e) or "pickled" in str(e):  # numpy's guess for bytes it does not know
        return "it holds Python objects or bytes numpy does not read as arrays"
    return reason(e)


def _numpy_error(path: Path, what: str, fix: str, e: BaseException) -> PrismError:
    if isinstance(e, OSError) and not isinstance(e, zipfile.BadZipFile):
        return read_error(path, what, e)
    return PrismError(f"{path} is not a {what} ({_numpy_why(e)}); {fix}")


# What numpy raises for bytes that are not (or no longer) its file format; pickles are never loaded.
_NUMPY_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _np_load(path: Path, what: str, fix: str) -> np.ndarray | np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except _NUMPY_ERRORS as e:
        raise _numpy_error(path, what, fix, e)


def read_npy(path: Path, what: str, fix: str) -> np.ndarray:
    """The array in a `.npy` file; a PrismError naming `what` it should be and `fix` otherwise."""
    arr = _np_load(path, what, fix)
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise PrismError(f"{path} is a .npz archive, not a {what}; {fix}")
    return arr


def npy_bytes(data: bytes, where: str, fix: str) -> np.ndarray:
    """The array in the bytes of a `.npy` file (pickles refused); a PrismError naming `where` and `fix` otherwise."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except _NUMPY_ERRORS as e:
        raise PrismError(f"{where} is not a .npy array ({_numpy_why(e)}); {fix}")
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise PrismError(f"{where} is a .npz archive, not a .npy array; {fix}")
    return arr


def read_npz(path: Path, what: str, fix: str) -> dict[str, np.ndarray]:
    """name -> array of a `.npz` file; a PrismError naming `what` it should be and `fix` otherwise."""
    z = _np_load(path, what, fix)
    if isinstance(z, np.ndarray):
        raise PrismError(f"{path} is a single .npy array, not a {what}; {fix}")
    with z:
        try:
            return {k: z[k] for k in z.files}
        except _NUMPY_ERRORS as e:  # a member cut short or damaged
            raise _numpy_error(path, what, fix, e)


def load_torch_file(path: Path) -> object:
    """A `.pt` file's content with tensors turned into numpy arrays (tensors only: no code is unpickled)."""
    try:
        import torch
    except ImportError:
        raise PrismError(f"{path} is a torch file; reading it needs torch: {TORCH_INSTALL}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise read_error(path, "dump file", e)
    except Exception as e:  # torch raises many kinds for a file that is not its own
        raise PrismError(f"{path} is not a readable torch file ({type(e).__name__}: "
                         f"{reason(e, 'the file is empty or cut short')}); give the .pt file the tool wrote")

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            try:
                return x.numpy()
            except (TypeError, RuntimeError):  # bfloat16, sparse, quantized: no numpy form
                raise PrismError(f"{path} holds a {x.dtype} tensor numpy cannot read; routing dumps hold "
                                 f"integer ids or counts")
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [to_numpy(v) for v in x]
        return x
    return to_numpy(obj)
