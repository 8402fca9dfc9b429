"""README.md's command blocks run as written, in order, in a fresh copy of the project (the files a clone holds),
the way a new user runs them after the install line: every ```bash block command by command, every ```python
block as a script, every ```toml block loaded as a cluster file.

A comment line right under a command that starts with `# wrote`, `# start`, `# note:` or `# error:` is output the
README promises: it must appear in what the command prints (`...` stands for any text), and `# error:` means the
command must fail with exit code 2. `pip install` steps are checked against the package's extras and skipped (the
test environment has them); the test command itself is what runs this test."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prism_plan.placement.cluster import load_cluster

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PROMISE = re.compile(r"#\s+((?:wrote|start|note:|error:).*)")
INSTALL = re.compile(r"pip install (\S+)")
TEST_COMMAND = "python3 -m pytest -q"


def readme_blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README) if kind == lang]


def shell_commands(block: str) -> list[tuple[str, list[str]]]:
    """(command, promised output lines) in the order of the block; continuation lines joined."""
    commands: list[tuple[str, list[str]]] = []
    pending = ""
    for line in block.splitlines():
        if pending:
            pending += " " + line.strip()
        elif line.lstrip().startswith("#"):
            promise = PROMISE.match(line.strip())
            if promise and commands:
                commands[-1][1].append(promise.group(1))
            continue
        elif line.strip():
            pending = line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        elif pending:
            commands.append((pending, []))
            pending = ""
    return commands


def extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return set(config["options.extras_require"])


def without_installs(command: str) -> str:
    """The command with its `pip install X &&` steps checked and dropped ('' when nothing else is left)."""
    parts = [p.strip() for p in command.split("#")[0].split("&&")]
    for p in parts:
        m = INSTALL.fullmatch(p)
        if m:
            extra = re.fullmatch(r"'?\.(?:\[(\w+)\])?'?", m.group(1))
            assert extra, f"README installs something other than this package: {p}"
            assert extra.group(1) in extras() | {None}, f"README installs an extra pyproject.toml lacks: {p}"
    rest = [p for p in parts if not INSTALL.fullmatch(p)]
    return " && ".join(rest)


def promised_in(promise: str, said: str) -> bool:
    """Whether `said` holds the promised line, each `...` standing for any text."""
    at = 0
    for piece in filter(None, (" ".join(x.split()) for x in promise.split("..."))):
        at = said.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return True


def fresh_copy(dest: Path) -> Path:
    """The project's files as a clone has them (tracked, plus new files git does not ignore)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a clone holds")
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_readme_blocks_are_found():
    shell = [c for b in readme_blocks("bash") for c, _ in shell_commands(b)]
    assert shell[0].startswith("pip install . && prism-plan quickstart")
    assert TEST_COMMAND in shell[1]
    assert len(shell) > 20 and readme_blocks("python") and readme_blocks("toml")
    # the command CI runs is the README's
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith(f"pip install '.[test]' && {TEST_COMMAND}")


def test_every_readme_block_runs_verbatim(tmp_path):
    work = fresh_copy(tmp_path / "clone")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               COLUMNS="120")
    ran = 0
    for block in readme_blocks("bash"):
        for command, promised in shell_commands(block):
            command = without_installs(command)
            if not command or command.split("#")[0].strip() == TEST_COMMAND:
                continue
            res = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                 timeout=900)
            said = " ".join((res.stdout + res.stderr).split())
            failing = any(p.startswith("error:") for p in promised)
            assert res.returncode == (2 if failing else 0), f"{command}\n{res.stdout}\n{res.stderr}"
            for p in promised:
                assert promised_in(p, said), f"{command}: {p!r} not in\n{said}"
            ran += 1
    for i, script in enumerate(readme_blocks("python")):
        (work / f"readme_{i}.py").write_text(script)
        res = subprocess.run([sys.executable, f"readme_{i}.py"], cwd=work, env=env, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, f"python block {i}:\n{script}\n{res.stderr}"
    for i, text in enumerate(readme_blocks("toml")):
        (work / f"readme_{i}.toml").write_text(text)
        assert load_cluster(work / f"readme_{i}.toml").num_servers >= 1
    assert ran > 20
