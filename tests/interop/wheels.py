"""The serving systems' own code, taken from their wheels on the package registry, for the interop tests.

`pip download --no-deps` fetches each wheel once into a cache folder (PRISM_INTEROP_WHEELS, default
~/.cache/prism-plan/wheels); its Python files are unpacked beside it. Importing a package's `__init__` would pull
in a whole server, so `real_modules` registers empty parent packages and runs only the module files a test
names, with the test's own small stand-ins for the server-side modules they import.

Run as a script to fetch every wheel (what `.ci/run` does before the tests). With PRISM_INTEROP=require (set
by `.ci/run`) a wheel that cannot be fetched fails the tests; otherwise they skip.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Iterator

# distribution name in the wheel's file name -> (requirement, extra `pip download` arguments)
WHEELS = {
    "sglang": ("sglang==0.5.23", ()),
    "vllm": ("vllm==0.33.0", ()),
    # 0.23.0.post1 is source-only and needs triton-ascend to build; 0.23.0 has the same static-map loader
    "vllm_ascend": ("vllm-ascend==0.23.0", ()),
    # its wheels need Python >= 3.12; the router tracer is pure Python and loads under 3.11
    "megatron_core": ("megatron-core==0.19.2", ("--python-version", "3.12")),
}
CACHE = Path(os.environ.get("PRISM_INTEROP_WHEELS", Path.home() / ".cache" / "prism-plan" / "wheels"))


class WheelUnavailable(RuntimeError):
    """A wheel could not be fetched from the package registry."""


def wheel(dist: str) -> Path:
    """The cached wheel of `dist` (a key of WHEELS), fetched with `pip download --no-deps` when missing."""
    requirement, extra = WHEELS[dist]
    version = requirement.split("==")[1]
    found = sorted(CACHE.glob(f"{dist}-{version}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *extra,
                          "-d", str(CACHE), requirement], capture_output=True, text=True)
    found = sorted(CACHE.glob(f"{dist}-{version}-*.whl"))
    if run.returncode or not found:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise WheelUnavailable(f"pip download {requirement} failed: {tail[0]}")
    return found[0]


def source(dist: str) -> Path:
    """The folder holding the unpacked Python files of `dist`'s wheel (unpacked once)."""
    whl = wheel(dist)
    root = CACHE / "src" / whl.stem
    done = root / ".unpacked"
    if not done.exists():
        with zipfile.ZipFile(whl) as z:
            z.extractall(root, [n for n in z.namelist() if n.endswith(".py")])
        done.touch()
    return root


def stand_in(name: str, **attrs) -> types.ModuleType:
    """A module `name` holding `attrs`: a test's stand-in for a server-side import."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@contextlib.contextmanager
def real_modules(dist: str, *modules: str, stand_ins: tuple[types.ModuleType, ...] = (),
                 packages: tuple[str, ...] = ()) -> Iterator[dict[str, types.ModuleType]]:
    """Import `modules` (dotted names) from `dist`'s wheel; yield {name: module}.

    The parents of every module, and `packages`, are registered as empty packages over the wheel's folders,
    so no `__init__.py` runs; `stand_ins` replace the modules of the same names. On exit the wheel's modules
    and the stand-ins leave sys.modules, so nothing leaks into other tests."""
    root = source(dist)
    names = set(packages)
    for dotted in modules:
        parts = dotted.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    saved = dict(sys.modules)
    try:
        for m in stand_ins:
            sys.modules[m.__name__] = m
        for name in sorted(names, key=lambda n: n.count(".")):
            if name in sys.modules and name not in saved:
                continue
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")))]
            package.__package__ = name
            sys.modules[name] = package
        importlib.invalidate_caches()
        yield {dotted: importlib.import_module(dotted) for dotted in modules}
    finally:
        # only the wheel's modules and the stand-ins go: a library imported lazily meanwhile (numba loads its
        # parts on first compile, and registers them once per process) must stay
        roots = {n.split(".")[0] for n in names | {m.__name__ for m in stand_ins}}
        for name in set(sys.modules) - set(saved):
            if name.split(".")[0] in roots:
                del sys.modules[name]
        sys.modules.update(saved)


def require_or_skip(dist: str) -> Path:
    """source(dist), or a pytest skip (a failure with PRISM_INTEROP=require) when the wheel cannot be fetched."""
    import pytest

    try:
        return source(dist)
    except WheelUnavailable as e:
        if os.environ.get("PRISM_INTEROP") == "require":
            pytest.fail(str(e))
        pytest.skip(str(e))


if __name__ == "__main__":
    for name in WHEELS:
        print(f"{name}: {source(name)}")
